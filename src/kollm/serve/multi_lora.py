"""Many LoRA adapters on one base in the native engine: per-row LoRA applied inside each forward pass.

Every linear layer that some adapter adapts is wrapped once (`_RowLoRALinear`); the wrapper holds, per adapter
slot, the adapter's A ([slots + 1, r_max, in]) and B*scale ([out, slots + 1, r_max]) zero-padded to the largest
rank (zero padding changes nothing), slot 0 all zeros (the base alone). These buffers are allocated once: loading
an adapter copies its weights into its slot in place, so their addresses never change (a captured CUDA graph keeps
reading them). Each forward pass gives every batch row one slot, and each adapted layer adds that slot's delta:

  - the dynamic KV cache (Hugging Face's forward through the wrappers): the engine sets the rows' slots before the
    pass (`AdapterBank.use_rows`), and each wrapper adds
        y[b] += (x[b] @ A[slot[b]].T) @ B[:, slot[b]].T          (two batched matmuls, torch.bmm)
  - the static KV cache (kollm.serve.kv.StaticKV, kollm's own layer code, CUDA graphs): each cache slot keeps the
    adapter slot of the request it holds (a device tensor, set at prefill), and every adapted projection adds
        y += ((x @ A_flat.T) * mask) @ B_flat.T                  (two plain matmuls, `lora_delta`)
    with A_flat [(slots + 1) * r, in] and B_flat [out, (slots + 1) * r] views of the same buffers and mask [rows,
    (slots + 1) * r] one where a column belongs to the row's slot (`columns`): every loaded adapter's low-rank
    product for every row, the others' masked out. No Python branch depends on which adapters a batch holds, so a
    decode step stays one CUDA graph; its extra cost is reading every slot's A and B once per step, whatever the
    batch mixes (what per-adapter kernels would read anyway once every slot is in the batch). Projections of one
    input (q, k, v; gate, up), which StaticKV multiplies as one concatenated weight, take their A's as extra rows
    of that weight and their B's as one block-diagonal matrix (`group`): one wider matmul, one mask and one more
    matmul for the whole group (a step of a small model is bound by its kernel count, not by these bytes).

so one decode step runs requests of different adapters (and of the base) together, with the base's weights
shared and never merged.

Adapters are PEFT folders (a LoRA step's output, kollm.adapter). They load into a slot on the first request that
names them and stay while slots last; beyond `max_adapters` the least recently used adapter that no running
request uses is evicted. A request whose adapter finds no free slot waits (the engine admits it once a running
request of an evicted-able adapter finishes), so eviction never fails a request.

    AdapterBank(model, {name: folder}, max_adapters)   wraps the model's adapted linear layers
    bank.acquire(name, busy) -> slot | None            load on first use (LRU eviction); None: wait
    bank.use_rows([slot, ...])                         the slots of the next forward pass's rows
    bank.flat(module) -> (A_flat, B_flat) | None       a layer's buffers as StaticKV multiplies them
    bank.group(modules, weight) -> (W_ext, B_ext) | None   projections of one input, grouped (see above)
    bank.columns(device) -> [(slots + 1) * r]          the slot of each column of A_flat's output
    bank.stats() -> {name: {"loaded", "loads", "evictions", "requests"}}
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
import torch
import torch.nn.functional as F
from torch import nn

from kollm.errors import ConfigError

PEFT_PREFIX = "base_model.model."


@dataclass
class _Adapter:
    name: str
    folder: Path
    rank: int
    scale: float
    modules: list[str]  # module paths in the causal LM (model.layers.0.self_attn.q_proj, ...)
    loads: int = 0
    evictions: int = 0
    requests: int = 0
    slot: int | None = None
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # loaded on first use


def read_adapter(name: str, folder: Path) -> _Adapter:
    """An adapter's config and the modules it adapts (weights are read when it is loaded into a slot)."""
    from safetensors import safe_open

    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ConfigError(f"--adapters {name}: {folder} is not a LoRA adapter (no adapter_config.json / weights)")
    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"--adapters {name}: {folder} is a {cfg.get('peft_type')} adapter; only LoRA is served")
    rank, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    with safe_open(str(weights_file), framework="pt") as f:
        keys = list(f.keys())
    modules = sorted({k.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for k in keys if ".lora_A." in k})
    other = [k for k in keys if ".lora_A." not in k and ".lora_B." not in k]
    if other:
        raise ConfigError(
            f"--adapters {name}: {folder} carries weights other than LoRA matrices ({other[0]}, e.g. resized "
            "embeddings); serve it alone (kollm serve ADAPTER), which merges it into its base"
        )
    return _Adapter(name, folder, rank, scale, modules)


def lora_delta(h: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Each row's LoRA delta on the static path: h [rows, T, in], lora (A_flat, B_flat) (`AdapterBank.flat`), mask
    [rows, 1, (slots + 1) * r] (1 on the columns of the row's slot) -> [rows, T, out]."""
    return F.linear(F.linear(h, lora[0]) * mask, lora[1])


class _RowLoRALinear(nn.Module):
    """A linear layer plus, per batch row, the LoRA delta of that row's adapter slot."""

    A: torch.Tensor  # [slots + 1, r_max, in]
    B: torch.Tensor  # [out, slots + 1, r_max], scale folded in (out first: B.view(out, -1) is B_flat, no copy)

    def __init__(self, base: nn.Linear, bank: AdapterBank, slots: int, rank: int):
        super().__init__()
        self.base = base
        self.bank = bank
        w = base.weight
        self.register_buffer("A", torch.zeros(slots + 1, rank, w.shape[1], dtype=w.dtype, device=w.device))
        self.register_buffer("B", torch.zeros(w.shape[0], slots + 1, rank, dtype=w.dtype, device=w.device))

    # the base layer's weight and bias, for code that reads a linear layer's weights (kollm.serve.kv.StaticKV)
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.bank.device_rows(self.A.device)
        if rows is None:
            return y
        a, b = self.A[rows], self.B[:, rows].transpose(0, 1)  # [N, r, in], [N, out, r]
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, T, in]
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
        return y + delta.reshape(y.shape)


class AdapterBank:
    """The adapters one engine serves on its base (see the module docstring). Its methods run in the engine's
    worker thread, except stats() (any thread)."""

    def __init__(self, model: nn.Module, adapters: dict[str, Path], max_adapters: int):
        if max_adapters < 1:
            raise ConfigError(f"--max-adapters: expected at least 1, got {max_adapters}")
        self.adapters = {name: read_adapter(name, Path(folder)) for name, folder in adapters.items()}
        self.max_adapters = max_adapters
        self.rank = max((a.rank for a in self.adapters.values()), default=1)
        self.row_slots: list[int] = []  # the slots of the next forward pass's rows (use_rows)
        self._rows: torch.Tensor | None = None  # row_slots on the device, made when a wrapper first needs it
        # forward passes whose rows ran more than one adapter (or adapters and the base): every prefill, and the
        # decode steps the engine samples on the host (a static-cache step picking its tokens on the device, which
        # reads each cache slot's adapter there, does not pass through use_rows)
        self.mixed_passes = 0
        self._lru: OrderedDict[str, int] = OrderedDict()  # loaded adapter -> slot, least recently used first
        self._lock = threading.Lock()
        self.layers: dict[str, _RowLoRALinear] = {}
        self._groups: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # group() by module ids
        named = dict(model.named_modules())
        for path in sorted({m for a in self.adapters.values() for m in a.modules}):
            module = named.get(path)
            if not isinstance(module, nn.Linear):
                owner = next(a.name for a in self.adapters.values() if path in a.modules)
                raise ConfigError(f"--adapters {owner}: adapts {path}, which is not a linear layer of the base model")
            parent_path, _, attr = path.rpartition(".")
            wrapper = _RowLoRALinear(module, self, max_adapters, self.rank)
            setattr(named[parent_path] if parent_path else model, attr, wrapper)
            self.layers[path] = wrapper

    def add(self, name: str, folder: Path) -> None:
        """Serve one more adapter (a canary's next challenger); it loads on its first request. It must adapt only
        layers that the bank wraps already, at a rank no larger than the bank's (the buffers are not resized)."""
        adapter = read_adapter(name, Path(folder))
        outside = [m for m in adapter.modules if m not in self.layers]
        if outside or adapter.rank > self.rank:
            what = f"adapts {outside[0]}" if outside else f"has rank {adapter.rank} > {self.rank}"
            raise ConfigError(
                f"adapter {name} ({folder}) {what}, unlike the adapters this engine was started with; "
                "restart the server to serve it on the same base"
            )
        with self._lock:
            if name in self.adapters:
                raise ConfigError(f"adapter {name} is served already")
            self.adapters[name] = adapter

    # --- slots -------------------------------------------------------------------------------------------
    def acquire(self, name: str, busy: set[str]) -> int | None:
        """The slot of adapter `name`, loading it on first use; when every slot is taken, the least recently
        used adapter that is not in `busy` (adapters of running requests) is evicted. None: every slot is busy."""
        adapter = self.adapters[name]
        with self._lock:
            if name in self._lru:
                self._lru.move_to_end(name)
                adapter.requests += 1
                return self._lru[name]
            if len(self._lru) < self.max_adapters:
                used = set(self._lru.values())
                slot = next(s for s in range(1, self.max_adapters + 1) if s not in used)
            else:
                victim = next((n for n in self._lru if n not in busy), None)
                if victim is None:
                    return None
                slot = self._lru.pop(victim)
                self.adapters[victim].evictions += 1
                self.adapters[victim].slot = None
            self._load(adapter, slot)
            self._lru[name] = slot
            adapter.requests += 1
            return slot

    def _load(self, adapter: _Adapter, slot: int) -> None:
        from safetensors.torch import load_file

        weights = load_file(str(adapter.folder / "adapter_model.safetensors"))
        for path, layer in self.layers.items():
            layer.A[slot].zero_()
            layer.B[:, slot].zero_()
            a = weights.get(f"{PEFT_PREFIX}{path}.lora_A.weight")
            b = weights.get(f"{PEFT_PREFIX}{path}.lora_B.weight")
            if a is None or b is None:
                continue
            layer.A[slot, : adapter.rank].copy_(a.to(layer.A.dtype))
            layer.B[:, slot, : adapter.rank].copy_((b.float() * adapter.scale).to(layer.B.dtype))
        adapter.loads += 1
        adapter.slot = slot

    def use_rows(self, slots: list[int]) -> None:
        """Set the slots of the next forward pass's rows (0: the base alone); all-zero rows skip the LoRA work.
        On the static path StaticKV reads them at prefill, into its cache slots' adapter slots."""
        if len(set(slots)) > 1:
            self.mixed_passes += 1
        self.row_slots = list(slots)
        self._rows = None

    def device_rows(self, device: torch.device) -> torch.Tensor | None:
        """The rows' slots as a tensor on `device` (None: every row runs the base alone)."""
        if not any(self.row_slots):
            return None
        if self._rows is None:
            self._rows = torch.tensor(self.row_slots, device=device)
        return self._rows

    # --- the static path (kollm.serve.kv.StaticKV) -----------------------------------------------------
    def _wrapper(self, module: nn.Module) -> _RowLoRALinear | None:
        return module if isinstance(module, _RowLoRALinear) and module.bank is self else None

    def flat(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A linear layer of the model as (A_flat [(slots + 1) * r, in], B_flat [out, (slots + 1) * r]): views of
        its buffers (loading an adapter shows in them); None where no adapter adapts that layer."""
        layer = self._wrapper(module)
        if layer is None:
            return None
        return layer.A.flatten(0, 1), layer.B.flatten(1, 2)

    def group(self, modules: list[nn.Module], weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Linear layers of one input whose weights StaticKV concatenates (`weight` [out, in], their out sizes in
        order) as (W_ext [out + k * C, in], B_ext [out, k * C]), C = (slots + 1) * r, k the adapted ones among
        them: W_ext is `weight` followed by each adapted layer's A_flat, B_ext holds each one's B_flat in its own
        rows and columns (zeros elsewhere), so x @ W_ext.T gives the base output and every slot's x @ A.T at once,
        and (that * mask) @ B_ext.T the rows' deltas. The adapted layers' A and B buffers become views of W_ext
        and B_ext (what they held is copied), so loading an adapter shows in them; the same modules give the
        same tensors again. None where no adapter adapts any of them."""
        key = tuple(id(m) for m in modules)
        if key in self._groups:
            return self._groups[key]
        layers = [self._wrapper(m) for m in modules]
        if all(layer is None for layer in layers):
            return None
        out = int(weight.shape[0])
        width = (self.max_adapters + 1) * self.rank
        adapted = [layer for layer in layers if layer is not None]
        w_ext = torch.empty(out + len(adapted) * width, weight.shape[1], dtype=weight.dtype, device=weight.device)
        w_ext[:out] = weight
        b_ext = torch.zeros(out, len(adapted) * width, dtype=weight.dtype, device=weight.device)
        row, col = 0, 0
        for module, layer in zip(modules, layers):
            module_weight = module.weight
            assert isinstance(module_weight, torch.Tensor)
            size = int(module_weight.shape[0])
            if layer is not None:
                a_view = w_ext[out + col : out + col + width]
                a_view.copy_(layer.A.flatten(0, 1))
                b_view = b_ext[row : row + size, col : col + width]
                b_view.copy_(layer.B.flatten(1, 2))
                layer.A = a_view.view(layer.A.shape)
                layer.B = b_view.view(layer.B.shape)
                col += width
            row += size
        if row != out:
            raise ValueError(f"group: the layers' outputs add up to {row} rows, the weight has {out}")
        self._groups[key] = (w_ext, b_ext)
        return w_ext, b_ext

    def columns(self, device: torch.device) -> torch.Tensor:
        """The adapter slot of each column of x @ A_flat.T: [(slots + 1) * r], slot s at [s * r, (s + 1) * r)."""
        return torch.arange(self.max_adapters + 1, device=device).repeat_interleave(self.rank)

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {
                n: {
                    "loaded": int(a.slot is not None),
                    "loads": a.loads,
                    "evictions": a.evictions,
                    "requests": a.requests,
                }
                for n, a in self.adapters.items()
            }
