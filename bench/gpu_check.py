"""The GPU path in one run (<= 8 minutes on one H100/H200), one table:

    OUT=/tmp/out python bench/gpu_check.py [--only throughput ...] [--budget 460] [--steps 15] [--batch 256]

- `throughput`: step time, images/s, MFU and peak device memory of our pretraining step (`gpu_throughput.ours`:
  `loop.train_loop` at the pretraining defaults) for ViT-B/16 and BiT-R50x1 at 224 px, bf16 and fp16 (with
  `GradScaler`), eager and compiled; the first `WARMUP` steps left out of the timing, their wall time (with
  the model build and, compiled, a compilation from a cold dynamo cache) reported as `warmup_s`.
- `round_trip`: a run checkpointed halfway on one device string and resumed on `cuda:0` in a fresh model ends
  where an uninterrupted run ends (`max_abs_diff`), with every restored tensor on `cuda:0` (`off_device` = 0).
- `solves`: the few-shot ridge solve (numpy, on the host: it has no GPU path) and the linear probe's L-BFGS solve
  on the GPU vs the CPU, on the same synthetic features (seconds, top-1, speed-up).
- `smoke_study`: `python -m study.run --grid configs/smoke.yaml resources.gpus_per_worker=1` (exit code, points
  whose pretraining reported device memory, i.e. ran on the GPU).

A check gets its time budget (it is skipped, saying so, when less than that is left of `--budget`); a failure is
recorded in its row (`error`) and the others carry on. The table is printed at the end and written to
`$OUT/gpu_check.json` when OUT is set; the last line is the compiled / eager speed-up of ViT-B/16 in bf16 (a
ratio measured in the same run). Without CUDA it prints that it skipped and exits 0 (the JSON then says
`"skipped": true`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo root on the path, so `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.gpu_throughput import CLASSES, SIZE, WARMUP, DeviceBatches, our_setup, ours
from pipelines import fewshot, linear_probe, models, perf
from pipelines.loop import Hooks, LoopSpec, train_loop
from pipelines.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("ViT-B/16", "BiT-R50x1")
SKIP_LINE = "gpu_check: skipped, no CUDA device"
Row = dict[str, object]


@dataclass(frozen=True)
class Check:
    """One measurement: `labels` name its rows (and an error row), `budget_s` is the least time it needs, `run`
    takes the seconds left and returns its rows."""

    labels: Row
    budget_s: float
    run: Callable[[float], list[Row]]
    name: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "name", " ".join(str(v) for v in self.labels.values()))


def random_batch(batch: int, size: int, device: torch.device, classes: int = CLASSES):
    """A fixed uint8 image batch [B,S,S,3] and labels, made on `device`."""
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device, generator=gen)
    return images, torch.randint(0, classes, (batch,), device=device, generator=gen)


def throughput(name: str, precision: str, compiled: bool, device: torch.device, batch: int, steps: int,
               size: int = SIZE) -> list[Row]:
    """Steady-state step time, images/s, MFU and peak memory of `WARMUP + steps` of our pretraining steps."""
    images, labels = random_batch(batch, size, device)
    if compiled:
        torch._dynamo.reset()  # a cold compile: its time is the one a trial pays, not a previous run's cache hit
    perf.reset_peak_memory(device)
    start = time.perf_counter()
    result = ours(name, images, labels, steps, precision, compiled)
    wall = time.perf_counter() - start  # train_loop synchronises at the end of its timing window
    flops = 3 * models.forward_flops(name, size, CLASSES)
    measured = perf.throughput(result.timed_steps * batch, result.timed_seconds, result.waited_seconds,
                               result.timed_steps, flops, device, precision, devices=1)
    return [{"check": "throughput", "model": name, "precision": precision, "compiled": compiled, "batch": batch,
             "step_time_s": measured["step_time_s"], "images_per_s": measured["images_per_s"],
             "mfu": measured.get("mfu", math.nan),
             "peak_memory_gb": measured.get("peak_device_memory_gb", measured.get("peak_host_rss_gb")),
             "warmup_s": wall - result.timed_seconds, "timed_steps": result.timed_steps}]


def _train(name: str, images: torch.Tensor, labels: torch.Tensor, steps: int, precision: str,
           folder: Path | None, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """`steps` eager pretraining steps on one fixed batch from weights drawn with `seed`; with `folder`, resumed
    from and checkpointed there."""
    torch.manual_seed(seed)
    size, device = images.shape[1], images.device
    model, optimizer, scheduler = our_setup(name, device, len(images), size)
    spec = LoopSpec(steps=steps, batch_size=len(images), image_size=size, grad_clip=1.0, precision=precision)
    train_loop(model, DeviceBatches(images, labels), spec, optimizer, scheduler, Runtime(device, progress=False),
               Hooks(checkpoint_dir=folder))
    return model, optimizer


def round_trip(name: str, precision: str, saved_on: torch.device, restored_on: torch.device, size: int = SIZE,
               batch: int = 8, steps: int = 6, tol: float = 1e-4) -> list[Row]:
    """Train `steps` steps straight on `restored_on`; then half of them on `saved_on` with a checkpoint and the
    rest resumed from it in a fresh model on `restored_on`. Both ends must agree within `tol`, and every restored
    tensor (weights, optimizer state) must live on `restored_on`."""
    images, labels = random_batch(batch, size, restored_on)
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # cuDNN's atomic-add weight gradients would differ run to run
    try:
        straight, _ = _train(name, images, labels, steps, precision, None)
        with tempfile.TemporaryDirectory() as tmp:
            _train(name, images.to(saved_on), labels.to(saved_on), steps // 2, precision, Path(tmp))
            # other initial weights: only the checkpoint can make the two ends agree
            resumed, optimizer = _train(name, images, labels, steps, precision, Path(tmp), seed=1)
    finally:
        torch.backends.cudnn.deterministic = deterministic
    after = resumed.state_dict()
    diff = max((v.float() - after[k].float()).abs().max().item() for k, v in straight.state_dict().items())
    restored = [*after.values(), *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
    off = sum(t.device != restored_on for t in restored if t.ndim > 0)  # 0-dim step counters may stay on the host
    return [{"check": "round_trip", "model": name, "precision": precision, "saved_on": str(saved_on),
             "restored_on": str(restored_on), "max_abs_diff": diff, "off_device": off,
             "ok": diff <= tol and off == 0}]


def synthetic_features(n: int, dim: int, classes: int, seed: int = 0):
    """Train and test features (float32) with a learnable class structure: class means plus noise."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)).astype(np.float32)
    y, yt = rng.integers(0, classes, n), rng.integers(0, classes, n // 4)
    x = means[y] + 2.0 * rng.normal(size=(n, dim)).astype(np.float32)
    xt = means[yt] + 2.0 * rng.normal(size=(len(yt), dim)).astype(np.float32)
    return x, y, xt, yt


def _timed(device: torch.device, fn: Callable):
    perf.synchronize(device)
    start = time.perf_counter()
    out = fn()
    perf.synchronize(device)
    return out, time.perf_counter() - start


def solves(devices: list[torch.device], n: int = 4000, dim: int = 768, classes: int = 100,
           max_iter: int = 100) -> list[Row]:
    """Seconds and top-1 of the few-shot solve (host, numpy) and of the linear probe's solve on each of `devices`
    (the first is the baseline of `speedup`), on the same synthetic features."""
    x, y, xt, yt = synthetic_features(n, dim, classes)
    shots = min(10, n // classes // 2)
    cpu = torch.device("cpu")
    result, seconds = _timed(cpu, lambda: fewshot.run(fewshot.FewshotConfig(shots=(1, shots), repeats=1),
                                                      x, y, xt, yt, seed=0))
    rows: list[Row] = [{"check": "fewshot_solve", "device": "cpu (numpy, no GPU path)", "seconds": seconds,
                        "top1": result.top1[shots], "shots": shots}]
    cfg = linear_probe.LinearProbeConfig(max_iter=max_iter)
    for device in devices:
        probe, seconds = _timed(device, lambda d=device: linear_probe.run(cfg, x, y, xt, yt, 0, device=d))
        rows.append({"check": "probe_solve", "device": str(device), "seconds": seconds, "top1": probe.top1,
                     "l2": probe.l2, "speedup": rows[1]["seconds"] / seconds if len(rows) > 1 else 1.0})
    return rows


def _point_records(out: Path) -> list[dict]:
    """The point records a study under `--out` left in its default storage (`<out>/<study>/storage`)."""
    return [json.loads(p.read_text()) for p in out.glob("*/storage/points/*/record.json")]


def smoke_study(timeout_s: float, grid: Path = ROOT / "configs" / "smoke.yaml",
                overrides: tuple[str, ...] = ("resources.gpus_per_worker=1",)) -> list[Row]:
    """The smoke study with one GPU per trial, in a child process (its own session, so a timeout stops Ray too):
    exit code, points pretrained and those of them whose pretraining reported device memory (ran on CUDA)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "study"
        env = {**os.environ, "VITSCALE_CACHE": str(Path(tmp) / "cache"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "study.run", "--grid", str(grid), "--out", str(out), *overrides]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
            error = None if proc.returncode == 0 else (stderr.strip().splitlines() or ["(no stderr)"])[-1]
        except subprocess.TimeoutExpired:
            _stop(proc)
            error = f"timed out after {timeout_s:.0f} s"
        pretrained = [r["pretrain"] for r in _point_records(out) if r.get("pretrain")]
        on_gpu = sum("peak_device_memory_gb" in r for r in pretrained)
        return [{"check": "smoke_study", "rc": proc.returncode, "seconds": time.perf_counter() - start,
                 "points": len(pretrained), "points_on_gpu": on_gpu, **({"error": error} if error else {})}]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the study's process group (it checkpoints and exits), SIGKILL if it is still there in 30 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def run_checks(checks: list[Check], budget_s: float) -> tuple[list[Row], list[Row]]:
    """Every check's rows (an error or a skip recorded in a row of its own labels) and each check's seconds."""
    start, rows, timings = time.perf_counter(), [], []
    for check in checks:
        left = budget_s - (time.perf_counter() - start)
        if left < check.budget_s:
            rows.append({**check.labels, "skipped": f"needs {check.budget_s:.0f} s, {max(left, 0):.0f} s left"})
            continue
        tick = time.perf_counter()
        try:
            rows += check.run(left)
        except Exception as err:  # one check failing must not stop the others
            rows.append({**check.labels, "error": f"{type(err).__name__}: {str(err).strip()[:300]}"})
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - tick
        timings.append({"check": check.name, "seconds": seconds, "budget_s": check.budget_s})
        print(f"  {check.name}: {seconds:.0f} s (budget {check.budget_s:.0f} s)", flush=True)
    return rows, timings


def format_table(rows: list[Row]) -> str:
    """Rows as an aligned text table; columns in order of first appearance, numbers to 4 significant digits."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = [columns, ["-" * w for w in widths], *cells]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def headline(rows: list[Row], model: str = "ViT-B/16", precision: str = "bf16") -> str:
    """The compiled / eager speed-up of `model` at `precision` (eager step time over compiled step time)."""
    step = {r["compiled"]: r.get("step_time_s") for r in rows
            if r.get("check") == "throughput" and r.get("model") == model and r.get("precision") == precision}
    label = f"compiled / eager speed-up, {model} {precision}"
    if not step.get(True) or not step.get(False):
        return f"{label}: n/a (a run failed or was skipped)"
    return f"{label}: {step[False] / step[True]:.2f}x"


def to_json(payload: dict) -> str:
    """Strict JSON: NaN and infinities become null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return [clean(x) for x in v] if isinstance(v, list) else v

    return json.dumps(clean(payload), indent=1, allow_nan=False)


def write_json(payload: dict) -> Path | None:
    """`$OUT/gpu_check.json` when OUT is set."""
    if not os.environ.get("OUT"):
        return None
    path = Path(os.environ["OUT"]) / "gpu_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(payload) + "\n")
    return path


def plan(args: argparse.Namespace) -> list[Check]:
    """The checks, in order: the headline pair first, the smoke study (the longest) last."""
    device = torch.device("cuda")
    saved_on = torch.device(f"cuda:{torch.cuda.device_count() - 1}") if torch.cuda.device_count() > 1 else device
    restored_on = torch.device("cuda:0")
    checks = []
    for precision in ("bf16", "fp16"):
        for name in MODELS:
            for compiled in (False, True):
                budget = (60 if name.startswith("BiT") else 40) if compiled else 10  # sum <= --budget
                checks.append(Check({"check": "throughput", "model": name, "precision": precision,
                                     "compiled": compiled}, budget,
                                    lambda _, n=name, p=precision, c=compiled: throughput(n, p, c, device, args.batch,
                                                                                          args.steps)))
    for name in MODELS:
        checks.append(Check({"check": "round_trip", "model": name, "precision": "fp16"}, 10,
                            lambda _, n=name: round_trip(n, "fp16", saved_on, restored_on)))
    checks.append(Check({"check": "solves"}, 40, lambda _: solves([torch.device("cpu"), device])))
    checks.append(Check({"check": "smoke_study"}, 150, smoke_study))
    return [c for c in checks if not args.only or any(word in c.name for word in args.only)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="run the checks whose name contains one of these")
    parser.add_argument("--budget", type=float, default=460, help="seconds for all checks (8 min less start-up)")
    parser.add_argument("--steps", type=int, default=15, help=f"timed steps per throughput run (after {WARMUP})")
    parser.add_argument("--batch", type=int, default=256, help="throughput batch size")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(SKIP_LINE)
        write_json({"skipped": True, "reason": "no CUDA device", "rows": []})
        return 0
    device = torch.device("cuda")
    name = perf.device_name(device)
    print(f"device: {name} x{torch.cuda.device_count()}, torch {torch.__version__}, CUDA {torch.version.cuda}",
          flush=True)
    start = time.perf_counter()
    rows, timings = run_checks(plan(args), args.budget)
    line = headline(rows)
    print("\n" + format_table(rows))
    path = write_json({"skipped": False, "device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                       "total_s": time.perf_counter() - start, "budget_s": args.budget, "checks": timings,
                       "rows": rows, "headline": line})
    if path is not None:
        print(f"json: {path}")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
