"""Training checkpoints: weights as safetensors plus a small state file (optimizer, scheduler, step, RNG states,
data position), written atomically (temporary folder + rename), the newest `keep` kept.

Every `ckpt-*` folder a save leaves is complete, whenever the writer is killed: a checkpoint is written under a
dot-name and renamed into place, and one being replaced or pruned is renamed back to a dot-name before it is
deleted. Dot-folders are never read; the next save removes those a killed save left (one writer per folder).

The state file holds only tensors and plain Python values and is read with `torch.load(weights_only=True)`,
so loading a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

PREFIX = "ckpt-"


def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, loop_state: dict, keep: int = 2,
         also: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint `step` under `root` and prune all but the newest `keep` complete ones; `also` writes more
    files into the folder (before the state file that marks it complete).

    A reader never sees a half-written or half-deleted checkpoint, even if this process is killed midway.
    """
    root.mkdir(parents=True, exist_ok=True)
    for leftover in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # from a save killed midway
        shutil.rmtree(leftover)
    final = root / f"{PREFIX}{step:09d}"
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    if also is not None:
        also(tmp)
    # state.pt last: it marks a folder complete (storage copies it last too).
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "loop": loop_state, "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    replaced = _set_aside(final) if final.exists() else None  # a resumed run reached this step again
    os.rename(tmp, final)
    # Only complete ones count: a folder without state.pt (an interrupted copy) must not push out a good one.
    pruned = [_set_aside(path) for path in _complete(root)[:-keep]]
    for trash in filter(None, [replaced, *pruned]):
        shutil.rmtree(trash)
    return final


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of a rank's own random draws (dropout, drop-path) in a process group: rank 0 keeps `seed` (one
    process trains as before), the others draw apart from it and from every other point's seed."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def rng_state(device: torch.device) -> np.ndarray:
    """This process's torch generators as one uint8 row [1, n]: the CPU's, then `device`'s where it is a GPU (the
    dropout and drop-path masks of a CUDA model come from the latter)."""
    parts = [torch.get_rng_state()]
    if device.type == "cuda":
        parts.append(torch.cuda.get_rng_state(device))
    return torch.cat(parts).numpy()[None]


def set_rng_state(row: np.ndarray | torch.Tensor, device: torch.device) -> None:
    """Restore what `rng_state` saved (the GPU's part only where this run is on one and it was saved on one)."""
    row = torch.as_tensor(row, dtype=torch.uint8)
    cpu = torch.get_rng_state().numel()
    torch.set_rng_state(row[:cpu].clone())
    if device.type == "cuda" and row.numel() > cpu:
        torch.cuda.set_rng_state(row[cpu:].clone(), device)


def _set_aside(path: Path) -> Path:
    """Rename out of the `ckpt-*` names before deleting: a kill mid-delete must not leave state.pt without
    its weights."""
    os.rename(path, trash := path.with_name(f".old-{path.name}"))
    return trash


def _complete(root: Path) -> list[Path]:
    return [p for p in sorted(root.glob(f"{PREFIX}*")) if (p / "state.pt").exists()]


def latest(root: Path | None) -> Path | None:
    """The newest complete checkpoint under `root` (temporary folders are never complete)."""
    if root is None or not root.is_dir():
        return None
    done = _complete(root)
    return done[-1] if done else None


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict:
    """Restore model, optimizer, scheduler and the global torch RNG; returns the loop state.

    The state file is read onto the CPU whatever device wrote it (`map_location`): a checkpoint saved on
    `cuda:3` resumes on a node whose GPU is `cuda:0`, or that has none; `load_state_dict` then moves each tensor
    to where its parameter lives."""
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state["loop"]
