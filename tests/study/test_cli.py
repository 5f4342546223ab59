"""Bad input fails before any work starts: one line naming the problem, exit code 2, no traceback."""

import json
import time

import pytest

from tests.conftest import ROOT, mount_tmpfs, run_cli


def _grid(tmp_path, text: str):
    path = tmp_path / "grid.yaml"
    path.write_text((ROOT / "configs" / "smoke.yaml").read_text() + text)
    return path


def _in_process(args: list[str], cache_dir, monkeypatch, capsys) -> tuple[int, str, str]:
    """`main` as the command line calls it, in this process (a Python start would cost ~8 s of imports): its exit
    status, stdout and stderr."""
    from study.run import main

    monkeypatch.setenv("VITSCALE_CACHE", str(cache_dir))
    monkeypatch.chdir(ROOT)
    code = main(args)
    return code, *capsys.readouterr()


@pytest.mark.parametrize("overrides, message", [
    (["pretrain.epocs=3"], "unknown key 'pretrain.epocs'; valid keys here: epochs, steps, examples"),
    (["pretrain.batch_size=big"], "pretrain.batch_size: expected int, got 'big'"),
    (["models=[ViT-B/17]"], "unknown model 'ViT-B/17'; valid models: ViT-Ti/16"),
    (["data.subsets=[256, 4096]"], "data.subsets: 4096 examples asked, but data.pretrain holds only 2048"),
    (["pretrain.steps=null"], "pretrain: give exactly one duration: epochs, steps or examples"),
    (["pretrain.examples=512"], "pretrain: give exactly one duration: epochs, steps or examples (steps and examples "
                                "are set: examples: null keeps steps; steps: null keeps examples)"),
    (["evaluate.finetune.image_size=50"], "evaluate.finetune.image_size=50 is not a multiple of ViT-Pico/4's "
                                          "patch size 4"),
    (["data.pretrain.source=webdataset", "data.pretrain.urls=/nonexistent/{000000..000003}.tar"],
     "data.pretrain.urls: /nonexistent/000000.tar not found (4 of 4 shards missing); give existing paths"),
    (["study=../elsewhere"], "study: '../elsewhere' is not a name; use letters, digits, '-', '_' and '.', not "
                             "starting with '.'"),
    (["pretrain.lr=.nan"], "pretrain.lr: expected a finite number, got nan"),
    (["pretrain.checkpoint_every=-1"], "pretrain.checkpoint_every must be >= 0, got -1"),
])  # the other refusals of values that parse but make no sense: tests/study/test_config.py, in process
def test_bad_input_is_one_line_and_exit_2(overrides, message, cache_dir, tmp_path, monkeypatch, capsys):
    """`main` as the command line calls it, in this process (a Python start per case would cost ~8 s of imports);
    the real process, its exit status and its stderr: the test below."""
    from study.run import main

    monkeypatch.setenv("VITSCALE_CACHE", str(cache_dir))
    monkeypatch.chdir(ROOT)
    code = main(["--grid", "configs/smoke.yaml", "--out", str(tmp_path), *overrides])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert stderr.startswith(f"error: configs/smoke.yaml: {message}") and len(stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


@pytest.mark.parametrize("flags, message", [
    (["--json"], "--json works only with --dry-run; add it (nothing was run)"),
    (["--budget", "5"], "--budget works only with --suggest; add it (nothing was run)"),
    (["--apply", "x.yaml"], "--apply works only with --suggest; add it (nothing was run)"),
    (["--mfu", "0.3"], "--mfu works only with --dry-run or --suggest; add it (nothing was run)"),
    (["--dry-run", "--suggest"], "--dry-run and --suggest (`vit-scaling suggest`) are two different reports: give "
                                 "one of them"),
    (["--same-data", "--fresh"], "--same-data keeps earlier results and --fresh ignores them: give one of them"),
    # --apply's file, checked before any ranking (it was a traceback after it, or the --grid file overwritten)
    (["--suggest", "--apply", "configs/smoke.yaml"], "--apply configs/smoke.yaml is the --grid file: the extended "
                                                      "grid goes into a new file, beside it"),
    (["--suggest", "--apply", "configs"], "--apply configs is a folder: give the new grid file's path"),
    (["--suggest", "--apply", "README.md"], "--apply README.md exists: give a new file name"),
    (["--suggest", "--apply", "no/such/next.yaml"], "--apply no/such/next.yaml: the folder no/such does not exist"),
    (["--tracking-uri", "foo://bar"], "--tracking-uri foo://bar: MLflow takes no 'foo://' store; give one of "),
    (["--tracking-uri", "127.0.0.1:5000"], "--tracking-uri 127.0.0.1:5000: a folder (file) store, which MLflow 3 "
                                           "opens only with MLFLOW_ALLOW_FILE_STORE=true; give sqlite:///"),
    (["--tracking-uri", "file:///tmp/mlruns"], "--tracking-uri file:///tmp/mlruns: a folder (file) store"),
    (["data.cache_dir=/proc/no-such-folder"], "data.cache_dir: cannot make the folder /proc/no-such-folder (No such "
                                              "file or directory); give a folder this user can write"),
])
def test_flags_and_folders_that_cannot_work_are_one_line_before_any_work(flags, message, cache_dir, tmp_path,
                                                                         monkeypatch, capsys):
    """A flag of --dry-run or --suggest given alone would have run the whole study; a folder that cannot be made
    would have failed in a stage, with a traceback."""
    code, _, stderr = _in_process(["--grid", "configs/smoke.yaml", "--out", str(tmp_path / "out"), *flags],
                                  cache_dir, monkeypatch, capsys)
    assert code == 2 and stderr.startswith(f"error: {message}") and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dry_run", [["--dry-run"], []], ids=["dry-run", "run"])
@pytest.mark.parametrize("option", ["--out", "--storage"])
def test_an_out_or_storage_under_a_file_is_one_line(option, dry_run, cache_dir, tmp_path, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    where = {"--out": str(tmp_path / "out"), "--storage": str(tmp_path / "storage"), option: str(afile)}
    code, _, stderr = _in_process(["--grid", "configs/smoke.yaml", *dry_run, *(x for kv in where.items() for x in kv)],
                                  cache_dir, monkeypatch, capsys)
    problem = f"{afile / 'smoke'} is below {afile}, a file" if option == "--out" else f"{afile} is a file"
    assert code == 2 and stderr == f"error: {option}: {problem}; give a folder this user can write\n", stderr


@pytest.mark.parametrize("storage", ["s3:/bucket/runs?endpoint_override=127.0.0.1:9&scheme=http", "s3//bucket/runs"])
def test_a_storage_uri_with_a_mangled_scheme_is_one_line_not_a_local_folder(storage, cache_dir, tmp_path, monkeypatch,
                                                                          capsys):
    """`s3:/...` and `s3//...` have no '://', so they were taken for local folders (named after the URI, under the
    working directory), and a study on a cluster kept its results on the nodes that made them, exit 0."""
    code, _, stderr = _in_process(["--grid", "configs/smoke.yaml", "--dry-run", "--out", str(tmp_path / "out"),
                                   "--storage", storage], cache_dir, monkeypatch, capsys)
    assert code == 2 and stderr.count("\n") == 1 and "a URI with a mangled '://'" in stderr, stderr
    assert "write s3://..., or give a local path" in stderr and not (ROOT / storage.split("/")[0]).exists()


def test_bad_input_from_the_command_line_is_one_line_exit_2_and_no_traceback(cache_dir, tmp_path):
    proc = run_cli(["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(tmp_path),
                    "data.pretrain.source=webdataset", "data.pretrain.urls=/nonexistent/{000000..000003}.tar"],
                   cache_dir)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("error: configs/smoke.yaml: data.pretrain.urls: /nonexistent/000000.tar not found (4 of 4 "
                           "shards missing); give existing paths\n")
    assert not list(tmp_path.iterdir())


def test_a_grid_file_that_is_not_text_is_one_line_and_exit_2(tmp_path, capsys):
    from study.run import main

    grid = tmp_path / "grid.yaml"
    grid.write_bytes(bytes(range(256)) * 4)  # what `--grid model.safetensors` would give
    assert main(["--grid", str(grid), "--out", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    assert stderr == f"error: {grid} is not a text file (byte 128 is not UTF-8): give a YAML grid such as " \
                     "configs/scaling.yaml\n"
    assert not (tmp_path / "out").exists()


def test_missing_grid_file(cache_dir, monkeypatch, capsys):
    code, _, stderr = _in_process(["--grid", "configs/nope.yaml"], cache_dir, monkeypatch, capsys)
    assert code == 2 and stderr.strip() == "error: grid file not found: configs/nope.yaml"
    code, _, stderr = _in_process(["--grid", "tests"], cache_dir, monkeypatch, capsys)
    assert code == 2 and stderr.strip() == "error: --grid tests is a folder; give a YAML grid file, e.g. " \
                                           "configs/scaling.yaml"
    code, _, stderr = _in_process(["--grid", "configs"], cache_dir, monkeypatch, capsys)
    assert code == 2 and stderr.startswith("error: --grid configs is a folder (it holds ") and "scaling.yaml" in stderr


def test_dry_run_json_lists_every_grid_point(cache_dir, monkeypatch, capsys):
    _, stdout, _ = _in_process(["--grid", "configs/smoke.yaml", "--dry-run", "--json"], cache_dir, monkeypatch, capsys)
    rows = json.loads(stdout)
    assert [(r["model"], r["subset_size"]) for r in rows] == [
        ("ViT-Pico/4", 256), ("ViT-Pico/4", 1024), ("BiT-R14-Pico", 256), ("BiT-R14-Pico", 1024)]
    assert all(r["examples_seen"] == 12 * 64 for r in rows)
    # ViT-Pico/4 on 32 px, 16 classes, counted by hand: 8 x 8 patches + the class token = 65 tokens of width 64.
    # Multiply-adds: patch embedding 64 * 48 * 64; per block (4 of them) qkv 65 * 64 * 192, q @ k and attn @ v
    # 2 * 65 * 65 * 64, projection 65 * 64 * 64, MLP 2 * 65 * 64 * 128; head 64 * 16. FLOPs = 2 x multiply-adds.
    macs = 64 * 48 * 64 + 4 * (65 * 64 * 192 + 2 * 65 * 65 * 64 + 65 * 64 * 64 + 2 * 65 * 64 * 128) + 64 * 16
    assert macs == 10_880_512
    assert rows[0]["pretrain_flops"] == 3 * 2 * macs * 768  # backward ~ 2 x forward, 768 examples seen


def test_dry_run_lists_the_shell_commands_of_pipe_urls_and_what_each_point_will_do(tmp_path, cache_dir, monkeypatch,
                                                                                   capsys):
    args = ["--grid", "configs/smoke.yaml", "--dry-run", "--out", str(tmp_path), "data.pretrain.source=webdataset",
            "data.pretrain.urls=pipe:cat /data/s-{0..1}.tar", "recipes.ViT.dropout=0.1", "recipes.ViT-Pico/4.lr=3e-4"]
    code, stdout, stderr = _in_process(args, cache_dir, monkeypatch, capsys)
    assert code == 0, stderr
    assert "  cat /data/s-0.tar\n  cat /data/s-1.tar" in stdout and "2 shell commands" in stdout
    many = [*args[:6],
            "data.pretrain.urls=pipe:cat /data/s-{0000..2999}.tar;pipe:curl -s http://h/x.tar",
            "data.pretrain.test_urls=pipe:cat /data/t-{0..29}.tar"]
    code, listing, stderr = _in_process(many, cache_dir, monkeypatch, capsys)  # a line per spec, not per shard
    assert code == 0, stderr
    listed = listing.split("(review them as you would a script):\n")[1].split("\n\n")[0].splitlines()
    assert "run 3,031 shell commands, from these 3 specs" in listing and listed == [
        "  cat /data/s-{0000..2999}.tar  (3,000 commands)", "  curl -s http://h/x.tar        (1 command)",
        "  cat /data/t-{0..29}.tar       (30 commands)"]
    assert stdout.count("  train\n") == 4  # nothing done yet: every point trains
    # each model's recipe, merged
    assert ("  ViT-Pico/4       steps 12, batch 64, adamw lr 0.0003, wd 0.1, warm-up 4, cosine decay, softmax, "
            "dropout 0.1 (with recipes.ViT and recipes.ViT-Pico/4)\n") in stdout
    assert "  BiT-R14-Pico     steps 12, batch 64, adamw lr 0.001," in stdout
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_paper_scale_dry_run_is_fast_and_touches_no_data(cache_dir, monkeypatch, capsys):
    start = time.monotonic()
    code, stdout, stderr = _in_process(["--grid", "configs/paper/vit-vs-bit-jft.yaml", "--dry-run", "--json", "--mfu",
                                        "0.5"], cache_dir, monkeypatch, capsys)
    elapsed = time.monotonic() - start
    # Priced, then checked: its placeholder paths (/data/jft300m/...) are not on this machine.
    assert code == 2 and stderr.startswith(
        "error: configs/paper/vit-vs-bit-jft.yaml: data.pretrain.urls: /data/jft300m/000000.tar not found (30304 of "
        "30304 shards missing)")
    rows = json.loads(stdout)
    assert len(rows) == 11 * 4 and elapsed < 60
    assert {"model", "subset_size", "examples_seen", "pretrain_flops", "finetune_h100_hours", "bound_h100_hours",
            "images_per_s_needed", "images_per_s_fed"} <= set(rows[0])  # their arithmetic: tests/study/test_cost.py
    b16 = next(r for r in rows if r["model"] == "ViT-B/16" and r["subset_size"] == 302_974_400)  # less the val slice
    # Paper Table 6: ViT-B/16, 7 epochs of JFT-300M = 224 exaFLOPs.
    assert b16["pretrain_flops"] == pytest.approx(224e18, rel=0.01)
    # priced at the given MFU of an H100 SXM's dense bf16 peak (989 TFLOP/s), on 8 GPUs per point
    assert b16["h100_hours"] == pytest.approx(b16["pretrain_flops"] / (989e12 * 0.5) / 3600) and b16["gpus"] == 8


def test_errors_a_retry_cannot_fix_are_named_with_what_to_do(tmp_path):
    """No space, no permission, a read-only file system (as `open` raises them, and as pyarrow's file systems do,
    without errno): one line naming the path and what to do; anything else is left to Tune's retries."""
    import errno
    import os

    from study.trial import unfixable_by_retry

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "storage" / "x.tmp"))
    assert unfixable_by_retry(full).startswith(f"No space left on device ({tmp_path / 'storage' / 'x.tmp'}): free "
                                               "space there, then rerun the same command (not retried")
    arrow = OSError("Failed to open local file '/data/s/points/a/state.pt'. Detail: [errno 30] Read-only file system")
    assert "give a writable --storage" in unfixable_by_retry(arrow) and "/data/s/points" in unfixable_by_retry(arrow)
    assert "fix the permissions" in unfixable_by_retry(PermissionError(errno.EACCES, "Permission denied", "/x"))
    assert unfixable_by_retry(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")) is None


def test_a_storage_that_cannot_be_written_stops_the_driver_in_one_line(tmp_path, cache_dir, monkeypatch, capsys):
    """`--storage` on a read-only file system (a tmpfs mounted read-only: root cannot write it either)."""
    import subprocess

    ro = mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    try:
        code, _, stderr = _in_process(["--grid", "configs/smoke.yaml", "--out", str(tmp_path / "out"), "--storage",
                                       str(ro / "storage")], cache_dir, monkeypatch, capsys)
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]  # found before any work: bad input
    (line,) = stderr.strip().splitlines()
    assert line == (f"error: --storage: {ro / 'storage'} cannot be made: {ro} cannot be written (a read-only file "
                    "system); give a folder this user can write"), line
    assert not (tmp_path / "out" / "smoke").exists()  # nothing made before the refusal


def test_without_git_the_commit_is_the_one_the_submitter_passed(monkeypatch, tmp_path):
    """A Ray job's uploaded working dir has no .git (nor, here, a git on PATH): the commit comes from the job's env."""
    from study.run import git_commit

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("VIT_SCALING_GIT_COMMIT", "0123abc")
    assert git_commit() == "0123abc"
    monkeypatch.delenv("VIT_SCALING_GIT_COMMIT")
    assert git_commit() == "unknown"


def test_dry_run_notes_a_warm_up_that_is_not_shorter_than_the_run(cache_dir, monkeypatch, capsys):
    code, stdout, _ = _in_process(["--grid", "configs/smoke.yaml", "--dry-run", "pretrain.warmup_steps=12"],
                                  cache_dir, monkeypatch, capsys)
    notes = [line.strip() for line in stdout.splitlines() if line.strip().startswith("note: the warm-up")]
    assert code == 0 and notes == ["note: the warm-up (12 steps) is not shorter than the run (12 steps at 256 "
                                   "images): the learning rate never reaches 0.001"] * 2
    _, stdout, _ = _in_process(["--grid", "configs/smoke.yaml", "--dry-run"], cache_dir, monkeypatch, capsys)
    assert "note: the warm-up" not in stdout


def test_dry_run_notes_a_kept_step_chosen_on_a_minival_of_a_few_images(cache_dir, monkeypatch, capsys):
    """`select: best` on the smoke task (160 training images) chooses on 16 of them: one image is 6.2 points, so
    the dry run says so (it said nothing); a task 25x larger is not noted."""
    best = ["--grid", "configs/smoke.yaml", "--dry-run", "pretrain.eval_every=6", "pretrain.select=best"]
    code, stdout, _ = _in_process(best, cache_dir, monkeypatch, capsys)
    notes = [line.strip() for line in stdout.splitlines() if "kept step is chosen" in line]
    assert code == 0 and notes == ["note: its kept step is chosen on a minival of ~16 images of downstream[0] "
                                   "(shapes-novel): one image is 6.2 points of few-shot top-1, so steps closer than "
                                   "a few of those are picked by chance (a larger task, or pretrain.select: final)"] * 2
    _, stdout, _ = _in_process([*best, "downstream[0].size=4000"], cache_dir, monkeypatch, capsys)
    assert "kept step is chosen" not in stdout


def test_a_dry_run_makes_no_tracking_store(cache_dir, monkeypatch, capsys, tmp_path):
    store = tmp_path / "nope" / "x" / "mlflow.db"
    code, _, _ = _in_process(["--grid", "configs/smoke.yaml", "--dry-run", "--out", str(tmp_path / "out"),
                              "--tracking-uri", f"sqlite:///{store}"], cache_dir, monkeypatch, capsys)
    assert code == 0 and not (tmp_path / "nope").exists() and not (tmp_path / "out").exists()
