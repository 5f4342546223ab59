"""Grid-point and evaluation identities: what changes them and what must not."""

import pytest
import yaml

from pipelines.config import ConfigError
from study.config import expand, load_study
from study.identity import eval_ids, point_id
from tests.conftest import ROOT


def _study(tmp_path, text: str | None = None, overrides: list[str] | None = None):
    path = tmp_path / "grid.yaml"
    path.write_text(text if text is not None else (ROOT / "configs" / "smoke.yaml").read_text())
    return load_study(path, overrides or [])


def _ids(cfg) -> list[str]:
    return [p.id for p in expand(cfg)]


def test_ids_are_unique_per_point_and_stable_across_key_order(tmp_path):
    cfg = _study(tmp_path)
    ids = _ids(cfg)
    assert len(set(ids)) == len(ids) == 4 and all(len(i) == 16 for i in ids)
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    reordered = {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v)
                 for k, v in reversed(list(data.items()))}
    assert _ids(_study(tmp_path, yaml.safe_dump(reordered, sort_keys=False))) == ids


@pytest.mark.parametrize("override", [
    "pretrain.checkpoint_every=3", "pretrain.keep_checkpoints=5", "pretrain.micro_batch_size=16",
    "data.loader.workers=3", "resources.max_failures=7", "data.cache_dir=/elsewhere",
    "data.pretrain.name=renamed", "resources.max_concurrent_trials=1", "pretrain.log_every=7",
])
def test_execution_only_settings_keep_every_id(tmp_path, override):
    assert _ids(_study(tmp_path, overrides=[override])) == _ids(_study(tmp_path))


@pytest.mark.parametrize("override", ["evaluate.finetune.log_every=7", "evaluate.finetune.nonfinite_check_every=5",
                                      "evaluate.finetune.micro_batch_size=8", "evaluate.finetune.compile=false"])
def test_execution_only_finetune_settings_keep_every_evaluation_id(tmp_path, override):
    assert eval_ids(_study(tmp_path, overrides=[override])) == eval_ids(_study(tmp_path))
    assert eval_ids(_study(tmp_path, overrides=["evaluate.finetune.warmup_steps=7"])) != eval_ids(_study(tmp_path))


@pytest.mark.parametrize("override", [
    "pretrain.lr=3.0e-4", "pretrain.warmup_steps=2", "pretrain.batch_size=32", "data.pretrain.seed=5",
    "data.pretrain.size=1536", "data.subset_mode=shards", "pretrain.dropout=0.1", "pretrain.drop_path=0.1",
    "pretrain.label_smoothing=0.1", "pretrain.zero_head=true", "pretrain.head_bias_init=-10",
    "pretrain.eval_every=6",  # evaluation during training chooses the kept weights (select: best)
])
def test_what_shapes_the_weights_changes_every_id(tmp_path, override):
    before, after = _ids(_study(tmp_path)), _ids(_study(tmp_path, overrides=[override]))
    assert not set(before) & set(after)


def test_select_final_is_its_own_id_and_evaluation_during_training_needs_a_held_out_split(tmp_path):
    """`select: best` is the default: with `eval_every` alone a point selects its best step."""
    best = _ids(_study(tmp_path, overrides=["pretrain.eval_every=6"]))
    assert best == _ids(_study(tmp_path, overrides=["pretrain.eval_every=6", "pretrain.select=best"]))
    assert not set(best) & set(_ids(_study(tmp_path, overrides=["pretrain.eval_every=6", "pretrain.select=final"])))
    with pytest.raises(ConfigError, match=r"pretrain.eval_every: .*give data.pretrain.test_size .*or data.holdout"):
        _study(tmp_path, overrides=["pretrain.eval_every=6", "data.pretrain.test_size=0", "data.holdout=0"])
    assert _ids(_study(tmp_path, overrides=["pretrain.select=best"])) == _ids(_study(tmp_path))  # the default
    assert _ids(_study(tmp_path, overrides=["pretrain.select=final"])) == _ids(_study(tmp_path))  # no eval_every
    examples = ["pretrain.eval_every_examples=300"]  # the same evaluations, counted in examples
    final = _ids(_study(tmp_path, overrides=[*examples, "pretrain.select=final"]))
    assert not set(final) & set(_ids(_study(tmp_path, overrides=examples)))
    with pytest.raises(ConfigError, match="give eval_every .steps. or eval_every_examples, not both"):
        _study(tmp_path, overrides=[*examples, "pretrain.eval_every=6"])
    mixed = _study(tmp_path, overrides=[*examples, "recipes.ViT.eval_every=6"])  # a recipe's unit replaces the base's
    assert {m: mixed.pretrain_for(m).eval_steps for m in mixed.models} == {"ViT-Pico/4": 6, "BiT-R14-Pico": 5}


SECOND_TASK = ("downstream=[{name: shapes-novel, source: shapes, size: 160, test_size: 160, image_size: 48, "
               "num_classes: 8, seed: 1}, {name: other, source: shapes, size: 160, test_size: 160, image_size: 32, "
               "num_classes: 8, seed: 2}]")


@pytest.mark.parametrize("override, moves", [
    ("downstream[0].seed=7", True),  # another first task: another step scores best
    ("evaluate.fewshot.shots=[1, 10]", True),  # no 5-shot: the headline is the largest k
    ("evaluate.fewshot.l2_reg=1.0", True),
    ("evaluate.fewshot.repeats=3", True),  # the headline is a mean over the draws
    ("evaluate.fewshot.shots=[1, 5, 10]", False),  # the 5-shot sets are prefixes of each class's draw, as before
    ("downstream[0].name=renamed", False),  # a label
    (SECOND_TASK, False),  # selection scores the first task only
    ("evaluate.linear_probe.max_iter=7", False),  # not what selection scores
    ("evaluate.finetune.steps=3", False),
])
def test_what_the_best_step_is_chosen_on_is_in_the_ids_of_the_points_that_choose(tmp_path, override, moves):
    """With `select: best` the kept weights are the step with the best 5-shot top-1 on the first downstream task, so
    that task and the few-shot protocol decide them; with `select: final` they do not."""
    for select, chooses in (("best", True), ("final", False)):
        during = ["pretrain.eval_every=6", f"pretrain.select={select}"]
        before, after = _ids(_study(tmp_path, overrides=during)), _ids(_study(tmp_path, overrides=[*during, override]))
        assert (not set(before) & set(after)) if moves and chooses else before == after, (select, override)
    only_vit = ["recipes.ViT-Pico/4.eval_every=6", override]  # a recipe's evaluation moves that model's points only
    before, after = _by_model(_study(tmp_path, overrides=only_vit[:1])), _by_model(_study(tmp_path, overrides=only_vit))
    assert after["BiT-R14-Pico"] == before["BiT-R14-Pico"]
    assert (not after["ViT-Pico/4"] & before["ViT-Pico/4"]) if moves else after == before


def test_a_slice_is_carved_where_validation_has_no_test_split_and_its_size_is_in_those_ids_only(tmp_path):
    """Carving changes which rows the subsets hold, so it moves the ids of the points it carves from; a source with
    a test split (every shipped study: their pins above) carves nothing."""
    assert _study(tmp_path, overrides=["pretrain.eval_every=6"]).holdout == 0  # smoke's source has a test split
    untested = ["data.pretrain.test_size=0"]
    assert _study(tmp_path, overrides=untested).holdout == 0  # no validation asked: nothing carved, ids as before
    carved = _study(tmp_path, overrides=[*untested, "pretrain.eval_every=6"])
    assert carved.holdout == 20  # 1% of 2048 (at most 25,600: big_vision's)
    assert carved.holdout == _study(tmp_path, overrides=[*untested, "recipes.ViT-Pico/4.eval_every=6"]).holdout
    same = _study(tmp_path, overrides=[*untested, "pretrain.eval_every=6", "data.holdout=20"])
    assert _ids(same) == _ids(carved)  # the default, written out
    other = _study(tmp_path, overrides=[*untested, "pretrain.eval_every=6", "data.holdout=40"])
    assert not set(_ids(other)) & set(_ids(carved))  # another slice: other rows in every subset
    plain = _ids(_study(tmp_path, overrides=untested))
    assert not set(_ids(_study(tmp_path, overrides=[*untested, "data.holdout=20"]))) & set(plain)  # val_top1 only


def test_the_carved_slice_does_not_depend_on_which_models_the_grid_holds(tmp_path):
    """A recipe's evaluation during training carves the slice whether or not its model is in the grid, so adding
    (or dropping) that model leaves the other model's subsets, and ids, as they were."""
    carving = ["data.pretrain.test_size=0", "recipes.ViT-Pico/4.eval_every=6"]
    both = _study(tmp_path, overrides=carving)
    bit_alone = _study(tmp_path, overrides=[*carving, "models=[BiT-R14-Pico]"])
    assert both.holdout == bit_alone.holdout == 20
    assert _by_model(bit_alone)["BiT-R14-Pico"] == _by_model(both)["BiT-R14-Pico"]


@pytest.mark.parametrize("overrides, message", [
    (["data.subsets=[256, 2048]"], "data.subsets: 2048 examples asked, but data.pretrain holds only 2048 less the 20 "
                                   "held out for validation (data.holdout): use at most 2028, or a smaller "
                                   "data.holdout"),
    (["data.holdout=2048"], "data.subsets: 1024 examples asked, but data.pretrain holds only 2048 less the 2048 "
                            "held out"),
    (["data.holdout=-1"], "data.holdout must be >= 0, got -1"),
    (["data.pretrain.test_size=256", "data.holdout=20"], "data.holdout: 20 rows asked, but data.pretrain has a test "
                                                         "split, which upstream validation uses"),
])
def test_an_impossible_held_out_slice_is_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        _study(tmp_path, overrides=["data.pretrain.test_size=0", "pretrain.eval_every=6", *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_seed_and_subset_change_only_their_points(tmp_path):
    base = {(p.model, p.subset_size, p.seed): p.id for p in expand(_study(tmp_path))}
    grown = {(p.model, p.subset_size, p.seed): p.id
             for p in expand(_study(tmp_path, overrides=["seeds=[0, 1]", "data.subsets=[256, 1024, 2048]"]))}
    assert {k: grown[k] for k in base} == base  # the old points keep their ids: nothing is retrained
    assert len(set(grown.values())) == 12
    cfg = _study(tmp_path)
    assert point_id(cfg, "ViT-Pico/4", 256, 0) != point_id(cfg, "ViT-Pico/4", 256, 1)
    assert point_id(cfg, "ViT-Pico/4", 256, 0) != point_id(cfg, "ViT-Pico/4", 1024, 0)


def _by_model(cfg) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in expand(cfg):
        out.setdefault(p.model, set()).add(p.id)
    return out


@pytest.mark.parametrize("recipe", [["recipes.ViT-Pico/4.lr=3.0e-4"], ["recipes.ViT.pool=gap"],
                                    ["recipes.ViT.dropout=0.1", "recipes.ViT.pos_embed=sincos2d"],
                                    ["recipes.ViT-Pico/4.steps=20"]])
def test_a_recipe_changes_the_ids_of_the_points_it_applies_to_and_only_those(tmp_path, recipe):
    before, after = _by_model(_study(tmp_path)), _by_model(_study(tmp_path, overrides=recipe))
    assert after["BiT-R14-Pico"] == before["BiT-R14-Pico"] and not after["ViT-Pico/4"] & before["ViT-Pico/4"]


def test_a_model_recipe_beats_its_familys_key_by_key_and_the_merge_is_what_is_hashed(tmp_path):
    cfg = _study(tmp_path, overrides=["recipes.ViT.lr=3.0e-4", "recipes.ViT.dropout=0.1",
                                      "recipes.ViT-Pico/4.lr=1.0e-3", "recipes.ViT-Pico/4.epochs=2"])
    merged = cfg.pretrain_for("ViT-Pico/4")
    assert (merged.lr, merged.dropout, merged.epochs, merged.steps) == (1.0e-3, 0.1, 2, None)  # a duration replaces
    assert cfg.pretrain_for("BiT-R14-Pico") == cfg.pretrain
    same = _study(tmp_path, overrides=["recipes.ViT.lr=3.0e-4", "recipes.ViT-Pico/4.lr=1.0e-3"])  # = pretrain's lr
    assert _ids(same) == _ids(_study(tmp_path))


def test_an_evaluation_change_keeps_the_pretraining_and_changes_only_its_own_id(tmp_path):
    cfg, changed = _study(tmp_path), _study(tmp_path, overrides=["evaluate.fewshot.shots=[1, 2, 5]"])
    assert _ids(cfg) == _ids(changed)
    before, after = eval_ids(cfg), eval_ids(changed)
    assert set(before) == {"fewshot/shapes-novel", "linear_probe/shapes-novel", "finetune/shapes-novel", "diagnostics"}
    assert {k for k in before if before[k] != after[k]} == {"fewshot/shapes-novel"}
    lp_ft = eval_ids(_study(tmp_path, overrides=["evaluate.finetune.head_init=probe"]))
    assert {k for k in before if before[k] != lp_ft[k]} == {"finetune/shapes-novel"}  # the default (zero): in no id
    no_probe = eval_ids(_study(tmp_path, overrides=["evaluate.linear_probe=null"]))
    fewshot = "fewshot/shapes-novel"
    assert "linear_probe/shapes-novel" not in no_probe and no_probe[fewshot] == before[fewshot]


def test_a_downstream_task_added_or_moved_keeps_the_ids_of_the_others(tmp_path):
    """Each evaluation that runs on each task has an id per task, so adding a task (or reordering the list) runs the
    evaluations on the new task alone; the diagnostics, which read no task, keep theirs."""
    one, two = eval_ids(_study(tmp_path)), eval_ids(_study(tmp_path, overrides=[SECOND_TASK]))
    assert {k: two[k] for k in one} == one
    assert set(two) - set(one) == {"fewshot/other", "linear_probe/other", "finetune/other"}
    flipped = SECOND_TASK.replace("downstream=[", "").rstrip("]").split("}, ")
    reordered = eval_ids(_study(tmp_path, overrides=[f"downstream=[{flipped[1]}, {flipped[0]}}}]"]))
    assert reordered == two
    moved = eval_ids(_study(tmp_path, overrides=[SECOND_TASK, "downstream[1].seed=3"]))
    assert {k for k in two if two[k] != moved[k]} == {"fewshot/other", "linear_probe/other", "finetune/other"}


def _defaults():
    from pipelines.config import to_dict
    from pipelines.data import SourceConfig
    from pipelines.downstream import EvaluateConfig
    from pipelines.pretrain import PretrainConfig
    from study.identity import EVAL_VERSION, RECIPE_VERSION, digest

    recipe = digest([RECIPE_VERSION, to_dict(PretrainConfig(steps=1)), to_dict(SourceConfig())])
    evaluation = digest([EVAL_VERSION, to_dict(EvaluateConfig())])
    return recipe, evaluation


# Identities hash only non-default values, so a changed default would change results under the same ids.
# When this fails: if a default changed what a config computes, bump RECIPE_VERSION (pretraining, sources) or
# EVAL_VERSION (evaluations) in study/identity.py; then (in either case, a new field too) update the pin.
# (The evaluation pin moved when `evaluate.diagnostics: true` + `diagnostic_batch: 128` became the section
# `evaluate.diagnostics: {batch: 128}`: the same defaults in another shape; the ids below did not move.)
# (It moved again with `finetune.minival_seed`, whose minival rule bumped the fine-tune's PROTOCOL_VERSION: the
# fine-tune ids below moved with it, and only they. The recipe pin moved with `pretrain.log_every`, execution-only;
# the evaluation pin with `finetune.head_init`, whose default `zero` is left out of the ids; the recipe pin again
# when the model knobs and label_smoothing joined PretrainConfig, defaults keeping today's models; and with
# `pretrain.eval_every` and `select`, whose defaults (no evaluation during training) keep today's weights; and with
# `pretrain.eval_every_examples`, default None, the same; and with `weight_init`, default `timm`, today's init.
# The evaluation pin moved with `finetune.log_every`, execution-only like pretraining's: the ids below did not.)
PINNED_DEFAULTS = ("5011af01f202a883", "23cfc9a704db13a7")
# The point ids of the shipped studies, as before the model knobs and recipes: their weights are reused after an
# upgrade (a new field at its default hashes nothing). The Pico study's 12 ViT points (configs/scaling-pico.yaml, the
# default study until it became the Femto pair) moved once, deliberately, to the paper's initialisation (`recipes:
# {ViT: {weight_init: jax}}`); its BiT points (the last 12) did not.
PINNED_POINT_IDS = {
    "smoke": ["ca10c6d981753735", "25858b79bb6e7bc5", "7693a98886fca0a3", "db01d08a0c3e82ea"],
    "scaling": ["375ead643132fdd8", "1dc2f46aee88e896", "711e2c07a49449cc", "62e8ac4b26fb2fdc", "4f875aab3b898ff9",
                "660a750f8ffb7a04", "ca856721ccef17fd", "e27a1cf2b791eac9", "10468ecd98f2a3ed", "c92a482d4e601c46",
                "48f2064783a2dd74", "8ce0690b5ced570a", "249a6bd48b097160", "b9a28a80b091d296", "c162d7e61649ced6",
                "6763c3765d71f32b", "78f18ed33f141417", "a5b1d8370d336ecd", "8a745098eeca941c", "f2e6e2624ef19024",
                "64167f689db9a497", "d92aa1ad43df2875", "59483d2b743c186e", "28d8073b0433239e"],
    "scaling-pico": ["5543f9738bad0384", "b5e77f1d56750024", "6588299bbeedf56a", "307034f5a1d00cab", "7c4d8cf7ea5a2e26",
                "d7c59bd5195969e8", "00a76d37fa593c47", "f46f4e2d98ab5489", "4e7d46f01145e0af", "ce44a416799ba7e8",
                "7a38b16d6c5f11ac", "dec9a94985533aef", "2cfd7d1d6186eb65", "53e0c1be5ac03d55", "abcd5fb4a46b0a26",
                "2087732cfa27d368", "d8e3492e9ce5d286", "eeef04345c44f1fd", "9f7312572b0d2543", "8c6c0ae239fd0342",
                "52ffef9eccbf5d9a", "930e29907a723c58", "629c70efb97d6f31", "fb6181e1ba5f2bce"],
}
# The evaluation ids of the shipped studies: finished studies are not re-evaluated after an upgrade (the Pico
# study's fine-tune moved once, deliberately, to LP-FT: `head_init: probe`; the smoke study's once, to a sweep of
# two learning rates instead of four, for the tests' time). The default study evaluates as the Pico study does.
# Keyed per task since evaluations that run on each task have an id per task: with one task, the same ids.
PINNED_EVAL_IDS = {
    "smoke": {"fewshot/shapes-novel": "f863e9d7fb785b7f", "linear_probe/shapes-novel": "9380b66fe0457576",
              "finetune/shapes-novel": "b6fb55b863502d9d", "diagnostics": "80422ce3c0f28d18"},
    "scaling": {"fewshot/shapes-novel": "af53271c9c6d482a", "linear_probe/shapes-novel": "ddd01448a13d7378",
                "finetune/shapes-novel": "43e5362f511e7344", "diagnostics": "80422ce3c0f28d18"},
    "scaling-pico": {"fewshot/shapes-novel": "af53271c9c6d482a", "linear_probe/shapes-novel": "ddd01448a13d7378",
                     "finetune/shapes-novel": "43e5362f511e7344", "diagnostics": "80422ce3c0f28d18"},
}


def test_config_defaults_are_pinned_to_the_recipe_and_eval_versions():
    assert _defaults() == PINNED_DEFAULTS, f"defaults changed: see the comment above; now {_defaults()}"


@pytest.mark.parametrize("study", PINNED_POINT_IDS)
def test_the_shipped_studies_keep_their_point_ids(study):
    assert _ids(load_study(ROOT / "configs" / f"{study}.yaml")) == PINNED_POINT_IDS[study]


@pytest.mark.parametrize("study", PINNED_EVAL_IDS)
def test_the_shipped_studies_keep_their_evaluation_ids(study):
    assert eval_ids(load_study(ROOT / "configs" / f"{study}.yaml")) == PINNED_EVAL_IDS[study]


def test_a_null_section_switches_its_evaluation_off(tmp_path):
    ids = eval_ids(_study(tmp_path, overrides=["evaluate.diagnostics=null", "evaluate.finetune=null"]))
    assert set(ids) == {"fewshot/shapes-novel", "linear_probe/shapes-novel"}


def test_the_image_path_version_keys_decoded_sources_and_leaves_the_procedural_default_alone(tmp_path, monkeypatch):
    import study.identity

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-000000.tar").write_bytes(b"")
    decoded = _study(tmp_path, overrides=["data.pretrain.source=webdataset",
                                          f"data.pretrain.urls={shards}/train-000000.tar"])
    procedural = _study(tmp_path)
    before = _ids(decoded), _ids(procedural), eval_ids(procedural)
    monkeypatch.setattr(study.identity, "IMAGE_VERSION", study.identity.IMAGE_VERSION + 1)
    assert not set(_ids(decoded)) & set(before[0])
    assert (_ids(procedural), eval_ids(procedural)) == before[1:]


def test_a_few_shot_protocol_version_moves_the_points_that_select_on_few_shot_and_only_those(tmp_path, monkeypatch):
    import pipelines.evaluations.fewshot as fewshot

    best, final = (["pretrain.eval_every=6", f"pretrain.select={select}"] for select in ("best", "final"))
    before = _ids(_study(tmp_path, overrides=best)), _ids(_study(tmp_path, overrides=final)), _ids(_study(tmp_path))
    monkeypatch.setattr(fewshot, "PROTOCOL_VERSION", 1, raising=False)
    assert not set(_ids(_study(tmp_path, overrides=best))) & set(before[0])
    assert (_ids(_study(tmp_path, overrides=final)), _ids(_study(tmp_path))) == before[1:]
