"""fp16 with a loss scaler on a CPU (a step whose gradient is inf is skipped, as on a GPU), and how often the
compiled model compiles: once per graph, not once per learning rate of a sweep or per ragged evaluation batch
(dynamo's own counters). torch.compile runs with the aot_eager backend here: the plumbing, not inductor's kernels."""

import math

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from pipelines import finetune, models, perf, pretrain
from pipelines.data.stream import LoaderConfig
from pipelines.loop import Hooks, _update
from pipelines.runtime import Runtime
from tests.pipelines.tiny import as_shards

CPU = torch.device("cpu")
IN_PROCESS = Runtime(CPU, loader=LoaderConfig(workers=0), progress=False)


def _task(n: int, size: int) -> tuple:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    images = np.clip(labels[:, None, None, None] * 90 + rng.integers(0, 30, (n, size, size, 3)), 0, 255)
    return as_shards(images.astype(np.uint8), labels)


def test_fp16_with_the_loss_scaler_skips_a_step_whose_gradient_is_inf_and_takes_the_next():
    torch.manual_seed(0)
    model = models.build("ViT-Pico/4", 3, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = perf.grad_scaler("fp16", CPU)
    assert scaler.is_enabled() and not perf.grad_scaler("bf16", CPU).is_enabled()
    x = torch.rand(8, 3, 16, 16)

    def backward(poison: bool) -> dict[str, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with perf.autocast("fp16", CPU):
            logits = model(x)
        assert logits.dtype == torch.float16  # the forward ran in fp16
        scaler.scale(logits.float().logsumexp(-1).mean()).backward()
        if poison:
            model.head.weight.grad[0, 0] = math.inf
        return {k: v.clone() for k, v in model.state_dict().items()}

    before, scale = backward(poison=True), scaler.get_scale()
    _update(model, optimizer, scheduler, scaler, grad_clip=1.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the step was skipped
    assert scaler.get_scale() == scale / 2  # and the scale backed off
    before = backward(poison=False)
    _update(model, optimizer, scheduler, scaler, grad_clip=1.0)
    assert not torch.equal(before["head.weight"], model.head.weight)  # a finite step is taken
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_pretraining_on_a_cpu_learns():
    cfg = pretrain.PretrainConfig(steps=16, batch_size=16, lr=3e-3, warmup_steps=2, precision="fp16")
    epochs = []
    pretrain.run(cfg, "ViT-Pico/4", _task(64, 32), 3, 32, IN_PROCESS, Hooks(on_epoch=epochs.append))
    assert all(math.isfinite(e.loss) for e in epochs) and epochs[-1].loss < epochs[0].loss


@pytest.fixture
def dynamo(monkeypatch):
    monkeypatch.setattr(perf, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


# A ViT is compiled by region: the patch embedding and one graph every block shares, each in training and in
# evaluation (4). A BiT is compiled whole for its training step (1); its evaluation calls forward_features.
@pytest.mark.parametrize(("name", "graphs"), [("ViT-Pico/4", 4), ("BiT-R14-Pico", 1)])
def test_a_compiled_finetune_sweep_compiles_each_graph_once(dynamo, name, graphs):
    """Two learning rates, a minival of 30 and a test split of 300 (batches of 256 and 44): without the padded last
    batch and with a recompile per learning rate this would be 16 graphs for the ViT."""
    data = _task(300, 48)
    state = models.build(name, 16, 32).state_dict()
    cfg = finetune.FinetuneConfig(image_size=48, steps=6, batch_size=32, lr_sweep=(0.03, 0.01), warmup_steps=2,
                                  compile=True)
    result = finetune.run(cfg, name, state, data, data, 3, IN_PROCESS)
    assert dynamo["stats"]["unique_graphs"] == graphs
    assert math.isfinite(result.top1)


def test_a_padded_last_batch_gives_the_same_features(dynamo):
    torch.manual_seed(0)
    model = models.build("ViT-Pico/4", 3, 16)
    images = np.random.default_rng(0).integers(0, 255, (20, 16, 16, 3), dtype=np.uint8)
    from pipelines.metrics import infer

    eager = infer(model, images, 16, CPU, batch_size=8, pre_logits=True)
    perf.compile_model(model)
    compiled = infer(model, images, 16, CPU, batch_size=8, pre_logits=True)
    assert compiled.shape == eager.shape == (20, model.num_features)
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)
    assert dynamo["stats"]["unique_graphs"] == 2  # 8, 8 and 4 padded to 8: one shape
