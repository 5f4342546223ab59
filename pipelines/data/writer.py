"""Writing webdataset shards (procedural data is written as shards and read back through the reader that reads a
user's ImageNet-21k shards: image + `.cls`), each with its sidecar index beside it."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pipelines import atomic
from pipelines.data.sources import SIDECAR_VERSION, sidecar_url


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_samples(path: Path, samples: Iterable[dict]) -> int:
    """Write webdataset samples (`{"__key__": ..., "<ext>": bytes}`) to one tar, atomically, then its sidecar.

    Returns:
        number of samples written.
    """
    path = Path(path)
    tmp = atomic.temp_name(path)
    count = 0
    try:
        with wds.TarWriter(str(tmp)) as sink:
            for sample in samples:
                sink.write(sample)
                count += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_sidecar(path)
    return count


def write_shard(path: Path, samples: Iterable[tuple[str, np.ndarray, int]]) -> int:
    """Write (key, uint8 image, label) samples to one tar as PNG + `.cls`; returns the number written."""
    return write_samples(path, ({"__key__": key, "png": encode_png(image), "cls": str(label).encode()}
                                for key, image, label in samples))


def sidecar_of(rows) -> dict:
    """A shard's sidecar content from its `index.ShardRows`."""
    return {"version": SIDECAR_VERSION, "keys": rows.keys, "labels": rows.labels, "offsets": rows.offsets,
            "sizes": rows.sizes}


def write_sidecar(path: Path) -> None:
    """Index a local shard and store that beside it, so a remote copy is indexed without reading it."""
    from pipelines.data.scan import scan_shard

    store_sidecar(path, scan_shard(str(path)))


def store_sidecar(path: Path, rows) -> None:
    """Store a shard's rows (`index.ShardRows`) as its sidecar."""
    atomic.write_bytes(Path(sidecar_url(str(path))), json.dumps(sidecar_of(rows)).encode())
