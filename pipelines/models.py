"""The model table: paper names -> timm constructions, parameter counts and forward FLOPs.

Each row names its family (`pipelines.families`), whose builder turns the row's kwargs into a model.

    python -m pipelines.models [--image-size 224] [--json]

Parameter counts in the table exclude the classifier head (`get_classifier()`), since its size depends on the
dataset. Published counts are compared with the model carrying a 1000-way head: the ViT paper's Table 1
(B 86M, L 307M, H 632M, computed for B/16, L/16, H/14: ours 86.6M, 304.3M, 632.0M, within 1%; /32 variants carry
no published count, their larger patch embedding adds 1.8M) and, for BiT, the counts on timm's model cards of the
released BiT weights (the BiT paper lists none).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pkgutil
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from timm.layers import GroupNormAct, StdConv2d, StdConv2dSame, lecun_normal_, resample_abs_pos_embed, trunc_normal_
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import HybridEmbed
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipelines import families
from pipelines.config import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # a name in `families.FAMILIES`, whose builder takes `kwargs`
    kwargs: dict = field(default_factory=dict)
    published_params_m: float | None = None  # millions, with a 1000-way head (see the module docstring)
    cpu_sized: bool = False

    @property
    def patch(self) -> int | None:
        """Input pixels per token side: the ViT patch size, or a hybrid's backbone stride (its pixels per token)."""
        return self.kwargs.get("patch_size")


@dataclass(frozen=True)
class ModelOptions:
    """The knobs a grid sets per model (under `pretrain:` or a recipe); the defaults build the table's models as
    they always were. Which a family honours is its row's `knobs` (`pipelines.families`); the head's two take every
    family.

    Attributes:
        dropout: a ViT's dropout after every dense layer but the qkv projection and after adding the position
            embedding (ViT paper Appendix B.1; big_vision `vit.py`: timm's `proj_drop_rate` and `pos_drop_rate`);
            a BiT's dropout before its head (timm `ResNetV2(drop_rate)`).
        drop_path: stochastic depth, rising linearly with depth to this rate (timm `drop_path_rate`).
        pool: `token` (the class token, as the paper) or `gap` (the mean of the encoder's normalised tokens, no
            class token: the paper's Appendix D.3 and big_vision `pool_type='gap'`).
        pos_embed: `learned`, or `sincos2d`: a fixed 2D sin-cos table (big_vision `posemb='sincos2d'`), not a
            parameter, recomputed for the grid at any resolution.
        pre_logits: the paper's pretraining head, one tanh hidden layer of the model's width before the classifier
            (big_vision `rep_size=True`); fine-tuning replaces it by a linear head (`pretrained_for_task`).
        zero_head: the classifier's weights start at zero (big_vision `head_zeroinit`), so every logit starts at
            the bias.
        head_bias_init: the classifier's bias starts here: big_vision pretrains its 21,843-way sigmoid with -10
            (`configs/vit_i21k.py`, `init_head_bias`), so every class starts near probability 0 and the loss near
            the positives' alone instead of ~ C log 2.
        weight_init: a transformer's initial weights. `timm`: timm's default (every dense layer truncated-normal
            at std 0.02, as DeiT). `jax`: the ViT paper's and big_vision's (timm `weight_init='jax'`): dense layers
            Xavier-uniform, the patch embedding (and a hybrid's convolutions) LeCun-normal, the head zero, the
            class token ~0. At width 64 a std-0.02 layer scales its input by ~0.16, so timm's start is close to a
            linear model of the patches; the Pico study's ViT-Pico/4 leaves its loss plateau sooner from `jax`.
    """

    dropout: float = 0.0
    drop_path: float = 0.0
    pool: Literal["token", "gap"] = "token"
    pos_embed: Literal["learned", "sincos2d"] = "learned"
    pre_logits: bool = False
    zero_head: bool = False
    head_bias_init: float = 0.0
    weight_init: Literal["timm", "jax"] = "timm"

    @classmethod
    def of(cls, config) -> ModelOptions:
        """The options a config carrying them as fields (`PretrainConfig`) gives."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def changed(self) -> dict:
        """The knobs set to other than their defaults, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    def for_finetuning(self) -> ModelOptions:
        """The architecture a downstream task fine-tunes: the same pooling and position embedding, a linear head
        (the paper's fine-tuning head) and none of pretraining's regularisation (the public ViT fine-tuning
        configs set dropout to 0)."""
        return ModelOptions(pool=self.pool, pos_embed=self.pos_embed)


NO_OPTIONS = ModelOptions()


def _vit(depth: int, dim: int, heads: int, mlp: int, patch: int, **extra) -> dict:
    return dict(depth=depth, embed_dim=dim, num_heads=heads, mlp_ratio=mlp / dim, patch_size=patch, **extra)


def _bit(layers: tuple[int, ...], width: int = 1, **extra) -> dict:
    return dict(layers=layers, width_factor=width, **extra)


def _hybrid(vit: dict, layers: tuple[int, ...]) -> dict:
    """ViT paper hybrids: ResNet-50 (v1-style stem and blocks, StdConv + GroupNorm) as the patch embedding, ViT on
    its 1x1 feature 'patches'. Stages (3, 4, 9) end at stride 16; the full (3, 4, 6, 3) at stride 32."""
    return {**vit, "patch_size": 16 if len(layers) == 3 else 32, "hybrid_layers": layers}


# Small-image BiT variants: 3x3 stride-1 stem without max-pool (a 7x7/2 stem + pool would leave 8x8 of a
# 32-px image before the first block), bottleneck channels 1/8 of R50's, GroupNorm with 8 groups.
_TINY_BIT = dict(channels=(32, 64, 128, 256), stem_chs=16, small_stem=True, gn_groups=8)

MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    # ViT paper Table 1 (B, L, H) and DeiT's Ti/S widths; patch size after the slash.
    ModelSpec("ViT-Ti/16", "ViT", _vit(12, 192, 3, 768, 16)),
    ModelSpec("ViT-S/16", "ViT", _vit(12, 384, 6, 1536, 16)),
    ModelSpec("ViT-B/32", "ViT", _vit(12, 768, 12, 3072, 32)),
    ModelSpec("ViT-B/16", "ViT", _vit(12, 768, 12, 3072, 16), 86.0),
    ModelSpec("ViT-L/32", "ViT", _vit(24, 1024, 16, 4096, 32)),
    ModelSpec("ViT-L/16", "ViT", _vit(24, 1024, 16, 4096, 16), 307.0),
    ModelSpec("ViT-H/14", "ViT", _vit(32, 1280, 16, 5120, 14), 632.0),
    # BiT (Kolesnikov et al. 2020): ResNet-v2, GroupNorm + Weight Standardization.
    ModelSpec("BiT-R50x1", "BiT", _bit((3, 4, 6, 3), 1), 25.5),
    ModelSpec("BiT-R101x1", "BiT", _bit((3, 4, 23, 3), 1), 44.5),
    ModelSpec("BiT-R152x1", "BiT", _bit((3, 8, 36, 3), 1)),
    ModelSpec("BiT-R50x2", "BiT", _bit((3, 4, 6, 3), 2)),
    ModelSpec("BiT-R50x3", "BiT", _bit((3, 4, 6, 3), 3), 217.3),
    ModelSpec("BiT-R101x3", "BiT", _bit((3, 4, 23, 3), 3), 387.9),
    ModelSpec("BiT-R152x2", "BiT", _bit((3, 8, 36, 3), 2), 236.3),
    ModelSpec("BiT-R152x4", "BiT", _bit((3, 8, 36, 3), 4), 936.5),
    ModelSpec("BiT-R200x3", "BiT", _bit((3, 24, 36, 3), 3)),
    # ViT paper hybrids (Section 3.1, Appendix Table 6).
    ModelSpec("R50x1+ViT-B/32", "Hybrid", _hybrid(_vit(12, 768, 12, 3072, 32), (3, 4, 6, 3))),
    ModelSpec("R50x1+ViT-B/16", "Hybrid", _hybrid(_vit(12, 768, 12, 3072, 16), (3, 4, 9))),
    ModelSpec("R50x1+ViT-L/16", "Hybrid", _hybrid(_vit(24, 1024, 16, 4096, 16), (3, 4, 9))),
    # CPU-sized variants for 32-px images. The Femto and Pico pairs have about the same parameter count (74k / 84k,
    # 141k / 127k without heads); the Nano pair does not (ViT 460k, BiT 221k: the BiT grew in depth only). Femto: half a
    # Pico's step (a ViT-Pico/4 with 2 blocks; a BiT-R14-Pico whose first three stages, where its step's time goes
    # at 32 and 16 px, are half as wide, with GroupNorm of 4 groups). The Femto pair is the default study's
    # (configs/scaling.yaml), the Pico pair the Pico study's (configs/scaling-pico.yaml): README, "The default study".
    ModelSpec("ViT-Femto/4", "ViT", _vit(2, 64, 4, 128, 4), cpu_sized=True),
    ModelSpec("ViT-Pico/4", "ViT", _vit(4, 64, 4, 128, 4), cpu_sized=True),
    ModelSpec("ViT-Nano/4", "ViT", _vit(6, 96, 4, 192, 4), cpu_sized=True),
    ModelSpec("BiT-R14-Femto", "BiT", _bit((1, 1, 1, 1), **{**_TINY_BIT, "channels": (16, 32, 64, 256),
                                                            "gn_groups": 4}), cpu_sized=True),
    ModelSpec("BiT-R14-Pico", "BiT", _bit((1, 1, 1, 1), **_TINY_BIT), cpu_sized=True),
    ModelSpec("BiT-R26-Nano", "BiT", _bit((2, 2, 2, 2), **_TINY_BIT), cpu_sized=True),
]}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; valid models: {', '.join(MODELS)}")
    return MODELS[name]


def check_options(name: str, options: ModelOptions) -> None:
    """Refuse a knob `name`'s family does not honour (its row's `knobs`), naming it and what the family takes."""
    family = families.get(get_spec(name).family)
    head = ("zero_head", "head_bias_init")
    refused = [k for k in options.changed() if k not in family.knobs + head]
    if refused:
        raise ConfigError(f"{refused[0]}={getattr(options, refused[0])!r} does not apply to {name} (a {family.name} "
                          f"model); {family.name} models take {', '.join(family.knobs + head)}")


def build(name: str, num_classes: int, image_size: int, options: ModelOptions = NO_OPTIONS) -> nn.Module:
    """Build a fresh timm model by table name with `options` (on the current default device; use
    `torch.device('meta')`)."""
    check_options(name, options)
    spec = get_spec(name)
    builder = pkgutil.resolve_name(families.get(spec.family).builder)
    model = builder(dict(spec.kwargs), num_classes, image_size, options)
    head = model.get_classifier()
    with torch.no_grad():
        if options.zero_head:
            head.weight.zero_()
        if options.head_bias_init:
            head.bias.fill_(options.head_bias_init)  # else timm's 0 (ViT and ResNetV2)
    return model


def _transformer(options: ModelOptions) -> dict:
    """timm `VisionTransformer` arguments for the knobs: a class token only for token pooling; GAP averages the
    final-normed tokens (`fc_norm=False`: norm, then mean, as big_vision), dropout where the paper puts it."""
    return dict(class_token=options.pool == "token", global_pool="token" if options.pool == "token" else "avg",
                fc_norm=False, proj_drop_rate=options.dropout, pos_drop_rate=options.dropout,
                drop_path_rate=options.drop_path, weight_init="jax" if options.weight_init == "jax" else "")


def _finish_transformer(model: VisionTransformer, options: ModelOptions) -> VisionTransformer:
    """The knobs timm has no argument for: the fixed sin-cos table and the pre-logits layer."""
    if options.pos_embed == "sincos2d":
        table = sincos2d(*model.patch_embed.grid_size, model.embed_dim)
        table = torch.cat([table.new_zeros(model.num_prefix_tokens, model.embed_dim), table])  # no posemb on [cls]
        del model.pos_embed
        model.register_buffer("pos_embed", table[None], persistent=False)  # not trained, not in checkpoints
    if options.pre_logits:
        # timm's forward_head runs `fc_norm` between pooling and the classifier (an Identity in these models), so
        # the layer sits there and `forward_head(pre_logits=True)`, the few-shot features, ends with its tanh, as
        # big_vision's `pre_logits`.
        fc = nn.Linear(model.embed_dim, model.embed_dim)
        if options.weight_init == "jax":
            lecun_normal_(fc.weight)  # big_vision's pre_logits: a Flax Dense with its default init
        else:
            trunc_normal_(fc.weight, std=0.02)  # timm's init for the ViT's other dense layers
        nn.init.zeros_(fc.bias)
        model.fc_norm = nn.Sequential(OrderedDict(fc=fc, act=nn.Tanh()))
    return model


PRE_LOGITS = "fc_norm."  # the pre-logits layer's state-dict prefix, dropped when fine-tuning re-heads the model


def sincos2d(height: int, width: int, dim: int, temperature: float = 10_000.0) -> torch.Tensor:
    """[height * width, dim] fixed 2D sin-cos position embedding, row-major over the patch grid, as big_vision's
    `posemb_sincos_2d` (MoCo v3): [sin x, cos x, sin y, cos y], frequencies temperature^(-i / (dim/4 - 1)).
    timm's `build_sincos2d_pos_embed` orders the bands and spaces the frequencies differently."""
    if dim % 4:
        raise ConfigError(f"pos_embed=sincos2d needs a width divisible by 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4 - 1))
    x, y = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


def build_vit(kw: dict, num_classes: int, image_size: int, options: ModelOptions) -> nn.Module:
    """The ViT family's builder (`families.FAMILIES`): a model row's kwargs -> a timm `VisionTransformer`."""
    # By default class token + token pooling, as in the paper; timm's default init (trunc-normal).
    return _finish_transformer(VisionTransformer(img_size=image_size, num_classes=num_classes, **kw,
                                                 **_transformer(options)), options)


def build_hybrid(kw: dict, num_classes: int, image_size: int, options: ModelOptions) -> nn.Module:
    """The Hybrid family's builder: a ResNet-v1 backbone (`hybrid_layers`) as a ViT's patch embedding."""
    layers = kw.pop("hybrid_layers")
    kw.pop("patch_size")  # the backbone's stride; the ViT itself takes 1x1 patches of its features
    backbone = ResNetV2(layers=layers, num_classes=0, global_pool="", preact=False, stem_type="same",
                        conv_layer=partial(StdConv2dSame, eps=1e-8))
    model = VisionTransformer(img_size=image_size, num_classes=num_classes, patch_size=1,
                              embed_layer=partial(HybridEmbed, backbone=backbone), **kw, **_transformer(options))
    return _finish_transformer(model, options)


def build_bit(kw: dict, num_classes: int, image_size: int, options: ModelOptions) -> nn.Module:
    """The BiT family's builder: a timm `ResNetV2` with GroupNorm + Weight Standardization."""
    small_stem = kw.pop("small_stem", False)
    stem_stride = kw.pop("stem_stride", 1)
    groups = kw.pop("gn_groups", 32)
    model = ResNetV2(num_classes=num_classes, stem_type="fixed", conv_layer=partial(StdConv2d, eps=1e-8),
                     norm_layer=partial(GroupNormAct, num_groups=groups), drop_rate=options.dropout,
                     drop_path_rate=options.drop_path, **kw)
    if small_stem:
        model.stem = nn.Sequential(StdConv2d(3, kw["stem_chs"], kernel_size=3, stride=stem_stride, padding=1,
                                             eps=1e-8))
    return model


def backbone_params(model: nn.Module) -> int:
    """Parameters excluding the classifier head (see module docstring)."""
    head = {id(p) for p in model.get_classifier().parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in head)


@functools.lru_cache(maxsize=256)
def forward_flops(name: str, image_size: int, num_classes: int = 1000, options: ModelOptions = NO_OPTIONS) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass of one image, counted from the module graph on the
    meta device (no weights allocated), attention matmuls included whichever SDPA kernel timm calls."""
    with torch.device("meta"):
        model = build(name, num_classes, image_size, options)
        x = torch.empty(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def pretrained_for_task(name: str, state: dict[str, torch.Tensor], num_classes: int, image_size: int,
                        options: ModelOptions = NO_OPTIONS) -> nn.Module:
    """A pretrained backbone (built with `options`) re-headed for a downstream task at `image_size`.

    The head, and a pre-logits layer, are dropped and replaced by a zero-initialised linear head (the paper's
    fine-tuning set-up, `ModelOptions.for_finetuning`); a learned position embedding is resampled by 2D
    interpolation of the patch grid, the class token kept apart (a sin-cos one is computed for the new grid).
    """
    model = build(name, num_classes, image_size, options.for_finetuning())
    prefix = _head_prefix(model)
    head_keys = {k for k in model.state_dict() if k.startswith(prefix)}
    dropped = (prefix, PRE_LOGITS) if options.pre_logits else (prefix,)
    backbone = {k: v for k, v in state.items() if not k.startswith(dropped)}
    if "pos_embed" in backbone:
        grid = model.patch_embed.grid_size
        backbone["pos_embed"] = resample_abs_pos_embed(backbone["pos_embed"], new_size=list(grid),
                                                       num_prefix_tokens=model.num_prefix_tokens)
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if set(missing) != head_keys or unexpected:
        raise RuntimeError(f"checkpoint does not match {name}: missing {missing}, unexpected {unexpected}")
    head = model.get_classifier()
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return model


def _head_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the classifier (`head.` for a ViT, `head.fc.` for a ResNetV2)."""
    classifier = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is classifier) + "."


def table(image_size: int) -> list[dict]:
    rows = []
    for spec in MODELS.values():
        with torch.device("meta"):
            model = build(spec.name, 1000, image_size)
        rows.append({"name": spec.name, "family": spec.family, "params": backbone_params(model),
                     "published_params_with_head": None if spec.published_params_m is None
                     else int(spec.published_params_m * 1e6),
                     "gflops": forward_flops(spec.name, image_size) / 1e9, "cpu_sized": spec.cpu_sized})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.models", description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    args = parser.parse_args(argv)
    rows = table(args.image_size)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'model':<16} {'family':<6} {'params':>12} {'published':>10} {'GFLOPs@' + str(args.image_size):>12}")
    for r in rows:
        paper = "" if r["published_params_with_head"] is None else f"{r['published_params_with_head'] / 1e6:.1f}M"
        print(f"{r['name']:<16} {r['family']:<6} {r['params']:>12,} {paper:>10} {r['gflops']:>12.3f}")
    print("params: without the classifier head; published: counted with a 1000-way head (ViT Table 1; timm's "
          "BiT model cards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
