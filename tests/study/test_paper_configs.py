"""configs/paper/ carries the ViT paper's Table 3 (Dosovitskiy et al. 2021, Appendix B.1) per model: each model's
merged recipe is pinned here against the table, so an edit to a config that drifts from the paper fails."""

import pytest

from study.config import load_study
from tests.conftest import ROOT

PAPER = ROOT / "configs" / "paper"

# Table 3: (epochs, base LR, LR decay, weight decay, dropout); every row: batch 4096, 10k warm-up steps.
JFT = {"ViT-B/32": (7, 8e-4), "ViT-B/16": (7, 8e-4), "ViT-L/32": (7, 6e-4), "ViT-L/16": (7, 4e-4),
       "ViT-H/14": (14, 3e-4), "BiT-R50x1": (7, 1e-3), "BiT-R101x1": (7, 8e-4), "BiT-R152x2": (7, 6e-4)}
TABLE_3 = {
    "vit-vs-bit-jft.yaml": {m: (ep, lr, "linear", 0.1, 0.0) for m, (ep, lr) in JFT.items()},
    "vit-imagenet21k.yaml": {m: (90, 1e-3, "linear", 0.03, 0.1) for m in ("ViT-B/32", "ViT-B/16", "ViT-L/32",
                                                                          "ViT-L/16")},
    "vit-imagenet1k.yaml": {m: (300, 3e-3, "cosine", 0.3, 0.1) for m in ("ViT-B/32", "ViT-B/16", "ViT-L/32",
                                                                         "ViT-L/16")},
}


@pytest.mark.parametrize("config", TABLE_3)
def test_the_paper_configs_carry_table_3_per_model(config):
    cfg = load_study(PAPER / config)
    for model, row in TABLE_3[config].items():
        p = cfg.pretrain_for(model)
        assert (p.epochs, p.lr, p.decay, p.weight_decay, p.dropout) == row, model
        assert (p.batch_size, p.warmup_steps, p.optimizer) == (4096, 10_000, "adamw"), model
        # clipping only where Table 3 names it ("for ImageNet ... additionally apply gradient clipping at norm 1")
        assert p.grad_clip == (1.0 if config == "vit-imagenet1k.yaml" else 0), model
        assert p.pre_logits == model.startswith("ViT"), model  # Section 3.1: a hidden layer at pre-training
    assert set(TABLE_3[config]) <= set(cfg.models)
