"""Pytest plugin: a real S3 endpoint over HTTP (moto's threaded server) on a free port.

`s3_endpoint` is one server per session (moto keeps its state in memory; tests stay
apart by using their own bucket); `s3_store_url` gives each test a fresh bucket.
Fake AWS credentials are put in `os.environ` for the session and restored after,
so botocore never reads the developer's real ones.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
# Removed for the session: they would point botocore at a real profile or endpoint.
_CLEARED_AWS_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """`http://127.0.0.1:PORT` of a moto S3 server running for the whole session."""
    from moto.server import ThreadedMotoServer

    saved = {name: os.environ.get(name) for name in (*_FAKE_AWS_ENV, *_CLEARED_AWS_ENV)}
    os.environ.update(_FAKE_AWS_ENV)
    for name in _CLEARED_AWS_ENV:
        os.environ.pop(name, None)
    # Port 0: the OS picks a free port when the server binds, so there is no race.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_store_url(s3_endpoint: str) -> str:
    """A `s3://bucket-<uuid8>/prefix` URL in a bucket no other test uses (created on open)."""
    return f"s3://bucket-{uuid.uuid4().hex[:8]}/prefix"
