"""The grid file: values that parse but make no sense are refused, numbers read as written, `pipe:` commands
listed. In process; tests/study/test_cli.py checks that the CLI turns a refusal into one line and exit 2."""

import pytest

from pipelines.config import ConfigError
from study.config import load_study, pipe_commands
from tests.conftest import ROOT

SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.mark.parametrize("overrides, message", [
    (["study=runs/x"], "study: 'runs/x' is not a name; use letters, digits, '-', '_' and '.', not starting with '.'"),
    (["study=.x"], "study: '.x' is not a name"),
    (["study=''"], "study: '' is not a name"),
    (["pretrain.lr=.inf"], "pretrain.lr: expected a finite number, got inf"),
    (["pretrain.weight_decay=.nan"], "pretrain.weight_decay: expected a finite number, got nan"),
    (["pretrain.checkpoint_every=-1"], "pretrain.checkpoint_every must be >= 0, got -1"),
    (["data.pretrain.seed=-1"], "data.pretrain: seed must be >= 0, as numpy's seeds are (got -1)"),
    (["data.pretrain.image_size=7", "data.pretrain.num_classes=1"],
     "data.pretrain: image_size must be >= 8 (got 7); num_classes must be >= 2 (got 1)"),
    (["data.pretrain.source=folder", "data.pretrain.root=/d", "data.pretrain.urls=/d/{0..3}.tar"],
     "data.pretrain: source 'folder' takes no 'urls' (source 'webdataset''s keys); set source: webdataset to read "
     "that instead"),
    (["data.pretrain.source=webdataset", "data.pretrain.urls=/d/{0..3}.tar", "data.pretrain.root=/d"],
     "data.pretrain: source 'webdataset' takes no 'root' (source 'folder''s keys)"),
    (["pretrain.keep_checkpoints=0"], "pretrain.keep_checkpoints must be >= 1, got 0"),
    (["pretrain.beta2=1"], r"pretrain.beta2 must be in [0, 1), got 1.0"),
    (["pretrain.warmup_steps=-5"], "pretrain.warmup_steps must be >= 0, got -5"),
    (["resources.max_failures=-1"], "resources.max_failures must be >= 0, got -1"),
    (["resources.cpus_per_worker=0"], "resources.cpus_per_worker must be > 0, got 0.0"),
    (["resources.workers_per_trial=0"], "resources.workers_per_trial must be >= 1, got 0"),
    (["resources.cpus_per_trial=2"], "resources.cpus_per_trial is now resources.cpus_per_worker (with "
                                     "resources.workers_per_trial)"),
    (["resources.max_concurrent_trials=-2"], "resources.max_concurrent_trials must be >= 0, got -2"),
    (["seeds=[0, 1, 0]"], "seeds: 0 is listed twice; its grid points would run twice"),
    (["seeds=[-1]"], "seeds: -1 is negative; numpy takes only non-negative seeds"),
    (["seeds=[18446744073709551616]"], "seeds: 18446744073709551616 is too large; torch takes seeds below 2^64"),
    (["models=[ViT-Pico/4, BiT-R14-Pico, ViT-Pico/4]"],
     "models: 'ViT-Pico/4' is listed twice; its grid points would run twice"),
    (["evaluate.diagnostics.batch=0"], "evaluate.diagnostics: batch must be >= 1, got 0"),
    (["evaluate.fewshott.shots=[1]"], "unknown key 'evaluate.fewshott'; valid keys here: fewshot, linear_probe, "
                                      "finetune, diagnostics"),
    (["evaluate.finetune.steps=0"], "evaluate.finetune.steps must be > 0, got 0"),
    (["evaluate.finetune.image_size=0"], "evaluate.finetune.image_size must be >= 8, got 0"),
    (["evaluate.finetune.batch_size=0"], "evaluate.finetune.batch_size must be >= 1, got 0"),
    (["resources.workers_per_trial=3"], "pretrain.batch_size=64 does not divide among resources.workers_per_trial=3 "
                                        "workers; use a multiple of 3"),
    (["resources.workers_per_trial=4", "pretrain.micro_batch_size=32"],
     "pretrain.micro_batch_size=32 must be in (0, 16], a worker's part of the batch (64 / 4)"),
    (["resources.workers_per_trial=2", "evaluate.finetune.batch_size=33", "pretrain.batch_size=64"],
     "evaluate.finetune.batch_size=33 does not divide among resources.workers_per_trial=2 workers"),
    (["recipes.ViT-B/17.lr=1e-3"], "recipes: 'ViT-B/17' is neither a model nor a family; valid families: ViT, BiT, "
                                   "Hybrid; valid models: ViT-Ti/16, "),
    (["recipes.ViT.lrr=1"], "unknown key 'recipes.ViT.lrr'; valid keys here (pretrain's): dropout, drop_path, pool, "),
    (["recipes.ViT.lr=fast"], "recipes.ViT.lr: expected float, got 'fast'"),
    (["recipes.ViT.dropout=1.5"], "recipes.ViT: dropout must be in [0, 1), got 1.5"),
    (["recipes.ViT=0.1"], "recipes.ViT: expected a mapping of pretrain keys, got 0.1"),
    (["recipes.BiT.pool=gap"], "pretrain (with recipes.BiT): pool='gap' does not apply to BiT-R14-Pico (a BiT model); "
                               "BiT models take dropout, drop_path, zero_head, head_bias_init"),
    (["pretrain.pos_embed=sincos2d"], "pretrain: pos_embed='sincos2d' does not apply to BiT-R14-Pico"),
    (["recipes.ViT-Pico/4.warmup_steps=-1"], "pretrain.warmup_steps (with recipes.ViT-Pico/4) must be >= 0, got -1"),
    (["resources.workers_per_trial=4", "recipes.ViT.micro_batch_size=32"],
     "pretrain.micro_batch_size=32 (with recipes.ViT) must be in (0, 16], a worker's part of the batch (64 / 4)"),
])
def test_values_that_make_no_sense_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_study(SMOKE, overrides)
    assert str(err.value).startswith(f"{SMOKE}: {message}") and "\n" not in str(err.value)  # the file, then the key


def test_zero_means_off_where_documented():
    cfg = load_study(SMOKE, ["pretrain.checkpoint_every=0", "pretrain.grad_clip=0", "resources.max_failures=0",
                             "resources.max_concurrent_trials=0", "study=vit-vs-bit_2.1"])
    assert (cfg.pretrain.checkpoint_every, cfg.resources.max_failures, cfg.study) == (0, 0, "vit-vs-bit_2.1")


def test_numbers_in_grid_files_and_overrides_read_as_written(tmp_path):
    grid = tmp_path / "grid.yaml"
    text = SMOKE.read_text().replace("{steps: 12,", "{examples: 7.68e2,").replace("lr: 1.0e-3", "lr: 1e-3")
    assert "7.68e2" in text and "1e-3" in text
    grid.write_text(text)
    cfg = load_study(grid, ["pretrain.beta2=.95", "pretrain.weight_decay=1E-4"])
    assert (cfg.pretrain.examples, cfg.pretrain.lr, cfg.pretrain.beta2, cfg.pretrain.weight_decay) == (
        768, 1e-3, 0.95, 1e-4)
    assert load_study(SMOKE, ["pretrain.lr=1e6"]).pretrain.lr == 1e6


def test_pipe_commands_lists_every_command_the_grid_would_run(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("""
study: piped
data:
  pretrain: {source: webdataset, size: 2048, num_classes: 16,
             urls: "pipe:curl -s https://h/train-{0..2}.tar; /local/{000..001}.tar"}
  subsets: [256]
downstream:
  - {name: pets, source: webdataset, size: 160, test_size: 40, num_classes: 8,
     urls: "pipe:aws s3 cp s3://b/pets-0.tar -",
     test_urls: "pipe:aws s3 cp s3://b/pets-0.tar -;pipe:aws s3 cp s3://b/pets-test.tar -;s3://b/t.tar"}
models: [ViT-Pico/4]
pretrain: {steps: 1}
evaluate: {fewshot: {shots: [1]}}
""")
    assert pipe_commands(load_study(grid)) == [  # brace-expanded; the repeated one listed once; no plain paths
        "curl -s https://h/train-0.tar", "curl -s https://h/train-1.tar", "curl -s https://h/train-2.tar",
        "aws s3 cp s3://b/pets-0.tar -", "aws s3 cp s3://b/pets-test.tar -"]
    assert pipe_commands(load_study(SMOKE)) == []


@pytest.mark.parametrize("text, message", [
    ("study: x\nmodels: [ViT-Pico/4\n", "is not valid YAML: line 3, column 1: expected ',' or ']', but got "
                                        "'<stream end>'"),
    ("study: x\nseeds: [0]\nmodels: [ViT-Pico/4]\nseeds: [1]\n",
     "is not valid YAML: line 4, column 1: key 'seeds' is given twice (also on line 2)"),
    ("base: &b {lr: 1.0}\npretrain: {<<: *b, lr: 2.0}\n", None),  # a merge's key may be overridden
])
def test_a_yaml_error_names_its_line_and_a_key_given_twice_is_one(tmp_path, text, message):
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    if message is None:
        from pipelines.config import load_yaml

        assert load_yaml(text)["pretrain"] == {"lr": 2.0}
        return
    with pytest.raises(ConfigError) as err:
        load_study(grid)
    assert str(err.value) == f"{grid} {message}"
