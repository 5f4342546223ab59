"""What the study shows in MLflow, from plain data: the parent's comparison metrics, rounding, the runs-table view."""

import json
import os

import pytest

from analysis import results
from pipelines.downstream import Measurement
from study.tracking import comparison_metrics, model_colours, rounded, runs_url, study_view


def _table():
    rows = []
    for model, family, base in (("ViT-B/16", "ViT", 40.0), ("BiT-R50x1", "BiT", 50.0)):
        for size in (1000, 10_000):
            for seed in (0, 1):
                fields = {"model": model, "family": family, "subset_size": size, "examples_seen": 5 * size,
                          "pretrain_flops": 1e12, "seed": seed}
                top1 = base + size / 1000 + seed / 3
                rows += results.rows(fields, [Measurement("fewshot", "pets", 5, "top1", top1, 0.5),
                                              Measurement("finetune", "pets", None, "top1", top1 + 10),
                                              Measurement("finetune", "pets", None, "lr", 0.01)])
    return results.build_table(rows)


def test_the_parent_gets_each_models_accuracy_mean_over_seeds_stepped_by_subset_size():
    metrics = {(m.key, m.step): m.value for m in comparison_metrics(_table())}
    assert set(metrics) == {(f"{ev}/pets/{name}/{model}", size)
                            for ev, name in (("fewshot", "5shot_top1"), ("finetune", "top1"))
                            for model in ("ViT-B-16", "BiT-R50x1") for size in (1000, 10_000)}  # no lr: not accuracy
    assert metrics[("fewshot/pets/5shot_top1/ViT-B-16", 1000)] == 41.17  # (41 + 41.333) / 2, 4 digits
    assert metrics[("finetune/pets/top1/BiT-R50x1", 10_000)] == 70.17


@pytest.mark.parametrize(("value", "shown"), [(14.583333333333334, 14.58), (5.46875, 5.469), (100.0, 100.0),
                                              (1_281_167.0, 1_281_167.0), (0.000123456, 0.0001235), (2.0, 2.0)])
def test_metrics_are_rounded_to_four_digits_but_counts_stay_exact(value, shown):
    assert rounded(value) == shown


def test_the_url_opens_the_runs_table_in_the_studys_view():
    assert runs_url("http://host:5000/", "7") == \
        "http://host:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=study"
    assert runs_url("sqlite:////x/mlflow.db", "1").startswith("http://127.0.0.1:5000/#/experiments/1/runs?")
    view = json.loads(study_view(["fewshot_5shot_top1"]))
    assert view["selectedColumns"][0] == "metrics.`fewshot_5shot_top1`" and view["runsHiddenMode"] == "SHOW_ALL"
    assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "model"}]
    colours = model_colours(["ViT-B/16", "BiT-R50x1"])
    assert len(set(colours.values())) == 2


def test_a_cut_off_reevaluation_is_no_longer_complete_and_its_orphan_ends_killed_not_finished(tmp_path):
    """A real SQLite store. A complete child taken over for a re-evaluation loses `complete` when it starts, so if
    its driver dies then and the point leaves the grid, the next driver's orphan sweep ends it KILLED; a complete
    child merely left RUNNING (its driver died before the status write) ends FINISHED."""
    from study.config import expand, load_study
    from study.tracking import COMPLETE_TAG, Tracker
    from tests.conftest import ROOT

    uri, art = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts"
    points = expand(load_study(ROOT / "configs" / "smoke.yaml"))
    first = Tracker(uri, "smoke", art)
    first.start_parent("parent", {}, [], "one")
    for point in points[:2]:
        first.start_point(point, {}, {}, {})
    assert first.close(timeout=60) == 0
    for point in points[:2]:
        first.client.set_tag(first.runs[point.id], COMPLETE_TAG, "1")  # both logged in full, both still RUNNING
    second = Tracker(uri, "smoke", art)
    assert all(second.known[p.id].complete for p in points[:2])
    second.start_point(points[0], {}, {}, {})  # a re-evaluation of the first starts, then its driver dies
    assert second.close(timeout=60) == 0
    third = Tracker(uri, "smoke", art)
    third.close_orphans(running_now=set())  # neither point runs now
    assert third.close(timeout=60) == 0
    status = {p.id: third.client.get_run(first.runs[p.id]).info.status for p in points[:2]}
    assert status == {points[0].id: "KILLED", points[1].id: "FINISHED"}


def test_a_resumed_study_that_finishes_loses_the_failed_points_tag_of_the_invocation_before(tmp_path):
    """A real SQLite store: the first invocation ends FAILED with `failed_points`; the rerun that finishes every
    point ends FINISHED without it (the tag said what is no longer true)."""
    from study.tracking import Tracker

    uri, art = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts"
    first = Tracker(uri, "smoke", art)
    first.start_parent("parent", {}, [], "one")
    first.finish_parent("FAILED", [], None, {"failed_points": "1 of 4"})
    assert first.close(timeout=60) == 0
    assert first.client.get_run(first.parent_id).data.tags["failed_points"] == "1 of 4"
    second = Tracker(uri, "smoke", art)
    assert second.parent_id == first.parent_id  # the rerun reuses the study's parent
    second.start_parent("parent", {}, [], "two")
    second.finish_parent("FINISHED", [], None, {"failed_points": None})
    second.finish_parent("FINISHED", [], None, {"failed_points": None})  # absent already: nothing to remove
    assert second.close(timeout=60) == 0
    parent = second.client.get_run(second.parent_id)
    assert parent.info.status == "FINISHED" and "failed_points" not in parent.data.tags


def test_stored_curves_fill_in_what_the_run_lacks_and_nothing_twice(tmp_path):
    """A real SQLite store. A point logged from storage (its live writes lost to an outage or a killed driver) gets
    the curves its trial stored: the (key, step) entries its run lacks, below the steps it has too (the first part
    of a resumed point, lost), not those it has (logged live)."""
    from study.config import expand, load_study
    from study.tracking import Tracker
    from tests.conftest import ROOT

    uri, art = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts"
    point = expand(load_study(ROOT / "configs" / "smoke.yaml"))[0]
    first = Tracker(uri, "smoke", art)
    first.start_parent("parent", {}, [], "one")
    first.start_point(point, {}, {}, {})
    first.log_curve(point, "pretrain", 10, {"loss": 2.25})  # logged live by a resumed trial (step 5: an outage's)
    assert first.close(timeout=60) == 0
    stored = {"pretrain": {"5": {"loss": 2.5}, "10": {"loss": 2.25, "lr": 0.001}, "x": {"loss": 1.0}},
              "finetune/shapes-novel": {"1": {"val_top1": 0.125, "bad": float("nan")}}, "junk": []}
    second = Tracker(uri, "smoke", art)
    second.log_history(point, stored, {})
    second.log_history(point, stored, {})  # (twice: nothing more)
    assert second.close(timeout=60) == 0
    run_id = first.runs[point.id]

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in second.client.get_metric_history(run_id, key)]

    assert sorted(history("pretrain/loss")) == [(5, 2.5), (10, 2.25)]
    assert history("pretrain/lr") == [(10, 0.001)] and history("finetune/shapes-novel/val_top1") == [(1, 0.125)]
    assert "finetune/shapes-novel/bad" not in second.client.get_run(run_id).data.metrics


def test_waiting_on_an_unreachable_server_at_the_end_says_so(capsys):
    """The writes queued for a server that went down are waited for at the end (up to `close`'s timeout): a silent
    wait of minutes looked like a hang, so it is said, with the count. A server that has not answered once in this
    invocation (a mistyped port, a server not started) is not waited for minutes: its writes are left to the next
    invocation at once, and the first line says why in a few words."""
    import time

    from study.tracking import _Writer

    def refused() -> None:
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    for answered_once in (True, False):
        writer = _Writer("http://127.0.0.1:1")
        if answered_once:
            writer.submit("the parent", lambda: None)
        writer.submit("a metric", refused)
        writer.submit("another", refused)
        while writer.down_since is None:  # the first refused write has failed (long before the end, in a study)
            time.sleep(0.01)
        start = time.monotonic()
        left = writer.drain(timeout=30.0 if not answered_once else 1.0, unanswered=0.5)
        assert left == 2 and time.monotonic() - start < 5
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith("mlflow: http://127.0.0.1:1 is unreachable (connection refused: nothing listens "
                                 "there); training goes on")
        assert err[1] == ("mlflow: http://127.0.0.1:1 is still unreachable; waiting up to 1 s for its 2 queued writes "
                          "(what is left then, the next invocation logs from the study's storage)" if answered_once else
                          "mlflow: http://127.0.0.1:1 has not answered once in this invocation; its 2 queued writes "
                          "are left to the next invocation, which logs them from the study's storage")


def test_a_plan_made_without_the_tracking_store_says_what_it_may_retrain(tmp_path, capsys):
    """The server down when the study starts: the plan comes from the storage alone, so a point the store holds
    (weights logged from another machine) and this storage lacks would train again; the study goes on, saying so."""
    import socket
    from types import SimpleNamespace

    from study.run import note_unseen
    from study.tracking import Tracker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there
    decisions = [SimpleNamespace(action=a) for a in ("train", "train", "reuse", "log")]
    up = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "smoke", tmp_path / "artifacts")
    note_unseen(up, decisions)
    assert up.close(timeout=10) == 0 and not up.unseen and "note:" not in capsys.readouterr().err
    tracker = Tracker(down, "smoke", tmp_path / "artifacts")
    assert tracker.unseen and tracker.known == {}
    note_unseen(tracker, decisions)
    tracker.close(timeout=1)
    assert (f"note: the 2 points to train were planned from the storage alone ({down} did not answer): any of them "
            "the tracking store holds") in capsys.readouterr().err


def test_a_study_running_under_other_storage_is_refused(tmp_path):
    """Two drivers of one MLflow study with different storage hold different leases: the second is refused while the
    parent is RUNNING under the first's storage; the same storage, or a parent that ended, passes."""
    from types import SimpleNamespace

    from pipelines.config import UserError
    from study.run import STORAGE_TAG, check_one_storage
    from study.tracking import Tracker

    uri, art = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts"
    cfg = SimpleNamespace(study="smoke")
    first = Tracker(uri, "smoke", art)
    first.start_parent("parent", {STORAGE_TAG: "s3://bkt/a"}, [], "one")
    assert first.close(timeout=60) == 0  # left RUNNING, as by a driver that runs (or was killed)
    running = Tracker(uri, "smoke", art, read_only=True)
    check_one_storage(cfg, running, SimpleNamespace(storage_root="s3://bkt/a"))
    with pytest.raises(UserError, match=r"^study 'smoke' at sqlite:///.* is RUNNING with storage s3://bkt/a, not "
                                        r"s3://bkt/b: another driver may be running it.*Give --storage s3://bkt/a"):
        check_one_storage(cfg, running, SimpleNamespace(storage_root="s3://bkt/b"))
    ended = Tracker(uri, "smoke", art)
    ended.finish_parent("KILLED", [], None)
    assert ended.close(timeout=60) == 0
    check_one_storage(cfg, Tracker(uri, "smoke", art, read_only=True), SimpleNamespace(storage_root="s3://bkt/b"))
    # A parent an earlier release tagged with a relative --storage, as given: the same folder, made absolute, passes
    relative = Tracker(uri, "smoke", art, fresh=True)
    relative.start_parent("parent", {STORAGE_TAG: "relstore"}, [], "two")
    assert relative.close(timeout=60) == 0
    running = Tracker(uri, "smoke", art, read_only=True)
    check_one_storage(cfg, running, SimpleNamespace(storage_root=os.path.abspath("relstore")))
    with pytest.raises(UserError, match=rf"RUNNING with storage {os.path.abspath('relstore')}, not /elsewhere"):
        check_one_storage(cfg, running, SimpleNamespace(storage_root="/elsewhere"))


def test_a_point_finished_after_a_stop_logs_the_evaluations_its_stopped_run_never_logged(tmp_path):
    """A real SQLite store. A point stopped after its few-shot evaluation (its record holds it; its run was never
    finished, so holds no metric of it) is finished by the next invocation, which runs only the fine-tune: the run
    gets the few-shot metrics too, and once, not those an earlier finish logged (its eval tags say which)."""
    from argparse import Namespace
    from dataclasses import replace

    from study.config import expand, load_study
    from study.identity import eval_ids
    from study.protocol import EvalRecord, PointFields, PointRecord, PretrainSummary, eval_kind
    from study.run import Finisher, Locations
    from study.tracking import Tracker
    from tests.conftest import ROOT

    cfg = load_study(ROOT / "configs" / "smoke.yaml", ["evaluate.linear_probe=null", "evaluate.diagnostics=null"])
    point, evals = expand(cfg)[0], eval_ids(cfg)
    where = Locations(cfg, Namespace(out=str(tmp_path / "runs"), storage=None, tracking_uri=None))
    values = {"fewshot": Measurement("fewshot", "shapes-novel", 5, "top1", 31.25),
              "finetune": Measurement("finetune", "shapes-novel", None, "top1", 40.5)}
    record = PointRecord(point.id, PointFields(**point.table_fields), PretrainSummary(point.steps, point.examples_seen,
                         1.0, 0), {k: EvalRecord(i, [values[eval_kind(k)]]) for k, i in evals.items()})
    first = Tracker(where.tracking_uri, "smoke", tmp_path / "artifacts")
    first.start_parent("parent", {}, [], "one")
    first.start_point(point, {}, {}, {})  # then stopped: no final metric, no eval tag
    assert first.close(timeout=60) == 0
    finetune = next(k for k in evals if eval_kind(k) == "finetune")
    for _ in range(2):  # the second: a re-evaluation of the fine-tune alone, after the first finished the point
        second = Tracker(where.tracking_uri, "smoke", tmp_path / "artifacts")
        Finisher(cfg, where, second, {})(point, record, (finetune,), curves=True)
        assert second.close(timeout=60) == 0
    run_id = first.runs[point.id]
    metrics = second.client.get_run(run_id).data.metrics
    assert metrics["fewshot/shapes-novel/5shot_top1"] == 31.25 and metrics["finetune/shapes-novel/top1"] == 40.5
    assert len(second.client.get_metric_history(run_id, "fewshot/shapes-novel/5shot_top1")) == 1
    # The fine-tune's same value, logged again by the second invocation and a retried write, is one entry; a
    # re-evaluation that changed it adds one at the same step
    history = [(m.step, m.value) for m in second.client.get_metric_history(run_id, "finetune/shapes-novel/top1")]
    assert history == [(point.steps, 40.5)]
    third = Tracker(where.tracking_uri, "smoke", tmp_path / "artifacts")
    finish = Finisher(cfg, where, third, {})
    finish(point, record, (finetune,), curves=True)
    finish(point, record, (finetune,), curves=True)  # as the writer's retry of a job that failed after logging
    values["finetune"] = Measurement("finetune", "shapes-novel", None, "top1", 41.0)
    changed = replace(record, evals={k: EvalRecord(i, [values[eval_kind(k)]]) for k, i in evals.items()})
    finish(point, changed, (finetune,), curves=True)
    assert third.close(timeout=60) == 0
    history = [(m.step, m.value) for m in third.client.get_metric_history(run_id, "finetune/shapes-novel/top1")]
    assert sorted(history) == [(point.steps, 40.5), (point.steps, 41.0)]
    assert third.client.get_run(run_id).data.metrics["finetune/shapes-novel/top1"] == 41.0


def test_a_run_a_killed_driver_left_running_ends_when_the_next_invocation_stops_before_its_trial_starts(tmp_path):
    """A real SQLite store. The next invocation plans the point (so its orphan sweep leaves it alone) and is then
    stopped at once, before the trial starts: the child ended RUNNING. It ends KILLED now."""
    from study.config import expand, load_study
    from study.tracking import Tracker
    from tests.conftest import ROOT

    uri, art = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts"
    point = expand(load_study(ROOT / "configs" / "smoke.yaml"))[0]
    killed = Tracker(uri, "smoke", art)
    killed.start_parent("parent", {}, [], "one")
    killed.start_point(point, {}, {}, {})
    assert killed.close(timeout=60) == 0  # (its driver then killed: nothing ended)
    rerun = Tracker(uri, "smoke", art)
    rerun.close_orphans({point.id})  # the point runs again now: not an orphan
    rerun.end_started("KILLED")  # a signal before its trial started
    assert rerun.close(timeout=60) == 0
    assert rerun.client.get_run(killed.runs[point.id]).info.status == "KILLED"


def test_an_artifact_store_that_does_not_answer_stops_the_plan_instead_of_retraining(tmp_path, monkeypatch):
    """A real SQLite store. A run without the artifact: None (an older version's run: the point trains again, and the
    console says so). A store that fails to answer (injected here: the artifact server down) is one line, not a
    silent "none" that retrained a finished point and marked its run KILLED."""
    from pipelines.config import UserError
    from study.config import expand, load_study
    from study.tracking import Tracker
    from tests.conftest import ROOT

    uri, art = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts"
    point = expand(load_study(ROOT / "configs" / "smoke.yaml"))[0]
    first = Tracker(uri, "smoke", art)
    first.start_parent("parent", {}, [], "one")
    first.start_point(point, {}, {}, {})
    assert first.close(timeout=60) == 0
    again = Tracker(uri, "smoke", art)
    child = again.known[point.id]
    assert again.fetch_record(child) is None and not again.fetch_weights(child, None, None)

    def down(*args, **kwargs):
        raise ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded")

    monkeypatch.setattr(again.client, "list_artifacts", down)
    with pytest.raises(UserError, match=r"^MLflow's artifact store did not give record.json of run \w+: "
                                        r"HTTPConnectionPool.*; rerun when it answers"):
        again.fetch_record(child)
    assert again.close(timeout=60) == 0


def test_a_record_cut_short_is_ignored_in_one_line_not_a_traceback(tmp_path, capsys):
    from study.storage import PointFiles, Storage
    from study.trial import load_record

    storage = Storage(str(tmp_path / "storage"))
    storage.write_bytes(PointFiles("abc").record, b'{"point_id": "abc", "fie')
    assert load_record(storage, "abc") is None
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "record.json is not a readable record (" in err
    assert len(err.splitlines()) == 1


def test_a_server_that_answers_with_an_error_of_its_own_is_told_from_one_that_does_not_answer():
    """The forms MLflow's client (its own retries off) raises for an HTTP answer, each giving its status, and for no
    answer, or a gateway's or busy server's, None (a wait may mend those: they are outages)."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    from study.tracking import server_error

    url = "API request to http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1/x failed with exception "
    response = requests.Response()
    response.status_code = 507
    answered = {
        MlflowException(url + "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: /x "
                              "(Caused by ResponseError('too many 500 error responses'))"): 500,
        MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 501 != 200. "
                        "Response body: '<html>'"): 501,
        MlflowException("507 Server Error: Insufficient Storage for url: http://127.0.0.1:5000/x"): 507,
        requests.HTTPError("Insufficient Storage", response=response): 507,
        RestException({"error_code": "INTERNAL_ERROR", "message": "the artifact store failed"}): 500,
    }
    for err, status in answered.items():
        assert server_error(err) == status, err
    silent = [MlflowException(url + "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: "
                                    "/x (Caused by NewConnectionError('Connection refused'))"),
              MlflowException(url + "(Caused by ResponseError('too many 503 error responses'))"),
              MlflowException("API request failed with error code 429 != 200. Response body: 'slow down'"),
              RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such run"}),
              TimeoutError("timed out")]
    for err in silent:
        assert server_error(err) is None, err
