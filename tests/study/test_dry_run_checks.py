"""The dry run checks what it can without a GPU or reading an image: every local path, class folders against
`num_classes`, image counts and `_info.json` against `size` and every subset. Each defect is one line naming the grid
file and the key, exit 2, before Ray starts (a real run stops on the same checks); remote shards are listed as not
checked."""

import json

import pytest
from PIL import Image

from pipelines.data.sources import write_info
from tests.conftest import ROOT, run_cli

CLASSES = ("cat", "dog", "owl")


def _folder(root, per_class: int = 4):
    for i, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            ext = "png" if j % 2 else "jpg"
            Image.new("RGB", (8, 8), (40 * i, 30 * j, 0)).save(root / name / f"{j}.{ext}")
    (root / "cat" / "notes.txt").write_text("not an image: not counted")
    return root


def _grid(tmp_path, pretrain: str, downstream: str, subsets: str = "[4, 8]"):
    """A complete folder grid (12 train and 6 test images of 3 classes), with the given sources."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""
study: own-folder
data:
  pretrain: {pretrain}
  subsets: {subsets}
downstream:
  - {downstream}
models: [ViT-Pico/4]
pretrain: {{steps: 2, batch_size: 4}}
evaluate: {{fewshot: {{shots: [1]}}}}
""")
    return grid


@pytest.fixture
def folders(tmp_path):
    return _folder(tmp_path / "train"), _folder(tmp_path / "test", per_class=2)


def _pretrain(train, **over):
    fields = {"source": "folder", "root": str(train), "size": 12, "image_size": 32, "num_classes": 3} | over
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "}"


def _task(train, test, **over):
    fields = {"name": "pets", "source": "folder", "root": str(train), "test_root": str(test), "size": 12,
              "image_size": 32, "num_classes": 3} | over
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "}"


def _main(args, monkeypatch, tmp_path, capsys):
    """`main` in this process, with Ray's start replaced by a failure: a check must stop the run before it."""
    from study import run, tune_runner

    def no_ray(*_):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(tune_runner, "connect", no_ray)
    code = run.main([*args, "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("defect, message", [
    ("missing", "downstream[0].test_root: {tmp}/nowhere not found; give a folder of class folders (<class>/<image>)"),
    ("a-file", "downstream[0].test_root: {tmp}/notes.txt is a file, not a folder; give a folder of class folders "
               "(<class>/<image>)"),
    ("subset", "data.pretrain.size=16, data.subsets=16: more than the 12 images in {tmp}/train; at most 12"),
    ("classes", "data.pretrain.num_classes: 5, but {tmp}/train has 3 class folders (cat, dog, owl); set "
                "data.pretrain.num_classes: 3"),
    ("info", "downstream[0].size=12: more than the 10 samples {tmp}/wds/_info.json lists for these shards; at "
             "most 10"),
    ("empty-class", "data.pretrain.root: 1 class folder without images ({tmp}/other/emu); add their images, or "
                    "remove them and lower data.pretrain.num_classes"),
    ("empty-test-class", "downstream[0].test_root: 1 class folder without images ({tmp}/test/owl): the test "
                         "accuracy would leave out their classes; add their test images"),
    ("folder-url", "data.pretrain.urls: {tmp}/wds is a folder; give tar shards: a path, or a brace range such as "
                   "{tmp}/wds/train-{{000000..000099}}.tar"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_each_defect_is_one_line_naming_the_file_and_key_exit_2_before_ray(defect, message, dry_run, folders,
                                                                          tmp_path, monkeypatch, capsys):
    train, test = folders
    pretrain, task, subsets = _pretrain(train), _task(train, test), "[4, 8]"
    if defect == "missing":
        task = _task(train, tmp_path / "nowhere")
    elif defect == "a-file":
        (tmp_path / "notes.txt").write_text("a file, not a folder")
        task = _task(train, tmp_path / "notes.txt")
    elif defect == "subset":
        pretrain, subsets = _pretrain(train, size=16), "[4, 16]"
    elif defect == "classes":
        pretrain = _pretrain(train, num_classes=5)
    elif defect == "info":  # shards with an `_info.json` that holds fewer samples than the declared size
        (tmp_path / "wds").mkdir()
        for name in ("a.tar", "b.tar"):
            (tmp_path / "wds" / name).write_bytes(b"")  # never indexed: the dry run reads a tar's ends only
        write_info(tmp_path / "wds", "train", ["a.tar", "b.tar"], [6, 4], num_classes=3)
        task = _task(train, test, source="webdataset", root=None, test_root=None,
                     urls=f"{tmp_path}/wds/{{a,b}}.tar", test_urls=f"{tmp_path}/wds/a.tar")
    elif defect == "empty-class":
        other = _folder(tmp_path / "other")  # not the downstream task's folder
        (other / "emu").mkdir()
        pretrain = _pretrain(other, num_classes=4)
    elif defect == "empty-test-class":
        for image in (test / "owl").iterdir():
            image.unlink()
    elif defect == "folder-url":
        (tmp_path / "wds").mkdir()
        pretrain = json.dumps({"source": "webdataset", "urls": str(tmp_path / "wds"), "size": 12, "image_size": 32,
                               "num_classes": 3})
    grid = _grid(tmp_path, pretrain, task, subsets)
    code, out, err = _main(["--grid", str(grid), *(["--dry-run"] if dry_run else [])], monkeypatch, tmp_path,
                           capsys)
    assert code == 2, err
    assert err == f"error: {grid}: {message.format(tmp=tmp_path)}\n"
    assert not (tmp_path / "out").exists()


def test_a_correct_folder_grid_passes_and_lists_the_remote_shards_it_could_not_check(folders, tmp_path,
                                                                                     monkeypatch, capsys):
    train, test = folders
    remote = _task(train, test, name="remote", source="webdataset", root=None, test_root=None, size=300,
                   num_classes=10, urls="s3://bucket/pets/train-{0..3}.tar", test_urls="https://h/pets/test.tar")
    grid = _grid(tmp_path, _pretrain(train), _task(train, test, test_size=6) + "\n  - " + remote)
    code, out, err = _main(["--grid", str(grid), "--dry-run"], monkeypatch, tmp_path, capsys)
    assert code == 0, err
    assert "ViT-Pico/4" in out and "not checked" in out
    assert "  downstream[1].urls: 4 remote shards (s3://bucket/pets/train-0.tar)" in out
    assert "  downstream[1].test_urls: 1 remote shard (https://h/pets/test.tar)" in out
    assert "downstream[0]" not in out  # the folders were checked


def test_a_second_defect_is_a_second_line(folders, tmp_path, monkeypatch, capsys):
    train, test = folders
    grid = _grid(tmp_path, _pretrain(train, num_classes=4), _task(train, tmp_path / "gone"))
    code, _, err = _main(["--grid", str(grid), "--dry-run"], monkeypatch, tmp_path, capsys)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 2 and all(line.startswith(f"error: {grid}: ") for line in lines)
    assert "data.pretrain.num_classes: 4" in lines[0] and "downstream[0].test_root" in lines[1]


def test_test_size_follows_from_test_root_and_is_checked_when_given(folders, tmp_path):
    from pipelines.config import ConfigError
    from study.config import check_data, load_study

    train, test = folders
    cfg = load_study(_grid(tmp_path, _pretrain(train), _task(train, test)))  # no test_size: test_root gives it
    assert cfg.downstream[0].test_size == 0 and check_data(cfg).problems == []
    cfg = load_study(_grid(tmp_path, _pretrain(train), _task(train, test, test_size=7)))
    assert check_data(cfg).problems == [f"downstream[0].test_size=7: more than the 6 images in {test}; at most 6"]
    for task, key in ((_task(train, test, test_root=None), "test_root"),
                      ('{name: novel, source: shapes, size: 64, num_classes: 4}', "test_size")):
        grid = _grid(tmp_path, _pretrain(train), task)
        with pytest.raises(ConfigError) as err:  # procedural sources still need their number of test examples
            load_study(grid)
        assert str(err.value).startswith(f"{grid}: downstream[0].{key}: a downstream task needs a test split; "
                                         f"give {key}")


def test_a_missing_key_names_the_file_the_key_path_and_what_it_takes(tmp_path):
    from pipelines.config import ConfigError
    from study.config import load_study

    grid = tmp_path / "grid.yaml"
    grid.write_text((ROOT / "configs" / "smoke.yaml").read_text().replace("pretrain: {steps", "pretrained: {steps"))
    with pytest.raises(ConfigError) as err:
        load_study(grid, ["pretrained=null"])
    assert str(err.value) == f"{grid}: unknown key 'pretrained'; valid keys here: study, data, downstream, models, " \
                             "pretrain, seeds, evaluate, resources, recipes"
    grid.write_text("".join(line for line in grid.read_text().splitlines(keepends=True)
                            if not line.startswith("pretrained:")))
    with pytest.raises(ConfigError) as err:
        load_study(grid)
    assert str(err.value) == f"{grid}: missing required key 'pretrain' (a mapping with keys epochs, steps, examples, " \
                             "batch_size, optimizer, ...)"
    with pytest.raises(ConfigError) as err:
        load_study(grid, ["pretrain.steps=1", "data={pretrain: {source: shapes}}"])
    assert str(err.value) == f"{grid}: missing required key 'data.subsets' (a list of int)"


def test_help_lines_are_whole_sentences(cache_dir):
    """argparse wraps; the text it wraps must not stop mid-sentence (the description was the docstring's first
    line, cut after 'log to MLflow,')."""
    proc = run_cli(["-m", "study.run", "--help"], cache_dir)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "log to MLflow, write the results and the report. Running the same command again resumes" in text
    assert proc.stdout.split("\n\n")[1].endswith(".")  # the description paragraph


def test_shards_are_checked_against_their_info_json_or_listed_as_not_checked(tmp_path):
    from pipelines.data import SourceConfig
    from pipelines.data.preflight import inspect

    for name in ("a.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"")
    src = SourceConfig(source="webdataset", urls=f"{tmp_path}/{{a,b}}.tar", size=10, num_classes=4)
    found = inspect(src, "data.pretrain", [("data.subsets", 8), ("data.subsets", 12)])
    assert found.problems == [] and found.unchecked == [
        f"data.pretrain.urls: no _info.json beside {tmp_path}/a.tar: the sample count is checked when the shards are "
        "indexed"]
    write_info(tmp_path, "train", ["a.tar", "b.tar"], [5, 5], num_classes=3)
    found = inspect(src, "data.pretrain", [("data.subsets", 8), ("data.subsets", 12)])
    assert found.unchecked == [] and found.problems == [
        f"data.subsets=12: more than the 10 samples {tmp_path}/_info.json lists for these shards; at most 10",
        f"data.pretrain.num_classes: 4, but {tmp_path}/_info.json says num_classes 3; set data.pretrain.num_classes: 3"]


def test_a_cut_shard_found_when_indexed_is_one_line_naming_the_source_key_and_the_shard(folders, tmp_path):
    """The dry run notes a tar cut short; what only reading tells (the samples it lost, here without _info.json to
    count against) stops the real run where it indexes (after Ray starts: on a cluster the index is built there),
    before any trial, naming the grid's key and the shard."""
    import numpy as np

    from pipelines.data.writer import write_shard

    rng = np.random.default_rng(0)
    shards = [tmp_path / "wds" / f"train-{s}.tar" for s in range(2)]
    shards[0].parent.mkdir()
    for s, path in enumerate(shards):
        write_shard(path, ((f"{s}-{i:03d}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), i % 3)
                           for i in range(8)))
    raw = shards[1].read_bytes()
    shards[1].write_bytes(raw[:len(raw) // 2])
    pretrain = {"source": "webdataset", "urls": str(tmp_path / "wds" / "train-{0..1}.tar"), "size": 8,
                "image_size": 32, "num_classes": 3}
    grid = _grid(tmp_path, json.dumps(pretrain), _task(*folders), subsets="[4, 8]")
    dry = run_cli(["-m", "study.run", "--grid", str(grid), "--dry-run"], tmp_path / "cache")
    assert dry.returncode == 0 and (f"noted (the real run checks these when it indexes the data, before any trial "
                                    f"starts):\n  data.pretrain.urls: 1 of 2 shards cut short (first {shards[1]}: "
                                    f"{len(raw) // 2:,} bytes, without the two zero blocks a tar ends with)") \
        in dry.stdout, dry.stdout[-2000:]
    done = run_cli(["-m", "study.run", "--grid", str(grid), "--out", str(tmp_path / "out")], tmp_path / "cache")
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error")]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert not list((tmp_path / "out").glob("*/storage/points/*")), "a trial started"
    assert lines[0].startswith("error: data.pretrain: indexing webdataset: 1 of ") and \
        f"(first truncated_tar: {shards[1]} lost 1)" in lines[0], lines[0]
