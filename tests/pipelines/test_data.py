import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipelines import data
from pipelines.data import folder as folder_module
from pipelines.data import shapes
from pipelines.data.augment import eval_image
from pipelines.data.reader import DataError, iter_encoded
from pipelines.data.sources import check_local_shards
from pipelines.data.writer import write_shard

SMALL = data.SourceConfig(source="shapes", size=600, test_size=100, image_size=32, num_classes=8, seed=5)


def test_render_is_a_pure_function_of_seed_split_index():
    a, la = shapes.render(0, "train", 17, 8, 32)
    b, lb = shapes.render(0, "train", 17, 8, 32)
    c, _ = shapes.render(0, "test", 17, 8, 32)
    d, _ = shapes.render(1, "train", 17, 8, 32)
    assert np.array_equal(a, b) and la == lb
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8


def test_classes_are_distinct_outline_fill_pairs_and_sources_differ():
    parts = [shapes.class_parts(c, 16, seed=0) for c in range(16)]
    assert len(set(parts)) == 16
    other = {shapes.class_parts(c, 10, seed=1) for c in range(10)}
    assert other != set(parts[:10])
    with pytest.raises(ValueError, match="at most 64 classes"):
        shapes.class_parts(0, 65, seed=0)


def test_prepare_writes_shards_once_and_reads_back_identical_pixels(cache_dir, monkeypatch):
    generated = []
    real = data._generate_shapes
    monkeypatch.setattr(data, "_generate_shapes", lambda *a: generated.append(a) or real(*a))
    shards = data.prepare(SMALL, cache_dir, progress=False).shards
    assert len(shards["train"]) == 1 and len(shards["test"]) == 1
    files = [*shards["train"], *shards["test"], str(Path(shards["train"][0]).parent / "_info.json")]
    written = {f: (os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files}
    again = data.prepare(SMALL, cache_dir, progress=False).shards
    assert again == shards
    assert {f: (os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files} == written  # not rewritten ...
    assert len(generated) <= 1  # ... nor generated again (a second copy would lose the rename and leave these)
    assert data.prepare(SMALL, cache_dir, progress=False).shards == shards and len(generated) <= 1
    split = data.load(shards["train"], 32, progress=False)
    assert len(split) == 600
    i = split.keys.index("00000123")
    image, label = shapes.render(SMALL.seed, "train", 123, SMALL.num_classes, SMALL.image_size)
    assert np.array_equal(split.images[i], image) and split.labels[i] == label  # PNG is lossless


def test_nested_subsets_contain_each_other_and_are_deterministic(cache_dir, tmp_path):
    index = data.prepare(SMALL, cache_dir, progress=False).index()
    small, mid, big = (set(data.nested_subset(index, n, seed=3).positions.tolist()) for n in (50, 200, 600))
    assert small < mid < big and len(small) == 50 and len(big) == 600
    assert set(data.nested_subset(index, 200, seed=4).positions.tolist()) != mid
    # Another process computes the same manifest (shard order: see the shard-mode test).
    subset = data.nested_subset(index, 200, seed=3)
    code = ("from pipelines import data; import sys; index = data.SourceIndex(sys.argv[1]); "
            "print(data.manifest_hash(data.nested_subset(index, 200, 3)))")
    out = subprocess.run([sys.executable, "-c", code, str(index.folder)], capture_output=True, text=True)
    assert out.stdout.strip() == data.manifest_hash(subset)


def test_subset_larger_than_source_is_a_clear_error(cache_dir):
    index = data.prepare(SMALL, cache_dir, progress=False).index()
    with pytest.raises(DataError, match="subset of 700 examples asked, but the source has only 600"):
        data.nested_subset(index, 700, seed=0)


def test_missing_shard_path_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data path not found: .*missing-000001.tar \(1 of 2 shards missing\)"):
        (tmp_path / "missing-000000.tar").write_bytes(b"")
        check_local_shards(str(tmp_path / "missing-{000000..000001}.tar"))


def _write(tmp_path, n=5):
    rng = np.random.default_rng(0)
    path = tmp_path / "s.tar"
    write_shard(path, ((f"k{i}", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), i % 3) for i in range(n)))
    return path


def test_truncated_shard_fails_with_a_clear_error(tmp_path):
    path = _write(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2 + 100])
    with pytest.raises(DataError, match=r"corrupt or truncated shard \S*s\.tar: unexpected end of data"):
        list(iter_encoded([str(path)]))


def test_sample_without_label_is_named(tmp_path):
    path = tmp_path / "nolabel.tar"
    with tarfile.open(path, "w") as tar:
        src = _write(tmp_path / "..", 1)
        with tarfile.open(src) as inner:
            member = next(m for m in inner.getmembers() if m.name.endswith(".png"))
            tar.addfile(member, inner.extractfile(member))
    with pytest.raises(DataError, match="sample 'k0' has no .cls label"):
        list(iter_encoded([str(path)]))


def test_load_resizes_other_sizes_to_the_requested_resolution(tmp_path):
    """The evaluation transform as production reads it (`data.load` -> `eval_batches`): the centred square of the
    shorter side, resized bilinearly (antialiased) to the requested size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 24, 3), dtype=np.uint8) for _ in range(5)]
    write_shard(tmp_path / "s.tar", ((f"k{i}", image, i % 3) for i, image in enumerate(images)))
    split = data.load([str(tmp_path / "s.tar")], 8)
    assert split.images.shape == (5, 8, 8, 3) and split.labels.tolist() == [0, 1, 2, 0, 1]
    for image, got in zip(images, split.images, strict=True):
        expected = Image.fromarray(image).resize((8, 8), Image.BILINEAR, box=(4, 0, 20, 16))  # the centre 16 x 16
        assert np.array_equal(got, np.asarray(expected))


def _folder(root, classes, per_class, rng):
    from PIL import Image

    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")


def _folder_pixels(root, size):
    """(label, pixels) of every image of a class folder through the one image path, the reference for its shards."""
    from pipelines.data.folder import folder_classes, folder_files

    labels = {name: i for i, name in enumerate(folder_classes(str(root)))}
    return sorted((labels[key.split("/")[0]], eval_image(Path(path).read_bytes(), size).tobytes())
                  for key, path in folder_files(str(root)))


def _as_set(split):
    return sorted((int(label), im.tobytes()) for im, label in zip(split.images, split.labels, strict=True))


def test_folder_source_is_converted_once_to_shards_that_give_the_model_the_same_pixels(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    _folder(tmp_path / "train", ["cat", "ant", "bee"], 4, rng)
    _folder(tmp_path / "test", ["cat", "ant", "bee"], 2, rng)
    src = data.SourceConfig(source="folder", root=str(tmp_path / "train"), test_root=str(tmp_path / "test"),
                            size=12, test_size=6, num_classes=3, image_size=16)
    converted = []
    real = folder_module.folder_to_shards
    monkeypatch.setattr(folder_module, "folder_to_shards", lambda *a, **k: converted.append(a) or real(*a, **k))
    found = data.prepare(src, tmp_path / "cache")
    splits = found.shards
    assert all(path.endswith(".tar") for paths in splits.values() for path in paths)
    stamp = {p: os.stat(p).st_mtime_ns for paths in splits.values() for p in paths}
    assert data.prepare(src, tmp_path / "cache").shards == splits
    assert {p: os.stat(p).st_mtime_ns for p in stamp} == stamp and len(converted) == 2  # once per split
    for split, root in (("train", src.root), ("test", src.test_root)):
        from_shards = data.load(splits[split], 16)
        assert len(from_shards) == {"train": 12, "test": 6}[split] and _as_set(from_shards) == _folder_pixels(root, 16)
    from_shards = data.load(splits["train"], 16)
    paths = {json.loads(raw)["path"]: key for key, raw in _jsons(splits["train"])}
    labels = dict(zip(from_shards.keys, from_shards.labels, strict=True))
    assert [labels[paths[f]] for f in ("ant/0.jpg", "bee/3.jpg", "cat/1.jpg")] == [0, 1, 2]  # sorted class names
    assert len(data.load(data.nested_subset(found.index(), 5, seed=0), 16)) == 5


def test_a_node_whose_copy_of_a_folder_source_has_other_mtimes_reads_it_through_the_drivers_index(tmp_path):
    """The index (in shared storage) was built on the driver's conversion; a node converts its own copy of the
    folders (the same files, copied without their mtimes) into the folder that index names, and reads the driver's
    pixels (it converted under another key, and every read failed: "cannot read shard ...")."""
    rng = np.random.default_rng(0)
    _folder(tmp_path / "train", ["cat", "ant"], 5, rng)
    _folder(tmp_path / "test", ["cat", "ant"], 2, rng)
    src = data.SourceConfig(source="folder", root=str(tmp_path / "train"), test_root=str(tmp_path / "test"),
                            size=10, test_size=4, num_classes=2, image_size=16)
    index_root = tmp_path / "storage" / "index"  # a local or NFS --storage: every node sees it
    driver = data.prepare(src, tmp_path / "driver-cache", index_root, progress=False)
    for image in tmp_path.glob("t*/*/*.jpg"):
        os.utime(image, ns=(10**18, 10**18))  # the node's copy
    node = data.prepared(src, tmp_path / "node-cache", index_root)
    for split in ("train", "test"):
        assert all(str(tmp_path / "node-cache") in u and os.path.exists(u) for u in node.shards[split])
        ours, theirs = data.load(node.subset(split), 16), data.load(driver.subset(split), 16)
        assert ours.keys == theirs.keys and np.array_equal(ours.images, theirs.images)
    assert sorted(p.name for p in (tmp_path / "node-cache").iterdir()) == sorted(
        {os.path.basename(os.path.dirname(u)) for urls in driver.shards.values() for u in urls})


def _jsons(shards):
    """(key, .json bytes) of every sample: where a converted image came from."""
    from pipelines.data.reader import read_shard

    return [(key, parts["json"]) for shard in shards for key, parts in read_shard(shard)]


def test_folder_source_errors_name_the_problem(tmp_path):
    rng = np.random.default_rng(0)
    _folder(tmp_path / "train", ["a", "b"], 1, rng)
    _folder(tmp_path / "test", ["a", "c"], 1, rng)
    base = dict(source="folder", root=str(tmp_path / "train"), size=2, num_classes=2)
    with pytest.raises(DataError, match="unlike the train folder's"):
        data.prepare(data.SourceConfig(**base, test_root=str(tmp_path / "test")), tmp_path)
    with pytest.raises(DataError, match="data path .*nope not found"):
        data.prepare(data.SourceConfig(**base, test_root=str(tmp_path / "nope")), tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DataError, match="data path .*a-file is a file, not a folder"):
        data.prepare(data.SourceConfig(**base, test_root=str(tmp_path / "a-file")), tmp_path)
    with pytest.raises(DataError, match="has 2 class folders, but num_classes is 3"):
        data.prepare(data.SourceConfig(**{**base, "num_classes": 3}), tmp_path)


def test_folder_to_shards_round_trip_is_pixel_and_label_identical(tmp_path, cache_dir):
    from PIL import Image

    from tests.conftest import run_cli

    rng = np.random.default_rng(1)
    root = tmp_path / "folder"
    for c, name in enumerate(["dog", "cat", "emu"]):
        (root / name).mkdir(parents=True)
        for i in range(7):
            ext = "png" if i % 2 else "jpg"  # PNG is lossless; JPEG bytes are copied, not re-encoded
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / name / f"{c}_{i}.{ext}")
    proc = run_cli(["-m", "pipelines.data.folder", "--from-folder", str(root), "--out", str(tmp_path / "wds"),
                    "--shard-size", "5"], cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "21 samples of 3 classes in 5 shards" in proc.stdout
    info = json.loads((tmp_path / "wds" / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 21 and info["splits"]["train"]["shard_lengths"] == [5] * 4 + [1]
    assert json.loads((tmp_path / "wds" / "classes.json").read_text()) == ["cat", "dog", "emu"]
    src = data.SourceConfig(source="webdataset", urls=str(tmp_path / "wds" / "train-{000000..000004}.tar"),
                            size=21, num_classes=3, image_size=12)
    assert _as_set(data.load(data.prepare(src, tmp_path).subset(), 12)) == _folder_pixels(root, 12)
    with pytest.raises(DataError, match="declares size 22, but .*_info.json lists 21 train samples"):
        data.prepare(data.SourceConfig(**{**src.__dict__, "size": 22}), tmp_path)
    bad = run_cli(["-m", "pipelines.data.folder", "--from-folder", str(tmp_path / "nope"), "--out", str(tmp_path)],
                  cache_dir)
    assert bad.returncode == 2 and bad.stderr.startswith("error: data path not found")
    assert "warning" not in proc.stderr  # every file whole


def test_the_folder_command_warns_of_files_that_are_not_whole_images_and_keeps_them(tmp_path, capsys):
    from PIL import Image

    from pipelines.data.folder import broken_image, folder_to_shards

    root = tmp_path / "folder"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(root / name / f"{i}.jpg")
    whole = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "1.jpg").write_bytes(whole[:len(whole) // 2])  # an interrupted copy
    (root / "dog" / "0.jpg").write_bytes(b"")
    (root / "dog" / "1.jpg").write_bytes(b"<html>not found</html>")  # a saved error page
    (root / "dog" / "2.jpg").write_bytes(whole + bytes(8192))  # trailing bytes after the end marker: decodes
    assert broken_image(whole, "jpg") is None and broken_image(whole + bytes(8192), "jpeg") is None
    assert broken_image(b"", "png") == "zero bytes" and broken_image(b"\x89PNG\r\n\x1a\n" + b"x" * 30, "png") == \
        "a PNG cut short (no end marker)"
    info = folder_to_shards(str(root), tmp_path / "wds", progress=False, workers=1)
    said = capsys.readouterr().err
    assert info["splits"]["train"]["num_samples"] == 6  # kept: the readers count them, up to max_bad_fraction
    assert said.startswith(f"warning: 3 of 6 files under {root} do not look like whole images (first: cat/1.jpg, "
                           "sample '000000001' of its shards: a JPEG cut short (no end marker)); they are kept"), said
    from pipelines.data.folder import warn_broken

    warn_broken(str(root), tmp_path / "wds", 6)  # a later run on the converted folder: the reader names the key
    assert capsys.readouterr().err == said
    shards = [str(p) for p in sorted((tmp_path / "wds").glob("train-*.tar"))]
    with pytest.raises(data.DataError) as failed:  # the error that stops a run names the image, not only the shard
        data.load(shards, 16, max_bad_fraction=0.0)
    assert re.search(rf"first undecodable_image: sample '\d+' in {re.escape(shards[0])} \(the file "
                     rf"{re.escape(str(root))}/(cat/1|dog/[01])\.jpg\): ", str(failed.value)), str(failed.value)


def test_the_folder_command_refuses_bad_arguments_with_one_line_and_writes_nothing(tmp_path, capsys):
    """A shard size below 1 would write no shard and say it had (or fail in `range`); an --out that is a file, a
    folder without images: one line, exit 2, nothing written."""
    from pipelines.data.folder import main

    _folder(tmp_path / "src", ["cat", "dog"], 2, np.random.default_rng(0))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("no image")
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    base = ["--from-folder", str(tmp_path / "src"), "--out", str(tmp_path / "wds")]
    for argv, line in (([*base, "--shard-size", "0"], "argument --shard-size: '0' is not a positive integer"),
                       ([*base, "--shard-size", "-3"], "argument --shard-size: '-3' is not a positive integer"),
                       ([*base, "--split", "a/b"], "argument --split: 'a/b' is not a file name prefix")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and line in capsys.readouterr().err.splitlines()[-1]
    for argv, line in ((base[:2] + ["--out", str(mine)], f"--out {mine} is a file; the shards are written into a "
                        "folder (new or existing)"),
                       (base[:2] + ["--out", str(mine / "wds")], f"--out {mine / 'wds'} is below {mine}, a file"),
                       (["--from-folder", str(tmp_path / "empty"), "--out", str(tmp_path / "wds")],
                        f"no images found under {tmp_path / 'empty'} (expected {tmp_path / 'empty'}/<class>/<image>)")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {line}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes.txt", "src"] and mine.read_text() == "mine"


def test_the_folder_command_adds_splits_of_the_same_classes_and_refuses_to_mix(tmp_path, capsys):
    """A train and a test folder converted in turn into one --out; a second train conversion there (its shards would
    mix with the first's), or a folder of other classes (label i would differ per split): one line, nothing written."""
    from pipelines.data.folder import main

    rng = np.random.default_rng(0)
    _folder(tmp_path / "train", ["cat", "dog"], 3, rng)
    _folder(tmp_path / "test", ["cat", "dog"], 2, rng)
    _folder(tmp_path / "other", ["cat", "emu"], 2, rng)
    out = tmp_path / "wds"
    assert main(["--from-folder", str(tmp_path / "train"), "--out", str(out), "--shard-size", "2"]) == 0
    assert main(["--from-folder", str(tmp_path / "test"), "--out", str(out), "--split", "test"]) == 0
    assert json.loads((out / "_info.json").read_text())["name"] == "train"  # the dataset's, not the last split's
    written = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main(["--from-folder", str(tmp_path / "train"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: --out {out} already holds 3 train shards (train-000000.tar, ...); "
                                       "give an empty folder, or remove them first\n")
    assert main(["--from-folder", str(tmp_path / "other"), "--out", str(out), "--split", "val"]) == 2
    assert capsys.readouterr().err == (f"error: --out {out} holds the splits of other class folders (classes.json: "
                                       "cat, dog), not these (cat, emu): label i would name another class in each "
                                       "split; give the same class folders, or another --out\n")
    assert sorted(p.name for p in out.iterdir()) == written


@pytest.mark.parametrize("command", [["pipelines.data.folder", "--from-folder", "nope", "--out", "x"],
                                     ["pipelines.data.index", "nope-{0..1}.tar", "--out", "x"]])
def test_the_data_commands_run_without_runpy_s_warning(tmp_path, command):
    """`pipelines.data` imports neither command's module: runpy would run a second copy of it as `__main__`, and
    say so with a RuntimeWarning on every run."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert not (tmp_path / "x").exists()


def test_class_counts_report_the_spread():
    balance = data.class_counts(np.array([0, 0, 1, 3]), 5)
    assert balance == {"counts": [2, 1, 0, 1, 0], "min": 0, "max": 2, "empty_classes": 2}
    assert data.class_counts(np.array([0, 6]), 5)["counts"] == [1, 0, 0, 0, 0, 0, 1]  # past num_classes: counted


def _source(folder, counts, tag=""):
    """Real shards `train-<s>.tar` of tiny PNGs with `counts[s]` samples each; keys `<tag><s>-<i>`."""
    rng = np.random.default_rng(0)
    for s, n in enumerate(counts):
        write_shard(folder / f"train-{s}.tar", ((f"{tag}{s}-{i:03d}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
                                                 i % 3) for i in range(n)))
    return [str(folder / f"train-{s}.tar") for s in range(len(counts))]


def test_prepare_indexes_a_source_once_and_fails_up_front_on_a_corrupt_training_shard(tmp_path, monkeypatch):
    from pipelines.data import scan as index_scan

    _source(tmp_path, [100] * 3)
    src = data.SourceConfig(source="webdataset", urls=str(tmp_path / "train-{0..2}.tar"), size=240, num_classes=3,
                            image_size=8)
    built = []
    real = index_scan.build
    monkeypatch.setattr(index_scan, "build", lambda shards, *a, **k: built.append(shards) or real(shards, *a, **k))
    found = data.prepare(src, tmp_path / "cache")
    assert len(built) == 1
    again = data.prepared(src, tmp_path / "cache")  # a trial, a rank: the driver's record, nothing rebuilt
    assert again == found and len(built) == 1 and data.prepare(src, tmp_path / "cache") == found and len(built) == 1
    index = again.index()
    assert len(index) == 300 and index.keys_of([0, 150, 299]) == ["0-000", "1-050", "2-099"]
    assert index.labels_of(np.array([0, 1, 2, 150])).tolist() == [0, 1, 2, 50 % 3]
    raw = (tmp_path / "train-1.tar").read_bytes()
    (tmp_path / "train-1.tar").write_bytes(raw[: len(raw) // 2])  # a new size and mtime: a new index key
    with pytest.raises(DataError, match=r"^indexing webdataset: 1 of \d+ samples unreadable .*truncated_tar 1"):
        data.prepare(src, tmp_path / "cache")
    assert len(built) == 2


def test_shard_mode_subsets_are_nested_deterministic_and_read_few_shards(tmp_path):
    counts = [100, 80, 120, 100, 50, 100, 90, 110]
    shards = _source(tmp_path, counts)
    index = data.SourceIndex(data.cached_index(shards, tmp_path / "index"))
    subsets = [data.nested_subset(index, n, seed=3, mode="shards") for n in (60, 250, 500, 750)]
    assert [len(s) for s in subsets] == [60, 250, 500, 750]
    rows = [set(s.positions.tolist()) for s in subsets]
    assert all(a < b for a, b in zip(rows, rows[1:], strict=False))  # nested
    shards_read = [set(index.shard_of(s.positions).tolist()) for s in subsets]
    assert len(shards_read[0]) == 1 and len(shards_read[1]) <= 4  # whole shards, not samples across all 8
    assert rows[1] == set(data.nested_subset(index, 250, seed=3, mode="shards").positions.tolist())  # deterministic
    assert rows[1] != set(data.nested_subset(index, 250, seed=4, mode="shards").positions.tolist())
    backwards = data.SourceIndex(data.cached_index(shards[::-1], tmp_path / "index"))
    for mode in ("shards", "samples"):  # the shard list's order is irrelevant: the same keys are chosen
        assert data.manifest_hash(data.nested_subset(backwards, 250, 3, mode)) == \
            data.manifest_hash(data.nested_subset(index, 250, 3, mode))
    with pytest.raises(DataError, match="subset of 751 examples asked, but the source has only 750"):
        data.nested_subset(index, 751, seed=0, mode="shards")


@pytest.mark.parametrize("streamed", [False, True], ids=["read by offset", "streamed"])
def test_a_held_out_slice_is_fixed_and_in_no_subset_of_any_size_seed_or_mode(tmp_path, streamed):
    """The validation slice carved from a source without a test split: the same whatever the shard order or the
    process (it takes no seed and no rank), never in a nested subset, which stay nested within the rest."""
    shards = _source(tmp_path, [100, 80, 120, 100, 50, 100, 90, 110])  # 750 samples
    urls = [f"pipe:cat {s}" for s in shards] if streamed else shards
    index = data.SourceIndex(data.cached_index(urls, tmp_path / "index"))
    held = data.held_out(index, 60)
    rows = set(np.asarray(held.positions).tolist())
    assert len(rows) == 60 and np.asarray(index.shard_seekable).all() != streamed
    if streamed:  # whole shards (the last one cut), so a validation pass streams those alone
        assert len(set(index.shard_of(held.positions).tolist())) <= 2
    backwards = data.SourceIndex(data.cached_index(urls[::-1], tmp_path / "index"))
    assert data.manifest_hash(data.held_out(backwards, 60)) == data.manifest_hash(held)
    code = ("from pipelines import data; import sys; index = data.SourceIndex(sys.argv[1]); "
            "print(data.manifest_hash(data.held_out(index, 60)))")
    out = subprocess.run([sys.executable, "-c", code, str(index.folder)], capture_output=True, text=True)
    assert out.stdout.strip() == data.manifest_hash(held)  # another process (a rank, a trial) carves the same rows
    for mode in ("samples", "shards"):
        for seed in (0, 3):
            subsets = [set(np.asarray(data.nested_subset(index, n, seed, mode, held).positions).tolist())
                       for n in (1, 50, 200, 689, 690)]
            assert [len(s) for s in subsets] == [1, 50, 200, 689, 690]
            assert all(a < b for a, b in zip(subsets, subsets[1:], strict=False))  # nested
            assert not set().union(*subsets) & rows and subsets[-1] | rows == set(range(750))
    with pytest.raises(DataError, match=r"subset of 691 examples asked, but the source has only 690 \(750 less 60 "
                                        r"held out for validation\)"):
        data.nested_subset(index, 691, seed=0, held=held)
    with pytest.raises(DataError, match="a held-out slice of 750 rows asked of a source of 750"):
        data.held_out(index, 750)


def test_a_changed_remote_shard_gets_a_new_index(tmp_path, monkeypatch):
    """Remote shards are keyed by their sidecar's content hash (`pipe:`) or ETag (http), not by their URL alone."""
    from pipelines.data import scan as index_scan
    from pipelines.data.sources import shard_identity

    _source(tmp_path, [10, 10], "a")
    urls = [f"pipe:cat {tmp_path}/train-{s}.tar" for s in range(2)]
    built = []
    real = index_scan.build
    monkeypatch.setattr(index_scan, "build", lambda shards, *a, **k: built.append(shards) or real(shards, *a, **k))
    first = data.cached_index(urls, tmp_path / "cache")
    assert data.cached_index(urls, tmp_path / "cache") == first and len(built) == 1  # built once
    write_shard(tmp_path / "train-1.tar", ((f"b1-{i:02d}", np.zeros((8, 8, 3), np.uint8), 0) for i in range(12)))
    again = data.SourceIndex(data.cached_index(urls, tmp_path / "cache"))
    assert len(built) == 2 and again.shard_start(1) == 10 and len(again) == 22
    assert not again.shard_seekable[0]  # read from the sidecar, streamed when trained on
    (tmp_path / "train-0.tar.idx.json").unlink()
    assert shard_identity(urls[0]) == [urls[0]]  # no sidecar: the URL alone


def test_a_node_with_its_own_cache_reads_the_stored_index_without_building_it(tmp_path, monkeypatch):
    """The driver indexes once into the study's storage; a node whose cache folder differs (generated shards are
    made per node) maps that index, with its shard paths moved to its own cache, and builds nothing."""
    from pipelines.data import scan as index_scan

    storage = tmp_path / "storage" / "index"
    found = data.prepare(SMALL, tmp_path / "driver-cache", storage, progress=False)
    built = []
    monkeypatch.setattr(index_scan, "build", lambda *a, **k: built.append(a))
    node = data.prepared(SMALL, tmp_path / "node-cache", storage)
    assert built == [] and node.indexes == found.indexes  # the stored index, not a new one
    assert node.index().shard_url(0).startswith(str((tmp_path / "node-cache").resolve()))
    assert os.path.exists(node.index().shard_url(0))  # generated in this node's cache
    subset = data.nested_subset(node.index(), 50, seed=1)
    from_node = data.load(subset, 32)
    from_driver = data.load(data.nested_subset(found.index(), 50, seed=1), 32)
    assert np.array_equal(from_node.images, from_driver.images) and from_node.keys == from_driver.keys


@pytest.mark.parametrize("streamed", [False, True], ids=["by-offset", "pipe"])
def test_evaluation_decodes_in_loader_workers_to_the_batches_of_one_process(streamed):
    from pipelines.data.index import ShardSubset, scratch_index
    from tests.pipelines.tiny import as_shards

    rng = np.random.default_rng(3)
    split = as_shards(rng.integers(0, 255, (45, 12, 12, 3), dtype=np.uint8), rng.integers(0, 5, 45), per_shard=10)
    if streamed:
        index = scratch_index([f"pipe:cat {url}" for url in split.index.shards])
        split = ShardSubset(index, np.arange(len(index), dtype=np.int64))
    rows = split.part(np.r_[0:7, 12:31, 40:45])  # runs that start and stop inside shards

    def batches(workers):
        return list(data.eval_batches(rows, 8, batch_size=6, workers=workers))

    one, two = batches(0), batches(2)
    assert [len(b) for b in two] == [len(b) for b in one] == [6, 6, 6, 6, 6, 1]
    for a, b in zip(one, two, strict=True):
        assert a.keys == b.keys and np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert [k for b in one for k in b.keys] == [f"{i:06d}" for i in np.r_[0:7, 12:31, 40:45]]


def test_a_class_past_num_classes_is_one_line_naming_the_sample_when_the_source_is_prepared(tmp_path):
    from pipelines.data.writer import write_shard

    rng = np.random.default_rng(0)
    path = tmp_path / "wds" / "train-0.tar"
    path.parent.mkdir()
    write_shard(path, ((f"k{i}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), 7 if i == 5 else i % 4)
                       for i in range(12)))
    src = data.SourceConfig(source="webdataset", urls=str(path), size=12, num_classes=4, image_size=8)
    with pytest.raises(DataError, match=rf"^source 'webdataset' \(train\): sample 'k5' in {re.escape(str(path))} has "
                                        r"class 7, but num_classes is 4 \(classes 0..3\); set num_classes: 8 if"):
        data.prepare(src, tmp_path / "cache", progress=False)
    assert len(data.prepare(data.SourceConfig(**{**src.__dict__, "num_classes": 8}), tmp_path / "cache",
                            progress=False).index()) == 12


def test_members_whose_names_hold_a_dot_are_said_to_merge_into_one_sample(tmp_path):
    """webdataset cuts a key at the first '.': `img.0000.jpg` ... are one sample `img`, and the size check says why."""
    import io
    import tarfile

    from PIL import Image

    path = tmp_path / "train-0.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(8):
            for name, body in ((f"img.{i:04d}.jpg", io.BytesIO()), (f"img.{i:04d}.cls", io.BytesIO(b"1"))):
                if name.endswith(".jpg"):
                    Image.new("RGB", (8, 8)).save(body, "JPEG")
                info = tarfile.TarInfo(name)
                info.size = len(body.getvalue())
                tar.addfile(info, io.BytesIO(body.getvalue()))
    src = data.SourceConfig(source="webdataset", urls=str(path), size=8, num_classes=2, image_size=8)
    with pytest.raises(DataError, match=r"hold 1 readable samples; members such as img.0000.jpg and img.0001.jpg are "
                                        r"one sample: a key ends at the first '.'"):
        data.prepare(src, tmp_path / "cache", progress=False)


def test_a_sources_stamp_follows_its_files_not_the_cache_made_from_them(tmp_path, monkeypatch):
    """`Prepared.stamp`: the same files give the same stamp, even converted or generated again into an empty cache;
    new modification times change `files` alone; a rewritten image changes `sizes` too. A webdataset source's
    stamp is its shards', the same way; the procedural source's, its generator's settings (not its shards' layout);
    a split with a shard known by its URL alone has none (a failed look-up must not read as changed files)."""
    import shutil

    rng = np.random.default_rng(0)
    _folder(tmp_path / "train", ["cat", "ant"], 3, rng)
    src = data.SourceConfig(source="folder", root=str(tmp_path / "train"), size=6, num_classes=2, image_size=16)
    first = data.prepare(src, tmp_path / "cache", progress=False).stamp["train"]
    shutil.rmtree(tmp_path / "cache")
    assert data.prepare(src, tmp_path / "cache", progress=False).stamp["train"] == first
    os.utime(tmp_path / "train" / "cat" / "0.jpg", ns=(10**18, 10**18))
    touched = data.prepare(src, tmp_path / "cache", progress=False).stamp["train"]
    assert touched["files"] != first["files"] and touched["sizes"] == first["sizes"]
    from PIL import Image

    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "train" / "cat" / "0.jpg")
    rewritten = data.prepare(src, tmp_path / "cache", progress=False).stamp["train"]
    assert rewritten["sizes"] != first["sizes"]

    shapes = data.SourceConfig(source="shapes", size=8, test_size=4, num_classes=2, image_size=8)
    made = data.prepare(shapes, tmp_path / "cache2", progress=False)
    assert set(made.stamp) == {"train", "test"} and made.stamp["train"] != made.stamp["test"]
    shutil.rmtree(tmp_path / "cache2")
    assert data.prepare(shapes, tmp_path / "cache2", progress=False).stamp == made.stamp
    urls = made.shards["train"]
    wds = data.SourceConfig(source="webdataset", urls=urls[0], test_urls=made.shards["test"][0], size=8, test_size=4,
                            num_classes=2, image_size=8)
    before = data.prepare(wds, tmp_path / "cache3", progress=False).stamp
    os.utime(urls[0], ns=(10**18, 10**18))
    after = data.prepare(wds, tmp_path / "cache3", progress=False).stamp
    assert after["train"]["files"] != before["train"]["files"] and after["train"]["sizes"] == before["train"]["sizes"]
    assert after["test"] == before["test"]  # one split changed, the other did not
    assert data.prepared(wds, tmp_path / "cache3").stamp == after  # as the driver recorded it, for a trial
    monkeypatch.setattr(data, "SHAPES_LAYOUT", data.SHAPES_LAYOUT + 1)  # shards laid out anew, the same pixels
    assert data.prepare(shapes, tmp_path / "cache2", progress=False).stamp == made.stamp
    tagged = {"train": [["s3://b/0.tar", "sidecar", "ab12"], ["https://h/1.tar", "etag", "x"]]}
    assert data.data_stamp(tagged)["train"]["files"] == data.data_stamp(tagged)["train"]["sizes"]  # no time
    assert data.data_stamp({**tagged, "test": [["pipe:cat /d/2.tar"]]})["test"] is None  # known by URL alone
