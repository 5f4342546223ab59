"""Checkpoint/resume: N steps straight vs N/2 steps, SIGKILL, resume to N must give the same weights, bit for bit
(CPU, one thread: the same kernels run in the same order on the same data, RNG states and optimizer state)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipelines import checkpoint, models

SCRIPT = """
import sys, time, numpy as np, torch
from pathlib import Path
torch.set_num_threads(1)
from pipelines import pretrain
from pipelines.data import ImageArrays
from pipelines.data.augment import Augment
rng = np.random.default_rng(0)
data = ImageArrays(rng.integers(0, 255, (320, 32, 32, 3), dtype=np.uint8), rng.integers(0, 8, 320))
cfg = pretrain.PretrainConfig(steps=24, batch_size=32, lr=3e-3, warmup_steps=4, checkpoint_every=12,
                              augment=Augment(crop="translate", crop_padding=2, flip=True))
out, stall = Path(sys.argv[1]), sys.argv[2] == "stall"
# 10 steps per epoch; the checkpoint at step 12 is mid-epoch. When asked, stall at the end of epoch 2 (step 20)
# so the parent can kill this process after checkpoint 12 and before the run could finish.
hold = lambda m: time.sleep(600) if stall and m["step"] == 20 else None
pretrain.run(cfg, "ViT-Pico/4", data, 8, 32, seed=3, device=torch.device("cpu"), out_dir=out,
             checkpoint_dir=out / "checkpoints", on_epoch=hold, progress=False)
"""


def _run(out: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(out), mode], env=env,
                            cwd=Path(__file__).resolve().parents[2])


def test_killed_run_resumes_bit_for_bit(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run(straight, "run").wait(timeout=300) == 0
    proc = _run(killed, "stall")
    deadline = time.monotonic() + 300
    while checkpoint.latest(killed / "checkpoints") is None:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest(killed / "checkpoints").name == "ckpt-000000012"
    assert not (killed / "pretrained.safetensors").exists()
    assert _run(killed, "run").wait(timeout=300) == 0  # resumes from step 12
    a, b = load_file(str(straight / "pretrained.safetensors")), load_file(str(killed / "pretrained.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    model = models.build("ViT-Pico/4", 4, 32)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (5, 10, 15):
        checkpoint.save(tmp_path, step, model, opt, sched, {"step": step}, keep=2)
    (tmp_path / ".tmp-ckpt-000000020-1").mkdir()  # a writer killed mid-write leaves only a temp folder
    (tmp_path / "ckpt-000000025").mkdir()  # or a folder without its state file
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000000010", "ckpt-000000015", "ckpt-000000025"]
    assert checkpoint.latest(tmp_path).name == "ckpt-000000015"
    assert checkpoint.load(checkpoint.latest(tmp_path), model, opt, sched) == {"step": 15}


def test_gradient_accumulation_matches_the_full_batch_step():
    import numpy as np

    from pipelines import pretrain
    from pipelines.data import ImageArrays

    rng = np.random.default_rng(0)
    data = ImageArrays(rng.integers(0, 255, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, 64))
    from pipelines.data.augment import Augment

    results = []
    for micro in (None, 16):
        # SGD: its update is linear in the gradient, so float noise from summing micro-batches stays noise
        # (Adam's g / sqrt(v) turns the noise on near-zero gradients into a full-size step).
        cfg = pretrain.PretrainConfig(steps=3, batch_size=64, optimizer="sgd", lr=0.1, warmup_steps=1,
                                      micro_batch_size=micro, augment=Augment(crop="inception", flip=True))
        results.append(pretrain.run(cfg, "BiT-R14-Pico", data, 4, 32, seed=0, device=torch.device("cpu"),
                                    progress=False).state_dict)
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-5, rtol=1e-4)
