"""Training checkpoints: trainable weights, optimizer, scheduler, RNG and data position, written atomically.

Layout: `<checkpoint_dir>/step-00000040/{weights.pt, optimizer.pt, state.pt}`; under `sharding: fsdp`,
`step-00000040/{dcp/, state.pt}`, where dcp/ is a `torch.distributed.checkpoint` of the trainable weights and the
optimizer written by every rank (its shards), which loads onto any number of ranks. A checkpoint is written into a
temporary folder and renamed into place, so a killed process leaves either a complete checkpoint or none.

Every file holds only tensors and plain types (dicts, lists, tuples, numbers, strings) and is read back with
`torch.load(weights_only=True)`, so a tampered checkpoint cannot run code on resume: numpy's RNG state is stored as
a list of ints rather than a pickled ndarray.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kollm.errors import StepFailed

PREFIX = "step-"


@dataclass
class TrainState:
    """Where training stands: restored on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    offset: int = 0  # items (rows or pairs) of this epoch already consumed, per rank
    tokens: int = 0  # input tokens processed (all ranks)
    losses: list[float] = field(default_factory=list)  # the mean loss of every optimizer step
    world: int = 1  # ranks that `offset` counts for


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """The RNG states as tensors and plain types (loadable with weights_only=True)."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    numpy_state = [str(name), [int(k) for k in key], int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    checkpoint_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    *,
    keep: int = 2,
) -> Path:
    """Write a checkpoint for `state.step` atomically and keep only the newest `keep` ones."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / f"{PREFIX}{state.step:08d}"
    tmp = checkpoint_dir / f".tmp-{PREFIX}{state.step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(trainable_state(model), tmp / "weights.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    _finish(tmp, final, scheduler, state, keep)
    return final


def _finish(tmp: Path, final: Path, scheduler: Any, state: TrainState, keep: int) -> None:
    """Write the loop's own state beside the weights in `tmp`, make every file durable, rename `tmp` into place as
    `final` and keep only the newest `keep` checkpoints of its folder."""
    torch.save({"train": state.__dict__, "scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "state.pt")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_sharded(
    checkpoint_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    *,
    keep: int = 2,
) -> Path:
    """`save` for a sharded (FSDP) model: a collective, every rank writes its shards. Rank 0 renames the folder
    into place once all have written."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    rank = dist.get_rank()
    final = checkpoint_dir / f"{PREFIX}{state.step:08d}"
    tmp = checkpoint_dir / f".tmp-{PREFIX}{state.step:08d}"
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=tmp / "dcp")
    if rank == 0:
        _finish(tmp, final, scheduler, state, keep)
    dist.barrier()
    return final


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
    """Restore a checkpoint written by `save_sharded`, on any number of ranks (DCP reshards on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if not (path / "dcp").is_dir():
        raise StepFailed(
            f"checkpoint {path} was written by a run with sharding: ddp, and this run has sharding: fsdp; set the "
            f"sharding it was written with, or delete the checkpoint folder {path.parent} to start the step from scratch"
        )
    options = StateDictOptions(ignore_frozen_params=True)
    weights, optim = get_state_dict(model, optimizer, options=options)
    dcp.load({"model": weights, "optimizer": optim}, checkpoint_id=path / "dcp")  # into these dicts, resharded
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim, options=options)
    blob = _load_plain(path / "state.pt")
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return TrainState(**blob["train"])


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoint_dir.exists():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.name.startswith(PREFIX) and (p / "state.pt").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest(checkpoint_dir: Path | None) -> Path | None:
    if checkpoint_dir is None:
        return None
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
    """Restore a checkpoint written by `save` into model/optimizer/scheduler and the RNGs; return the state."""
    if not (path / "weights.pt").exists():
        raise StepFailed(
            f"checkpoint {path} was written by a run with sharding: fsdp, and this run has sharding: ddp; set the "
            f"sharding it was written with, or delete the checkpoint folder {path.parent} to start the step from scratch"
        )
    weights = _load_plain(path / "weights.pt")
    params = dict(model.named_parameters())
    unknown = set(weights) - set(params)
    if unknown:
        raise RuntimeError(
            f"checkpoint {path} does not match the model (unknown parameters such as {sorted(unknown)[:3]})"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(_load_plain(path / "optimizer.pt"))
    blob = _load_plain(path / "state.pt")
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return TrainState(**blob["train"])


def _load_plain(file: Path) -> Any:
    """torch.load restricted to tensors and plain types: a file that needs anything else is refused unexecuted."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StepFailed(
            f"checkpoint file {file} holds objects other than tensors and plain values, so it was not loaded "
            f"(tampered, or written by an older kollm): {first}. Delete the checkpoint folder {file.parent} to start "
            "the step from scratch."
        ) from None


# ---------------------------------------------------------------- checkpoints in the artifact store
# A step run against a remote artifact store (s3://...) mirrors its checkpoints to `<store>/checkpoints/<key>/`
# (the runner passes that URL), so a retry on another node resumes from the last one instead of from step 0. The
# local folder is a node-local cache of it. A checkpoint's state.pt is uploaded last: a remote checkpoint without
# it is incomplete (a node that died mid-upload) and is never pulled.


def _remote_fs(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def _remote_steps(fs: Any, root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root` (step, path), oldest first."""
    fs.invalidate_cache(root)
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return []
    steps = set()
    for path in found:
        parts = path[len(root.rstrip("/")) + 1 :].split("/")
        if len(parts) == 2 and parts[0].startswith(PREFIX) and parts[1] == "state.pt":
            steps.add((int(parts[0][len(PREFIX) :]), f"{root.rstrip('/')}/{parts[0]}"))
    return sorted(steps)


def push(remote: str, folder: Path, *, keep: int = 2) -> str:
    """Upload the checkpoint `folder` to `remote` (state.pt last) and keep only the newest `keep` there; returns
    the store's path of the upload."""
    fs, root = _remote_fs(remote)
    target = f"{root.rstrip('/')}/{folder.name}"
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.name == "state.pt")
    for path in files:
        fs.put_file(str(path), f"{target}/{path.relative_to(folder).as_posix()}")
    for _, old in _remote_steps(fs, root)[:-keep]:
        fs.rm(old, recursive=True)
    return target


def pull(remote: str, checkpoint_dir: Path) -> int | None:
    """Download the newest complete checkpoint under `remote` into `checkpoint_dir` unless a local one is as new;
    returns its step (None: the store holds none)."""
    fs, root = _remote_fs(remote)
    found = _remote_steps(fs, root)
    if not found:
        return None
    step, path = found[-1]
    local = latest(checkpoint_dir)
    if local is not None and int(local.name[len(PREFIX) :]) >= step:
        return step
    tmp = checkpoint_dir / f".tmp-pull-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for remote_file in fs.find(path):
        target = tmp / remote_file[len(path) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote_file, str(target))
    final = checkpoint_dir / f"{PREFIX}{step:08d}"
    try:
        os.rename(tmp, final)
    except OSError:  # another rank of this node pulled it first
        shutil.rmtree(tmp, ignore_errors=True)
    return step
