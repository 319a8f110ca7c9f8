"""An S3-compatible server for the object-storage tests and benchmarks: moto's server mode (``moto.server``,
which implements the S3 API over HTTP), started once per test run as a subprocess on a free
port, with one bucket. Every process the tests start reaches it through ``LAMINA_S3_ENDPOINT_URL``
and the usual ``AWS_*`` credentials (moto accepts any)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from server.processes import free_port

BUCKET = "lamina-test"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str

    def store_url(self) -> str:
        """A fresh prefix in the bucket, for one store."""
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"

    @property
    def options(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint_url}


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start moto's S3 server, create the bucket, yield, stop it."""
    os.environ.update(CREDENTIALS)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.put(f"{endpoint}/{BUCKET}", timeout=2).raise_for_status()  # create the bucket
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)
        yield S3Server(endpoint)
    finally:
        process.terminate()
        process.wait(timeout=10)
