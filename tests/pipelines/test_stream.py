"""Streaming loader: exactly once per epoch on real JPEG tar shards, per-cause corruption counts, augmentation."""

import io
import itertools
import json
import math
import re
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import data
from pipelines.data.augment import Augment, augment_decoded, center_box, eval_image, inception_box, train_image
from pipelines.data.index import ShardSubset, scratch_index
from pipelines.data.reader import DataError
from pipelines.data.stream import ShardStream, StreamLoader, part_plan

AUG = Augment(crop="inception", flip=True)


def _jpeg(rng, size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _shard(path, samples) -> None:
    """Write (key, {ext: bytes}) samples as a plain tar, members in webdataset order."""
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, raw in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))


def _source(tmp_path, sizes, rng=None):
    """Shards of real JPEGs with the given sample counts; returns (shard paths, all keys)."""
    rng = rng or np.random.default_rng(0)
    paths, keys, n = [], [], 0
    for s, size in enumerate(sizes):
        samples = [(f"s{s}k{i:04d}", {"jpg": _jpeg(rng), "cls": str((n + i) % 5).encode()}) for i in range(size)]
        _shard(tmp_path / f"{s:06d}.tar", samples)
        paths.append(str(tmp_path / f"{s:06d}.tar"))
        keys += [k for k, _ in samples]
        n += size
    return paths, keys


def _whole(shards) -> ShardSubset:
    """Every sample of `shards`, through their index."""
    index = scratch_index(shards)
    return ShardSubset(index, np.arange(len(index), dtype=np.int64))


def _keys(subset: ShardSubset, local: list[str] | None = None) -> list[str]:
    """The subset's keys (read from the tar headers of `local`, the same shards as local files, if given)."""
    index = scratch_index(local) if local is not None else subset.index
    return index.keys_of(subset.positions)


def _epochs(loader: StreamLoader, epochs: int, start_step: int = 0) -> list[list[str]]:
    """The keys of each of the first `epochs` epochs (by each sample's epoch), and the batches read."""
    out: dict[int, list[str]] = {}
    for batch in loader.batches(start_step):
        for key, epoch in zip(batch.keys, batch.sample_epochs, strict=True):
            out.setdefault(int(epoch), []).append(key)
        if batch.end_of_epoch and batch.epoch + 1 >= epochs and len(out) > epochs - 1 and \
                all(e >= epochs - 1 for e in batch.sample_epochs[-1:]):
            return [out[e] for e in sorted(out)[:epochs]]
    raise AssertionError("unreachable: the stream is endless")


def _steps(loader: StreamLoader, n: int, start_step: int = 0) -> list:
    return list(itertools.islice(loader.batches(start_step), n))


@pytest.mark.parametrize("sizes", [[50, 40, 13], [37], [20, 16]],
                         ids=["3 uneven shards", "1 shard, more workers", "batch-multiple parts"])
def test_every_subset_sample_is_seen_exactly_once_per_epoch_in_the_same_order_for_any_workers(tmp_path, sizes):
    shards, keys = _source(tmp_path, sizes)
    rows = data.nested_subset(scratch_index(shards), len(keys) - 4, seed=0)
    subset = _keys(rows)
    n, runs = len(subset), {}
    for workers in (0, 1, 3):
        stream = ShardStream(rows, 12, batch_size=8, augment=AUG, seed=1, shuffle_buffer=16)
        batches = _steps(StreamLoader(stream, workers), math.ceil(2 * n / 8) + 1)
        flat = [k for b in batches for k in b.keys]
        for e in range(2):
            assert Counter(flat[e * n:(e + 1) * n]) == Counter(subset)  # each sample once per epoch
        assert [len(b.labels) for b in batches] == [8] * len(batches)  # every batch full: epochs run on
        assert [b.end_of_epoch for b in batches] == [(t + 1) * 8 // n > t * 8 // n for t in range(len(batches))]
        assert all(b.images.shape[1:] == (12, 12, 3) and b.images.dtype == torch.uint8 for b in batches)
        runs[workers] = batches
    for batches in (runs[1], runs[3]):  # the order and the augmentation do not depend on the loader workers
        assert [b.keys for b in batches] == [b.keys for b in runs[0]]
        assert all(torch.equal(a.images, b.images) for a, b in zip(batches, runs[0], strict=True))


def test_ranks_take_equal_slices_of_the_one_process_batches(tmp_path):
    """World-size independence: rank r of 3 reads the r-th third of what one process reads at each step,
    with the same augmentation, and every rank runs the same steps."""
    shards, keys = _source(tmp_path, [30, 11])
    index = _whole(shards)
    whole = _steps(StreamLoader(ShardStream(index, 12, 12, AUG, seed=2), workers=2), 8)
    parts = [_steps(StreamLoader(ShardStream(index, 12, 12, AUG, seed=2, rank=r, world_size=3), workers=r),
                    8) for r in range(3)]
    for t, batch in enumerate(whole):
        assert [k for p in parts for k in p[t].keys] == batch.keys
        assert torch.equal(torch.cat([p[t].images for p in parts]), batch.images)
        assert {p[t].end_of_epoch for p in parts} == {batch.end_of_epoch}
    with pytest.raises(ValueError, match="does not divide among 5 ranks"):
        ShardStream(index, 12, 12, AUG, seed=2, rank=0, world_size=5)


def test_part_plan_covers_every_position_once():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(0, 9, rng.integers(1, 6)).tolist()
        parts, order = int(rng.integers(1, 8)), rng.permutation(len(counts))
        taken = Counter((shard, i) for p in range(parts) for shard, a, b in part_plan(counts, order, p, parts)
                        for i in range(a, b))
        assert taken == Counter((s, i) for s in range(len(counts)) for i in range(counts[s]))


def test_epochs_reshuffle_and_a_resume_replays_the_same_batches(tmp_path):
    shards, keys = _source(tmp_path, [20, 20])
    make = lambda: StreamLoader(ShardStream(_whole(shards), 12, 6, AUG, seed=3), workers=2)  # noqa: E731
    first = _steps(make(), 14)
    assert [k for b in first[:6] for k in b.keys] != [k for b in first[7:13] for k in b.keys]
    resumed = _steps(make(), 5, start_step=9)
    assert [b.keys for b in resumed] == [b.keys for b in first[9:]]
    assert all(torch.equal(a.images, b.images) for a, b in zip(resumed, first[9:], strict=True))


def _corrupt_source(tmp_path):
    """One shard of 40 good JPEGs and one bad sample of each kind a reader can meet."""
    rng = np.random.default_rng(4)
    good = [(f"g{i:03d}", {"jpg": _jpeg(rng), "cls": b"1"}) for i in range(40)]
    flipped = bytearray(_jpeg(rng))
    flipped[len(flipped) // 2] ^= 0xFF  # libjpeg decodes this with a warning: only the checksum catches it
    original = _jpeg(rng)
    header_flipped = bytearray(original)
    header_flipped[2:40] = bytes(38)  # destroys the JPEG markers: undecodable
    bad = [("flip", {"jpg": bytes(flipped), "cls": b"2",
                     "json": json.dumps({"sha256": __import__("hashlib").sha256(original).hexdigest()}).encode()}),
           ("header", {"jpg": bytes(header_flipped), "cls": b"2"}),
           ("cut", {"jpg": original[:len(original) * 2 // 3], "cls": b"2"}),  # a truncated image
           ("empty", {"jpg": b"", "cls": b"2"}),
           ("nolabel", {"jpg": _jpeg(rng)})]
    _shard(tmp_path / "000000.tar", good[:20] + bad + good[20:])
    return [str(tmp_path / "000000.tar")]


def test_corrupt_samples_are_counted_per_cause_and_skipped(tmp_path):
    shards = _corrupt_source(tmp_path)
    index = _whole(shards)
    loader = StreamLoader(ShardStream(index, 12, 9, AUG, seed=0), workers=2, max_bad_fraction=0.5)
    (epoch,) = _epochs(loader, 1)
    assert sorted(epoch) == [f"g{i:03d}" for i in range(40)]
    assert loader.skipped(0) == {"checksum_mismatch": 1, "undecodable_image": 2, "empty_member": 1,
                                 "missing_label": 1}
    first = loader.bad[0].first  # one example of each cause, from the loader's worker processes, naming the file
    assert sorted(first) == sorted(loader.skipped(0)) and all(shards[0] in why for why in first.values())
    assert re.fullmatch(rf"sample '(header|cut)' in {re.escape(shards[0])}: \w+Error: .+", first["undecodable_image"])
    assert first["missing_label"].startswith("sample 'nolabel' has no .cls label")
    strict = StreamLoader(ShardStream(index, 12, 8, AUG, seed=0), workers=0)  # default limit 0.1%
    with pytest.raises(DataError, match=r"epoch 0 of the training data: \d of 45 samples unreadable \(.*\), above "
                                        r"the limit max_bad_fraction=0.001 \(first \w+: sample '\w+'"):
        _epochs(strict, 1)  # as soon as the limit is passed, naming the sample
    loaded = data.load(shards, 12, max_bad_fraction=0.5)
    assert len(loaded) == 40 and loaded.bad == loader.skipped(0)
    with pytest.raises(DataError, match=rf"\(first checksum_mismatch: sample 'flip': .*; first empty_member: sample "
                                        rf"'empty' has a zero-byte .jpg \(in {re.escape(shards[0])} at byte \d+\); "):
        data.load(shards, 12)  # evaluation's reader names them too


def test_truncated_tars_are_counted_when_indexed_and_when_streamed(tmp_path):
    shards, keys = _source(tmp_path, [30, 30])
    index = _whole(shards)  # indexed while intact; the second shard is cut afterwards
    raw = open(shards[1], "rb").read()
    open(shards[1], "wb").write(raw[:len(raw) // 2])
    loader = StreamLoader(ShardStream(index, 12, 10, AUG, seed=0), workers=2, max_bad_fraction=0.5)
    (epoch,) = _epochs(loader, 1)
    read = len(epoch)
    assert 30 < read < 60 and loader.skipped(0) == {"truncated_tar": 60 - read}
    cut = scratch_index(shards)
    assert len(cut) - 30 == read - 30 and cut.shard_lost.tolist() == [0, 1]  # without _info.json: the one cut
    full = data.SourceConfig(source="webdataset", urls=str(tmp_path / "{000000..000001}.tar"), size=60, num_classes=5)
    with pytest.raises(DataError, match=rf"hold {read} readable samples \(at least 1 lost to truncated"):
        data.check_source(full, cut)  # what the tar lost beyond its cut sample is not known
    (tmp_path / "_info.json").write_text(json.dumps({"splits": {"train": {
        "filenames": ["000000.tar", "000001.tar"], "shard_lengths": [30, 30]}}}))
    assert scratch_index(shards).shard_lost.tolist() == [0, 60 - read]
    with pytest.raises(DataError, match=rf"hold {read} readable samples \({60 - read} lost to truncated"):
        data.check_source(full, scratch_index(shards))
    src = data.SourceConfig(source="webdataset", urls=str(tmp_path / "{000000..000001}.tar"), size=40, num_classes=5)
    with pytest.raises(DataError, match=rf"indexing webdataset: {60 - read} of 60 samples unreadable .*truncated_tar"):
        data.prepare(src, tmp_path / "cache")


def test_inception_box_stays_inside_the_image_with_area_and_aspect_in_range():
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, w, h = inception_box(300, 200, 0.05, rng)
        assert 0 <= left and left + w <= 300 and 0 <= top and top + h <= 200
    areas = [np.prod(inception_box(200, 200, 0.05, rng)[2:]) / 40000 for _ in range(2000)]
    assert 0.04 < min(areas) < 0.07 and max(areas) > 0.95 and 0.4 < np.mean(areas) < 0.55  # ~U(0.05, 1)
    assert center_box(300, 200) == (50, 0, 200, 200)


def test_train_and_eval_transforms_on_a_large_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:200, :400]
    image = np.repeat(((xx + yy) * 150 // 600).astype(np.uint8)[..., None], 3, axis=2)  # a dark gradient ...
    image[:, 100:300] = 255  # ... either side of a white centre square
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    _shard(tmp_path / "big.tar", [("big", {"jpg": buf.getvalue(), "cls": b"0"})])
    (center,) = data.load([str(tmp_path / "big.tar")], 32).images  # the evaluation path: one batch from shards
    assert center.shape == (32, 32, 3) and center.min() > 200  # resize + centre crop keeps only the square
    assert np.array_equal(center, eval_image(buf.getvalue(), 32))
    crops = [train_image(buf.getvalue(), 24, AUG, rng) for _ in range(50)]  # decoded at 1/2..1/8 scale (draft)
    assert all(c.shape == (24, 24, 3) and c.dtype == np.uint8 for c in crops)
    assert len({c.tobytes() for c in crops}) > 30 and min(c.mean() for c in crops) < 150 < max(c.mean() for c in crops)
    with pytest.raises(OSError, match="image file is truncated"):
        train_image(buf.getvalue()[:2000], 24, AUG, rng)  # a truncated image is never accepted


@pytest.mark.parametrize("workers", [0, 3])
def test_streamed_pipe_urls_are_read_exactly_once_with_bad_samples_counted(tmp_path, workers):
    """`pipe:` URLs cannot be read by offset: they go through webdataset's gopen and the shuffle buffer."""
    shards, keys = _source(tmp_path, [23, 9])
    (tmp_path / "c").mkdir()
    corrupt = _corrupt_source(tmp_path / "c")
    urls = [f"pipe:cat {path}" for path in shards + corrupt]
    index = scratch_index(urls)
    assert not any(index.shard_seekable) and len(index) == 32 + 45
    rows = data.nested_subset(index, 70, seed=0)
    subset = _keys(rows, shards + corrupt)
    loader = StreamLoader(ShardStream(rows, 12, 8, AUG, seed=0, shuffle_buffer=10), workers,
                          max_bad_fraction=0.5)
    good = {k for k in subset if k.startswith(("s", "g"))}
    for keys_of_epoch in _epochs(loader, 2):
        assert Counter(keys_of_epoch) == Counter(good)
    assert sum(loader.skipped(0).values()) == len(subset) - len(good)


@pytest.mark.parametrize("start", [3, 4, 5])
def test_a_streamed_source_resumed_at_any_step_replays_the_same_batches(tmp_path, start):
    """Shards read only as streams (`pipe:`), through 2 loader workers: a resume at a step that is not a multiple of
    the workers gives the uninterrupted run's batches from there on (each step reads from the part its step number
    names, not the part of the worker that happens to serve it), so no sample is read twice in an epoch."""
    shards, keys = _source(tmp_path, [20, 20])
    rows = _whole([f"pipe:cat {path}" for path in shards])
    make = lambda: StreamLoader(ShardStream(rows, 12, 4, AUG, seed=3, shuffle_buffer=4), workers=2)  # noqa: E731
    first = _steps(make(), 12)  # 10 steps an epoch
    resumed = _steps(make(), 12 - start, start_step=start)
    assert [b.keys for b in resumed] == [b.keys for b in first[start:]]
    epoch = [k for b in first[:start] + resumed[:10 - start] for k in b.keys]
    assert Counter(epoch) == Counter(keys)


def test_translate_pads_with_a_black_border_in_the_stream():
    """A white image shifted by up to 4 px in the loader's workers shows a black border, and reaches the model as
    white and black only (the model input, in [-1, 1])."""
    import torch

    from pipelines.loop import to_input

    aug = Augment(crop="translate", crop_padding=4, flip=False)
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 255, np.uint8)).save(buf, format="PNG")
    rng = np.random.default_rng(0)
    streamed = np.stack([train_image(buf.getvalue(), 16, aug, rng) for _ in range(64)])
    assert streamed.shape == (64, 16, 16, 3) and set(np.unique(streamed).tolist()) == {0, 255}
    shifted = (streamed == 0).any(axis=(1, 2, 3))
    assert shifted.mean() > 0.9  # all but the unshifted ones: 1 offset of 81
    x = to_input(streamed, 16, torch.device("cpu"))
    assert set(torch.unique(x).tolist()) == {-1.0, 1.0}  # white, and a black border where shifted
    assert 0.1 < (x == -1.0).float().mean() < 0.3


def test_a_remote_source_is_indexed_from_its_sidecars_without_reading_its_shards(tmp_path):
    """The shard writer leaves `<shard>.tar.idx.json` beside each shard; a `pipe:` source reads those alone."""
    from pipelines.data.writer import write_shard

    rng = np.random.default_rng(0)
    for s in range(3):
        write_shard(tmp_path / f"train-{s}.tar", ((f"{s}-{i:02d}", rng.integers(0, 255, (24, 24, 3), dtype=np.uint8),
                                                   i % 4) for i in range(30)))
    log = tmp_path / "read.log"
    cat = tmp_path / "cat.py"  # a `cat` that logs what it sends: the bytes a remote read would download
    cat.write_text("import sys\ndata = open(sys.argv[1], 'rb').read()\n"
                   f"open({str(log)!r}, 'a').write(f'{{sys.argv[1]}} {{len(data)}}\\n')\n"
                   "sys.stdout.buffer.write(data)\n")
    urls = [f"pipe:{sys.executable} {cat} {tmp_path}/train-{s}.tar" for s in range(3)]
    remote, local = scratch_index(urls), scratch_index([str(tmp_path / f"train-{s}.tar") for s in range(3)])
    for column in ("key", "label", "offset", "size", "shard_end", "shard_lost"):
        assert np.array_equal(getattr(remote, column), getattr(local, column))
    read = [line.split() for line in log.read_text().splitlines()]
    # Only sidecars (each read for the index key, then for the rows), never a shard.
    assert sorted({path for path, _ in read}) == [f"{tmp_path}/train-{s}.tar.idx.json" for s in range(3)]
    tar_bytes = sum((tmp_path / f"train-{s}.tar").stat().st_size for s in range(3))
    assert sum(int(n) for _, n in read) < tar_bytes / 5  # headers and labels, not images
    (tmp_path / "train-1.tar.idx.json").unlink()  # no sidecar: that shard is streamed to index it
    assert np.array_equal(scratch_index(urls).key, local.key)
    assert f"{tmp_path}/train-1.tar " in log.read_text()


@pytest.mark.parametrize("size,padding", [(8, 1), (16, 4), (9, 7), (8, 8), (8, 12)])
def test_the_translate_is_a_crop_of_the_zero_padded_image(size, padding):
    """`augment_decoded` shifts by slicing into a black image: the same pixels and draws as np.pad, then crop."""
    aug = Augment(crop="translate", crop_padding=padding, flip=True)
    image = np.random.default_rng(size).integers(1, 256, (size, size, 3), dtype=np.uint8)
    for seed in range(40):
        got = augment_decoded(image, aug, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        flipped = image[:, ::-1] if rng.random() < 0.5 else image
        dy, dx = rng.integers(0, 2 * padding + 1, 2)
        padded = np.pad(flipped, ((padding, padding), (padding, padding), (0, 0)))
        assert np.array_equal(got, padded[dy:dy + size, dx:dx + size]) and got.flags.c_contiguous


@pytest.mark.parametrize("workers", [0, 2])
def test_decoded_images_are_kept_across_epochs_with_the_same_batches(tmp_path, monkeypatch, workers):
    """With a fixed decode (translate crop), each loader process decodes a subset sample once, not once per epoch,
    and the batches (pixels, labels, keys, bad counts) equal decoding every epoch; unreadable samples are counted
    again in every epoch. A subset over `decoded_cache_mb`, or a random crop, decodes every time."""
    import pipelines.data.stream as stream

    shards = _corrupt_source(tmp_path)  # 40 good samples, 5 unreadable (2 of them undecodable images)
    subset = _whole(shards)
    aug = Augment(crop="translate", crop_padding=2, flip=True)
    decodes = Counter()
    real = stream.train_decode
    monkeypatch.setattr(stream, "train_decode", lambda raw, *a: decodes.update([raw]) or real(raw, *a))

    def run(cache_mb, augment=aug):
        loader = StreamLoader(ShardStream(subset, 12, 9, augment, seed=0, decoded_cache_mb=cache_mb), workers,
                              max_bad_fraction=0.5)
        batches = _steps(loader, 15)  # 135 samples: 3 epochs of 45
        return batches, [loader.skipped(e) for e in range(3)]

    plain, plain_bad = run(0)
    decodes.clear()  # count the cached run's decodes alone
    kept, kept_bad = run(1)
    assert plain_bad == kept_bad and plain_bad[2] == {"checksum_mismatch": 1, "undecodable_image": 2,
                                                      "empty_member": 1, "missing_label": 1}
    for a, b in zip(plain, kept, strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    if workers == 0:  # the decodes are counted in this process
        assert len(decodes) == 42 and sorted(set(decodes.values())) == [1, 3]  # 40 kept once, 2 bad every epoch
        assert not ShardStream(subset, 12, 9, aug, seed=0, decoded_cache_mb=0).cache_decoded
        assert not ShardStream(subset, 12 * 64, 9, aug, seed=0, decoded_cache_mb=1).cache_decoded  # 45 x 1.7 MiB
        assert not ShardStream(subset, 12, 9, AUG, seed=0, decoded_cache_mb=1).cache_decoded  # inception: random


@pytest.mark.parametrize("start", [3, 8, 13])
def test_a_streamed_source_with_unreadable_samples_resumes_where_it_stopped(tmp_path, start):
    """Unreadable samples (each kind a reader meets, and a tar cut after indexing) in `pipe:` shards, 2 loader
    workers: each step takes its positions whether they read or not, so a resume (mid-epoch, or epochs in) gives the
    uninterrupted run's batches, and every epoch reads each readable sample once and counts each unreadable one."""
    shards, _ = _source(tmp_path, [20, 17])
    (tmp_path / "c").mkdir()
    urls = [f"pipe:cat {path}" for path in shards + _corrupt_source(tmp_path / "c")]
    rows = _whole(urls)  # 82 samples indexed; then the second shard loses its end
    raw = open(shards[1], "rb").read()
    open(shards[1], "wb").write(raw[:len(raw) // 2])
    readable = {k for k, *_ in data.reader.iter_encoded(urls, data.reader.BadCounts())} - {"header", "cut"}
    make = lambda: StreamLoader(ShardStream(rows, 12, 8, AUG, seed=3, shuffle_buffer=6), workers=2,  # noqa: E731
                                max_bad_fraction=0.5)
    first = _steps(make(), 24)  # 82 positions an epoch: 10.25 steps of 8
    resumed = _steps(make(), 24 - start, start_step=start)
    assert [b.keys for b in resumed] == [b.keys for b in first[start:]]
    for epoch in range(2):
        keys = [k for b in first for k, e in zip(b.keys, b.sample_epochs, strict=True) if e == epoch]
        assert Counter(keys) == Counter(readable)
    loader = make()
    _steps(loader, 24)  # each loader worker's part is 41 positions an epoch: 2 epochs by step 24
    assert sum(loader.skipped(0).values()) == sum(loader.skipped(1).values()) == 82 - len(readable)


def test_a_key_repeated_in_a_streamed_tar_is_read_once_per_epoch(tmp_path):
    """`duplicates: first` indexes a repeated key once; the stream reads it once too (its second copy took a
    position the epoch does not have, so later epochs and a resume drifted by one)."""
    rng = np.random.default_rng(0)
    samples = [(f"k{i:02d}", {"jpg": _jpeg(rng), "cls": b"1"}) for i in range(12)]
    _shard(tmp_path / "000000.tar", samples + [samples[3]])  # k03 again, at the tar's end
    index = data.SourceIndex(data.cached_index([f"pipe:cat {tmp_path}/000000.tar"], tmp_path / "index",
                                               duplicates="first"))
    rows = ShardSubset(index, np.arange(len(index), dtype=np.int64))
    make = lambda: StreamLoader(ShardStream(rows, 12, 4, AUG, seed=0, shuffle_buffer=4), workers=0)  # noqa: E731
    first = _steps(make(), 9)  # 3 steps an epoch
    for epoch in range(3):
        assert Counter(k for b in first[3 * epoch:3 * epoch + 3] for k in b.keys) == Counter(k for k, _ in samples)
    assert [b.keys for b in _steps(make(), 4, start_step=5)] == [b.keys for b in first[5:]]
