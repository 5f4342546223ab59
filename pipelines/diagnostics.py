"""What a model learned in place of the CNN's built-in bias (the ViT paper's Fig 7), as numbers.

For a ViT: PCA of the patch-embedding filters, the cosine similarity of the position embeddings (and one
number, `posemb_locality`), and the mean attention distance per layer and head. For a ResNet: the theoretical
receptive field per stage, so both share one distance axis (pixels). Which applies, and where the parts they read
sit on the model, is the family's `diagnostic` (`pipelines.families`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np
import torch
from safetensors.numpy import load, save
from scipy.stats import spearmanr
from torch import nn

from pipelines import families, perf
from pipelines.loop import to_input


@dataclass
class Diagnostics:
    family: str
    metrics: dict[str, float] = field(default_factory=dict)
    filters: np.ndarray | None = None  # [k, p, p, 3] PCA components of the patch filters (unit norm)
    explained: np.ndarray | None = None  # their explained-variance ratios
    posemb_sim: np.ndarray | None = None  # [g, g, g, g]: similarity of position (r, c) to every (r', c')
    attn_distance: np.ndarray | None = None  # [layers, heads], pixels
    receptive_field: list[int] = field(default_factory=list)  # pixels, per ResNet stage

    @property
    def has_panel(self) -> bool:
        """Whether it holds the arrays of a Fig 7 panel (an attention family's)."""
        return self.attn_distance is not None


def filter_pca(weight: torch.Tensor, k: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of the flattened patch-embedding filters [D, 3, p, p] -> ([k, p, p, 3], ratios)."""
    w = weight.detach().double().flatten(1).numpy()
    w = w - w.mean(0)
    _, s, vt = np.linalg.svd(w, full_matrices=False)
    k = min(k, len(s))
    p = weight.shape[-1]
    return vt[:k].reshape(k, 3, p, p).transpose(0, 2, 3, 1), (s**2 / (s**2).sum())[:k]


def posemb_similarity(pos_embed: np.ndarray, grid: int) -> np.ndarray:
    """Cosine similarity between every pair of patch position embeddings [g*g, D] -> [g, g, g, g]."""
    e = pos_embed / np.linalg.norm(pos_embed, axis=1, keepdims=True)
    return (e @ e.T).reshape(grid, grid, grid, grid)


def grid_distances(grid: int) -> np.ndarray:
    """Euclidean distance between patch positions, in patches: [g*g, g*g]."""
    rc = np.stack(np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij"), -1).reshape(-1, 2)
    return np.linalg.norm(rc[:, None, :] - rc[None, :, :], axis=-1)


def posemb_locality(pos_embed: np.ndarray, grid: int) -> float:
    """Spearman correlation between embedding similarity and closeness (minus 2D grid distance), over all
    pairs of distinct positions: near 1 when nearby patches have similar embeddings, near 0 for random ones."""
    sim = posemb_similarity(pos_embed, grid).reshape(grid * grid, grid * grid)
    iu = np.triu_indices(grid * grid, 1)
    return float(spearmanr(sim[iu], -grid_distances(grid)[iu]).statistic)


def mean_attention_distance(probs: torch.Tensor, grid: int, patch_size: int, num_prefix: int = 1) -> np.ndarray:
    """Attention-weighted mean distance (pixels) between query and key patches, per head: [B, H, N, N] -> [H].

    Prefix tokens (the class token) are excluded as queries and keys; each query's weights over the patch keys
    are renormalised to sum to one.
    """
    patches = probs[..., num_prefix:, num_prefix:].double()
    patches = patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)
    dist = torch.from_numpy(grid_distances(grid) * patch_size)
    return (patches * dist).sum(-1).mean((0, 2)).numpy()


def uniform_attention_distance(grid: int, patch_size: int) -> float:
    """The mean attention distance (pixels) of uniform attention over the patch grid: `mean_attention_distance` of
    a head that weighs every patch alike. A head near it attends globally; a local head scores well below it."""
    return float(grid_distances(grid).mean() * patch_size)


@torch.no_grad()
def attention_probabilities(model: nn.Module, x: torch.Tensor, precision: str = "fp32",
                            blocks: str = "blocks") -> list[torch.Tensor]:
    """Per block (`blocks`: their attribute path), the softmax attention [B, H, N, N], recomputed from each
    attention module's input.

    Fused attention (SDPA) never materialises the probabilities; rather than switching it off, a forward hook
    captures the input of every `Attention` and the probabilities are recomputed from its own q/k projections.
    The forward runs in `precision` (`perf.autocast`); the recomputation in fp32, so the softmax is not rounded.
    """
    inputs: list[torch.Tensor] = []
    layers = attrgetter(blocks)(model)
    hooks = [blk.attn.register_forward_hook(lambda mod, args, out: inputs.append(args[0])) for blk in layers]
    try:
        model.eval()
        with perf.autocast(precision, x.device):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    probs = []
    for blk, inp in zip(layers, inputs, strict=True):
        attn = blk.attn
        b, n, _ = inp.shape
        qkv = attn.qkv(inp.float()).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        probs.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1))
    return probs


def receptive_fields(model: nn.Module, parts: families.ReceptiveField | None = None) -> list[int]:
    """Theoretical receptive field (pixels) at the end of each stage, along the main path of the blocks; `parts`
    says where the stem and stages are (default: timm's `ResNetV2`)."""
    parts = parts or families.ReceptiveField()
    rf, jump = 1, 1

    def walk(layer: nn.Module) -> None:
        nonlocal rf, jump
        if isinstance(layer, nn.Conv2d | nn.MaxPool2d):
            k = layer.kernel_size if isinstance(layer.kernel_size, int) else layer.kernel_size[0]
            s = layer.stride if isinstance(layer.stride, int) else layer.stride[0]
            d = layer.dilation if isinstance(layer.dilation, int) else layer.dilation[0]
            rf += (k - 1) * d * jump
            jump *= s

    for layer in attrgetter(parts.stem)(model).modules():
        walk(layer)
    out = []
    for stage in attrgetter(parts.stages)(model):
        for block in stage.blocks:
            for conv in (block.conv1, block.conv2, block.conv3):
                walk(conv)
        out.append(rf)
    return out


def needs_images(family: str) -> bool:
    """Whether `family`'s diagnostic looks at images (attention distances); a ResNet's receptive field does not."""
    return isinstance(families.get(family).diagnostic, families.Attention)


def run(model: nn.Module, family: str, images: np.ndarray | None, image_size: int, device: torch.device,
        precision: str = "auto") -> Diagnostics:
    """Diagnostics of a pretrained model of `family` on a fixed evaluation batch (`images`, uint8 [B, H, W, 3]; None
    where the family `needs_images` not); the forward pass in `precision` (auto: bf16 on CUDA, fp32 on a CPU). A
    family without a diagnostic: none."""
    parts = families.get(family).diagnostic
    if parts is None:
        return Diagnostics(family)
    if isinstance(parts, families.ReceptiveField):
        rfs = receptive_fields(model, parts)
        return Diagnostics(family, {f"rf_stage{i + 1}": float(r) for i, r in enumerate(rfs)},
                           receptive_field=rfs)
    return _attention(model, family, parts, images, image_size, device, precision)


def _attention(model: nn.Module, family: str, parts: families.Attention, images: np.ndarray, image_size: int,
               device: torch.device, precision: str) -> Diagnostics:
    grid = attrgetter(parts.patch_embed)(model).grid_size[0]
    patch = image_size // grid  # pixels per token: the patch size, or a hybrid's backbone stride
    filters = explained = None
    if parts.patch_filters is not None:
        filters, explained = filter_pca(attrgetter(parts.patch_filters)(model).weight.cpu())
    posemb = attrgetter(parts.pos_embed)(model)[0, model.num_prefix_tokens:].detach().cpu().double().numpy()
    x = to_input(images, image_size, device).contiguous(memory_format=perf.channels_last(model, device))
    probs = attention_probabilities(model, x, perf.resolve_precision(precision, device), parts.blocks)
    dist = np.stack([mean_attention_distance(p.cpu(), grid, patch, model.num_prefix_tokens) for p in probs])
    metrics = {"posemb_locality": posemb_locality(posemb, grid),
               "attn_dist_uniform": uniform_attention_distance(grid, patch)}
    for layer, heads in enumerate(dist, start=1):
        metrics[f"attn_dist_layer{layer}_mean"] = float(heads.mean())
        metrics[f"attn_dist_layer{layer}_min"] = float(heads.min())
    return Diagnostics(family, metrics, filters, explained, posemb_similarity(posemb, grid), dist)


_ARRAYS = ("filters", "explained", "posemb_sim", "attn_distance")


def to_bytes(diag: Diagnostics) -> bytes:
    """The diagnostics as safetensors bytes (arrays as tensors, the rest as JSON metadata), for storage."""
    arrays = {name: np.ascontiguousarray(getattr(diag, name)) for name in _ARRAYS if getattr(diag, name) is not None}
    meta = {"family": diag.family, "metrics": diag.metrics, "receptive_field": diag.receptive_field}
    return save(arrays, metadata={"diagnostics": json.dumps(meta)})


def from_bytes(data: bytes) -> Diagnostics:
    """Inverse of `to_bytes` (safetensors: tensors and a JSON header, nothing unpickled)."""
    arrays = load(data)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["diagnostics"])
    # Files stored before the evaluation's name became the metrics' one prefix carry "diag/" in their names.
    metrics = {name.removeprefix("diag/"): value for name, value in meta["metrics"].items()}
    return Diagnostics(meta["family"], metrics, receptive_field=meta["receptive_field"],
                       **{name: arrays.get(name) for name in _ARRAYS})
