"""The GPU step on a CPU: no host read inside the step loop, bf16 autocast, torch.compile with plain checkpoint keys,
weight-decay exemptions, throughput measurements and the device peak table. The `gpu`-marked tests need CUDA."""

import math
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines import checkpoint, models, perf, pretrain
from pipelines.data.augment import Augment
from pipelines.data.index import ShardSubset
from pipelines.data.stream import LoaderConfig, ShardStream, StreamLoader
from pipelines.loop import Hooks, LoopSpec, TrainingDiverged, train_loop, warmup_decay
from pipelines.metrics import infer
from pipelines.runtime import Runtime
from tests.pipelines.tiny import as_shards

CPU = torch.device("cpu")
IN_PROCESS = Runtime(CPU, loader=LoaderConfig(workers=0), progress=False)  # the production loader, in this process
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _images(n=320, classes=4, seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = np.clip(labels[:, None, None, None] * 60 + rng.integers(0, 30, (n, 32, 32, 3)), 0, 255)
    return images.astype(np.uint8), labels


def _data(n=320, classes=4, seed=0) -> ShardSubset:
    return as_shards(*_images(n, classes, seed))


READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@pytest.fixture
def host_reads(monkeypatch):
    """Every call that copies a tensor's value to the host, with the file that made it."""
    calls: list[tuple[str, str]] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, sys._getframe(1).f_code.co_filename))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("micro", [None, 8])
def test_step_loop_reads_the_device_only_every_k_steps_and_at_epoch_ends(host_reads, micro):
    steps, every = 20, 5
    torch.manual_seed(0)
    model = models.build("ViT-Pico/4", 4, 32)
    optimizer = pretrain.make_optimizer(pretrain.PretrainConfig(steps=steps, batch_size=16), model, CPU)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_decay, total=steps, warmup=5,
                                                                     decay="cosine"))
    spec = LoopSpec(steps=steps, batch_size=16, image_size=32, grad_clip=1.0, micro_batch_size=micro,
                    nonfinite_check_every=every)
    # The loader reads in this process (workers=0), so no flip: its `.numpy()` on a CPU tensor would count here.
    stream = ShardStream(_data(160), 32, 16, Augment(crop="none", flip=False), seed=0)  # 10 steps per epoch
    source = StreamLoader(stream, workers=0)
    epochs = []
    host_reads.clear()
    result = train_loop(model, source, spec, optimizer, scheduler, IN_PROCESS, Hooks(on_epoch=epochs.append))
    assert len(epochs) == 2 and math.isfinite(result.final.loss)
    assert 0 < len(host_reads) <= steps // every + len(epochs), host_reads


def _poisoned_build(monkeypatch, bad_call: int):
    """models.build whose model returns NaN logits from its `bad_call`-th training forward on."""
    original = models.build

    def build(name, num_classes, image_size, options):
        model = original(name, num_classes, image_size, options)
        calls = [0]

        def poison(module, args, out):
            calls[0] += module.training
            return out * float("nan") if calls[0] >= bad_call else out

        model.register_forward_hook(poison)
        return model

    monkeypatch.setattr(models, "build", build)


def test_divergence_is_caught_before_a_checkpoint_is_written(monkeypatch, tmp_path):
    _poisoned_build(monkeypatch, bad_call=3)
    cfg = pretrain.PretrainConfig(steps=12, batch_size=16, checkpoint_every=2, nonfinite_check_every=50)
    with pytest.raises(TrainingDiverged, match=r"loss became nan between step 3 and 4; lower the learning rate"):
        pretrain.run(cfg, "ViT-Pico/4", _data(), 4, 32, IN_PROCESS, Hooks(checkpoint_dir=tmp_path))
    assert checkpoint.latest(tmp_path).name == "ckpt-000000002"  # the diverged step-4 state was never saved


def test_bf16_autocast_runs_on_a_cpu_and_matches_fp32():
    torch.manual_seed(0)
    model = models.build("ViT-Pico/4", 4, 32)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would make every logit 0 in any precision
    dtypes = []
    model.blocks[0].mlp.fc1.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    images = _images(64)[0]
    fp32 = infer(model, images, 32, CPU, precision="fp32")
    bf16 = infer(model, images, 32, CPU, precision="bf16")
    assert dtypes[0] == torch.float32 and dtypes[-1] == torch.bfloat16 and bf16.dtype == np.float32
    assert np.isfinite(bf16).all() and np.abs(fp32).max() > 0.5
    np.testing.assert_allclose(bf16, fp32, atol=0.05 * np.abs(fp32).max())
    assert (bf16.argmax(-1) == fp32.argmax(-1)).mean() > 0.9


def test_bf16_pretraining_on_a_cpu_learns():
    cfg = pretrain.PretrainConfig(steps=16, batch_size=16, lr=3e-3, warmup_steps=2, precision="bf16")
    epochs = []
    pretrain.run(cfg, "ViT-Pico/4", _data(64), 4, 32, IN_PROCESS, Hooks(on_epoch=epochs.append))
    assert all(math.isfinite(e.loss) for e in epochs) and epochs[-1].loss < epochs[0].loss


@pytest.mark.slow  # inductor writes and compiles C++ kernels: cold, 20-35 s for the ViT, 45-95 s for the BiT
@pytest.mark.parametrize("name", ["ViT-Pico/4", "BiT-R14-Pico"])
def test_compiled_model_matches_eager(name):
    torch.manual_seed(0)
    eager = models.build(name, 4, 32)
    torch.nn.init.normal_(eager.get_classifier().weight, std=0.5)
    compiled = models.build(name, 4, 32)
    compiled.load_state_dict(eager.state_dict())
    perf.compile_model(compiled)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    x = torch.randn(4, 3, 32, 32)
    losses = []
    for model in (eager, compiled):
        loss = model(x).square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for (key, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["ViT-Pico/4", "BiT-R14-Pico"])
def test_checkpoint_of_a_compiled_run_loads_into_a_plain_model(monkeypatch, tmp_path, name):
    monkeypatch.setattr(perf, "BACKEND", "aot_eager")  # the graph capture without code generation: fast
    cfg = pretrain.PretrainConfig(steps=2, batch_size=16, compile=True, checkpoint_every=1)
    result = pretrain.run(cfg, name, _data(64), 4, 32, IN_PROCESS, Hooks(checkpoint_dir=tmp_path / "ckpt"),
                          out_dir=tmp_path)
    plain = models.build(name, 4, 32)
    for saved in (load_file(str(result.weights_path)),
                  load_file(str(checkpoint.latest(tmp_path / "ckpt") / "model.safetensors"))):
        assert not any(k.startswith("_orig_mod") for k in saved)
        plain.load_state_dict(saved)  # strict: the same keys as a plain timm model
    assert torch.equal(plain.state_dict()[next(iter(saved))], result.state_dict[next(iter(saved))])


def test_weight_decay_spares_position_embedding_class_token_and_1d_parameters():
    model = models.build("ViT-Pico/4", 4, 32)
    decay, no_decay = pretrain.decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed", "patch_embed.proj.bias", "norm.weight"} <= spared
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if p.ndim > 1} - {
        "cls_token", "pos_embed"}


def test_pretraining_reports_throughput():
    cfg = pretrain.PretrainConfig(steps=12, batch_size=16)
    result = pretrain.run(cfg, "ViT-Pico/4", _data(64), 4, 32, IN_PROCESS)
    t = result.throughput
    assert set(t) == {"images_per_s", "step_time_s", "data_wait_fraction", "peak_host_rss_gb"}  # no MFU on a CPU
    assert t["images_per_s"] > 0 and t["step_time_s"] == pytest.approx(16 / t["images_per_s"])
    assert 0 <= t["data_wait_fraction"] < 1 and t["peak_host_rss_gb"] > 0.05


def test_precision_auto_is_fp32_on_a_cpu():
    assert perf.resolve_precision("auto", CPU) == "fp32" and perf.resolve_precision("bf16", CPU) == "bf16"
    assert not perf.compile_enabled("auto", CPU) and perf.compile_enabled(True, CPU)


@pytest.mark.parametrize(("name", "precision", "peak"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12), ("NVIDIA H100 PCIe", "bf16", 756e12), ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12), ("NVIDIA A100-PCIE-40GB", "fp32", 156e12),  # fp32 runs as TF32
    ("NVIDIA L4", "bf16", 121e12), ("NVIDIA L40S", "bf16", 362e12), ("NVIDIA A10", "bf16", 125e12),
    ("Tesla V100-SXM2-16GB", "fp16", 125e12), ("Tesla V100-SXM2-16GB", "fp32", 15.7e12)])
def test_peak_flops_table(name, precision, peak):
    assert perf.peak_flops(name, precision) == peak


@pytest.mark.parametrize(("name", "precision"), [("Tesla V100-SXM2-16GB", "bf16"), ("NVIDIA A10G", "bf16"),
                                                 ("Some Future GPU", "bf16"), ("cpu", "fp32")])
def test_peak_flops_is_nan_where_unknown(name, precision):
    assert math.isnan(perf.peak_flops(name, precision))
    assert math.isnan(perf.peak_flops(CPU, "fp32"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["ViT-Pico/4", "BiT-R14-Pico"])
def test_cuda_step_defaults(name, tmp_path):
    cuda = torch.device("cuda")
    cfg = pretrain.PretrainConfig(steps=20, batch_size=32, checkpoint_every=10)
    result = pretrain.run(cfg, name, _data(), 4, 32, Runtime(cuda, progress=False),
                          Hooks(checkpoint_dir=tmp_path / "ckpt"), out_dir=tmp_path)
    assert math.isfinite(result.final.loss) and result.throughput["peak_device_memory_gb"] > 0
    if math.isfinite(perf.peak_flops(cuda, perf.resolve_precision("auto", cuda))):
        assert 0 < result.throughput["mfu"] < 1
    plain = models.build(name, 4, 32)
    plain.load_state_dict(load_file(str(Path(result.weights_path))))
