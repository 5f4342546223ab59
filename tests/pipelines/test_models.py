import numpy as np
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


def test_the_femto_pair_matches_in_size_and_costs_half_a_pico():
    """Femto's two rows are a pair (parameter counts within 15%) at about half the Pico rows' forward FLOPs."""
    def params(name):
        with torch.device("meta"):
            return models.backbone_params(models.build(name, 16, 32))

    assert params("BiT-R14-Femto") == pytest.approx(params("ViT-Femto/4"), rel=0.15)
    for femto, pico in [("ViT-Femto/4", "ViT-Pico/4"), ("BiT-R14-Femto", "BiT-R14-Pico")]:
        assert models.forward_flops(femto, 32, 16) / models.forward_flops(pico, 32, 16) == pytest.approx(0.5, abs=0.1)


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


# --- the model knobs (ModelOptions), each against what timm or big_vision does --------------------------------

def test_sincos2d_is_big_visions_table():
    # big_vision `posemb_sincos_2d(h, w, width)`, written out per entry: row r, column c of the patch grid,
    # band i of width/4 at frequency 10000^(-i / (width/4 - 1)); [sin(c w), cos(c w), sin(r w), cos(r w)].
    h, w, width = 2, 3, 8
    bands = width // 4
    expected = np.zeros((h * w, width))
    for r in range(h):
        for c in range(w):
            for i in range(bands):
                freq = 10000.0 ** (-i / (bands - 1))
                expected[r * w + c, [i, bands + i, 2 * bands + i, 3 * bands + i]] = (
                    np.sin(c * freq), np.cos(c * freq), np.sin(r * freq), np.cos(r * freq))
    assert np.allclose(models.sincos2d(h, w, width).numpy(), expected, atol=1e-6)


def test_sincos2d_pos_embed_is_fixed_and_recomputed_for_a_new_grid():
    options = models.ModelOptions(pos_embed="sincos2d")
    model = models.build("ViT-Pico/4", 10, 32, options)
    assert "pos_embed" not in dict(model.named_parameters()) and "pos_embed" not in model.state_dict()
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(64))  # the class token gets none, as in big_vision
    assert torch.equal(model.pos_embed[0, 1:], models.sincos2d(8, 8, 64))
    tuned = models.pretrained_for_task("ViT-Pico/4", model.state_dict(), 4, 48, options)
    assert torch.equal(tuned.pos_embed[0, 1:], models.sincos2d(12, 12, 64))


def test_gap_pools_the_mean_of_the_normed_tokens_without_a_class_token():
    model = models.build("ViT-Pico/4", 10, 32, models.ModelOptions(pool="gap")).eval()
    assert model.cls_token is None and model.num_prefix_tokens == 0 and model.pos_embed.shape == (1, 64, 64)
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))  # ends with the encoder's LayerNorm
    assert torch.allclose(model.forward_head(tokens, pre_logits=True), tokens.mean(1), atol=1e-6)


@pytest.mark.parametrize("name", SMALL)
def test_a_zero_head_gives_uniform_logits_at_the_bias_init(name):
    model = models.build(name, 10, 32, models.ModelOptions(zero_head=True, head_bias_init=-10.0))
    logits = model(torch.randn(3, 3, 32, 32))
    assert torch.equal(logits, torch.full((3, 10), -10.0))
    from pipelines.loop import loss_fn  # sigmoid at -10: ~ the positive's 10 nats, not 10 x ln 2 at a zero bias
    assert loss_fn("sigmoid", logits, torch.tensor([1, 2, 3])).item() == pytest.approx(10 + 10 * 4.54e-5, rel=1e-3)


def test_label_smoothing_is_torchs_for_softmax_and_the_same_target_for_sigmoid():
    from pipelines.loop import loss_fn

    logits, labels = torch.randn(4, 5), torch.tensor([0, 3, 1, 4])
    assert torch.allclose(loss_fn("softmax", logits, labels, 0.1),
                          torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels))
    target = torch.nn.functional.one_hot(labels, 5).float() * 0.9 + 0.1 / 5
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 4
    assert torch.allclose(loss_fn("sigmoid", logits, labels, 0.1), expected)


def test_dropout_and_drop_path_reach_timms_layers_where_the_paper_puts_them():
    vit = models.build("ViT-Pico/4", 10, 32, models.ModelOptions(dropout=0.1, drop_path=0.2))
    block = vit.blocks[0]
    # after adding the position embedding and after every dense layer but qkv (ViT paper B.1); not on attention
    assert vit.pos_drop.p == block.attn.proj_drop.p == block.mlp.drop1.p == block.mlp.drop2.p == 0.1
    assert block.attn.attn_drop.p == 0 and vit.head_drop.p == 0
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)  # timm's linear rule: the last block's rate
    bit = models.build("BiT-R14-Pico", 10, 32, models.ModelOptions(dropout=0.1, drop_path=0.2))
    assert bit.drop_rate == 0.1 and bit.stages[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(vit.train()(x), vit(x)) and torch.equal(vit.eval()(x), vit(x))


def test_pre_logits_is_a_tanh_layer_for_pretraining_replaced_by_a_linear_head_for_fine_tuning():
    options = models.ModelOptions(pre_logits=True)
    model = models.build("ViT-Pico/4", 10, 32, options).eval()
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    features = model.forward_head(tokens, pre_logits=True)  # what few-shot and the linear probe read
    fc = model.fc_norm.fc
    assert torch.allclose(features, torch.tanh(fc(tokens[:, 0])), atol=1e-6)
    assert torch.allclose(model.forward_head(tokens), model.head(features), atol=1e-6)
    tuned = models.pretrained_for_task("ViT-Pico/4", model.state_dict(), 4, 32, options)
    assert isinstance(tuned.fc_norm, torch.nn.Identity) and tuned.head.in_features == 64
    assert torch.equal(tuned.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert torch.equal(tuned(torch.randn(2, 3, 32, 32)), torch.zeros(2, 4))


def test_jax_init_is_big_visions_xavier_dense_lecun_patch_embedding_and_zero_head():
    """`weight_init: jax` (the ViT paper's init): every dense layer Xavier-uniform, the patch embedding LeCun-normal,
    the head zero; timm's default draws them all at std 0.02. The BiT takes no such knob."""
    torch.manual_seed(0)
    jax = models.build("ViT-Pico/4", 16, 32, models.ModelOptions(weight_init="jax", pre_logits=True))
    timm = models.build("ViT-Pico/4", 16, 32)
    for name in ("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.3.mlp.fc1", "blocks.3.mlp.fc2"):
        w = jax.get_submodule(name).weight
        bound = (6 / sum(w.shape)) ** 0.5  # Xavier-uniform on [-bound, bound]: std bound / sqrt(3)
        assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1), name
        assert timm.get_submodule(name).weight.std().item() == pytest.approx(0.02, rel=0.1), name
    patch = jax.patch_embed.proj.weight
    assert patch.std().item() == pytest.approx(patch[0].numel() ** -0.5, rel=0.1)  # LeCun: 1 / sqrt(fan_in)
    assert torch.equal(jax.head.weight, torch.zeros_like(jax.head.weight))
    assert jax.fc_norm.fc.weight.std().item() == pytest.approx(64 ** -0.5, rel=0.1)  # pre-logits: Flax's Dense
    with pytest.raises(ConfigError, match=r"weight_init='jax' does not apply to BiT-R14-Pico"):
        models.build("BiT-R14-Pico", 16, 32, models.ModelOptions(weight_init="jax"))


def test_a_knob_the_family_does_not_take_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"pool='gap' does not apply to BiT-R50x1 \(a BiT model\); BiT models "
                                          r"take dropout, drop_path, zero_head, head_bias_init"):
        models.check_options("BiT-R50x1", models.ModelOptions(pool="gap"))
    models.check_options("R50x1+ViT-B/16", models.ModelOptions(pool="gap", pos_embed="sincos2d", pre_logits=True))
