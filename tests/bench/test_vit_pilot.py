"""bench/vit_pilot.py's plumbing: which of the grid's models it pilots, its pilot-only model rows, and that every
named recipe is a valid set of overrides of its grid (a recipe that no longer loads would only fail when run)."""

import pytest
import torch

from bench import vit_pilot
from pipelines import models
from study.config import expand, load_study
from tests.conftest import ROOT

GRID = ROOT / "configs" / "scaling.yaml"
PICO = ROOT / "configs" / "scaling-pico.yaml"  # the pilot's default grid, on which its recipes were piloted


@pytest.fixture
def pilot_rows(monkeypatch):
    for spec in vit_pilot.PILOT_MODELS:
        monkeypatch.setitem(models.MODELS, spec.name, spec)


def test_femto_batch24_on_the_pico_grid_is_the_default_study():
    piloted = load_study(PICO, list(vit_pilot.RECIPES["femto-batch24"]))
    default = load_study(GRID)
    assert [p.id for p in expand(piloted)] == [p.id for p in expand(default)]


def test_it_pilots_the_grids_vit_or_with_bias_strong_its_bit():
    cfg = load_study(GRID)
    assert vit_pilot.model_of(cfg) == "ViT-Femto/4"
    assert vit_pilot.model_of(cfg, "strong") == "BiT-R14-Femto"


def test_a_grid_without_exactly_one_model_of_that_bias_is_refused_in_one_line():
    cfg = load_study(GRID, ["models=[ViT-Femto/4, ViT-Pico/4, BiT-R14-Pico]"])
    with pytest.raises(SystemExit, match=r"exactly one weak-bias model, found \['ViT-Femto/4', 'ViT-Pico/4'\]"):
        vit_pilot.model_of(cfg)
    assert vit_pilot.model_of(cfg, "strong") == "BiT-R14-Pico"


@pytest.mark.parametrize("name", list(vit_pilot.RECIPES))
def test_every_recipe_loads_as_overrides_of_its_grid(name, pilot_rows):
    cfg = load_study(PICO, list(vit_pilot.RECIPES[name]))
    assert vit_pilot.model_of(cfg) in cfg.models and vit_pilot.model_of(cfg, "strong") in cfg.models


def test_the_stride_2_stem_bit_starts_its_first_stage_at_half_the_image(pilot_rows):
    plain, strided = (models.build(name, 16, 32) for name in ("BiT-R14-Pico", "BiT-R14-Pico/s2"))
    x = torch.zeros(2, 3, 32, 32)
    assert plain.stem(x).shape[-2:] == (32, 32) and strided.stem(x).shape[-2:] == (16, 16)
    assert models.backbone_params(plain) == models.backbone_params(strided)  # the same weights, a cheaper first stage
    assert strided(x).shape == (2, 16)
