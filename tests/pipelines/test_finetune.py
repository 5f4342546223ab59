import numpy as np
import pytest
import torch

from pipelines import finetune, models
from pipelines.data import ImageArrays
from pipelines.training import classification_metrics, macro_f1


def test_macro_f1_known_answer():
    labels, preds = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    assert macro_f1(preds, labels) == pytest.approx(100 * (2 / 3 + 4 / 5) / 2)
    metrics = classification_metrics(np.log(np.array([[0.5, 0.5], [0.25, 0.75]])), np.array([0, 1]))
    assert metrics["loss"] == pytest.approx(-(np.log(0.5) + np.log(0.75)) / 2)


def test_minival_is_a_disjoint_seeded_slice():
    data = ImageArrays(np.arange(100)[:, None, None, None].repeat(3, -1).astype(np.uint8), np.arange(100) % 4)
    train, val = finetune.split_minival(data, 0.1, seed=0)
    assert len(train) == 90 and len(val) == 10
    assert not set(train.images[:, 0, 0, 0]) & set(val.images[:, 0, 0, 0])
    assert finetune.split_minival(data, 0.0, seed=0) == (data, None)


def test_finetune_logs_per_epoch_validation_and_learns_at_higher_resolution():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 240)
    images = np.clip(labels[:, None, None, None] * 90 + rng.integers(0, 30, (240, 48, 48, 3)), 0, 255)
    data = ImageArrays(images.astype(np.uint8), labels)
    state = models.build("ViT-Pico/4", 16, 32).state_dict()
    cfg = finetune.FinetuneConfig(image_size=48, steps=30, batch_size=32, lr=0.03, warmup_steps=3)
    epochs = []
    result = finetune.run(cfg, "ViT-Pico/4", state, data, data, 3, seed=0, device=torch.device("cpu"),
                          progress=False, on_epoch=epochs.append)
    assert len(epochs) == len(result.curves) == 5  # 216 train images / batch 32 = 6 steps per epoch
    assert {"train_loss", "val_loss", "val_top1"} <= set(epochs[0])
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"] and result.top1 > 90
