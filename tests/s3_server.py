"""A real S3-compatible server on loopback for tests: moto's standalone server, in a thread.

    with s3_server() as server:          # sets AWS_* variables for this process and its children
        server.create_bucket("ckpt")
        ... "s3://ckpt/run/step-1" ...

The server binds 127.0.0.1 on a port the OS picks (port 0), so there is no
free-port race, and it speaks the S3 HTTP protocol, so s3fs and boto3 talk to
it exactly as to AWS. The environment carries the endpoint
(``AWS_ENDPOINT_URL``) and dummy credentials, so worker processes started by
the test inherit them; everything is restored when the block ends.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["S3Server", "s3_server"]

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that could send requests elsewhere or change how they are signed.
_CLEARED = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
)


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str

    def client(self) -> Any:
        """A boto3 S3 client bound to this server (for setup and for tampering)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=_ENV["AWS_DEFAULT_REGION"],
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)


@contextmanager
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1", host
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*_ENV, *_CLEARED, "AWS_ENDPOINT_URL", "NO_PROXY", "no_proxy")}
    try:
        for k in _CLEARED:
            os.environ.pop(k, None)
        os.environ.update(_ENV)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
        yield S3Server(endpoint)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
