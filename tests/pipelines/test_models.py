import pytest
import torch

from pipelines import families, models
from pipelines.config import ConfigError

ALL = list(models.MODELS)
SMALL = [name for name, spec in models.MODELS.items() if spec.cpu_sized]


@pytest.mark.parametrize("name", ALL)
def test_every_entry_builds_on_meta_with_its_published_size(name):
    spec = models.MODELS[name]
    with torch.device("meta"):
        model = models.build(name, 1000, 224 if not spec.cpu_sized else 32)
    params = models.backbone_params(model)
    head = sum(p.numel() for p in model.get_classifier().parameters())
    assert params > 0 and head == (model.num_features + 1) * 1000
    if spec.published_params_m is not None:  # published counts include a 1000-way head (module docstring)
        assert params + head == pytest.approx(spec.published_params_m * 1e6, rel=0.01)


@pytest.mark.parametrize("name", ALL)
def test_every_model_names_a_family_of_the_family_table(name):
    assert models.MODELS[name].family in families.FAMILIES


@pytest.mark.parametrize("name", SMALL)
def test_small_models_run_forward_and_backward(name):
    model = models.build(name, 10, 32)
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (4, 10)
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_vit_flops_match_the_closed_form_count():
    # ViT-B/16 at 224: per layer 12*N*D^2 (qkv, proj, MLP) + 2*N^2*D (QK^T, AV) multiply-adds, N = 197 tokens.
    n, d, layers = 197, 768, 12
    macs = layers * (12 * n * d * d + 2 * n * n * d) + 196 * (16 * 16 * 3) * d + d * 1000
    assert models.forward_flops("ViT-B/16", 224) == pytest.approx(2 * macs, rel=0.005)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown model 'ViT-B/17'; valid models: ViT-Ti/16, .*BiT-R50x1"):
        models.get_spec("ViT-B/17")


def test_finetune_head_is_zero_and_posemb_is_interpolated():
    torch.manual_seed(0)
    state = models.build("ViT-Pico/4", 16, 32).state_dict()
    same = models.pretrained_for_task("ViT-Pico/4", state, 10, 32)
    assert torch.equal(same.pos_embed, state["pos_embed"])  # same grid: unchanged
    big = models.pretrained_for_task("ViT-Pico/4", state, 10, 48)
    assert big.pos_embed.shape == (1, 1 + 12 * 12, 64)
    assert torch.equal(big.pos_embed[:, :1], state["pos_embed"][:, :1])  # class token kept apart
    out = big(torch.full((2, 3, 48, 48), 0.3))
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(out))


def test_resnet_takes_larger_inputs_with_a_zero_head():
    state = models.build("BiT-R14-Pico", 16, 32).state_dict()
    model = models.pretrained_for_task("BiT-R14-Pico", state, 10, 48)
    assert torch.equal(model.stem[0].weight, state["stem.0.weight"])
    assert torch.equal(model(torch.randn(2, 3, 48, 48)), torch.zeros(2, 10))


@pytest.mark.parametrize("name, stride", [("R50x1+ViT-B/16", 16), ("R50x1+ViT-B/32", 32)])
def test_hybrids_tokenise_the_resnet_feature_map(name, stride):
    with torch.device("meta"):
        model = models.build(name, 1000, 224)
    assert model.patch_embed.grid_size == (224 // stride, 224 // stride)
    assert models.get_spec(name).patch == stride and models.get_spec(name).family == "Hybrid"


@pytest.mark.parametrize("name", ALL)
def test_every_convolutional_path_runs_channels_last_and_every_model_can_checkpoint_activations(name):
    from pipelines import perf

    spec = models.MODELS[name]
    with torch.device("meta"):
        model = models.build(name, 10, 224 if not spec.cpu_sized else 32)
    layout = perf.channels_last(model, torch.device("cuda"))
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    in_resnet = families.get(spec.family).convolutional
    assert (layout == torch.channels_last) == in_resnet
    if in_resnet:  # every spatial convolution of a BiT or a hybrid's backbone (1x1 weights have no layout)
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    model.set_grad_checkpointing(True)  # `pretrain.grad_checkpointing`: timm's hook exists for every entry
