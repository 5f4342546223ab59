"""What a grid costs before it runs, as the dry run and `--suggest` price it: each point's pretraining and
fine-tuning (its learning-rate sweep included) in GPU-hours at a per-device MFU of an H100's dense bf16 peak, and
the bound the data loader puts on them: the images/s the point's GPUs take at that MFU against what its loader
workers can decode, from a measured per-worker rate. Training steps only: the evaluation passes (few-shot
features, minival and test) are left out."""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipelines import finetune, models, perf
from study.config import GridPoint, StudyConfig

PRICED_ON = "H100 SXM"  # the GPU the grid is priced on (its dense bf16 peak)
ASSUMED_MFU = 0.4  # what the dry run assumes without --mfu (35-45% is typical for ViT-B/16 on an H100)

# Images/s one loader worker (one CPU) decodes and augments to a training image (inception crop + flip) from
# ImageNet-like JPEGs (400-500 x 300-400 px, quality 90), by output size: 1000 / CPU ms per image of our loader,
# its process included (robust to shared cores), median of 5 rounds of `python bench/data_throughput.py
# --workers 1 --sizes 224 448 --rounds 5 --stall-steps 0` on an AMD EPYC VM (Zen 4, AVX-512, 2 cores shared),
# 2026-12-05: 1.19 CPU ms per image at 224 px (a 3-round run: 1.14), 2.19 at 448 px (1.78-2.98 over the rounds).
LOADER_IMAGES_PER_S = {224: 843.0, 448: 457.0}


def loader_images_per_s(image_size: int) -> float:
    """One loader worker's rate at `image_size`: CPU time per image linear in output pixels through the two measured
    sizes (decoding the source JPEG is the fixed part; cropping, resizing and copying grow with the output)."""
    (s0, r0), (s1, r1) = sorted(LOADER_IMAGES_PER_S.items())
    per_pixel = (1 / r1 - 1 / r0) / (s1 * s1 - s0 * s0)
    return 1 / (1 / r0 + per_pixel * (image_size * image_size - s0 * s0))


@dataclass(frozen=True)
class Stage:
    """One training stage of a grid point as priced.

    Attributes:
        flops: training FLOPs (3 x forward: backward ~ 2 x forward) of all its images.
        images: images its steps take (every run of a learning-rate sweep).
        gpu_hours: at the MFU, the loader keeping up.
        needed: images/s the point's GPUs take at the MFU (all ranks together).
        fed: images/s its loader workers can decode and augment (all ranks together).
        serial: no loader workers: decoding runs in the training process, between steps.
    """

    flops: float
    images: int
    gpu_hours: float
    needed: float
    fed: float
    serial: bool

    @property
    def loader_hours(self) -> float:
        """GPU-hours the point holds its GPUs while the loader decodes every image."""
        return self.gpu_hours * self.needed / self.fed

    @property
    def hours(self) -> float:
        """GPU-hours at the pace of the slower of the GPUs and the loader (their sum where decoding is serial)."""
        return self.gpu_hours + self.loader_hours if self.serial else max(self.gpu_hours, self.loader_hours)


def stage(cfg: StudyConfig, images: int, flops_per_image: float, image_size: int, mfu: float) -> Stage:
    """A stage of `images` training images of `flops_per_image` FLOPs each, decoded at `image_size`, on the
    point's resources (`resources.gpus_per_trial` devices, or one per rank on a CPU-only grid)."""
    r, workers = cfg.resources, cfg.data.loader.workers
    devices, peak = r.gpus_per_trial or r.workers_per_trial, perf.peak_flops(PRICED_ON, "bf16")
    flops = flops_per_image * images
    fed = max(workers, 1) * r.workers_per_trial * loader_images_per_s(image_size)
    return Stage(flops, images, flops / (peak * mfu) / 3600,
                 perf.images_per_s_at(mfu, flops_per_image, devices, peak), fed, workers == 0)


def finetune_stages(cfg: StudyConfig, model: str, mfu: float) -> tuple[Stage, ...]:
    """Fine-tuning `model` on each downstream task (none when `evaluate.finetune` is off): the steps `finetune.run`
    takes on the task's train split less its minival, at the global batch, once per learning rate of the sweep."""
    ft = cfg.evaluate.finetune
    if ft is None:
        return ()
    out = []
    for task in cfg.downstream:
        steps, batch = finetune.schedule(ft, task.size, cfg.resources.workers_per_trial)
        images = steps * batch * len(ft.learning_rates)
        # The architecture fine-tuning runs: the recipe's pooling and position embedding, a linear head.
        options = models.ModelOptions.of(cfg.recipes.merged(cfg.pretrain, model)).for_finetuning()
        flops = 3.0 * models.forward_flops(model, ft.image_size, task.num_classes, options)
        out.append(stage(cfg, images, flops, ft.image_size, mfu))
    return tuple(out)


def describe(cfg: StudyConfig, points: list[GridPoint], actions: dict[str, str], mfu: float) -> list[dict]:
    """The dry run's rows (`--json` prints them), one per point, with its cost at `mfu`.

    Returns:
        Rows with the point (`id`, `model`, `subset_size`, ...), `h100_hours` (pretraining, GPU-bound),
        `finetune_flops`, `finetune_h100_hours` (GPU-bound, every task and learning rate), `bound_h100_hours`
        (both stages at the pace of the slower of the GPUs and the loader), the images/s needed at `mfu` and fed
        by the `loader_workers` of each of the `ranks` for pretraining and (the most demanding task)
        fine-tuning, and `action`.
    """
    src, finetunes = cfg.data.pretrain, {m: finetune_stages(cfg, m, mfu) for m in cfg.models}
    rows = []
    for p in points:
        pre = stage(cfg, p.examples_seen, p.pretrain_flops / max(p.examples_seen, 1), src.image_size, mfu)
        fts = finetunes[p.model]
        rows.append({"id": p.id, "model": p.model, "family": p.family, "subset_size": p.subset_size, "seed": p.seed,
                     "steps": p.steps, "examples_seen": p.examples_seen, "pretrain_flops": p.pretrain_flops,
                     "gpus": cfg.resources.gpus_per_trial, "ranks": cfg.resources.workers_per_trial,
                     "loader_workers": cfg.data.loader.workers, "mfu": mfu, "h100_hours": pre.gpu_hours,
                     "finetune_flops": sum(s.flops for s in fts),
                     "finetune_h100_hours": sum(s.gpu_hours for s in fts),
                     "bound_h100_hours": pre.hours + sum(s.hours for s in fts),
                     "images_per_s_needed": pre.needed, "images_per_s_fed": pre.fed,
                     "finetune_images_per_s_needed": max((s.needed for s in fts), default=0.0),
                     "finetune_images_per_s_fed": max((s.fed for s in fts), default=0.0),
                     "action": actions.get(p.id, "train")})
    return rows


def print_grid(rows: list[dict], as_json: bool) -> None:
    """The grid, each point's cost, the loader bound per model and the totals (or the rows as JSON)."""
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'model':<14} {'subset':>12} {'seed':>4} {'examples seen':>15} {'pretrain FLOPs':>15} {'H100-h':>10} "
          f"{'+finetune':>10} {'bound':>10}  this run")
    for r in rows:
        print(f"{r['model']:<14} {r['subset_size']:>12,} {r['seed']:>4} {r['examples_seen']:>15,} "
              f"{r['pretrain_flops']:>15.3e} {r['h100_hours']:>10.2f} {r['finetune_h100_hours']:>10.2f} "
              f"{r['bound_h100_hours']:>10.2f}  {r['action']}")
    if not rows:
        print("0 trials")
        return
    print_loader_bound(rows)
    print_totals(rows)


def print_loader_bound(rows: list[dict]) -> None:
    """Per model: the images/s a point's GPUs take at the MFU, what its loader workers feed, and so the MFU the
    loader allows."""
    workers, ranks = rows[0]["loader_workers"], rows[0]["ranks"]
    print(f"\nloader bound per model (images/s of a point's {ranks} rank(s) together, each with {workers} loader "
          f"worker(s); one worker decodes ~{loader_images_per_s(224):,.0f} 224-px images/s, LOADER_IMAGES_PER_S in "
          f"study/cost.py):")
    print(f"{'model':<14} {'stage':<9} {'needed':>10} {'fed':>10}  MFU the loader allows")
    mfu = rows[0]["mfu"]
    for model in dict.fromkeys(r["model"] for r in rows):
        r = next(r for r in rows if r["model"] == model)
        for name, prefix in (("pretrain", ""), ("finetune", "finetune_")):
            needed, fed = r[f"{prefix}images_per_s_needed"], r[f"{prefix}images_per_s_fed"]
            if needed:
                print(f"{model:<14} {name:<9} {needed:>10,.0f} {fed:>10,.0f}  {min(mfu, mfu * fed / needed):.0%}")


def print_totals(rows: list[dict]) -> None:
    pre, ft = sum(r["h100_hours"] for r in rows), sum(r["finetune_h100_hours"] for r in rows)
    bound, mfu, gpus = sum(r["bound_h100_hours"] for r in rows), rows[0]["mfu"], rows[0]["gpus"]
    flops = sum(r["pretrain_flops"] + r["finetune_flops"] for r in rows)
    said = f"{mfu:.0%} MFU (--mfu)" if mfu != ASSUMED_MFU else f"an assumed {mfu:.0%} MFU (measure it: --mfu X)"
    wall = f"; {gpus:g} GPUs per point, so ~{bound / gpus:,.1f} h of wall time one point at a time" if gpus else ""
    print(f"\n{len(rows)} trials, {flops:.3e} training FLOPs in all, at {said} of an {PRICED_ON}'s bf16 peak per "
          f"GPU:\n  GPU-bound:    ~{pre + ft:,.1f} H100 GPU-hours ({pre:,.1f} pretraining + {ft:,.1f} fine-tuning)"
          f"\n  loader-bound: ~{bound:,.1f} H100 GPU-hours (each stage at the pace of the slower of the GPUs and "
          f"the loader workers){wall}")
