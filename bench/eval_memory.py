"""Peak memory of downstream evaluation (few-shot + linear probe + fine-tune), streamed vs all in memory.

    python bench/eval_memory.py [--images 20000] [--size 224] [--test-images 1000]

Writes a task of `--images` training JPEGs (q90, `--size` px, the procedural shapes drawn at that size) in
webdataset shards, then evaluates a pretrained-shaped ViT-Pico/4 on it twice, each side in its own subprocess so
its peak RSS (`ru_maxrss`) is its own:

- streamed: `pipelines.downstream.run`, as a trial runs it: features extracted batch by batch from the shards,
  the probe on the cached features, fine-tuning streamed by the exactly-once loader.
- in memory: both splits decoded into uint8 arrays at `--size` first (`data.load`), as evaluation ran before it
  streamed, then features from the arrays, few-shot and the probe. The training code no longer takes arrays, so
  this side does not fine-tune: its peak is a lower bound of what that path needed.

Goal (issue 14): streamed peak <= 1/3 of the in-memory peak. Prints the ratio last.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL, FEATURE_SIZE, CLASSES, PER_SHARD = "ViT-Pico/4", 32, 10, 1000


def _write_shard(job: tuple) -> str:
    import webdataset as wds
    from PIL import Image

    from pipelines.data import shapes

    path, split, start, stop, size = job
    with wds.TarWriter(str(path)) as sink:
        for i in range(start, stop):
            image, label = shapes.render(1, split, i, CLASSES, size)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "cls": str(label).encode()})
    return str(path)


def make_task(root: Path, images: int, test_images: int, size: int) -> dict:
    """JPEG shards of the train and test splits; returns the task's SourceConfig fields."""
    jobs = [(root / f"{split}-{start // PER_SHARD:06d}.tar", split, start, min(start + PER_SHARD, n), size)
            for split, n in (("train", images), ("test", test_images)) for start in range(0, n, PER_SHARD)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_write_shard, jobs))
    last = lambda n: (n - 1) // PER_SHARD  # noqa: E731
    return {"source": "webdataset", "name": "shapes-224", "size": images, "test_size": test_images,
            "image_size": size, "num_classes": CLASSES,
            "urls": str(root / f"train-{{000000..{last(images):06d}}}.tar"),
            "test_urls": str(root / f"test-{{000000..{last(test_images):06d}}}.tar")}


def side(mode: str, task_fields: dict, cache: str) -> dict:
    """One side of the comparison, in this process: its evaluations, seconds and peak RSS (MiB)."""
    import torch

    from pipelines import data, downstream, fewshot, finetune, linear_probe, models
    from pipelines.data.stream import LoaderConfig
    from pipelines.downstream import EvaluateConfig, Pretrained
    from pipelines.runtime import Runtime

    torch.set_num_threads(1)
    task = data.SourceConfig(**task_fields)
    ev = EvaluateConfig(fewshot=fewshot.FewshotConfig(shots=(1, 5), repeats=1),
                        finetune=finetune.FinetuneConfig(image_size=FEATURE_SIZE, steps=20, batch_size=64, lr=0.01),
                        diagnostics=None)
    model = models.build(MODEL, 16, FEATURE_SIZE)
    state = model.state_dict()
    cpu, start = torch.device("cpu"), time.perf_counter()
    if mode == "streamed":
        runtime = Runtime(cpu, cache_dir=Path(cache), loader=LoaderConfig(workers=0), progress=False)
        out = downstream.run(ev, Pretrained(MODEL, model, state, FEATURE_SIZE), (task,), runtime)
        values = {m.key: m.value for m in out}
    else:
        from pipelines.metrics import infer

        found = data.prepare(task, Path(cache), progress=False)
        train, test = (data.load(found.subset(s), task.image_size) for s in ("train", "test"))
        (x, y), (xt, yt) = ((infer(model, s.images, FEATURE_SIZE, cpu, pre_logits=True), s.labels)
                            for s in (train, test))
        shots = fewshot.run(ev.fewshot, x, y, xt, yt, 0)
        probe = linear_probe.run(ev.linear_probe, x, y, xt, yt, 0)
        values = {"fewshot_5shot": shots.top1[5], "linear_probe": probe.top1}
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"mode": mode, "peak_rss_mib": peak_mib, "seconds": time.perf_counter() - start, "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--side", choices=["streamed", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child: measure one side, print its record as the last line
        print(json.dumps(side(args.side, json.loads(args.task), args.cache)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        task = make_task(Path(tmp), args.images, args.test_images, args.size)
        print(f"task: {args.images:,} train + {args.test_images:,} test JPEGs at {args.size} px "
              f"({sum(f.stat().st_size for f in Path(tmp).glob('*.tar')) / 2**20:.0f} MiB of shards, "
              f"{time.perf_counter() - start:.0f} s to write)", flush=True)
        results = {}
        for mode in ("streamed", "memory"):
            proc = subprocess.run([sys.executable, __file__, "--side", mode, "--task", json.dumps(task),
                                   "--cache", tmp], capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                raise SystemExit(f"{mode} side failed:\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[mode]
            print(f"{mode:>9}: peak RSS {r['peak_rss_mib']:,.0f} MiB, {r['seconds']:.0f} s, "
                  + ", ".join(f"{k} {v:.1f}" for k, v in r["values"].items()), flush=True)
    ratio = results["streamed"]["peak_rss_mib"] / results["memory"]["peak_rss_mib"]
    print(f"streamed / in-memory peak RSS: {ratio:.3f} (goal <= 0.333)")


if __name__ == "__main__":
    main()
