"""A point's record: typed fields, the JSON that storage and MLflow hold unchanged (records written by earlier
versions load, and are written back byte for byte, but for the one renamed evaluation, diagnostic -> diagnostics, and
the per-task keys of the evaluations that run on each downstream task, fewshot -> fewshot/<task>)."""

import dataclasses

import pytest

from study.protocol import Finished, PointFields, PointRecord, PretrainSummary, decode, encode

# A record as the study wrote it before its fields were typed (a smoke study's, two evaluations kept).
STORED = """{
 "evals": {
  "diagnostics": {
   "id": "80422ce3c0f28d18",
   "measurements": [
    {
     "dataset": "pretrain",
     "eval": "diagnostic",
     "metric": "posemb_locality",
     "shots": null,
     "spread": null,
     "value": -0.012825464947067346
    }
   ]
  },
  "fewshot": {
   "id": "f863e9d7fb785b7f",
   "measurements": [
    {
     "dataset": "shapes-novel",
     "eval": "fewshot",
     "metric": "top1",
     "shots": 1,
     "spread": 0.3125000000000009,
     "value": 14.6875
    },
    {
     "dataset": "shapes-novel",
     "eval": "fewshot",
     "metric": "top1",
     "shots": 5,
     "spread": 0.0,
     "value": 13.750000000000002
    }
   ]
  }
 },
 "fields": {
  "examples_seen": 768,
  "family": "ViT",
  "model": "ViT-Pico/4",
  "pretrain_flops": 50137399296.0,
  "seed": 0,
  "subset_size": 256
 },
 "point_id": "ca10c6d981753735",
 "pretrain": {
  "data_wait_fraction": 0.02132874628420951,
  "examples_seen": 768,
  "images_per_s": 519.6803742663573,
  "peak_host_rss_gb": 1.142484992,
  "resumed_from_step": 0,
  "seconds": 1.741886161000366,
  "step_time_s": 0.12315262066678972,
  "steps": 12,
  "val_top1": 7.421875
 },
 "timings": {
  "data": 0.0002895899997383822,
  "pretrain": 2.3981575060006435
 }
}"""


def test_a_stored_record_loads_typed_and_is_written_back_byte_for_byte():
    record = PointRecord.from_json(STORED)
    assert record.fields == PointFields(model="ViT-Pico/4", family="ViT", subset_size=256, examples_seen=768,
                                        pretrain_flops=50137399296.0, seed=0)
    assert record.pretrain.steps == 12 and record.pretrain.val_top1 == 7.421875
    assert record.pretrain.mfu is None  # a CPU run: no known peak, so no MFU
    assert [m.shots for m in record.measurements()] == [None, 1, 5]
    assert record.to_json() == STORED.replace('"eval": "diagnostic"', '"eval": "diagnostics"').replace(
        '"fewshot": {', '"fewshot/shapes-novel": {')  # one name per kind; per task where it runs on each
    assert PointRecord.from_json(record.to_json()) == record


def test_a_record_from_before_per_task_identities_stays_current_where_its_task_list_was_the_one_task():
    """An evaluation recorded under its name alone, with one id for its whole task list, is split per task keeping
    that id: the smoke study's (one task) needs nothing re-run, a task added runs alone, and a two-task record
    (whose id hashed both tasks) matches neither task's own id, so both run again, once."""
    from study.config import load_study
    from study.identity import eval_ids
    from study.protocol import stale
    from tests.conftest import ROOT

    record, cfg = PointRecord.from_json(STORED), load_study(ROOT / "configs" / "smoke.yaml")
    want = {k: v for k, v in eval_ids(cfg).items() if k in ("fewshot/shapes-novel", "diagnostics")}
    assert set(record.evals) == {"diagnostics", "fewshot/shapes-novel"} and record.stale(want) == ()
    assert [m.shots for m in record.measurements(want)] == [None, 1, 5]
    legacy_tags = {"fewshot": "f863e9d7fb785b7f", "diagnostics": "80422ce3c0f28d18"}  # an MLflow child's, as tagged
    assert stale(legacy_tags, want) == ()
    assert stale(legacy_tags, {**want, "fewshot/other": "0123456789abcdef"}) == ("fewshot/other",)

    two = STORED.replace(
        '"dataset": "shapes-novel",\n     "eval": "fewshot",\n     "metric": "top1",\n     "shots": 5',
        '"dataset": "other",\n     "eval": "fewshot",\n     "metric": "top1",\n     "shots": 5')
    split = PointRecord.from_json(two)
    assert {k: [m.dataset for m in ev.measurements] for k, ev in split.evals.items() if k != "diagnostics"} == {
        "fewshot/shapes-novel": ["shapes-novel"], "fewshot/other": ["other"]}
    assert {ev.id for k, ev in split.evals.items() if k != "diagnostics"} == {"f863e9d7fb785b7f"}


def test_a_record_not_yet_pretrained_keeps_an_empty_summary():
    record = PointRecord("abc", PointFields("BiT-R50x1", "BiT", 10, 20, 3.0, 1))
    assert record.pretrain is None and '"pretrain": {}' in record.to_json()
    assert PointRecord.from_json(record.to_json()) == record


def test_a_gpu_summary_round_trips_through_the_wire():
    summary = PretrainSummary(steps=5, examples_seen=40, seconds=2.5, resumed_from_step=3, images_per_s=16.0,
                              step_time_s=0.5, data_wait_fraction=0.1, peak_device_memory_gb=1.5, mfu=0.4,
                              device_peak_tflops=989.0)
    record = dataclasses.replace(PointRecord.from_json(STORED), pretrain=summary)
    assert "peak_host_rss_gb" not in summary.to_dict()
    assert decode(encode(Finished(record))) == Finished(record)


def test_typed_fields_are_frozen_and_unknown_summary_keys_fail():
    record = PointRecord.from_json(STORED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.fields.seed = 1
    with pytest.raises(ValueError, match="flops_per_s"):
        PretrainSummary.from_dict({**record.pretrain.to_dict(), "flops_per_s": 1.0})


def test_a_record_keeps_the_stamp_of_the_data_it_measured_and_names_what_changed_since():
    """What its pretraining measured on (the pretraining source's train split, its test split for the upstream
    top-1, and the train split of the task a kept step is chosen on) on the record, a task's splits on each
    evaluation; a record from before stamps (or a plan without them, a dry run) changes nothing; an evaluation no
    longer asked for is not looked at; `restamp` (--same-data) takes the new files."""
    from study.protocol import EvalRecord, Stamps

    a, b = {"files": "a", "sizes": "s"}, {"files": "b", "sizes": "s"}
    old = Stamps({"train": a, "test": a}, {"shapes-novel": {"train": a, "test": a}})
    record = PointRecord.from_json(STORED)
    record.data = old.weights("shapes-novel", upstream=True)
    assert record.data == {"pretrain": {"train": a}, "upstream": {"test": a}, "select/shapes-novel": {"train": a}}
    record.evals["fewshot/shapes-novel"].data = old.of("fewshot/shapes-novel")
    assert PointRecord.from_json(record.to_json()) == record
    kinds = {k: ev.id for k, ev in record.evals.items()}
    assert record.changed(old) == () and record.stale(kinds, old) == ()
    assert record.changed(Stamps({"train": b, "test": a}, old.tasks)) == ("pretrain",)
    assert record.changed(Stamps({"train": a, "test": b}, old.tasks)) == ("upstream",)  # the weights are kept
    test_moved = Stamps(old.pretrain, {"shapes-novel": {"train": a, "test": b}})  # not what a step is chosen on
    assert record.changed(test_moved) == ("fewshot/shapes-novel",)
    moved = Stamps(old.pretrain, {"shapes-novel": {"train": b, "test": a}})
    assert record.changed(moved) == ("select/shapes-novel", "fewshot/shapes-novel")
    assert record.changed(moved, {"diagnostics": "x"}) == ("select/shapes-novel",)  # few-shot no longer asked
    assert record.stale(kinds, moved) == ("fewshot/shapes-novel",) and record.stale(kinds) == ()
    assert PointRecord.from_json(STORED).changed(moved) == ()  # stamped by nobody
    assert record.changed(Stamps()) == ()  # nothing prepared
    assert record.changed(Stamps({"train": None, "test": a}, old.tasks)) == ()  # a split not identified this time
    record.restamp(moved)
    assert record.data["select/shapes-novel"] == {"train": b} and record.changed(moved) == ()
    assert record.evals["fewshot/shapes-novel"] == EvalRecord(
        record.evals["fewshot/shapes-novel"].id, record.evals["fewshot/shapes-novel"].measurements,
        {"train": b, "test": a})
    assert record.evals["diagnostics"].data is None  # run once a point: no task to stamp
    assert Stamps({"train": a}).weights(None, upstream=False) == {"pretrain": {"train": a}}
    assert Stamps().weights("x", upstream=True) == {}
