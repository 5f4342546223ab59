"""Checkpoint/resume: N steps straight vs N/2 steps, SIGKILL, resume to N must give the same weights, bit for bit
(CPU, one thread: the same kernels run in the same order on the same data, RNG states and optimizer state), with
the data read from shards by the loader production runs (DataLoader worker processes included)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines import checkpoint, models

SCRIPT = """
import sys, time, numpy as np, torch
from pathlib import Path
torch.set_num_threads(1)
from pipelines import pretrain
from pipelines.data.augment import Augment
from pipelines.data.stream import LoaderConfig
from pipelines.loop import Hooks
from pipelines.runtime import Runtime
from tests.pipelines.tiny import as_shards
rng = np.random.default_rng(0)
data = as_shards(rng.integers(0, 255, (320, 32, 32, 3), dtype=np.uint8), rng.integers(0, 8, 320))
cfg = pretrain.PretrainConfig(steps=24, batch_size=32, lr=3e-3, warmup_steps=4, checkpoint_every=12,
                              augment=Augment(crop="translate", crop_padding=2, flip=True))
out, stall = Path(sys.argv[1]), sys.argv[2] == "stall"
# 10 steps per epoch; the checkpoint at step 12 is mid-epoch. When asked, stall at the end of epoch 2 (step 20)
# so the parent can kill this process after checkpoint 12 and before the run could finish.
hold = lambda record: time.sleep(600) if stall and record.step == 20 else None
rt = Runtime(torch.device("cpu"), seed=3, loader=LoaderConfig(workers=2), progress=False)
pretrain.run(cfg, "ViT-Pico/4", data, 8, 32, rt, Hooks(on_epoch=hold, checkpoint_dir=out / "checkpoints"),
             out_dir=out)
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


# Saves checkpoints `steps` in turn and SIGKILLs itself at `where` inside the last save: at a chosen point rather
# than after a timer, so every case interrupts the write it names.
KILLED_SAVE = """
import os, shutil, signal, sys
from pathlib import Path
import torch
from pipelines import checkpoint

root, where, steps = Path(sys.argv[1]), sys.argv[2], [int(s) for s in sys.argv[3:]]
model = torch.nn.Linear(8, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
sched = torch.optim.lr_scheduler.StepLR(opt, 10)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def cut_short(write):  # the file as a kill mid-write leaves it: its first half
    def cut(obj, path, *args, **kwargs):
        write(obj, path, *args, **kwargs)
        os.truncate(path, os.path.getsize(path) // 2)
        die()
    return cut

def rmtree_killed(path, *args, **kwargs):  # killed mid-delete, the weights gone and state.pt not yet
    if (Path(path) / "model.safetensors").exists():
        (Path(path) / "model.safetensors").unlink()
        die()
    real_rmtree(path, *args, **kwargs)

real_rmtree, real_rename = shutil.rmtree, os.rename
for step in steps:
    if step == steps[-1]:
        if where == "weights":
            checkpoint.save_file = cut_short(checkpoint.save_file)
        elif where == "state":
            torch.save = cut_short(torch.save)
        elif where == "rename":  # everything written, the rename into place not done
            os.rename = lambda src, dst: die() if ".tmp-" in str(src) else real_rename(src, dst)
        else:
            shutil.rmtree = rmtree_killed
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)  # the weights say which step they were saved at
    checkpoint.save(root, step, model, opt, sched, {"step": step}, keep=2)
"""


# Where the last save is killed, the steps saved, and the checkpoint that must then be the newest complete one.
@pytest.mark.parametrize("where, steps, survivor", [
    ("weights", [5, 10, 15], 10),
    ("state", [5, 10, 15], 10),
    ("rename", [5, 10, 15], 10),
    ("replace", [5, 10, 10], 10),  # a resumed run saving a step again, killed deleting the old one
    ("prune", [5, 10, 15], 15),  # killed deleting the oldest
])
def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path, where, steps, survivor):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path), where, *map(str, steps)], env=env,
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    assert checkpoint.latest(tmp_path).name == f"ckpt-{survivor:09d}"
    assert checkpoint.load(checkpoint.latest(tmp_path), model, opt, sched) == {"step": survivor}
    assert all(torch.all(p == survivor) for p in model.parameters())
    checkpoint.save(tmp_path, 20, model, opt, sched, {"step": 20}, keep=2)  # the next save clears the leftovers
    assert sorted(os.listdir(tmp_path)) == [f"ckpt-{survivor:09d}", "ckpt-000000020"]


def test_incomplete_folders_are_never_loaded_nor_push_out_a_complete_one(tmp_path):
    model = models.build("ViT-Pico/4", 4, 32)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (5, 10, 15):
        checkpoint.save(tmp_path, step, model, opt, sched, {"step": step}, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000010", "ckpt-000000015"]
    (tmp_path / "ckpt-000000025").mkdir()  # a copy from storage cut short: no state.pt yet
    assert checkpoint.latest(tmp_path).name == "ckpt-000000015"
    checkpoint.save(tmp_path, 20, model, opt, sched, {"step": 20}, keep=1)
    assert checkpoint.latest(tmp_path).name == "ckpt-000000020"
    assert checkpoint.load(checkpoint.latest(tmp_path), model, opt, sched) == {"step": 20}


def test_a_checkpoint_of_older_code_with_an_augmentation_generator_still_resumes(tmp_path):
    """Checkpoints written before the in-memory path was removed hold a "gen" entry (its augmentation RNG): a run
    resumes from one as from any other, to the weights of a run that was never interrupted."""
    import numpy as np

    from pipelines import pretrain
    from pipelines.data.augment import Augment
    from pipelines.data.stream import LoaderConfig
    from pipelines.loop import Hooks
    from pipelines.runtime import Runtime
    from tests.pipelines.tiny import as_shards

    rng = np.random.default_rng(0)
    data = as_shards(rng.integers(0, 255, (16, 16, 16, 3), dtype=np.uint8), rng.integers(0, 4, 16))

    class Stop(Exception):
        pass

    def stop(path: Path) -> None:
        raise Stop

    def run(ckpt: Path, on_checkpoint=None) -> dict:
        cfg = pretrain.PretrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, checkpoint_every=2,
                                      augment=Augment(crop="translate", crop_padding=2, flip=True))
        rt = Runtime(torch.device("cpu"), loader=LoaderConfig(workers=0), progress=False)
        return pretrain.run(cfg, "ViT-Pico/4", data, 4, 16, rt,
                            Hooks(checkpoint_dir=ckpt, on_checkpoint=on_checkpoint)).state_dict

    straight = run(tmp_path / "straight")
    with pytest.raises(Stop):
        run(tmp_path / "old", on_checkpoint=stop)  # stopped right after its checkpoint at step 2
    state_file = checkpoint.latest(tmp_path / "old") / "state.pt"
    state = torch.load(state_file, weights_only=True)
    assert "gen" not in state["loop"]
    state["loop"]["gen"] = torch.Generator().manual_seed(0).get_state()  # as the older code wrote it
    torch.save(state, state_file)
    resumed = run(tmp_path / "old")
    assert checkpoint.latest(tmp_path / "old").name == "ckpt-000000004"
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0)


def test_gradient_accumulation_matches_the_full_batch_step():
    import numpy as np

    from pipelines import pretrain
    from pipelines.data.augment import Augment
    from pipelines.data.stream import LoaderConfig
    from pipelines.runtime import Runtime
    from tests.pipelines.tiny import as_shards

    rng = np.random.default_rng(0)
    data = as_shards(rng.integers(0, 255, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, 64))

    results = []
    for micro in (None, 16):
        # SGD: its update is linear in the gradient, so float noise from summing micro-batches stays noise
        # (Adam's g / sqrt(v) turns the noise on near-zero gradients into a full-size step).
        cfg = pretrain.PretrainConfig(steps=3, batch_size=64, optimizer="sgd", lr=0.1, warmup_steps=1,
                                      micro_batch_size=micro, augment=Augment(crop="inception", flip=True))
        rt = Runtime(torch.device("cpu"), loader=LoaderConfig(workers=0), progress=False)
        results.append(pretrain.run(cfg, "BiT-R14-Pico", data, 4, 32, rt).state_dict)
    for k in results[0]:
        # Weight standardisation + GroupNorm carry summation-order noise to ~3e-5 after three steps (with or
        # without weight decay on the 1-D parameters); a wrong accumulation is off by ~1e-2.
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-4, rtol=1e-3)


def _written_on(state_file: Path, device: str) -> None:
    """Rewrite a saved state file's storage location tags, as if `device` had written it (torch.save records the
    device of every storage; loading without `map_location` puts each tensor back there)."""
    import io
    import zipfile

    raw = zipfile.ZipFile(io.BytesIO(state_file.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in raw.infolist():
            data = raw.read(info)
            if info.filename.endswith("data.pkl"):  # pickle protocol 2: `X` + 4-byte length + the string
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X" + len(device).to_bytes(4, "little") + device.encode())
            dst.writestr(info, data)
    state_file.write_bytes(out.getvalue())


def test_a_checkpoint_written_on_a_gpu_resumes_on_another_device(tmp_path):
    """Saved on `cuda:3` (its location tags rewritten), restored where that device does not exist: the state is
    mapped to the CPU, then into the parameters' and optimizer's own devices."""
    model = models.build("ViT-Pico/4", 4, 32)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    opt.step()  # the optimizer has state (exp_avg, ...) to restore
    saved = checkpoint.save(tmp_path, 7, model, opt, sched, {"step": 7}, keep=2)
    _written_on(saved / "state.pt", "cuda:3")
    if not torch.cuda.is_available():  # the file really names a device this machine lacks
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(saved / "state.pt", weights_only=True)
    fresh = models.build("ViT-Pico/4", 4, 32)
    opt2 = torch.optim.AdamW(fresh.parameters())
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    assert checkpoint.load(saved, fresh, opt2, sched2) == {"step": 7}
    moments = [s["exp_avg"] for s in opt2.state.values()]
    assert moments and all(m.device.type == "cpu" for m in moments)
    assert all(torch.equal(a, b["exp_avg"]) for a, b in zip(moments, opt.state.values(), strict=True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_the_saved_generators_replay_the_dropout_masks_of_the_device(device):
    """`rng_state` holds the CPU generator and, on a GPU, the GPU's (where a CUDA model's dropout draws from): after
    `set_rng_state` the next masks are those drawn after the save."""
    device = torch.device(device)
    torch.manual_seed(0)
    x = torch.ones(64, 64, device=device)
    torch.nn.functional.dropout(x, 0.5)
    saved = checkpoint.rng_state(device)
    after = torch.nn.functional.dropout(x, 0.5)
    torch.nn.functional.dropout(x, 0.5)
    checkpoint.set_rng_state(saved[0], device)
    assert torch.equal(torch.nn.functional.dropout(x, 0.5), after)
