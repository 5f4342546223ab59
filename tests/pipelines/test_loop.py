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
