"""A point's files in storage and what the plan makes of them. The layout is a study's state: a study written by
an earlier version resumes only if every name stays as it was."""

import dataclasses

import pytest

from study.config import GridPoint
from study.plan import decide
from study.protocol import PointFields, PointRecord, PretrainSummary
from study.storage import PointFiles, Storage

POINT = GridPoint(id="0123456789abcdef", model="ViT-Pico/4", family="ViT", subset_size=256, seed=0, steps=12,
                  examples_seen=768, forward_flops=10)
EVALS = {"fewshot": "f1", "finetune": "t1"}


def test_the_layout_of_a_point_is_as_earlier_versions_wrote_it():
    files = PointFiles("0123456789abcdef")
    folder = "points/0123456789abcdef"
    assert (files.folder, files.record, files.checkpoints, files.weights, files.model_spec, files.pretrain_summary,
            files.class_counts, files.fig7) == (
        folder, f"{folder}/record.json", f"{folder}/checkpoints", f"{folder}/pretrained.safetensors",
        f"{folder}/model.json", f"{folder}/pretrain.json", f"{folder}/class_counts.json", f"{folder}/fig7.safetensors")
    assert files.best_weights == f"{folder}/best.safetensors"  # kept only by `pretrain.select: best`
    assert files.logged() == [(files.weights, "model"), (files.best_weights, "model"), (files.model_spec, "model"),
                              (files.class_counts, None)]


def test_the_plan_follows_what_storage_holds_and_is_not_changed_afterwards(tmp_path):
    storage, files = Storage(str(tmp_path)), PointFiles(POINT.id)
    assert decide(POINT, EVALS, storage, None, fresh=False).action == "train"
    storage.write_bytes(f"{files.checkpoints}/ckpt-00000006/state.pt", b"x")
    assert decide(POINT, EVALS, storage, None, fresh=False).action == "resume"
    record = PointRecord(POINT.id, PointFields(**POINT.table_fields), PretrainSummary(12, 768, 1.0, 0))
    storage.write_bytes(files.record, record.to_json().encode())
    d = decide(POINT, EVALS, storage, None, fresh=False)
    assert (d.action, d.evals, d.record) == ("evaluate", EVALS, record)
    assert decide(POINT, EVALS, storage, None, fresh=True).action == "train"
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.action = "train"


def test_a_grid_leaving_out_points_names_the_changed_field_of_a_task_and_the_evaluations_last(tmp_path):
    """The refusal's "changed since" names a task's changed field as an override names it (not the whole
    `downstream` list), and puts evaluation settings, which never leave a point out, after what can."""
    from types import SimpleNamespace

    import yaml

    from pipelines.config import UserError
    from study.run import check_nothing_left_out

    before = {"pretrain": {"lr": 0.001}, "evaluate": {"fewshot": {"shots": [1, 5]}},
              "downstream": [{"name": "pets", "test_root": "/d/test", "size": 10}]}
    now = {"pretrain": {"lr": 0.001}, "evaluate": {"fewshot": {"shots": [1, 10]}},
           "downstream": [{"name": "pets", "test_root": "/d/test/", "size": 10}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(before))
    with pytest.raises(UserError, match=r"has 1 finished point this grid leaves out \(changed since: "
                                        r"downstream\[0\]\.test_root: /d/test -> /d/test/; evaluate\.fewshot\.shots: "
                                        r"\[1, 5\] -> \[1, 10\]\); its report"):
        check_nothing_left_out(SimpleNamespace(study="s"), [], {"p": SimpleNamespace(complete=True)},
                               tmp_path / "config.yaml", now)


def test_a_point_measured_on_files_changed_since_is_found_and_its_task_evaluated_again(tmp_path):
    """A changed downstream task re-runs the evaluations on it (not `reuse`, even where MLflow's child is
    complete), a changed upstream test split the upstream top-1; changed pretraining data, also under a checkpoint
    to resume, is reported by `changed_data` for the driver to refuse; a task named "pretrain" is not the
    pretraining source."""
    import json

    from study.plan import changed_data
    from study.protocol import EvalRecord, Stamps
    from study.tracking import COMPLETE_TAG, EVAL_TAG, WEIGHTS_TAG, ChildRun

    storage, files = Storage(str(tmp_path)), PointFiles(POINT.id)
    a, b = {"files": "a", "sizes": "s"}, {"files": "b", "sizes": "t"}
    same = Stamps({"train": a, "test": a}, {"pretrain": {"train": a, "test": a}})
    evals = {"fewshot/pretrain": "f1", "diagnostics": "d1"}
    record = PointRecord(POINT.id, PointFields(**POINT.table_fields), PretrainSummary(12, 768, 1.0, 0),
                         {"fewshot/pretrain": EvalRecord("f1", [], same.of("fewshot/pretrain")),
                          "diagnostics": EvalRecord("d1", [])}, data=same.weights(None, upstream=True))
    storage.write_bytes(files.record, record.to_json().encode())
    child = ChildRun("r", "FINISHED", {COMPLETE_TAG: "1", WEIGHTS_TAG: "1",
                                       **{EVAL_TAG + k: v for k, v in evals.items()}}, {})
    assert decide(POINT, evals, storage, child, False, same).action == "reuse"
    assert decide(POINT, evals, storage, child, False).action == "reuse"  # a dry run: nothing prepared
    task_moved = Stamps(same.pretrain, {"pretrain": {"train": a, "test": b}})
    d = decide(POINT, evals, storage, child, False, task_moved)
    assert (d.action, d.evals, d.upstream) == ("evaluate", {"fewshot/pretrain": "f1"}, False)
    assert changed_data([d], evals, task_moved) == {"task/pretrain": [(d, {"train": a, "test": a})]}
    assert changed_data([d], {"diagnostics": "d1"}, task_moved) == {}  # few-shot no longer asked for
    test_moved = Stamps({"train": a, "test": b}, same.tasks)
    d = decide(POINT, evals, storage, child, False, test_moved)
    assert (d.action, d.evals, d.upstream, d.describe()) == ("evaluate", {}, True, "evaluate (upstream top-1)")
    assert changed_data([d], evals, test_moved) == {"upstream": [(d, {"test": a})]}
    moved = Stamps({"train": b, "test": a}, same.tasks)
    d = decide(POINT, evals, storage, child, False, moved)
    assert changed_data([d, d], evals, moved) == {"pretrain": [(d, {"train": a})]}

    other = dataclasses.replace(POINT, id="fedcba9876543210")
    ckpts = PointFiles(other.id)
    storage.write_bytes(f"{ckpts.checkpoints}/ckpt-00000006/state.pt", b"x")
    storage.write_bytes(ckpts.data_stamp, json.dumps({"pretrain": {"train": a}}).encode())
    d = decide(other, evals, storage, None, False, moved)
    assert (d.action, d.started_on) == ("resume", {"pretrain": {"train": a}})
    assert changed_data([d], evals, moved) == {"pretrain": [(d, {"train": a})]}
    assert changed_data([d], evals, same) == {}
