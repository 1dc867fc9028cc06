"""The native engine's KV caches: where a running batch's keys and values live between decode steps.

Public API:
    DynamicKV            Hugging Face's DynamicCache, left-padded: any causal LM transformers can run, any device
    StaticKV             one preallocated cache slot per batch row and kollm's own attention over it; on CUDA each
                         decode step and each prefill is a replayed CUDA graph (one per shape bucket)
    static_kv_unsupported(model)   why StaticKV cannot serve a model (None when it can)
    layer_windows(config)          each layer's sliding window (None: full attention), as transformers applies it

Both keep the rows of the running batch in the order the engine keeps its sequences: `prefill` computes the
first logits of new prompts without touching the batch, `join` adds them, `decode` runs one step for every row
and returns its logits, `advance` feeds the sampled tokens back, `drop(keep)` keeps only the listed rows.
StaticKV also has `decode_greedy`: a step whose rows all take their most likely token, picked and fed back on
the device, so that only each row's token and its log-likelihood come back to the host.

Why StaticKV: a DynamicCache grows by concatenation (the whole cache is copied at every step) and every decode
step launches a few hundred small kernels from Python; on a GPU a 349M model's step is then bound by launch
overhead, not by the GPU (issue #17 measured 70 output tokens/s at batch 1 on an H200). StaticKV writes each new
key and value in place at the row's own position and captures the whole step as a CUDA graph per batch bucket
(at least MIN_DECODE_ROWS rows), so a step is one graph launch. On CUDA the attention is decode_attention's
Triton kernels (cache write, rotary embedding and attention over each row's own length); elsewhere, or for a
head size they do not take, PyTorch's attention over the first `Lb` positions (Lb the smallest length bucket
holding every row; then one graph per batch and length bucket). Prefill is captured too, per bucket of
(prompts, positions): prompts padded to MIN_PROMPT_BUCKET, 32, 64, ... positions, padding rows writing into a
spare slot; a prefill past `prefill_tokens` runs eagerly. StaticKV runs the model's own weights (norms,
projections, MLP, rotary tables) with kollm's own layer code, so it serves the architectures whose layers that
code reproduces (STATIC_KV_MODEL_TYPES): the Llama family (llama, mistral, qwen2, qwen3, sliding windows included),
gemma2 and gemma3 (text) (the (1 + weight) RMSNorm computed in float32, norms after attention and after the MLP,
the embedding scaled by sqrt(hidden) in the model's own embedding module, query_pre_attn_scalar, sliding-window
layers with their own rotary table, gemma2's attention logit soft-capping, the final logit soft-capping;
transformers' Gemma3 applies no attention soft-capping, nor does kollm) and exaone4 (no norm before attention,
norms after attention and after the MLP, q/k norms, sliding-window layers with the rotary embedding and global
layers without it). A sliding-window layer attends to the last `sliding_window` positions (the cache still holds
every position: no ring buffer); such models, and soft-capped ones, decode with PyTorch's attention, not the fused
Triton kernels (those attend to every position before a row's).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kollm.serve import decode_attention, multi_lora

log = logging.getLogger("kollm.serve")

STATIC_KV_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "exaone4")
GEMMA = ("gemma2", "gemma3_text")
MIN_LENGTH_BUCKET = 64
MIN_PROMPT_BUCKET = 16  # prefill graphs: prompt lengths are padded to 16, 32, 64, ... positions
MIN_DECODE_ROWS = 8  # decode graphs: at least 8 rows (cuBLAS picks slower kernels for 1 to 4 rows on an H200)


def static_kv_unsupported(model: Any) -> str | None:
    """None when StaticKV can serve this model, else the reason it cannot (the engine falls back to DynamicKV)."""
    cfg = model.config
    if cfg.model_type not in STATIC_KV_MODEL_TYPES:
        return f"model type {cfg.model_type!r} (StaticKV serves {', '.join(STATIC_KV_MODEL_TYPES)})"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "an unexpected module layout"
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(kinds - {'full_attention', 'sliding_attention'})}"
    return None


def layer_windows(cfg: Any) -> list[int | None]:
    """Each layer's sliding window (None: attends to every position before), as transformers' model computes it."""
    window = getattr(cfg, "sliding_window", None)
    kinds = getattr(cfg, "layer_types", None)
    if cfg.model_type == "mistral" or not kinds:  # mistral: every layer, when the config has a window
        return [window] * cfg.num_hidden_layers
    return [window if k == "sliding_attention" else None for k in kinds]


def step_outputs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, 2] float64 on the device: each row's sampled token (float64 holds every token id exactly) and its
    -log p under the raw logits, so one copy brings both to the host. The NLL is one gather and one logsumexp
    over the vocabulary, small beside the forward pass; a token the model gives no probability counts as 100
    nats (not infinity)."""
    picked = logits.gather(-1, tokens[:, None]).squeeze(-1).float() - logits.float().logsumexp(-1)
    nll = (-picked).nan_to_num(nan=100.0, posinf=100.0).clamp(max=100.0)
    return torch.stack([tokens.double(), nll.double()], dim=1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row (a row of NaN: the first finite maximum, as `sample` picks)."""
    return logits.float().nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float32).max).argmax(-1)


def _greedy_outputs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = greedy(logits)
    return tokens, step_outputs(logits, tokens)


def capture_graph(
    warm: Callable[[], object], run: Callable[[], torch.Tensor], device: torch.device, pool: Any
) -> tuple[Any, torch.cuda.CUDAGraph, torch.Tensor]:
    """`warm()` once on a side stream (the allocator, cuBLAS workspaces and compiling happen there, not inside the
    capture), then `run()` captured as a CUDA graph in the memory pool `pool` (a new pool when None). Returns
    (the pool, the graph, run's output: the tensor each replay writes)."""
    if pool is None:
        pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        warm()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return pool, graph, out


def _buckets(limit: int, start: int) -> list[int]:
    out, n = [], start
    while n < limit:
        out.append(n)
        n *= 2
    return out + [limit]


def _bucket(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


@dataclass(frozen=True)
class _Spec:
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    eps: float
    qk_eps: float
    act: Callable[[torch.Tensor], torch.Tensor]
    rotate: bool = True  # False: _attention_in leaves q and k unrotated (the fused decode attention rotates them)
    gemma_norm: bool = False  # RMSNorm as Gemma: (normed * weight) in float32, weight held as 1 + weight
    softcap: float | None = None  # attention logits: cap * tanh(logits / cap) (gemma2)


def _layer_weights(layer: Any, model_type: str, lora: multi_lora.AdapterBank | None = None) -> tuple[tuple, tuple]:
    """One decoder layer's weights as the argument tuples of _attention_in and _attention_out_and_mlp (plain
    tensors, so a compiled piece sees the same kind of input for every layer), with q/k/v and gate/up each
    concatenated into one matrix multiply. The concatenations are copies: those weights are held twice.

    The norms: (before attention, after attention, before the MLP, after the MLP), None where the architecture
    has none: the Llama family norms before attention and before the MLP (its `post_attention_layernorm`), Gemma
    at all four places, EXAONE 4 after attention and after the MLP only. Gemma's norm weights are held as
    1 + weight in float32 (see _rms).

    With adapters (`lora`), each tuple ends with its projections' LoRA, None where no adapter adapts them: for
    q/k/v and gate/up the bank's B_ext, their concatenated weight then being the bank's W_ext (`_grouped_linear`,
    AdapterBank.group), for o and down the bank's (A_flat, B_flat) (`_lora_linear`)."""
    a, m = layer.self_attn, layer.mlp
    biases = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]
    qkv_bias = torch.cat(biases) if all(b is not None for b in biases) else None
    gate_up_bias = torch.cat([m.gate_proj.bias, m.up_proj.bias]) if m.gate_proj.bias is not None else None
    q_norm = a.q_norm.weight if hasattr(a, "q_norm") else None
    k_norm = a.k_norm.weight if hasattr(a, "k_norm") else None
    qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
    gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight])
    lora_qkv = lora_gate_up = lora_o = lora_down = None
    if lora is not None:
        qkv_ext = lora.group([a.q_proj, a.k_proj, a.v_proj], qkv)
        if qkv_ext is not None:
            qkv, lora_qkv = qkv_ext
        gate_up_ext = lora.group([m.gate_proj, m.up_proj], gate_up)
        if gate_up_ext is not None:
            gate_up, lora_gate_up = gate_up_ext
        lora_o, lora_down = lora.flat(a.o_proj), lora.flat(m.down_proj)
    norms: tuple[torch.Tensor | None, ...]
    if model_type in GEMMA:
        gemma = (
            layer.input_layernorm.weight,
            layer.post_attention_layernorm.weight,
            layer.pre_feedforward_layernorm.weight,
            layer.post_feedforward_layernorm.weight,
        )
        norms = tuple(_gemma_weight(w) for w in gemma)
        q_norm, k_norm = _gemma_weight(q_norm), _gemma_weight(k_norm)
    elif model_type == "exaone4":
        norms = (None, layer.post_attention_layernorm.weight, None, layer.post_feedforward_layernorm.weight)
    else:
        norms = (layer.input_layernorm.weight, None, layer.post_attention_layernorm.weight, None)

    return (
        (norms[0], qkv, qkv_bias, q_norm, k_norm, lora_qkv),
        (
            a.o_proj.weight,
            a.o_proj.bias,
            norms[1],
            norms[2],
            gate_up,
            gate_up_bias,
            m.down_proj.weight,
            m.down_proj.bias,
            norms[3],
            lora_o,
            lora_gate_up,
            lora_down,
        ),
    )


def _gemma_weight(w: torch.Tensor | None) -> torch.Tensor | None:
    return None if w is None else 1.0 + w.detach().float()


def _norm_eps(module: Any) -> float:
    return float(module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps)


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float, gemma: bool = False) -> torch.Tensor:
    """RMSNorm exactly as the model computes it: in float32, scaled in the input's dtype (the Llama family), or
    scaled in float32 by 1 + weight (Gemma; `weight` holds 1 + weight). No weight: x unchanged."""
    if weight is None:
        return x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (xf * weight).to(x.dtype)
    return weight * xf.to(x.dtype)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _lora_linear(h, w, bias, lora, mask):
    """F.linear(h, w, bias), plus with adapters each row's LoRA delta (kollm.serve.multi_lora.lora_delta): lora the
    bank's (A_flat, B_flat) (None: no adapter adapts w), mask [B, 1, C] 1 on each row's adapter slot's columns
    (None: every row runs the base alone)."""
    y = F.linear(h, w, bias)
    if lora is None or mask is None:
        return y
    return y + multi_lora.lora_delta(h, lora, mask)


def _grouped_linear(h, w, bias, b_ext, mask):
    """F.linear(h, w, bias) where, with adapters (b_ext not None), w is the bank's W_ext (AdapterBank.group): the
    concatenated base weight's rows, then every adapted projection's A_flat; one matmul gives the base output and
    u = h @ A.T of every slot, and (u * mask) @ B_ext.T adds each row's deltas (mask [B, 1, C] repeated per
    adapted projection; None: the base output alone)."""
    if b_ext is None:
        return F.linear(h, w, bias)
    out = b_ext.shape[0]
    y = F.linear(h, w)
    base, u = y[..., :out], y[..., out:]
    if bias is not None:
        base = base + bias
    if mask is None:
        return base.contiguous()
    picked = (u.unflatten(-1, (-1, mask.shape[-1])) * mask.unsqueeze(-2)).flatten(-2)
    return base + F.linear(picked, b_ext)


def _attention_in(x, cos, sin, spec: _Spec, mask, norm1, qkv_w, qkv_bias, q_norm, k_norm, lora_qkv):
    """Input norm, q/k/v projection, (q/k norm,) rotary embedding (none where cos is None: a layer without
    position embedding): x [B, T, hidden] -> (x, q [B, T, heads, D], kv [B, T, 2, kv_heads, D]: the new keys and
    values stacked, as the cache holds them). mask and lora_qkv: the adapters' (_grouped_linear; None: none)."""
    b, t = x.shape[0], x.shape[1]
    h = _rms(x, norm1, spec.eps, spec.gemma_norm)
    qkv = _grouped_linear(h, qkv_w, qkv_bias, lora_qkv, mask)
    qkv = qkv.view(b, t, spec.heads + 2 * spec.kv_heads, spec.head_dim)
    q, k, v = qkv.split([spec.heads, spec.kv_heads, spec.kv_heads], dim=2)
    if q_norm is not None and k_norm is not None:
        q, k = _rms(q, q_norm, spec.qk_eps, spec.gemma_norm), _rms(k, k_norm, spec.qk_eps, spec.gemma_norm)
        if not spec.rotate:
            qkv = torch.cat([q, k, v], dim=2)
    if not spec.rotate:  # q, and k and v as [B, T, 2, kv_heads, D]: views of one tensor
        return x, qkv[:, :, : spec.heads], qkv[:, :, spec.heads :].unflatten(2, (2, spec.kv_heads))
    if cos is None:
        return x, q, torch.stack([k, v], dim=2)
    return x, _rotary(q, cos, sin), torch.stack([_rotary(k, cos, sin), v], dim=2)


def _attention_out_and_mlp(
    x,
    o,
    spec: _Spec,
    mask,
    o_w,
    o_bias,
    post_attn,
    norm2,
    gate_up_w,
    gate_up_bias,
    down_w,
    down_bias,
    post_mlp,
    lora_o,
    lora_gate_up,
    lora_down,
):
    """The attention output projection (its norm) and residual, then the (normed) gated MLP (its norm) and its
    residual. mask and lora_*: the adapters' (_lora_linear, _grouped_linear; None: none)."""
    x = x + _rms(_lora_linear(o, o_w, o_bias, lora_o, mask), post_attn, spec.eps, spec.gemma_norm)
    h = _rms(x, norm2, spec.eps, spec.gemma_norm)
    gate, up = _grouped_linear(h, gate_up_w, gate_up_bias, lora_gate_up, mask).chunk(2, dim=-1)
    down = _lora_linear(spec.act(gate) * up, down_w, down_bias, lora_down, mask)
    return x + _rms(down, post_mlp, spec.eps, spec.gemma_norm)


def _between_layers(x, o, cos, sin, spec: _Spec, mask, w_out: tuple, w_in: tuple):
    """One layer's attention output and MLP, then the next layer's attention input: one compiled piece, so the
    residual add and the next norm fuse. Returns what _attention_in returns."""
    return _attention_in(_attention_out_and_mlp(x, o, spec, mask, *w_out), cos, sin, spec, mask, *w_in)


def _last_layer_out(x, o, spec: _Spec, mask, w_out: tuple, final_norm, eps: float):
    """The last layer's attention output and MLP, then the model's final norm."""
    return _rms(_attention_out_and_mlp(x, o, spec, mask, *w_out), final_norm, eps, spec.gemma_norm)


def _attend(q, k, v, mask, scale: float, softcap: float | None, gqa: bool) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, Hkv, S, D] (mask: bool, True where visible, or an additive
    bias); with `softcap`, as transformers' eager attention computes it (logits * scale, capped, masked, softmax in
    float32); else PyTorch's scaled_dot_product_attention."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    w = torch.tanh(q @ k.transpose(-1, -2) * scale / softcap) * softcap
    w = w.masked_fill(~mask, torch.finfo(w.dtype).min) if mask.dtype == torch.bool else w + mask
    return torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class DynamicKV:
    """Hugging Face's DynamicCache over a left-padded batch: rows join by padding the shorter side on the left,
    and leading columns that are padding in every row are trimmed when rows leave."""

    def __init__(self, model: Any, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.reset()

    def reset(self) -> None:
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, T] bool, False on left padding
        self.next: torch.Tensor | None = None  # [B] the last sampled token of each row, not yet in the cache

    def prefill(self, prompts: list[list[int]]) -> tuple[Any, torch.Tensor]:
        from transformers import DynamicCache

        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, length - len(p) :] = torch.tensor(p)
            mask[i, length - len(p) :] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return (out.past_key_values, mask), out.logits[:, -1, :]

    def join(self, handle: tuple[Any, torch.Tensor], tokens: torch.Tensor) -> None:
        cache, mask = handle
        if self.cache is None or self.mask is None or self.next is None:
            self.cache, self.mask, self.next = cache, mask, tokens
            return
        t_old, t_new = self.mask.shape[1], mask.shape[1]
        width = max(t_old, t_new)

        def pad_left(x: torch.Tensor, by: int, dim: int) -> torch.Tensor:
            if by == 0:
                return x
            shape = list(x.shape)
            shape[dim] = by
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for old_layer, new_layer in zip(self.cache.layers, cache.layers):
            old_layer.keys = torch.cat(
                [pad_left(old_layer.keys, width - t_old, 2), pad_left(new_layer.keys, width - t_new, 2)]
            )
            old_layer.values = torch.cat(
                [pad_left(old_layer.values, width - t_old, 2), pad_left(new_layer.values, width - t_new, 2)]
            )
        self.mask = torch.cat([pad_left(self.mask, width - t_old, 1), pad_left(mask, width - t_new, 1)])
        self.next = torch.cat([self.next, tokens])

    def decode(self) -> torch.Tensor:
        assert self.mask is not None and self.next is not None
        ones = torch.ones((self.mask.shape[0], 1), dtype=torch.bool, device=self.device)
        mask = torch.cat([self.mask, ones], dim=1)
        positions = mask.long().sum(-1, keepdim=True) - 1
        out = self.model(
            input_ids=self.next[:, None],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.mask = mask
        return out.logits[:, -1, :]

    def advance(self, tokens: torch.Tensor) -> None:
        self.next = tokens

    def drop(self, keep: list[int]) -> None:
        if not keep:
            self.reset()
            return
        assert self.mask is not None and self.next is not None
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        self.next = self.next[index]
        start = int(mask.any(0).long().argmax())  # leading columns that are padding in every row
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self.mask = mask[:, start:]


class StaticKV:
    """One preallocated cache slot per batch row (see the module docstring). Create it in the thread that runs
    the model, under the same inference mode."""

    def __init__(
        self,
        model: Any,
        *,
        slots: int,
        context_length: int,
        cuda_graphs: bool | None = None,
        compile_pieces: bool | None = None,
        fused_attention: bool | None = None,
        prefill_tokens: int = 8192,
        lora: multi_lora.AdapterBank | None = None,
    ):
        reason = static_kv_unsupported(model)
        if reason is not None:
            raise ValueError(f"StaticKV cannot serve this model: {reason}")
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.slots, self.length = slots, context_length
        attn = self.layers[0].self_attn
        cfg = model.config
        self.head_dim = int(attn.head_dim)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.groups = self.heads // self.kv_heads
        self.model_type = str(cfg.model_type)
        gemma = self.model_type in GEMMA
        softcap = getattr(cfg, "attn_logit_softcapping", None) if self.model_type == "gemma2" else None
        self.spec = _Spec(
            heads=self.heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            scale=float(attn.scaling),
            eps=_norm_eps(self.layers[0].post_attention_layernorm),
            qk_eps=_norm_eps(attn.q_norm) if hasattr(attn, "q_norm") else 0.0,
            act=self.layers[0].mlp.act_fn,
            gemma_norm=gemma,
            softcap=float(softcap) if softcap else None,
        )
        # with adapters (kollm.serve.multi_lora): the bank's buffers of each adapted projection, each cache slot's
        # adapter slot (0: the base; one more for the spare slot), set at prefill from the bank's row slots
        self.lora = lora if lora is not None and lora.layers else None
        self.weights = [_layer_weights(layer, self.model_type, self.lora) for layer in self.layers]
        self.adapter_slots = torch.zeros(slots + 1, dtype=torch.long, device=self.device)
        self.lora_columns = self.lora.columns(self.device) if self.lora is not None else None
        # on CUDA the pieces between the attention kernels are compiled (fused norms, rotary embedding, SiLU-gate),
        # for prefill and decode: a decode graph of a few hundred kernels instead of over a thousand
        final = self.inner.norm.weight
        self.final_norm = (_gemma_weight(final) if gemma else final, _norm_eps(self.inner.norm))
        self.final_softcap: float | None = getattr(cfg, "final_logit_softcapping", None) if gemma else None
        self._pieces(self.device.type == "cuda" if compile_pieces is None else compile_pieces)
        # per layer, keys and values together: [slot, k|v, kv head, position, D], so one write stores both; one
        # slot more than the batch has, where the padding rows of a prefill graph write
        shape = (slots + 1, 2, self.kv_heads, context_length, self.head_dim)
        self.kv = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        positions = torch.arange(context_length, device=self.device)
        # each layer's rotary tables [L, head_dim] (None: no position embedding) and sliding window (None: none)
        self.windows = layer_windows(cfg)
        self.rope = self._rotary_tables(cfg, positions)
        self.positions = positions
        self.rows = torch.arange(slots, device=self.device)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)  # each slot's next input token
        self.pos = torch.zeros(slots, dtype=torch.long, device=self.device)  # the position it goes to
        self.live = torch.zeros(slots, dtype=torch.long, device=self.device)  # 1 for the slots of the batch's rows
        # the Triton kernels writing the cache, rotating q and k and attending (decode_attention); they read each
        # row's own length, so one graph per batch bucket serves every length
        if fused_attention is None:
            fused_attention = self.device.type == "cuda" and decode_attention.available(self.head_dim)
        if any(w is not None for w in self.windows) or self.spec.softcap is not None:
            fused_attention = False  # the kernels attend to every position before a row's, uncapped
        self.fused_attention = fused_attention
        self.decode_spec = dataclasses.replace(self.spec, rotate=not fused_attention)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.batch_buckets = _buckets(slots, min(MIN_DECODE_ROWS, slots) if self.cuda_graphs else 1)
        # a prefill's prompts, padded (ids 0, length 1, the spare slot for padding rows): graph inputs
        self.prompt_ids = torch.zeros((slots, context_length), dtype=torch.long, device=self.device)
        self.prompt_lengths = torch.ones(slots, dtype=torch.long, device=self.device)
        self.prompt_slots = torch.full((slots,), slots, dtype=torch.long, device=self.device)
        # prefill graphs for (prompts, positions) buckets up to prefill_tokens positions in all; larger run eagerly
        self.prefill_buckets = [
            (n, t)
            for n in _buckets(slots, 1)
            for t in _buckets(context_length, min(MIN_PROMPT_BUCKET, context_length))
            if n * t <= prefill_tokens
        ]
        self.length_buckets = (
            [context_length] if fused_attention else _buckets(context_length, min(MIN_LENGTH_BUCKET, context_length))
        )
        # (n_batch, n_len, picks) of a decode step, or (prompts, positions, None) of a prefill: graph and output
        self.graphs: dict[tuple[int, int, bool | None], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None
        self.reset()

    def _rotary_tables(self, cfg: Any, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each layer's (cos, sin) [L, head_dim], computed by the model's own rotary module: gemma3 has one per
        layer type (local and global bases); exaone4's global layers have none when the model has sliding ones."""
        x = torch.zeros(1, dtype=self.dtype, device=self.device)
        kinds = list(getattr(cfg, "layer_types", None) or ["full_attention"] * len(self.layers))
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for kind in kinds:
            if self.model_type == "exaone4" and cfg.sliding_window is not None and kind != "sliding_attention":
                out.append(None)  # EXAONE 4's global layers: no position embedding (NoPE)
                continue
            key = kind if self.model_type == "gemma3_text" else "all"
            if key not in tables:
                args = (kind,) if self.model_type == "gemma3_text" else ()
                cos, sin = self.inner.rotary_emb(x, positions[None], *args)
                tables[key] = (cos[0], sin[0])
            out.append(tables[key])
        return out

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(x)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def warm_up(self) -> None:
        """With CUDA graphs: compile the pieces and capture every (batch, length) bucket's graph now, before the
        first request would stall on it. Where compiling fails (no Triton, an unsupported GPU), the step runs
        uncompiled, still as graphs."""
        if not self.cuda_graphs:
            return
        try:
            self._capture_all()
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the uncompiled pieces
            log.warning("compiling the decode step failed (%s: %s); capturing it uncompiled", type(e).__name__, e)
            self._pieces(False)
            self.graphs.clear()
            self._capture_all()
        self.reset()

    def _pieces(self, compiled: bool) -> None:
        pieces: tuple[Callable[..., Any], ...] = (_attention_in, _between_layers, _last_layer_out, _greedy_outputs)
        if compiled:
            pieces = tuple(torch.compile(p, dynamic=True) for p in pieces)
        self._first, self._between, self._last, self._greedy_outputs = pieces

    def _capture_all(self) -> None:
        started = time.perf_counter()
        for n, t in self.prefill_buckets:
            self._replay(n, t, None)
        for n_batch in self.batch_buckets:
            for n_len in self.length_buckets:
                for picks in (False, True):
                    self._replay(n_batch, n_len, picks)
        log.info("captured %d prefill and decode graphs in %.1fs", len(self.graphs), time.perf_counter() - started)

    # --- batch bookkeeping ------------------------------------------------------------------------------
    def reset(self) -> None:
        self.active: list[int] = []  # the slot of each row, in row order
        self._lengths: list[int] = []  # each row's next position (host copy of pos, for the length bucket)
        self.pos.zero_()
        self.live.zero_()

    def _free(self, n: int) -> list[int]:
        taken = set(self.active)
        free = [s for s in range(self.slots) if s not in taken]
        if len(free) < n:
            raise RuntimeError(f"StaticKV: {n} new rows but only {len(free)} free slots")
        return free[:n]  # the lowest: the decode batch bucket covers up to the highest slot in use

    def prefill(self, prompts: list[list[int]]) -> tuple[Any, torch.Tensor]:
        """Run the prompts (right-padded, one forward pass), writing their keys and values into free slots;
        returns (slots, last-token logits). Rows are not part of the batch until `join`."""
        slots = self._free(len(prompts))
        n, t = len(prompts), max(len(p) for p in prompts)
        if t > self.length:
            raise ValueError(f"a prompt is longer than the cache ({self.length} positions)")
        bucket = None
        if self.cuda_graphs:
            bucket = next(((bn, bt) for bn, bt in self.prefill_buckets if bn >= n and bt >= t), None)
        n_pad, t_pad = bucket or (n, t)  # eagerly: no padding
        ids = torch.zeros((n_pad, t_pad), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        lengths = [len(p) for p in prompts]
        self.bind_adapters(slots)
        self.prompt_ids[:n_pad, :t_pad] = self._on_device(ids)
        self.prompt_lengths[:n_pad] = self._on_device(lengths + [1] * (n_pad - n))
        self.prompt_slots[:n_pad] = self._on_device(slots + [self.slots] * (n_pad - n))
        logits = self._replay(n_pad, t_pad, None) if bucket else self._prefill_forward(n_pad, t_pad)
        return (slots, lengths), logits[:n]

    def bind_adapters(self, slots: list[int]) -> None:
        """With adapters: the cache slots of the prompts about to be prefilled run the adapter slots the bank's
        `use_rows` set for them (in order), in this prefill and every decode step until the slot is reused."""
        if self.lora is not None:
            rows = self.lora.row_slots[: len(slots)]
            rows = rows + [0] * (len(slots) - len(rows))
            self.adapter_slots[self._on_device(slots)] = self._on_device(rows)

    def _on_device(self, values: list[int] | torch.Tensor) -> torch.Tensor:
        """A small index tensor on the model's device without waiting for the GPU: from pinned memory,
        asynchronously (a plain host-to-device copy synchronises the stream, which would stall the engine
        while a decode step it launched ahead is still running)."""
        t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def join(self, handle: tuple[list[int], list[int]], tokens: torch.Tensor) -> None:
        slots, lengths = handle
        index = self._on_device(slots)
        self.tokens[index] = tokens
        self.pos[index] = self._on_device(lengths)
        self.live[index] = 1
        self.active.extend(slots)
        self._lengths.extend(lengths)

    def _step(self, picks: bool) -> tuple[int, torch.Tensor]:
        n_batch = _bucket(self.batch_buckets, max(self.active) + 1)
        n_len = _bucket(self.length_buckets, max(self._lengths) + 1)
        if self.cuda_graphs:
            return n_batch, self._replay(n_batch, n_len, picks)
        return n_batch, self._decode_forward(n_batch, n_len, picks)

    def decode(self) -> torch.Tensor:
        """One step for every row: its logits [rows, vocab], in row order; `advance` feeds the tokens back."""
        n_batch, logits = self._step(False)
        if self.active == list(range(n_batch)):
            return logits
        return logits[self._on_device(self.active)]

    def decode_greedy(self) -> tuple[torch.Tensor, list[int]]:
        """One step for every row, each taking its most likely token, fed back on the device (no `advance`):
        returns `step_outputs` for the slots [0, n) the step covered, and the slot of each row in row order."""
        _, outputs = self._step(True)
        slots = list(self.active)
        self._lengths = [n + 1 for n in self._lengths]
        return outputs, slots

    def advance(self, tokens: torch.Tensor) -> None:
        index = self._on_device(self.active)
        self.tokens[index] = tokens
        self.pos[index] += 1
        self._lengths = [n + 1 for n in self._lengths]

    def drop(self, keep: list[int]) -> None:
        kept = set(keep)
        gone = [slot for i, slot in enumerate(self.active) if i not in kept]
        if gone:
            index = self._on_device(gone)
            self.pos[index] = 0
            self.live[index] = 0
        self.active = [self.active[i] for i in keep]
        self._lengths = [self._lengths[i] for i in keep]

    # --- the model ----------------------------------------------------------------------------------------
    def _layers(
        self, x: torch.Tensor, ropes: list, attend, spec: _Spec, slots: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every decoder layer over x [B, T, hidden], layer i rotating q and k by ropes[i] ((cos, sin) indexed at
        the rows' positions, or None); `attend(layer index, q, kv)` stores the new keys and values and returns the
        attention output [B, T, heads * D]. Returns the final-normed hidden states. With adapters, `slots` [B]
        (the rows' cache slots) selects each row's adapter (no slots: every row runs the base alone)."""
        mask = None
        if self.lora_columns is not None and slots is not None:  # [B, 1, columns]: 1 on the row's adapter slot
            mask = (self.adapter_slots[slots][:, None] == self.lora_columns[None, :]).to(self.dtype)[:, None]
        x, q, kv = self._first(x, *(ropes[0] or (None, None)), spec, mask, *self.weights[0][0])
        for i in range(len(self.layers) - 1):
            rope = ropes[i + 1] or (None, None)
            w_out, w_in = self.weights[i][1], self.weights[i + 1][0]
            x, q, kv = self._between(x, attend(i, q, kv), *rope, spec, mask, w_out, w_in)
        o = attend(len(self.layers) - 1, q, kv)
        return self._last(x, o, spec, mask, self.weights[-1][1], *self.final_norm)

    def _indexed(self, index: Callable[[torch.Tensor], torch.Tensor]) -> list:
        """Each layer's rotary tables indexed by `index` (once per distinct table)."""
        done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for rope in self.rope:
            if rope is not None and id(rope) not in done:
                done[id(rope)] = (index(rope[0]), index(rope[1]))
            out.append(None if rope is None else done[id(rope)])
        return out

    def _prefill_forward(self, n: int, t: int) -> torch.Tensor:
        """The first n prompts of the prompt buffers, padded to t positions, in one forward pass: writes their
        keys and values into their slots (padding positions too: a row's decode steps overwrite each position
        before attending to it; padding rows write into the spare slot) and returns each prompt's last-token
        logits [n, vocab]. Shapes depend only on (n, t), so the pass can be captured as a graph."""
        ids, lengths = self.prompt_ids[:n, :t], self.prompt_lengths[:n]
        pos = self.positions[:t]
        valid = pos[None, :] < lengths[:, None]  # [n, t]
        masks: dict[int | None, torch.Tensor] = {}
        diagonal = torch.eye(t, dtype=torch.bool, device=self.device)
        for window in set(self.windows):
            causal = pos[None, :] <= pos[:, None]  # [t, t]: query row, key column
            if window is not None:
                causal = causal & (pos[None, :] > pos[:, None] - window)
            # every query sees itself: a padding position a window past its prompt would otherwise see no key at
            # all, and its NaN would reach real rows' outputs through 0 * NaN in the next layer's attention
            masks[window] = ((causal[None, :, :] & valid[:, None, :]) | diagonal)[:, None]  # [n, 1, t, t]
        rows = self.prompt_slots[:n, None].expand(n, t).reshape(-1)
        cols = pos[None, :].expand(n, t).reshape(-1)
        ropes = self._indexed(lambda table: table[:t][None, :, None])  # [1, t, 1, D]

        def attend(i: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            self.kv[i][rows, :, :, cols] = kv.flatten(0, 1)
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
            mask = masks[self.windows[i]]
            o = _attend(q.transpose(1, 2), k, v, mask, self.spec.scale, self.spec.softcap, self.groups > 1)
            return o.transpose(1, 2).reshape(n, t, -1)

        x = self._layers(self.inner.embed_tokens(ids), ropes, attend, self.spec, self.prompt_slots[:n])
        return self._head(x[self.rows[:n], lengths - 1])

    def _decode_forward(self, n_batch: int, n_len: int, picks: bool) -> torch.Tensor:
        """One token for slots [0, n_batch) attending over positions [0, n_len): every tensor shape depends only
        on (n_batch, n_len), every value is read from the slot buffers, so the step can be captured as a graph.
        Free slots in that range compute on garbage at position 0 and are never read. Returns the logits, or
        with `picks` the `step_outputs` of the greedy tokens, which it also feeds back (tokens, positions)."""
        b = n_batch
        rows, pos = self.rows[:b], self.pos[:b]

        def fused(i: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:  # q, k unrotated (decode_spec)
            o = decode_attention.decode_attention(q[:, 0], kv[:, 0], self.kv[i], pos, self.spec.scale, self.rope[i])
            return o.reshape(b, 1, -1)

        biases: dict[int | None, torch.Tensor] = {}  # one additive mask per sliding window (None: full)
        if not self.fused_attention:
            keys = self.positions[:n_len][None, :]
            for window in set(self.windows):
                visible = keys <= pos[:, None]
                if window is not None:
                    visible = visible & (keys > pos[:, None] - window)
                bias = torch.zeros((b, 1, 1, n_len), dtype=self.dtype, device=self.device)
                biases[window] = bias.masked_fill_(~visible[:, None, None, :], float("-inf"))

        def attend(i: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            cache = self.kv[i]
            cache[rows, :, :, pos] = kv[:, 0]
            # one query token: the query heads of each kv head become that head's "query positions"
            qg = q.reshape(b, self.kv_heads, self.groups, self.head_dim)
            k, v = cache[:b, 0, :, :n_len], cache[:b, 1, :, :n_len]
            o = _attend(qg, k, v, biases[self.windows[i]], self.spec.scale, self.spec.softcap, False)
            return o.reshape(b, 1, -1)

        ropes = (
            [None] * len(self.layers)
            if self.fused_attention  # the kernels rotate q and k themselves
            else self._indexed(lambda table: table[pos][:, None, None])  # [b, 1, 1, D]
        )
        x = self._layers(
            self.inner.embed_tokens(self.tokens[:b])[:, None],
            ropes,
            fused if self.fused_attention else attend,
            self.decode_spec,
            rows,
        )
        logits = self._head(x[:, 0])
        if not picks:
            return logits
        tokens, outputs = self._greedy_outputs(logits)  # compiled on CUDA, as the layers' pieces
        self.tokens[:b] = tokens
        self.pos[:b] += self.live[:b]
        return outputs

    def _replay(self, n: int, t: int, picks: bool | None) -> torch.Tensor:
        """The CUDA graph of a decode step for (n_batch, n_len, picks), or with picks None of a prefill for
        (prompts, positions), captured on first use. Graphs share one memory pool: an output is valid until the
        next replay, and the engine is done with it by then (sampling copies it)."""
        key = (n, t, picks)

        def forward(picks: bool | None) -> torch.Tensor:
            return self._prefill_forward(n, t) if picks is None else self._decode_forward(n, t, picks)

        def warm() -> None:
            out = forward(None if picks is None else False)  # a decode warm-up must not move the batch on
            if picks:
                self._greedy_outputs(out)  # compiled here, not inside the capture; nothing fed back

        entry = self.graphs.get(key)
        if entry is None:
            self._pool, graph, out = capture_graph(warm, lambda: forward(picks), self.device, self._pool)
            entry = self.graphs[key] = (graph, out)
        entry[0].replay()
        return entry[1]
