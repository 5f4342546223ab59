"""Records stored before one spelling per evaluation read back under today's names (finished studies are reported,
not re-run)."""

import json

from study.protocol import PointRecord


def test_a_record_measurement_takes_the_name_of_the_evaluation_it_is_recorded_under():
    fields = {"model": "BiT-R14-Pico", "family": "BiT", "subset_size": 256, "examples_seen": 768,
              "pretrain_flops": 1.0, "seed": 0}
    old = {"point_id": "p", "fields": fields, "evals": {"diagnostics": {"id": "80422ce3c0f28d18", "measurements": [
        {"eval": "diagnostic", "dataset": "pretrain", "shots": None, "metric": "rf_stage1", "value": 3.0,
         "spread": None}]}}}
    record = PointRecord.from_json(json.dumps(old))
    (m,) = record.measurements()
    assert (m.eval, m.key) == ("diagnostics", "diagnostics/pretrain/rf_stage1")
    assert PointRecord.from_json(record.to_json()) == record
