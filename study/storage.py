"""The study's storage: one root (a local or NFS folder, or an `s3://` / `gs://` URI) that the driver and every node
see, read and written through `pyarrow.fs`. It holds Ray Tune's state, each grid point's checkpoints, its final
weights and the files the driver needs from it, under `points/<point id>/`, so nothing on the driver ever opens a
path that exists only on the node that trained a point.

Each file is written under a temporary name and moved into place, so a reader never sees half a file; a
checkpoint folder is complete once its `state.pt` (written last) exists.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from pipelines import checkpoint, pretrain, selection
from pipelines.config import UserError, first_line

POINTS = "points"  # every grid point's folder is under it
_SCHEMES = {"s3", "gs", "gcs", "hdfs", "abfs", "abfss", "az", "http", "https", "file", "mock"}  # what `s3//x` meant
TMP = ".tmp-"  # in the name of a file `_put` is still writing (it is moved to its own name when whole)
CHUNK = 8 << 20  # bytes per read and write when a file is copied to or from storage


@dataclass(frozen=True)
class PointFiles:
    """Every file and folder of one grid point, relative to the storage root: the one place that names them.

    The layout is part of a study's state (a rerun resumes from it), so a name here never changes."""

    point_id: str

    @property
    def folder(self) -> str:
        return f"{POINTS}/{self.point_id}"

    def file(self, name: str) -> str:
        return f"{self.folder}/{name}"

    @property
    def record(self) -> str:
        """The point's `PointRecord` (written after pretraining and after each evaluation)."""
        return self.file("record.json")

    @property
    def data_stamp(self) -> str:
        """What pretraining started on (`Stamps.weights`), written when it starts from step 0: a run resumed from its
        checkpoints on files changed since is found (`study.plan`), and the record keeps it."""
        return self.file("data.json")

    @property
    def checkpoints(self) -> str:
        """The newest few pretraining checkpoints (deleted once the weights and record are stored)."""
        return self.file("checkpoints")

    @property
    def weights(self) -> str:
        return self.file(pretrain.WEIGHTS_FILE)

    @property
    def best_weights(self) -> str:
        """The best step's weights (`pretrain.select: best`), beside the last step's."""
        return self.file(selection.BEST_FILE)

    def kept_weights(self, select_best: bool) -> str:
        """The weights a point's evaluations use."""
        return self.best_weights if select_best else self.weights

    @property
    def model_spec(self) -> str:
        """{"model", "num_classes", "image_size", "options"}: what rebuilds the module the weights belong to
        (`models.build`; `options`: the knobs set to non-defaults)."""
        return self.file("model.json")

    @property
    def pretrain_summary(self) -> str:
        return self.file("pretrain.json")

    @property
    def class_counts(self) -> str:
        return self.file("class_counts.json")

    @property
    def preempted(self) -> str:
        """Present while a preempted worker stores its checkpoint (`study.interrupt.preemption`)."""
        return self.file("preempted")

    @property
    def fig7(self) -> str:
        """A ViT's Fig 7 arrays (`pipelines.diagnostics.to_bytes`), drawn by the driver."""
        return self.file("fig7.safetensors")

    @property
    def curves(self) -> str:
        """Every curve the point's trial emitted, {prefix: {step: {name: value}}} (`study.trial.CurveLog`): what a
        later invocation logs to MLflow where the live writes were lost (a tracking outage, a killed driver)."""
        return self.file("curves.json")

    def logged(self) -> list[tuple[str, str | None]]:
        """(file, MLflow artifact folder) of the stored files a point's child run holds besides its record:
        the weights (the best step's too, where kept) and their spec under `model/`, which a later invocation
        fetches back."""
        return [(self.weights, "model"), (self.best_weights, "model"), (self.model_spec, "model"),
                (self.class_counts, None)]


_USERINFO = re.compile(r"(?<=://)[^/@?]*@")  # s3://KEY:SECRET@bucket
_SECRET_PARAM = re.compile(r"([?&][^=&]*(?:secret|token|password|access_key|key_id)[^=&]*=)[^&]*", re.IGNORECASE)


def redact(uri: str) -> str:
    """`uri` with the credentials it may carry (`s3://KEY:SECRET@bucket`, `?secret_key=...`) replaced by `***`."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub("***@", uri))


class Storage:
    """A storage root and paths relative to it (a point's: `PointFiles`)."""

    def __init__(self, root: str):
        local = "://" not in root
        # A local root as an absolute path: trials receive it, and a relative one would name another folder in their
        # working directory (Tune's trial folder, a cluster node's own).
        self.root = os.path.abspath(root) if local and root else root
        if local and (scheme := re.match(r"([A-Za-z][A-Za-z0-9+.-]+)(:/|//)", root)) and (
                ":" in scheme.group(0) or scheme.group(1).lower() in _SCHEMES):
            raise UserError(f"--storage {redact(root)}: a URI with a mangled '://' (it would be a local folder named "
                            f"after it); write {scheme.group(1)}://..., or give a local path")
        if not local and redact(root) != root:  # Ray would store the URI in its experiment state, and we print it
            raise UserError(f"--storage {redact(root)}: credentials in the URI would be printed and stored; put them "
                            "in the standard environment variables (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                            "GOOGLE_APPLICATION_CREDENTIALS) instead")
        try:
            self.fs, base = pafs.FileSystem.from_uri(Path(root).resolve().as_uri() if local else root)
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise UserError(f"--storage {root}: cannot open it ({err})") from None
        self.base = base.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    def check(self, write: bool) -> None:
        """Object storage answers, and (`write`) takes a write: one line before any work instead of the first
        write's traceback once the data are prepared (a bucket that is not there, an endpoint down, credentials
        refused). The dry run only reads; a local root is checked as a folder (`run.check_folders`)."""
        if self.local_path("") is not None:
            return
        try:
            self.fs.get_file_info(self.path(""))
            if write:
                probe = f".write-check-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                self.write_bytes(probe, b"")
                self.delete_file(probe)
        except OSError as err:
            raise UserError(f"--storage {redact(self.root)}: cannot {'write' if write else 'read'} there "
                            f"({first_line(err)}); "
                            "check the bucket, the endpoint and the credentials (AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS)") from None

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}".rstrip("/")

    def for_ray(self, rel: str) -> dict:
        """`rel` as a Ray `RunConfig`'s `storage_path` and `storage_filesystem`. Ray gets our filesystem rather than
        the URI: appending to a URI would land in its query (`?endpoint_override=...`), and a filesystem opened with
        credentials from the environment carries none into what Ray pickles into storage."""
        local = self.local_path(rel)
        if local is not None:
            return {"storage_path": str(local), "storage_filesystem": None}
        return {"storage_path": self.path(rel), "storage_filesystem": self.fs}

    def local_path(self, rel: str) -> Path | None:
        """The path on this machine, for a local root (Ray's `storage_path` and the user's messages)."""
        return Path(self.path(rel)) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write `rel` whole (`_put`)."""
        self._put(rel, lambda out: out.write(data))

    def upload_file(self, local: Path, rel: str) -> None:
        """Copy a local file to `rel` in chunks (an index column of a web-scale source is gigabytes: never whole in
        memory), whole or not at all (`_put`)."""
        with open(local, "rb") as src:
            self._put(rel, lambda out: shutil.copyfileobj(src, out, CHUNK))

    def _put(self, rel: str, fill) -> None:
        """Write `rel` by `fill(stream)` under a temporary name, moved into place when whole (on a local disk, the
        bytes synced before it: a machine that goes down right after the move leaves the file whole, not empty). A
        failed write leaves no part of it under `rel` (closing an object store's stream would complete a cut upload
        there), and its temporary file is removed."""
        target = self.path(rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        tmp = f"{target}{TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open_output_stream(tmp) as out:
                fill(out)
            if isinstance(self.fs, pafs.LocalFileSystem):
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self.fs.move(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            raise

    def sizes(self, rel: str) -> dict[str, int]:
        """Name -> size in bytes of the whole files directly under `rel` (empty when it does not exist): not those a
        writer is still filling under a temporary name."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return {info.base_name: info.size for info in infos
                if info.type == pafs.FileType.File and TMP not in info.base_name}

    def download_file(self, rel: str, local: Path) -> bool:
        """Copy `rel` to the local file `local` in chunks, through a temporary name; False where `rel` is absent."""
        from pipelines import atomic

        try:
            src = self.fs.open_input_stream(self.path(rel))
        except FileNotFoundError:
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.temp_name(local)
        try:
            with src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def delete_file(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass

    def list_dir(self, rel: str) -> list[str]:
        """Names directly under `rel` (empty when it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(info.base_name for info in infos)

    def delete_dir(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))

    # Checkpoints: the newest few of a point, as written by `pipelines.checkpoint`.

    def push_checkpoint(self, folder: Path, rel: str, keep: int) -> None:
        """Copy a local checkpoint folder to `rel/<its name>`, `state.pt` last, and keep the newest `keep`."""
        files = sorted(folder.iterdir(), key=lambda p: p.name == "state.pt")
        for f in files:
            self.upload_file(f, f"{rel}/{folder.name}/{f.name}")
        names = [n for n in self.list_dir(rel) if n.startswith(checkpoint.PREFIX)]
        for old in names[:-keep]:
            self.delete_dir(f"{rel}/{old}")

    def newest_checkpoint(self, rel: str) -> str | None:
        """The name of the newest complete checkpoint under `rel`."""
        done = [n for n in self.list_dir(rel) if n.startswith(checkpoint.PREFIX)
                and self.exists(f"{rel}/{n}/state.pt")]
        return done[-1] if done else None

    def pull_checkpoint(self, rel: str, name: str, local_root: Path) -> Path:
        """Bring checkpoint `rel/name` into `local_root/name` (state.pt last, so a partial copy is never taken)."""
        target = local_root / name
        files = sorted(self.list_dir(f"{rel}/{name}"), key=lambda n: n == "state.pt")
        for f in files:
            self.download_file(f"{rel}/{name}/{f}", target / f)
        return target
