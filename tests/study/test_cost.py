"""The dry run's price: pretraining and fine-tuning (its learning-rate sweep included) in GPU-hours at a per-device
MFU, and the bound the loader workers put on them."""

from dataclasses import replace

import pytest

from pipelines import models
from study import cost
from study.config import expand, grid_point, load_study
from tests.conftest import ROOT

PAPER = ROOT / "configs" / "paper" / "vit-vs-bit-jft.yaml"
H100_BF16 = 989e12


def _row(cfg, model: str = "ViT-B/16", subset: int = 9_000_000, mfu: float = 0.4) -> dict:
    (row,) = cost.describe(cfg, [grid_point(cfg, model, subset, cfg.seeds[0])], {}, mfu)
    return row


def test_finetuning_is_priced_at_its_image_size_once_per_rate_of_the_sweep():
    swept = load_study(PAPER, ["evaluate.finetune.lr=null", "evaluate.finetune.lr_sweep=[0.001, 0.003, 0.01, 0.03]"])
    ft, task = swept.evaluate.finetune, swept.downstream[0]
    assert ft.image_size == 448 and ft.steps and ft.batch_size <= task.size  # the paper's: steps x batch at 448 px
    row = _row(swept)
    per_image = 3 * models.forward_flops("ViT-B/16", 448, task.num_classes)  # forward + backward, at 448 px
    assert per_image > 4 * 3 * models.forward_flops("ViT-B/16", 224, task.num_classes)  # 4x the tokens, and more
    assert row["finetune_flops"] == pytest.approx(per_image * ft.steps * ft.batch_size * 4)
    assert row["finetune_h100_hours"] == pytest.approx(row["finetune_flops"] / (H100_BF16 * 0.4) / 3600)
    fixed = _row(load_study(PAPER, ["evaluate.finetune.lr=0.01"]))
    assert fixed["finetune_flops"] == pytest.approx(row["finetune_flops"] / 4)  # one learning rate: one run
    assert _row(load_study(PAPER, ["evaluate.finetune=null"]))["finetune_flops"] == 0


def test_finetuning_a_small_task_takes_the_schedule_finetune_runs():
    """The train split less its minival caps the batch, and sets the BiT-HyperRule length without `steps`."""
    cfg = load_study(ROOT / "configs" / "smoke.yaml")
    ft, task = cfg.evaluate.finetune, cfg.downstream[0]
    steps, batch = cost.finetune.schedule(ft, task.size, cfg.resources.workers_per_trial)
    assert batch == min(ft.batch_size, task.size - max(1, round(ft.val_fraction * task.size)))
    assert steps == ft.total_steps(task.size - max(1, round(ft.val_fraction * task.size)))
    flops = 3 * models.forward_flops(cfg.models[0], ft.image_size, task.num_classes)
    per_task = flops * steps * batch * len(ft.learning_rates)
    assert _row(cfg, cfg.models[0], cfg.data.subsets[0])["finetune_flops"] == pytest.approx(
        per_task * len(cfg.downstream))


def test_finetuning_is_priced_with_the_architecture_the_recipe_fine_tunes():
    """GAP drops the class token (one token fewer at every layer); the pre-logits layer is not fine-tuned."""
    token = _row(load_study(PAPER, ["evaluate.finetune.lr=0.01"]))
    gap = _row(load_study(PAPER, ["evaluate.finetune.lr=0.01", "recipes.ViT-B/16.pool=gap"]))
    ft, task = load_study(PAPER).evaluate.finetune, load_study(PAPER).downstream[0]
    per_image = 3 * models.forward_flops("ViT-B/16", ft.image_size, task.num_classes, models.ModelOptions(pool="gap"))
    assert gap["finetune_flops"] == pytest.approx(per_image * ft.steps * ft.batch_size)
    assert gap["finetune_flops"] < token["finetune_flops"]


def test_a_stage_takes_the_pace_of_the_slower_of_the_gpus_and_the_loader():
    slow = cost.Stage(flops=1e18, images=10**6, gpu_hours=2.0, needed=4_000.0, fed=1_000.0, serial=False)
    assert slow.loader_hours == pytest.approx(8.0) and slow.hours == pytest.approx(8.0)  # a quarter of the rate
    fast = replace(slow, fed=8_000.0)
    assert fast.loader_hours == pytest.approx(1.0) and fast.hours == 2.0
    assert replace(slow, serial=True).hours == pytest.approx(10.0)  # decoding between the steps: the sum


def test_the_loader_bounds_the_paper_grids_small_models_at_the_default_workers():
    cfg = load_study(PAPER)
    ranks, workers = cfg.resources.workers_per_trial, cfg.data.loader.workers
    row = _row(cfg, "ViT-B/32")
    per_image = 3 * models.forward_flops("ViT-B/32", 224, cfg.data.pretrain.num_classes,
                                         models.ModelOptions.of(cfg.pretrain_for("ViT-B/32")))  # its recipe's knobs
    assert row["images_per_s_needed"] == pytest.approx(0.4 * cfg.resources.gpus_per_trial * H100_BF16 / per_image)
    assert row["images_per_s_fed"] == pytest.approx(workers * ranks * cost.loader_images_per_s(224))
    assert row["images_per_s_fed"] < row["images_per_s_needed"]  # ViT-B/32 at 40% MFU outruns 7 CPUs per GPU
    ft_needed, ft_fed = row["finetune_images_per_s_needed"], row["finetune_images_per_s_fed"]
    pre = row["h100_hours"] * row["images_per_s_needed"] / row["images_per_s_fed"]
    ft = row["finetune_h100_hours"] * max(1.0, ft_needed / ft_fed)
    assert row["bound_h100_hours"] == pytest.approx(pre + ft)


def test_loader_workers_default_to_one_per_cpu_but_one(tmp_path):
    text = (ROOT / "configs" / "smoke.yaml").read_text()
    assert "loader: {workers: 1}" in text  # the CPU studies set theirs: the default leaves them as they are
    grid = tmp_path / "grid.yaml"
    grid.write_text(text.replace("loader: {workers: 1}", "loader: {}"))
    for cpus, workers in ((8, 7), (2, 1), (1, 1), (0.5, 1)):
        cfg = load_study(grid, [f"resources.cpus_per_worker={cpus}"])
        assert cfg.data.loader.workers == workers
    assert load_study(grid, ["data.loader.workers=0"]).data.loader.workers == 0  # decode in the training process
    default, given = load_study(grid, ["resources.cpus_per_worker=8"]), load_study(ROOT / "configs" / "smoke.yaml")
    assert [p.id for p in expand(default)] == [p.id for p in expand(given)]  # loader settings: no point retrains


def test_one_loader_worker_rate_runs_through_the_measured_sizes():
    for size, rate in cost.LOADER_IMAGES_PER_S.items():
        assert cost.loader_images_per_s(size) == pytest.approx(rate)
    assert cost.loader_images_per_s(32) > cost.loader_images_per_s(224) > cost.loader_images_per_s(448)


@pytest.mark.parametrize("grid", sorted((ROOT / "configs" / "paper").glob("*.yaml")), ids=lambda p: p.name)
def test_a_paper_dry_run_prints_pretraining_and_finetuning_hours_and_the_loader_bound(grid, cache_dir, monkeypatch,
                                                                                      capsys):
    from study.run import main

    monkeypatch.setenv("VITSCALE_CACHE", str(cache_dir))
    monkeypatch.chdir(ROOT)
    code = main(["--grid", str(grid.relative_to(ROOT)), "--dry-run"])
    out = capsys.readouterr().out
    assert code in (0, 2)  # priced before the data checks (placeholder /data paths fail them: 2)
    cfg = load_study(grid)
    assert "GPU-bound:" in out and " pretraining + " in out and " fine-tuning)" in out and "loader-bound:" in out
    for model in cfg.models:  # one pretraining and one fine-tuning line per model: needed, fed, the MFU allowed
        assert any(line.startswith(f"{model} ") and " pretrain " in line and line.endswith("%")
                   for line in out.splitlines())
        assert any(line.startswith(f"{model} ") and " finetune " in line for line in out.splitlines())
