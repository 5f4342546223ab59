"""Fixtures of the study tests: the smoke study, run once per session and read by every test that only looks at a
finished study; an S3 server on 127.0.0.1 (moto's standalone server) for `--storage s3://...`."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest

from tests.conftest import run_cli

MOTO = shutil.which("moto_server", path=os.path.dirname(sys.executable))
SECRET = "never-log-this-3f9a"  # a distinctive fake secret: tests grep what a study wrote for it


@pytest.fixture(scope="session")
def smoke(tmp_path_factory, cache_dir):
    """`python -m study.run --grid configs/smoke.yaml` as a user runs it: (its --out folder, the finished process).
    Tests that read it must not change what it wrote, except by adding to it (a comparison on its parent run)."""
    out = tmp_path_factory.mktemp("runs")
    proc = run_cli(["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(out)], cache_dir)
    return out, proc


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT

    @property
    def host(self) -> str:
        return self.endpoint.removeprefix("http://")

    def uri(self, bucket: str, path: str = "") -> str:
        """A `pyarrow.fs` URI of `bucket/path` on this server (what `--storage` takes)."""
        return (f"s3://{bucket}/{path}".rstrip("/") +
                f"?endpoint_override={self.host}&scheme=http&allow_bucket_creation=true")

    def client(self):
        """A boto3 client of this server (credentials from the environment, as every reader here takes them)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object in `bucket`, by key."""
        client = self.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def s3_server():
    """An S3 endpoint on 127.0.0.1 (one per test module) and credentials in the standard environment variables
    (fake ones, the secret distinctive: `SECRET`)."""
    assert MOTO, "moto_server is a dev dependency (moto[server]): pip install -e '.[dev]'"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": SECRET,
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            env.setenv(name, value)
        yield S3Server(f"http://127.0.0.1:{port}")
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def s3(s3_server) -> str:
    """A storage root (`--storage`) in a bucket of the S3 server."""
    return s3_server.uri("study-bucket", "runs")
