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
