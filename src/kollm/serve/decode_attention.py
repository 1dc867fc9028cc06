"""One decode step's attention for StaticKV on CUDA, in Triton kernels that also write the cache.

Public API:
    available(head_dim)   whether the kernel can run here (Triton imports, head_dim a power of two)
    decode_attention(q, kv, cache, pos, scale)   see its docstring

Why: StaticKV's portable decode attention is two kernels per layer, an indexed cache write (3.5 us on an H200)
and PyTorch's memory-efficient attention with an additive mask over a length bucket (9.7 us): a quarter of the
349M model's 1.2 ms step at batch 1 (issue #17). These kernels do both, read only the positions each row has
(up to its own position, not the bucket) and need no mask, so one CUDA graph per batch bucket serves every
length. Each program handles all query heads of one kv head (grouped-query attention); see decode_attention.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship no Triton: StaticKV uses its portable attention
    triton = None


def available(head_dim: int) -> bool:
    return triton is not None and 0 < head_dim <= 256 and head_dim & (head_dim - 1) == 0


if triton is not None:

    @triton.jit
    def _tables(Cos, Sin, at, d, D: tl.constexpr, ROTATE: tl.constexpr):
        # the rotary tables' row for one position (zeros, never used, without rotation: nothing is read)
        if ROTATE:
            cos = tl.load(Cos + at + d).to(tl.float32)
            sin = tl.load(Sin + at + d).to(tl.float32)
        else:
            cos = tl.zeros([D], tl.float32)
            sin = tl.zeros([D], tl.float32)
        return cos, sin

    @triton.jit
    def _rotated(ptr, d, rows_at, row_ok, cos, sin, D: tl.constexpr, ROTATE: tl.constexpr):
        # rows at ptr + rows_at[:, None] + d (float32), with the rotary embedding applied if ROTATE:
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2]) as the Llama family computes it
        x = tl.load(ptr + rows_at[:, None] + d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        if ROTATE:
            partner = tl.load(ptr + rows_at[:, None] + ((d + D // 2) % D)[None, :], mask=row_ok[:, None], other=0.0)
            sign = tl.where(d < D // 2, -1.0, 1.0)
            x = x * cos[None, :] + sign[None, :] * partner.to(tl.float32) * sin[None, :]
        return x

    # program (row, kv head, split): split 0 stores the new key and value at the row's position; each split
    # scores its CHUNK of the cached positions before it (online softmax in float32) and stores its running
    # maximum, sum and weighted values for _combine
    @triton.jit
    def _partials(
        Q,
        KV,
        Cache,
        Pos,
        Cos,
        Sin,
        PartM,
        PartL,
        PartAcc,
        stride_qb,
        stride_qh,
        stride_kvb,
        stride_kvs,
        stride_kvh,
        stride_cb,
        stride_cs,
        stride_ch,
        stride_cl,
        stride_rot,
        scale,
        SPLITS: tl.constexpr,
        CHUNK: tl.constexpr,
        GROUPS: tl.constexpr,
        GROUPS_P2: tl.constexpr,
        D: tl.constexpr,
        ROTATE: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        p = tl.load(Pos + row)
        d = tl.arange(0, D)
        g = tl.arange(0, GROUPS_P2)
        base = Cache + row * stride_cb + head * stride_ch
        cos, sin = _tables(Cos, Sin, p * stride_rot, d, D, ROTATE)
        one = tl.arange(0, 1)
        if split == 0:
            new = KV + row * stride_kvb + head * stride_kvh
            k_new = _rotated(new, d, one * 0, one == 0, cos, sin, D, ROTATE)  # [1, D]
            tl.store(base + p * stride_cl + d[None, :], k_new.to(Cache.dtype.element_ty))
            tl.store(base + stride_cs + p * stride_cl + d, tl.load(new + stride_kvs + d))
        start = split * CHUNK
        if start < p:
            q_rows = row * stride_qb + (head * GROUPS + g) * stride_qh
            q = _rotated(Q, d, q_rows, g < GROUPS, cos, sin, D, ROTATE) * scale  # [G, D]
            m = tl.full([GROUPS_P2], float("-inf"), tl.float32)
            total = tl.zeros([GROUPS_P2], tl.float32)
            acc = tl.zeros([GROUPS_P2, D], tl.float32)
            for block in range(start, tl.minimum(start + CHUNK, p), BLOCK_L):
                offs = block + tl.arange(0, BLOCK_L)
                ok = offs < p
                at = base + offs[:, None] * stride_cl + d[None, :]
                k = tl.load(at, mask=ok[:, None], other=0.0).to(tl.float32)
                v = tl.load(at + stride_cs, mask=ok[:, None], other=0.0).to(tl.float32)
                s = tl.where(ok[None, :], tl.sum(q[:, None, :] * k[None, :, :], axis=2), float("-inf"))  # [G, BL]
                m_next = tl.maximum(m, tl.max(s, axis=1))
                alpha = tl.exp(m - m_next)
                w = tl.exp(s - m_next[:, None])
                total = total * alpha + tl.sum(w, axis=1)
                acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * v[None, :, :], axis=1)
                m = m_next
            at = (row * tl.num_programs(1) + head) * SPLITS + split
            tl.store(PartM + at * GROUPS_P2 + g, m)
            tl.store(PartL + at * GROUPS_P2 + g, total)
            tl.store(PartAcc + (at * GROUPS_P2 + g)[:, None] * D + d[None, :], acc)

    # program (row, kv head): the new token's score (its key and value from registers, never read back from the
    # cache) merged with the splits that had positions, then normalised
    @triton.jit
    def _combine(
        Q,
        KV,
        Pos,
        Cos,
        Sin,
        PartM,
        PartL,
        PartAcc,
        Out,
        stride_qb,
        stride_qh,
        stride_kvb,
        stride_kvs,
        stride_kvh,
        stride_ob,
        stride_oh,
        stride_rot,
        scale,
        SPLITS: tl.constexpr,
        CHUNK: tl.constexpr,
        GROUPS: tl.constexpr,
        GROUPS_P2: tl.constexpr,
        D: tl.constexpr,
        ROTATE: tl.constexpr,
        SPLIT_BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        p = tl.load(Pos + row)
        d = tl.arange(0, D)
        g = tl.arange(0, GROUPS_P2)
        g_ok = g < GROUPS
        cos, sin = _tables(Cos, Sin, p * stride_rot, d, D, ROTATE)
        q = _rotated(Q, d, row * stride_qb + (head * GROUPS + g) * stride_qh, g_ok, cos, sin, D, ROTATE) * scale
        new = KV + row * stride_kvb + head * stride_kvh
        one = tl.arange(0, 1)
        k_new = _rotated(new, d, one * 0, one == 0, cos, sin, D, ROTATE)  # [1, D], rounded as the cache holds it
        k_new = k_new.to(KV.dtype.element_ty).to(tl.float32)
        v_new = tl.load(new + stride_kvs + d).to(tl.float32)
        m = tl.sum(q * k_new, axis=1)  # [G]: the new token's score is the first running maximum
        total = tl.full([GROUPS_P2], 1.0, tl.float32)
        acc = tl.zeros([GROUPS_P2, D], tl.float32) + v_new[None, :]
        used = (p + CHUNK - 1) // CHUNK
        first = (row * tl.num_programs(1) + head) * SPLITS
        for block in range(0, used, SPLIT_BLOCK):
            sp = block + tl.arange(0, SPLIT_BLOCK)
            ok = sp < used
            at = (first + sp)[:, None] * GROUPS_P2 + g[None, :]  # [S, G]
            pm = tl.load(PartM + at, mask=ok[:, None], other=float("-inf"))
            pl = tl.load(PartL + at, mask=ok[:, None], other=0.0)
            pa = tl.load(PartAcc + at[:, :, None] * D + d[None, None, :], mask=ok[:, None, None], other=0.0)
            m_next = tl.maximum(m, tl.max(pm, axis=0))
            alpha = tl.exp(m - m_next)
            w = tl.exp(pm - m_next[None, :])  # [S, G]
            total = total * alpha + tl.sum(w * pl, axis=0)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * pa, axis=0)
            m = m_next
        out_at = Out + row * stride_ob + (head * GROUPS + g)[:, None] * stride_oh + d[None, :]
        tl.store(out_at, (acc / total[:, None]).to(Out.dtype.element_ty), mask=g_ok[:, None])


def decode_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    cache: torch.Tensor,
    pos: torch.Tensor,
    scale: float,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Any:
    """q [b, heads, D] (the new token's queries), kv [b, 2, kv_heads, D] (its key and value), cache
    [slots >= b, 2, kv_heads, L, D] (one layer), pos [>= b] (each row's position, < L), rotary: the (cos, sin)
    tables [L, D] to rotate q and k by at each row's position (None: q and k come rotated). Writes row r's key
    and value at cache[r, :, :, pos[r]] and returns the attention output [b, heads, D] over positions
    0..pos[r] of slot r.

    Two launches: the cached positions are split into chunks scored in parallel (a decode step has one query
    token per row, too little work for one program per row and head), then one program per row and head merges
    the chunks with the new token (split-K attention, as flash-decoding)."""
    b, heads, dim = q.shape
    kv_heads, length = kv.shape[2], cache.shape[3]
    groups = heads // kv_heads
    groups_p2 = triton.next_power_of_2(groups)
    block = max(16, min(128, triton.next_power_of_2(max(1, 8192 // (groups_p2 * dim)))))
    chunk = max(block, triton.next_power_of_2(triton.cdiv(length, 64)))  # at most 64 splits
    splits = triton.cdiv(length, chunk)
    split_block = max(1, min(triton.next_power_of_2(splits), 8192 // (groups_p2 * dim)))
    assert q.stride(-1) == 1 and kv.stride(-1) == 1 and cache.stride(-1) == 1
    part_m = torch.empty((b, kv_heads, splits, groups_p2), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((b, kv_heads, splits, groups_p2, dim), dtype=torch.float32, device=q.device)
    qs, kvs = (q.stride(0), q.stride(1)), (kv.stride(0), kv.stride(1), kv.stride(2))
    cos, sin = rotary if rotary is not None else (q, q)  # without rotation the tables are never read
    assert cos.stride(-1) == 1 and cos.stride() == sin.stride()
    shape = {
        "SPLITS": splits,
        "CHUNK": chunk,
        "GROUPS": groups,
        "GROUPS_P2": groups_p2,
        "D": dim,
        "ROTATE": rotary is not None,
    }
    _partials[(b, kv_heads, splits)](
        q,
        kv,
        cache,
        pos,
        cos,
        sin,
        part_m,
        part_l,
        part_acc,
        *qs,
        *kvs,
        *cache.stride()[:4],
        cos.stride(0),
        scale,
        **shape,
        BLOCK_L=block,
    )
    out = torch.empty_like(q)
    _combine[(b, kv_heads)](
        q,
        kv,
        pos,
        cos,
        sin,
        part_m,
        part_l,
        part_acc,
        out,
        *qs,
        *kvs,
        out.stride(0),
        out.stride(1),
        cos.stride(0),
        scale,
        **shape,
        SPLIT_BLOCK=split_block,
    )
    return out
