import numpy as np
import pytest
import torch

from pipelines import downstream, finetune, models
from pipelines.data.index import ShardSubset, scratch_index
from pipelines.data.stream import LoaderConfig
from pipelines.downstream import EvaluateConfig, Pretrained
from pipelines.linear_probe import LinearProbeConfig
from pipelines.loop import Hooks
from pipelines.metrics import classification_metrics, evaluate
from pipelines.runtime import Runtime
from tests.pipelines import glyph_task
from tests.pipelines.tiny import as_shards

IN_PROCESS = Runtime(torch.device("cpu"), loader=LoaderConfig(workers=0), progress=False)  # reads in this process


def test_minival_is_a_disjoint_seeded_slice():
    data = as_shards(np.arange(100)[:, None, None, None].repeat(3, -1).astype(np.uint8), np.arange(100) % 4)
    train, val = finetune.split_minival(data, 0.1, seed=0)
    assert len(train) == 90 and len(val) == 10 and train.index is val.index is data.index
    assert not set(train.positions.tolist()) & set(val.positions.tolist())
    assert sorted([*train.positions.tolist(), *val.positions.tolist()]) == list(range(100))
    again, other = finetune.split_minival(data, 0.1, seed=0), finetune.split_minival(data, 0.1, seed=1)
    assert np.array_equal(again[1].positions, val.positions) and not np.array_equal(other[1].positions, val.positions)
    kept, none = finetune.split_minival(data, 0.0, seed=0)
    assert kept is data and none is None


def test_the_minival_is_the_same_keys_whatever_the_shard_order_and_never_trained_on():
    """The minival is chosen by the keys' seeded order, not by row numbers, rank or run: the same samples when the
    shards are listed in another order (rows renumbered), and no rank's part of the train split holds one."""
    data = as_shards(np.arange(100)[:, None, None, None].repeat(3, -1).astype(np.uint8), np.arange(100) % 4,
                     per_shard=25)
    flipped = scratch_index(data.index.shards[::-1])
    flipped = ShardSubset(flipped, np.arange(len(flipped), dtype=np.int64))

    def keys(subset):
        return set(np.asarray(subset.index.key[subset.positions]).tolist())

    (train, val), (train2, val2) = finetune.split_minival(data, 0.1, seed=0), finetune.split_minival(flipped, 0.1, 0)
    assert keys(val) == keys(val2) and len(val) == 10 and keys(train) == keys(train2)
    assert not keys(train) & keys(val) and keys(train) | keys(val) == keys(data)


def test_a_streamed_tasks_minival_is_whole_shards_so_a_pass_streams_only_them():
    local = as_shards(np.arange(100)[:, None, None, None].repeat(3, -1).astype(np.uint8), np.arange(100) % 4,
                      per_shard=10)
    index = scratch_index([f"pipe:cat {url}" for url in local.index.shards])
    data = ShardSubset(index, np.arange(len(index), dtype=np.int64))
    train, val = finetune.split_minival(data, 0.2, seed=0)
    assert len(val) == 20 and len(set(index.shard_of(val.positions).tolist())) == 2  # two whole shards of ten
    assert not set(train.positions.tolist()) & set(val.positions.tolist()) and len(train) == 80
    assert np.array_equal(finetune.split_minival(data, 0.2, seed=0)[1].positions, val.positions)


def test_finetune_logs_per_epoch_validation_and_learns_at_higher_resolution():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 240)
    images = np.clip(labels[:, None, None, None] * 90 + rng.integers(0, 30, (240, 48, 48, 3)), 0, 255)
    data = as_shards(images.astype(np.uint8), labels)
    state = models.build("ViT-Pico/4", 16, 32).state_dict()
    cfg = finetune.FinetuneConfig(image_size=48, steps=30, batch_size=32, lr=0.03, warmup_steps=3)
    epochs = []
    result = finetune.run(cfg, "ViT-Pico/4", state, data, data, 3, IN_PROCESS, Hooks(on_epoch=epochs.append))
    assert len(epochs) == len(result.curves) == 5  # 30 steps of 32 over 216 train images: 4 epoch ends, then the last
    assert list(epochs[0].metrics()) == ["train_loss", "train_top1", "val_loss", "val_top1"]
    assert epochs[-1].val_loss < epochs[0].val_loss and result.top1 > 90


@pytest.mark.parametrize("model_name", ["ViT-Pico/4", "BiT-R14-Pico"])  # a linear head and a 1x1-conv head
def test_a_probe_head_starts_the_finetune_at_the_probes_accuracy(model_name):
    """head_init: probe (LP-FT): at step 0 the fine-tune model is the probe, so its top-1 on the minival is the
    probe's on the same images' features."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 160)
    images = np.clip(labels[:, None, None, None] * 60 + rng.integers(0, 90, (160, 48, 48, 3)), 0, 255)
    train, minival = finetune.split_minival(as_shards(images.astype(np.uint8), labels), 0.25, seed=0)
    state = models.build(model_name, 16, 32).state_dict()
    head = finetune.probe_head(model_name, state, train, 3, 48, IN_PROCESS)
    model = models.pretrained_for_task(model_name, state, 3, 48)
    zero = evaluate(model, minival, 48, torch.device("cpu"))["top1"]
    x, y, _ = downstream.features(model, minival, 48, torch.device("cpu"))
    probe = classification_metrics(x @ head.weight.numpy().T + head.bias.numpy(), y)["top1"]
    finetune.set_head(model, head)
    step0 = evaluate(model, minival, 48, torch.device("cpu"))["top1"]
    assert step0 == pytest.approx(probe, abs=100 / len(minival)) and probe > 50  # chance 33%; one image at most
    assert step0 > zero  # a zero head predicts one class


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digit task as JPEG shards (1,400 train / 600 test at 32 px) and the letter-pretrained BiT-R14-Pico."""
    root = tmp_path_factory.mktemp("digits")
    task = glyph_task.digit_task(root, 1400, 600)
    state = glyph_task.pretrained_state()
    model = models.build("BiT-R14-Pico", len(glyph_task.LETTERS), 32)
    model.load_state_dict(state)
    return task, model, state, root


@pytest.mark.slow
def test_finetuning_reaches_the_frozen_probe_of_the_same_backbone(digits):
    """A fine-tune far below a frozen probe of its own backbone is a broken protocol (issue 14: 52-71% vs 93%).
    Fixed 0.01 with clipping at norm 1 stays under-stepped: the zero head's gradient norm (~3-6) keeps the clip on.
    Measured with the fixed minival slice and the float32 probe: probe 95.5, fine-tune 93.0 (1 torch thread) or 93.5
    (2), so the bar is 3 points; `head_init: probe` (LP-FT) reaches 95.2 / 94.8 on the same task."""
    task, model, state, root = digits
    ev = EvaluateConfig(fewshot=None, linear_probe=LinearProbeConfig(),
                        finetune=finetune.FinetuneConfig(image_size=32, steps=150, batch_size=64, warmup_steps=10,
                                                         lr_sweep=(0.01, 0.03)), diagnostics=None)
    runtime = Runtime(torch.device("cpu"), cache_dir=root, loader=LoaderConfig(workers=0), progress=False)
    found = downstream.run(ev, Pretrained("BiT-R14-Pico", model, state, 32), (task,), runtime)
    got = {m.eval: m.value for m in found if m.metric == "top1"}
    assert got["linear_probe"] > 90  # the pretrained features are good: the bar is high
    assert got["finetune"] >= got["linear_probe"] - 3, got
    assert [m.value for m in found if m.metric == "lr"][0] in (0.01, 0.03)  # the sweep's choice is measured too


def test_the_sweep_keeps_the_learning_rate_best_on_the_minival_and_reports_its_curve():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 120)
    images = np.clip(labels[:, None, None, None] * 90 + rng.integers(0, 30, (120, 16, 16, 3)), 0, 255)
    data_ = as_shards(images.astype(np.uint8), labels)
    state = models.build("ViT-Pico/4", 16, 16).state_dict()
    cfg = finetune.FinetuneConfig(image_size=16, steps=15, batch_size=32, warmup_steps=1, lr_sweep=(0.03, 1e4))
    epochs = []
    result = finetune.run(cfg, "ViT-Pico/4", state, data_, data_, 3, IN_PROCESS, Hooks(on_epoch=epochs.append))
    assert set(result.val_top1) == {0.03, 1e4} and not result.val_top1[1e4] >= result.val_top1[0.03]  # or NaN
    assert result.lr == 0.03 and epochs == result.curves and epochs[-1].val_top1 == result.val_top1[0.03]
    with pytest.raises(ValueError, match="give lr, or an lr_sweep"):
        finetune.FinetuneConfig(lr_sweep=())


def test_the_sweep_reports_its_steps_run_of_those_planned_and_a_diverged_run_leaves_the_plan():
    """What the console shows while a sweep runs (`on_steps`): the steps run over every learning rate's run, of the
    steps planned; a run that diverges takes the steps it did not run off the plan, so the sweep still ends at 100%
    and its pace counts only steps that ran."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 120)
    images = np.clip(labels[:, None, None, None] * 90 + rng.integers(0, 30, (120, 16, 16, 3)), 0, 255)
    data_ = as_shards(images.astype(np.uint8), labels)
    state = models.build("ViT-Pico/4", 16, 16).state_dict()
    told = []
    for sweep in [(0.01, 0.03), (1e38, 0.03)]:  # 1e38 diverges within its first steps
        cfg = finetune.FinetuneConfig(image_size=16, steps=15, batch_size=32, warmup_steps=1, lr_sweep=sweep,
                                      log_every=5)
        told.append([])
        finetune.run(cfg, "ViT-Pico/4", state, data_, data_, 3, IN_PROCESS,
                     on_steps=lambda step, steps, record: told[-1].append((step, steps, record.loss)))
    # 108 train rows, batch 32: epoch ends at steps 4, 7, 11, 14; told at least 5 steps apart and at each run's end
    assert [(step, steps) for step, steps, _ in told[0]] == [(5, 30), (10, 30), (15, 30), (20, 30), (25, 30), (30, 30)]
    assert [(step, steps) for step, steps, _ in told[1]] == [(5, 15), (10, 15), (15, 15)]  # run 1 ran no logged step
    assert all(np.isfinite(loss) for _, _, loss in told[0] + told[1])
    sweep = finetune.SweepSteps(10, 3, 4, lambda *told: None)
    sweep.reached = 6  # logged up to step 6, then diverged
    sweep.ended(diverged=True)
    assert (sweep.done, sweep.planned) == (6, 26)
    with pytest.raises(ValueError, match="log_every must be positive"):
        finetune.FinetuneConfig(log_every=0)
