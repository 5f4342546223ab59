"""Training checkpoints: weights as safetensors plus a small state file (optimizer, scheduler, step, RNG states,
data position), written atomically (temporary folder + rename), the newest `keep` kept.

The state file holds only tensors and plain Python values and is read with `torch.load(weights_only=True)`,
so loading a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PREFIX = "ckpt-"


def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, loop_state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` under `root`; a reader never sees a half-written one."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:09d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "loop": loop_state, "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: Path | None) -> Path | None:
    """The newest complete checkpoint under `root` (temporary folders are never complete)."""
    if root is None or not root.is_dir():
        return None
    done = [p for p in sorted(root.glob(f"{PREFIX}*")) if (p / "state.pt").exists()]
    return done[-1] if done else None


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict:
    """Restore model, optimizer, scheduler and the global torch RNG; returns the loop state."""
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state["loop"]
