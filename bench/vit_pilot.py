"""ViT recipe pilot: which recipe lets the grid's ViT leave its loss plateau within the grid's compute.

    python bench/vit_pilot.py [--grid configs/scaling-pico.yaml] [--recipes baseline lr2e-3 ...] [--seeds 0 1 2]
        [--set 'NAME=key=value;key=value' ...] [--bias weak|strong]

Each recipe is a list of dotted overrides of the grid (the study's own config path, so what is piloted here is
exactly what `study.run --grid configs/scaling-pico.yaml <overrides>` would train). The default grid is the Pico
study, on which every recipe below was piloted (the README's tables); the default study, configs/scaling.yaml, is its
`femto-batch24`. Every (recipe, seed) pretrains the grid's ViT once on the largest nested subset through
`pipelines.pretrain.run`, as a trial does (same subset for a seed, same loader, one torch thread per
`resources.cpus_per_worker`), then scores it on the source's held-out test split. The recipe is chosen on the
ViT's own upstream numbers alone; `--bias strong` trains the grid's BiT instead, to see on the BiT's own numbers what
a cut (a smaller model, fewer examples) costs it.

Prints one row per recipe: upstream top-1 on the test split (mean over seeds with its 95% t interval, and the
seeds' values), the last epoch's mean training loss against chance (ln classes), pretraining seconds per point,
and, last, each recipe's seconds as a ratio to the first recipe's (the baseline, measured in the same run). The
seconds are wall time on whatever else the machine is running: compare them within one run only. Width and
patch variants (`PILOT_MODELS`) are rows registered in this process only; a recipe names one in `models`. The depth
variant is the model table's ViT-Femto/4.
Goal (issue 25): upstream top-1 at the largest subset >= 2x chance, its 95% interval over 3 seeds excluding chance,
at no more seconds per point than the baseline.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace

import torch

from analysis.intervals import mean_interval
from pipelines import data, families, models, pretrain
from pipelines.metrics import evaluate
from pipelines.perf import pick_device
from pipelines.runtime import Runtime
from study.config import StudyConfig, load_study

# Pilot-only rows of the model table: width/patch variants of ViT-Pico/4 (depth 4, width 64, 4 heads, MLP 128,
# patch 4), registered by `main` only in this process, so a recipe can name one in `models`.
PILOT_MODELS = [
    models.ModelSpec("ViT-Pico/8", "ViT", dict(depth=4, embed_dim=64, num_heads=4, mlp_ratio=2.0, patch_size=8),
                     cpu_sized=True),
    models.ModelSpec("ViT-Pico/8-width128", "ViT", dict(depth=4, embed_dim=128, num_heads=4, mlp_ratio=2.0,
                                                        patch_size=8), cpu_sized=True),
    # BiT-R14-Pico with a stride-2 stem: its first stage at 16 px, a third of its step (a cheaper BiT tried for
    # issue 25's budget; `--bias strong`).
    models.ModelSpec("BiT-R14-Pico/s2", "BiT", {**models.MODELS["BiT-R14-Pico"].kwargs, "stem_stride": 2},
                     cpu_sized=True),
]
PLAIN = ("recipes.ViT.pool=gap", "recipes.ViT.pos_embed=sincos2d", "recipes.ViT.zero_head=true")  # Beyer et al. 2022
PICO = ("models=[ViT-Pico/4, BiT-R14-Pico]",)  # the Pico study's pair, named so `pico-*` mean it on any grid
DEPTH2 = ("models=[ViT-Femto/4, BiT-R14-Femto]",)  # ViT-Pico/4 with 2 blocks: the model table's ViT-Femto/4

# Candidates after Beyer et al. 2022 ("Better plain ViT baselines for ImageNet-1k"), each a set of grid overrides.
RECIPES: dict[str, tuple[str, ...]] = {
    "baseline": (),  # the grid as it stands (configs/scaling-pico.yaml unless --grid says otherwise)
    "lr2e-3": ("pretrain.lr=2.0e-3",),
    "lr3e-3": ("pretrain.lr=3.0e-3",),
    "warmup20": ("pretrain.warmup_steps=20",),
    "batch64": ("pretrain.batch_size=64", "pretrain.warmup_steps=25"),
    "batch64-lr2e-3": ("pretrain.batch_size=64", "pretrain.warmup_steps=25", "pretrain.lr=2.0e-3"),
    "gap": ("recipes.ViT.pool=gap",),
    "sincos2d": ("recipes.ViT.pos_embed=sincos2d",),
    "zero-head": ("recipes.ViT.zero_head=true",),
    "gap-zero-head-lr3e-3": ("recipes.ViT.pool=gap", "recipes.ViT.zero_head=true", "pretrain.lr=3.0e-3"),
    **{f"plain-lr{lr}": (*PLAIN, f"pretrain.lr={lr}") for lr in ("1e-3", "2e-3", "3e-3", "5e-3", "1e-2")},
    "plain-lr5e-3-warmup20": (*PLAIN, "pretrain.lr=5e-3", "pretrain.warmup_steps=20"),
    "plain-lr3e-3-batch16": (*PLAIN, "pretrain.lr=3e-3", "pretrain.batch_size=16", "pretrain.warmup_steps=100"),
    "plain-lr3e-3-no-augment": (*PLAIN, "pretrain.lr=3e-3", "pretrain.augment.crop=none"),
    "depth2": DEPTH2,
    "depth2-lr2e-3": (*DEPTH2, "pretrain.lr=2.0e-3"),
    "depth2-plain-lr3e-3": (*DEPTH2, *PLAIN, "pretrain.lr=3.0e-3"),
    "patch8": ("models=[ViT-Pico/8, BiT-R14-Pico]",),
    "patch8-lr3e-3": ("models=[ViT-Pico/8, BiT-R14-Pico]", "pretrain.lr=3.0e-3"),
    "patch8-width128": ("models=[ViT-Pico/8-width128, BiT-R14-Pico]",),
    # The recipe before the ViT paper's initialisation (`recipes.ViT.weight_init: jax`) joined the grid:
    # the rows above it in the README's pilot table were measured from this init (their overrides on top of it).
    "timm-init": ("recipes.ViT.weight_init=timm",),
    "patch8-width128-plain-lr3e-3": ("models=[ViT-Pico/8-width128, BiT-R14-Pico]", *PLAIN, "pretrain.lr=3.0e-3"),
    # The cuts that would halve a point's compute (README, "Wall time"): half the steps, half the batch, on the
    # default pair whatever the grid; `depth2` above is the other, half the model.
    "pico": PICO,
    "pico-half-steps": (*PICO, "pretrain.examples=8192", "pretrain.warmup_steps=25"),
    "pico-batch16": (*PICO, "pretrain.batch_size=16", "pretrain.examples=8192"),
    "pico-batch24": (*PICO, "pretrain.batch_size=24", "pretrain.examples=12288"),
    "femto-vit-s2-bit": ("models=[ViT-Femto/4, BiT-R14-Pico/s2]",),
    # Both cuts at 3/4 each: the Femto pair at 12,288 examples, as 384 steps of 32, 512 of 24, or 768 of 16.
    "femto-384-steps": (*DEPTH2, "pretrain.examples=12288"),
    "femto-batch24": (*DEPTH2, "pretrain.examples=12288", "pretrain.batch_size=24"),  # the default study's
    "femto-batch16": (*DEPTH2, "pretrain.examples=12288", "pretrain.batch_size=16", "pretrain.warmup_steps=75"),
}


@dataclass(frozen=True)
class Trial:
    recipe: str
    seed: int
    top1: float  # percent, held-out test split
    loss: float  # the last epoch's mean training loss
    train_top1: float
    seconds: float  # pretraining only
    images_per_s: float


def pilot(cfg: StudyConfig, recipe: str, seed: int, device: torch.device, bias: str = "weak") -> Trial:
    """Pretrain the grid's ViT (`bias` "strong": its BiT) on its largest subset for `seed` and score it on the
    held-out split."""
    src = cfg.data.pretrain
    model = model_of(cfg, bias)
    source = data.prepared(src, cfg.cache_dir)
    train = data.nested_subset(source.index(), max(cfg.data.subsets), seed, cfg.data.subset_mode)
    rt = Runtime(device, seed, loader=cfg.data.loader, progress=False)
    merged = cfg.recipes.merged(cfg.pretrain, model)  # the grid's `pretrain:` with the ViT's `recipes:`
    result = pretrain.run(merged, model, train, src.num_classes, src.image_size, rt)
    net = models.build(model, src.num_classes, src.image_size, models.ModelOptions.of(merged))
    net.load_state_dict(result.state_dict)
    top1 = evaluate(net.to(device), source.subset("test"), src.image_size, device)["top1"]
    return Trial(recipe, seed, top1, result.final.loss, result.final.train_top1, result.seconds,
                 result.throughput.get("images_per_s", math.nan))


def warm_up(cfg: StudyConfig, device: torch.device, bias: str = "weak") -> None:
    """A few untimed steps first, so the first recipe's seconds do not also pay for the process's one-time costs
    (imports on first use, the allocator, oneDNN's kernels)."""
    src = cfg.data.pretrain
    train = data.nested_subset(data.prepared(src, cfg.cache_dir).index(), max(cfg.data.subsets), 0)
    short = replace(cfg.pretrain, epochs=None, examples=None, steps=8, warmup_steps=1)
    pretrain.run(short, model_of(cfg, bias), train, src.num_classes, src.image_size,
                 Runtime(device, loader=cfg.data.loader, progress=False))


def model_of(cfg: StudyConfig, bias: str = "weak") -> str:
    """The grid's one model of that inductive bias: "weak", its ViT (or hybrid); "strong", its BiT."""
    found = [m for m in cfg.models if models.get_spec(m).family in families.with_bias(bias)]
    if len(found) != 1:
        raise SystemExit(f"the grid must name exactly one {bias}-bias model, found {found}")
    return found[0]


def report(trials: list[Trial], chance: float) -> None:
    recipes = list(dict.fromkeys(t.recipe for t in trials))
    base = recipes[0]

    def seconds(name: str) -> float:
        return sum(t.seconds for t in trials if t.recipe == name) / sum(t.recipe == name for t in trials)

    print(f"\n| recipe | upstream top-1 % (mean [95% CI]) | per seed | final train loss (chance {chance:.2f}) "
          f"| train top-1 % | s/point |")
    print("|---|---|---|---|---|---|")
    for name in recipes:
        rows = [t for t in trials if t.recipe == name]
        mean, lo, hi = mean_interval([t.top1 for t in rows])
        interval = "" if lo is None else f" [{lo:.1f}, {hi:.1f}]"
        print(f"| {name} | {mean:.1f}{interval} | {', '.join(f'{t.top1:.1f}' for t in rows)} "
              f"| {sum(t.loss for t in rows) / len(rows):.3f} | {sum(t.train_top1 for t in rows) / len(rows):.1f} "
              f"| {seconds(name):.1f} |")
    print(f"\nseconds per point are wall time on a shared machine (noisy); ratio to '{base}' in this run:")
    for name in recipes[1:]:
        print(f"  {name} / {base}: {seconds(name) / seconds(base):.2f}")


def parse_sets(items: list[str]) -> dict[str, tuple[str, ...]]:
    """`--set 'NAME=key=value;key=value'`: an ad-hoc recipe."""
    out = {}
    for item in items:
        name, _, overrides = item.partition("=")
        out[name] = tuple(o for o in overrides.split(";") if o)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="configs/scaling-pico.yaml")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), help=f"from: {', '.join(RECIPES)}")
    parser.add_argument("--set", nargs="*", action="extend", default=[],
                        help="ad-hoc recipes: 'NAME=key=value;key=value' (repeat --set, or list several after one)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--bias", choices=["weak", "strong"], default="weak",
                        help="which of the grid's models to pilot: weak, its ViT (the default); strong, its BiT "
                             "(to see what a cut costs the BiT on its own numbers, after the ViT's recipe is chosen)")
    args = parser.parse_args()
    models.MODELS.update({spec.name: spec for spec in PILOT_MODELS})
    unknown = [name for name in args.recipes if name not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe {unknown[0]!r}; known: {', '.join(RECIPES)} (or define one with --set)")
    chosen = {name: RECIPES[name] for name in args.recipes} | parse_sets(args.set)
    base = load_study(args.grid)
    src = base.data.pretrain
    data.prepare(src, base.cache_dir, progress=False)  # once, before any clock starts
    torch.set_num_threads(max(1, int(base.resources.cpus_per_worker)))  # one trial's threads
    device = pick_device(base.resources.gpus_per_worker)
    warm_up(base, device, args.bias)
    trials = []
    for name, overrides in chosen.items():
        cfg = load_study(args.grid, list(overrides))
        for seed in args.seeds:
            start = time.perf_counter()
            trials.append(pilot(cfg, name, seed, device, args.bias))
            t = trials[-1]
            print(f"{name} seed {seed}: top-1 {t.top1:.1f}, loss {t.loss:.3f}, pretrain {t.seconds:.1f} s "
                  f"({t.images_per_s:.0f} img/s), {time.perf_counter() - start:.1f} s with the test split", flush=True)
    report(trials, math.log(src.num_classes))


if __name__ == "__main__":
    main()
