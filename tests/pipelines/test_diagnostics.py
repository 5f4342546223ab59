"""Known answers for the Fig 7 diagnostics."""

import json
import math

import numpy as np
import pytest
import torch

from pipelines import diagnostics, families, models


def test_identity_attention_has_distance_zero():
    g = 4
    probs = torch.eye(1 + g * g).expand(2, 3, -1, -1)
    assert np.allclose(diagnostics.mean_attention_distance(probs, g, patch_size=4), 0)


def test_uniform_attention_gives_the_closed_form_mean_pairwise_distance():
    g, patch = 5, 4
    probs = torch.full((1, 2, 1 + g * g, 1 + g * g), 1.0 / (1 + g * g))  # includes the class token: dropped
    assert diagnostics.mean_attention_distance(probs, g, patch) == pytest.approx([_uniform_distance(g) * patch] * 2)


def _uniform_distance(g: int) -> float:
    """Mean distance between two uniform random cells of a g x g grid, by counting offsets."""
    return sum((g - abs(dx)) * (g - abs(dy)) * math.hypot(dx, dy)
               for dx in range(-g + 1, g) for dy in range(-g + 1, g)) / g**4


def _sincos_2d(g: int, dim: int = 64) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    freqs = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    parts = [f(pos.reshape(-1, 1) * freqs) for pos in (rows, cols) for f in (np.sin, np.cos)]
    return np.concatenate(parts, 1)


def test_posemb_locality_is_high_for_sinusoidal_and_near_zero_for_random():
    g = 8
    assert diagnostics.posemb_locality(_sincos_2d(g), g) > 0.8
    rng = np.random.default_rng(0)
    assert abs(diagnostics.posemb_locality(rng.normal(size=(g * g, 64)), g)) < 0.1


def test_filter_pca_recovers_known_components():
    rng = np.random.default_rng(0)
    p = 4
    basis, _ = np.linalg.qr(rng.normal(size=(3 * p * p, 3)))  # three orthonormal filters
    # Centred, exactly uncorrelated coefficients with distinct variances: the components are identifiable.
    raw = rng.normal(size=(500, 3))
    q, _ = np.linalg.qr(raw - raw.mean(0))
    coeffs = q * np.array([5.0, 3.0, 1.5])
    weight = torch.from_numpy((coeffs @ basis.T).reshape(500, 3, p, p))
    comps, ratio = diagnostics.filter_pca(weight, k=3)
    got = comps.transpose(0, 3, 1, 2).reshape(3, -1)
    assert np.allclose(np.abs(got @ basis), np.eye(3), atol=1e-6)
    assert ratio[0] > ratio[1] > ratio[2] and ratio.sum() == pytest.approx(1.0)


def test_recomputed_attention_reproduces_the_fused_module_output():
    torch.manual_seed(0)
    model = models.build("ViT-Pico/4", 10, 32).eval()
    assert all(blk.attn.fused_attn for blk in model.blocks)
    x = torch.randn(2, 3, 32, 32)
    outputs = []
    hook = model.blocks[1].attn.register_forward_hook(lambda m, a, out: outputs.append((a[0], out)))
    probs = diagnostics.attention_probabilities(model, x)
    hook.remove()
    assert all(blk.attn.fused_attn for blk in model.blocks)  # left on
    inp, out = outputs[0]
    attn = model.blocks[1].attn
    v = attn.qkv(inp).reshape(2, 65, 3, 4, 16).permute(2, 0, 3, 1, 4)[2]
    manual = attn.proj((probs[1] @ v).transpose(1, 2).reshape(2, 65, 64))
    torch.testing.assert_close(manual, out, atol=1e-5, rtol=1e-5)
    assert torch.allclose(probs[1].sum(-1), torch.ones(2, 4, 65))


def test_resnet_receptive_fields():
    assert diagnostics.receptive_fields(models.build("BiT-R14-Pico", 10, 32)) == [5, 7, 11, 19]
    with torch.device("meta"):
        r50 = models.build("BiT-R50x1", 10, 224)
    assert diagnostics.receptive_fields(r50)[-1] == 427  # the textbook ResNet-50 receptive field


def test_run_reports_per_layer_mean_and_min():
    model = models.build("ViT-Pico/4", 10, 32)
    images = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    diag = diagnostics.run(model, "ViT", images, 32, torch.device("cpu"))
    assert diag.attn_distance.shape == (4, 4) and diag.filters.shape == (28, 4, 4, 3)
    assert diag.posemb_sim.shape == (8, 8, 8, 8)
    for layer, heads in enumerate(diag.attn_distance, start=1):  # each layer's own heads, the named reduction
        assert heads.min() < heads.mean()  # the heads differ, so a swapped reduction would show
        assert diag.metrics[f"attn_dist_layer{layer}_mean"] == pytest.approx(heads.mean())
        assert diag.metrics[f"attn_dist_layer{layer}_min"] == pytest.approx(heads.min())
    # The layers differ as well, so a metric taken from the wrong layer would show.
    assert len({round(v, 6) for k, v in diag.metrics.items() if k.endswith("_mean")}) == 4


def test_run_measures_uniform_attention_in_pixels_without_the_class_token():
    model = models.build("ViT-Pico/4", 10, 32)
    with torch.no_grad():
        for blk in model.blocks:  # q = k = 0: every head attends uniformly to all 65 tokens
            blk.attn.qkv.weight.zero_()
            blk.attn.qkv.bias.zero_()
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    diag = diagnostics.run(model, "ViT", images, 32, torch.device("cpu"))
    expected = _uniform_distance(8) * 4  # 8 x 8 patches of 4 pixels; the class token is no position
    assert diag.attn_distance == pytest.approx(np.full((4, 4), expected))
    assert diag.metrics["attn_dist_layer4_min"] == pytest.approx(expected)
    assert diag.metrics["attn_dist_uniform"] == pytest.approx(expected)  # Fig 7's reference line: this very head


def test_run_dispatches_on_the_family():
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    bit = diagnostics.run(models.build("BiT-R14-Pico", 10, 32), "BiT", images, 32, torch.device("cpu"))
    assert bit.family == "BiT" and bit.receptive_field == [5, 7, 11, 19] and not bit.has_panel
    assert bit.metrics == {f"rf_stage{i}": float(r) for i, r in enumerate([5, 7, 11, 19], start=1)}
    vit = diagnostics.run(models.build("ViT-Pico/4", 10, 32), "ViT", images, 32, torch.device("cpu"))
    assert vit.family == "ViT" and vit.has_panel and vit.filters is not None


def test_a_hybrid_has_attention_numbers_but_no_rgb_patch_filters():
    assert families.get("Hybrid").diagnostic.patch_filters is None  # its projection acts on ResNet features
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    # The family, not the module's shape, decides: a ViT's layout measured as a hybrid shows no filters.
    diag = diagnostics.run(models.build("ViT-Pico/4", 10, 32), "Hybrid", images, 32, torch.device("cpu"))
    assert diag.family == "Hybrid" and diag.filters is None and diag.attn_distance.shape == (4, 4)


def test_stored_arrays_of_older_runs_read_back_with_plain_metric_names():
    from safetensors.numpy import save

    meta = {"family": "BiT", "metrics": {"diag/rf_stage1": 3.0}, "receptive_field": [3]}
    old = save({"explained": np.ones(2)}, metadata={"diagnostics": json.dumps(meta)})
    assert diagnostics.from_bytes(old).metrics == {"rf_stage1": 3.0}
