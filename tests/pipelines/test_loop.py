import itertools
import math

import numpy as np
import pytest
import torch

from pipelines import models, pretrain
from pipelines.config import UserError
from pipelines.data.stream import LoaderConfig
from pipelines.loop import EpochRecord, Hooks, TrainingDiverged, duration_steps, warmup_decay
from pipelines.runtime import Runtime
from tests.pipelines.tiny import as_shards

IN_PROCESS = Runtime(torch.device("cpu"), loader=LoaderConfig(workers=0), progress=False)  # reads in this process


def test_duration_helper_converts_each_unit():
    assert duration_steps(None, 70, None, 32, 1000) == 70
    assert duration_steps(2.0, None, None, 32, 1000) == math.ceil(2000 / 32)
    assert duration_steps(None, None, 65536, 32, 1000) == 2048
    with pytest.raises(UserError, match="exactly one of epochs, steps, examples"):
        duration_steps(1.0, 10, None, 32, 1000)


def test_schedule_warms_up_linearly_then_decays_to_zero():
    lrs = [warmup_decay(s, total=100, warmup=10, decay="cosine") for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and lrs[-1] < 0.01
    assert warmup_decay(55, total=100, warmup=10, decay="linear") == pytest.approx(0.5)


def _tiny_images(n=64, classes=4):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n)
    images = np.clip(labels[:, None, None, None] * 60 + rng.integers(0, 30, (n, 32, 32, 3)), 0, 255)
    return images.astype(np.uint8), labels


def test_pretraining_learns_an_easy_task_and_saves_safetensors(tmp_path):
    cfg = pretrain.PretrainConfig(steps=40, batch_size=32, lr=2e-3, warmup_steps=5)
    epochs: list[EpochRecord] = []
    result = pretrain.run(cfg, "ViT-Pico/4", as_shards(*_tiny_images()), 4, 32, IN_PROCESS,
                          Hooks(on_epoch=epochs.append), out_dir=tmp_path)
    assert result.steps == 40 and result.examples_seen == 1280 and len(epochs) == 20
    assert [e.step for e in epochs] == list(range(2, 41, 2)) and epochs[-1] == result.final
    assert epochs[-1].examples_seen == 1280 and epochs[-1].loss < epochs[0].loss * 0.5
    from safetensors.torch import load_file
    loaded = load_file(str(result.weights_path))
    assert torch.equal(loaded["pos_embed"], result.state_dict["pos_embed"])


def test_log_records_come_every_log_every_steps_and_at_epoch_ends_and_add_up_to_the_epoch():
    """Each log record covers the steps since the previous one (an epoch end is one too): within an epoch, their
    losses weighted by their steps give the epoch's loss."""
    cfg = pretrain.PretrainConfig(steps=20, batch_size=8, lr=1e-3, warmup_steps=2, log_every=3)
    epochs: list[EpochRecord] = []
    logs: list[EpochRecord] = []
    pretrain.run(cfg, "ViT-Pico/4", as_shards(*_tiny_images()), 4, 32, IN_PROCESS,
                 Hooks(on_epoch=epochs.append, on_log=logs.append))  # 64 images: 8 steps an epoch
    assert [r.step for r in logs] == [3, 6, 8, 9, 12, 15, 16, 18, 20] and [r.step for r in epochs] == [8, 16, 20]
    assert all(r.images_per_s > 0 and r.examples_seen == 8 * r.step for r in logs)
    bounds = [0] + [r.step for r in logs]
    for epoch, (first, last) in zip(epochs, [(0, 3), (3, 7), (7, 9)], strict=True):
        window = range(first, last)
        weighted = sum(logs[i].loss * (bounds[i + 1] - bounds[i]) for i in window) / (bounds[last] - bounds[first])
        assert weighted == pytest.approx(epoch.loss, rel=1e-6)


@pytest.mark.parametrize("images, stop_at", [(64, 10), (80, 5)], ids=["mid log window", "at an epoch's end"])
def test_a_run_stopped_and_resumed_logs_what_the_uninterrupted_run_logs(tmp_path, images, stop_at):
    """Stopped mid log window (64 images, 4 steps an epoch: checkpoint at step 10, the last log at 9), the resumed
    run's first record covers steps 10-12, as the uninterrupted run's does, not the epoch from its start. Stopped at
    an epoch's end (80 images: step 5), that epoch's record is made before the stop and the next epoch starts from
    nothing (it held both epochs' sums). Each record's lr is the rate its last step took."""
    from pipelines.loop import TrainingStopped

    cfg = pretrain.PretrainConfig(steps=12, batch_size=16, lr=1e-3, warmup_steps=2, log_every=3, checkpoint_every=2)

    def run(folder, stop=False):
        logs, epochs = [], []
        polls = itertools.count(5, 5)  # the stop is polled every 5 steps
        asks = (lambda: next(polls) >= stop_at) if stop else None
        rt = Runtime(torch.device("cpu"), loader=LoaderConfig(workers=0), progress=False, should_stop=asks)
        hooks = Hooks(on_log=lambda r: logs.append((r.step, r.loss, r.train_top1, r.lr)),
                      on_epoch=lambda r: epochs.append((r.step, r.loss, r.train_top1)), checkpoint_dir=folder)
        try:
            pretrain.run(cfg, "ViT-Femto/4", as_shards(*_tiny_images(images)), 4, 32, rt, hooks)
        except TrainingStopped as stopped:
            assert stopped.step == stop_at
        return logs, epochs

    straight = run(tmp_path / "a")
    assert straight[0][0][3] == pytest.approx(1e-3)  # step 3 took the warm-up's peak (step 2 ended the warm-up)
    (logs, epochs), (more_logs, more_epochs) = run(tmp_path / "b", stop=True), run(tmp_path / "b")
    assert (logs + more_logs, epochs + more_epochs) == straight


def test_non_finite_loss_stops_the_run_within_the_check_interval(monkeypatch):
    cfg = pretrain.PretrainConfig(steps=5, batch_size=16, lr=1e-3, nonfinite_check_every=3)
    images, labels = _tiny_images()
    data = as_shards(np.zeros_like(images), labels)
    original = models.build

    def poisoned(name, num_classes, image_size, options):
        model = original(name, num_classes, image_size, options)
        with torch.no_grad():
            model.head.weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(models, "build", poisoned)  # a real model whose head weights are NaN
    with pytest.raises(TrainingDiverged, match="loss became nan between step 1 and 3; lower the learning rate"):
        pretrain.run(cfg, "ViT-Pico/4", data, 4, 32, IN_PROCESS)


def test_an_epoch_record_names_its_metrics_once():
    """The names each epoch's numbers reach MLflow under (after the stage's prefix): the step and epoch are the
    row's coordinates, and skipped samples get one name per cause."""
    record = EpochRecord(epoch=3, step=30, examples_seen=960, loss=0.5, train_top1=80.0, lr=1e-3, images_per_s=100.0,
                         loader_wait_fraction=0.1, skipped={"decode": 2})
    assert record.metrics() == {"examples_seen": 960, "loss": 0.5, "train_top1": 80.0, "lr": 1e-3,
                                "images_per_s": 100.0, "loader_wait_fraction": 0.1, "skipped_decode": 2}
