"""The deployment API as an ASGI app, without a broker: a fake sink records what it publishes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from modelcd.events.schemas import DeployRequested, Event, ModelState, RetireRequested
from modelcd.ingest.api import ApiConfig, DeploymentApi
from modelcd.ingest.tracking import TrackingView
from modelcd.store.blobs import LocalStore
from modelcd.store.targets import TargetState


class FakeSink:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish(self, event: Event, *, event_id: str | None = None) -> None:
        self.events.append(event)


def client_for(tmp_path: Path, *, token: str | None = None, limit: int = 1 << 20,
               file_dirs: tuple[str, ...] = ()) -> tuple[httpx.AsyncClient, FakeSink, LocalStore]:
    store, sink = LocalStore(tmp_path / "store"), FakeSink()
    app = DeploymentApi(ApiConfig(api_token=token, max_upload_bytes=limit, file_uri_dirs=file_dirs), store, sink,
                        TrackingView())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest"), sink, store


async def test_raw_tar_upload_is_staged_and_published(tmp_path: Path) -> None:
    """A raw tar body is staged under uploads/, published as DeployRequested, and answered 202 + Location."""
    client, sink, store = client_for(tmp_path)
    async with client:
        resp = await client.post("/deployments?owner=bob", content=b"archive-bytes",
                                 headers={"content-type": "application/x-tar"})
        assert resp.status_code == 202
        body = resp.json()
        assert resp.headers["location"] == f"/deployments/{body['deployment_id']}"
        (event,) = sink.events
        assert isinstance(event, DeployRequested) and event.owner == "bob"
        assert event.package_uri == f"store:uploads/{body['deployment_id']}.tar"
        assert await store.get(event.package_uri.removeprefix("store:")) == b"archive-bytes"
        status = await client.get(resp.headers["location"])
        assert status.status_code == 200 and status.json()["status"] == "pending"


async def test_multipart_upload_takes_the_package_field(tmp_path: Path) -> None:
    """A multipart form upload stages the `package` file part."""
    client, sink, store = client_for(tmp_path)
    async with client:
        resp = await client.post("/deployments", files={"package": ("m.tar", b"tar-bytes", "application/x-tar")})
        assert resp.status_code == 202
        key = sink.events[0].package_uri.removeprefix("store:")  # type: ignore[attr-defined]
        assert await store.get(key) == b"tar-bytes"


async def test_bearer_token_required_when_configured(tmp_path: Path) -> None:
    """With a token configured, requests without it get 401 (and /healthz stays open)."""
    client, sink, _ = client_for(tmp_path, token="s3cret")
    async with client:
        resp = await client.get("/models")
        assert resp.status_code == 401 and "bearer" in resp.json()["error"].lower()
        assert resp.headers["www-authenticate"].startswith("Bearer")
        assert (await client.get("/models", headers={"authorization": "Bearer wrong"})).status_code == 401
        assert (await client.get("/models", headers={"authorization": "Bearer s3cret"})).status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        assert sink.events == []


async def test_oversize_body_is_413(tmp_path: Path) -> None:
    """A body over the limit is refused with 413, whether declared by Content-Length or streamed chunked."""
    client, sink, store = client_for(tmp_path, limit=1000)
    async with client:
        resp = await client.post("/deployments", content=b"x" * 1001, headers={"content-type": "application/x-tar"})
        assert resp.status_code == 413 and "limit" in resp.json()["error"]

        async def chunks():  # no Content-Length: the limit applies while reading
            for _ in range(5):
                yield b"y" * 400

        resp = await client.post("/deployments", content=chunks(), headers={"content-type": "application/x-tar"})
        assert resp.status_code == 413
    assert sink.events == [] and await store.list("") == []


@pytest.mark.parametrize("body", [b"{not json", b'{"package_uri": 3}', b'{"uri": "s3://b/k"}',
                                  b'{"package_uri": "http://x/y.tar"}', b'{"package_uri": "s3://b/k", "sha256": "x"}'])
async def test_malformed_json_is_400(tmp_path: Path, body: bytes) -> None:
    """Malformed JSON, wrong types, unknown fields and unsupported URIs are 400s with a reason."""
    client, sink, _ = client_for(tmp_path)
    async with client:
        resp = await client.post("/deployments", content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error"]
    assert sink.events == []


async def test_json_request_is_published_as_is(tmp_path: Path) -> None:
    """A JSON request pointing at a package is published unchanged, nothing staged; only the accepted request is
    on record (ingest resumes it after a restart that lost the topic)."""
    client, sink, store = client_for(tmp_path)
    async with client:
        resp = await client.post("/deployments", json={"package_uri": "s3://bucket/m.tar", "owner": "eve"})
        assert resp.status_code == 202
    (event,) = sink.events
    assert isinstance(event, DeployRequested) and event.package_uri == "s3://bucket/m.tar" and event.owner == "eve"
    assert await store.list("") == [f"requests/{event.deployment_id}.json"]


async def test_file_uri_refused_unless_its_directory_is_allowed(tmp_path: Path) -> None:
    """file:// through the API: 400 with one message for any path by default; accepted under an allowed dir."""
    client, sink, _ = client_for(tmp_path)
    async with client:
        answers = set()
        for path in ("/etc/passwd", "/nonexistent/x.tar", "/proc/self/fd/0", str(tmp_path)):
            resp = await client.post("/deployments", json={"package_uri": f"file://{path}"})
            assert resp.status_code == 400, resp.text
            answers.add(resp.json()["error"])
        assert len(answers) == 1 and "MODELCD_FILE_URI_DIRS" in answers.pop()
    allowed, sink2, _ = client_for(tmp_path, file_dirs=(str(tmp_path / "pkgs"),))
    async with allowed:
        ok = await allowed.post("/deployments", json={"package_uri": f"file://{tmp_path}/pkgs/m.tar"})
        out = await allowed.post("/deployments", json={"package_uri": f"file://{tmp_path}/pkgs/../m.tar"})
    assert ok.status_code == 202 and out.status_code == 400
    assert sink.events == [] and len(sink2.events) == 1


@pytest.mark.parametrize("expiry", ["0", "-5", "1000000000000000000000000000000"])
async def test_unbounded_or_nonpositive_expiry_is_400(tmp_path: Path, expiry: str) -> None:
    """An expiry of 0, negative or 10^30 seconds is refused (400) on the upload and the JSON door alike."""
    client, sink, store = client_for(tmp_path)
    async with client:
        upload = await client.post(f"/deployments?expiry_seconds={expiry}", content=b"x",
                                   headers={"content-type": "application/x-tar"})
        body = await client.post("/deployments", content=f'{{"package_uri": "s3://b/k", "expiry_seconds": {expiry}}}',
                                 headers={"content-type": "application/json"})
    assert upload.status_code == 400 and body.status_code == 400, (upload.text, body.text)
    assert "expiry_seconds" in upload.json()["error"] and "expiry_seconds" in body.json()["error"]
    assert sink.events == [] and await store.list("") == []


async def test_routes_and_methods(tmp_path: Path) -> None:
    """Unknown routes are 404, wrong methods 405, unsupported content types 415, unknown deployments 404."""
    client, _, _ = client_for(tmp_path)
    async with client:
        assert (await client.get("/nope")).status_code == 404
        assert (await client.put("/deployments")).status_code == 405
        assert (await client.post("/deployments", content=b"x", headers={"content-type": "text/plain"})).status_code == 415
        assert (await client.get("/deployments/unknown")).status_code == 404
        assert (await client.get("/models/iris")).status_code == 404


async def test_404s_name_the_command_that_lists_what_exists(tmp_path: Path) -> None:
    """The CLI shows the API's 404 as it is: each names the `modelcd` command that lists what exists."""
    client, _, _ = client_for(tmp_path)
    async with client:
        for path, command in [("/deployments/abc", "`modelcd deployments --since 1d`"),
                              ("/models/iris", "`modelcd models`")]:
            r = await client.get(path)
            assert r.status_code == 404 and command in r.json()["error"], r.text
        r = await client.delete("/models/iris/versions/9")
        assert r.status_code == 404 and "`modelcd models`" in r.json()["error"], r.text


async def test_retire_unknown_is_404_known_is_published(tmp_path: Path) -> None:
    """DELETE answers 404 for a model the target state lacks, 202 + RetireRequested for one it has."""
    client, sink, store = client_for(tmp_path)
    await TargetState(store).put_model(ModelState(name="iris", version="1", target="serving", owner="ann"))
    async with client:
        assert (await client.delete("/models/iris/versions/2")).status_code == 404
        resp = await client.delete("/models/iris/versions/1")
        assert resp.status_code == 202
        listed = (await client.get("/models")).json()["models"]
        assert [(m["name"], m["version"], m["state"]) for m in listed] == [("iris", "1", "serving")]
    (event,) = sink.events
    assert isinstance(event, RetireRequested) and (event.model, event.version) == ("iris", "1")


async def test_multipart_with_two_packages_or_cut_short_is_a_400(tmp_path: Path) -> None:
    """Two `package` fields, two unnamed files, or a body without its closing boundary: a 400, nothing staged;
    a `package` field beside another file still deploys the package."""
    client, sink, store = client_for(tmp_path)
    async with client:
        for files in ([("package", ("a.tar", b"a")), ("package", ("b.tar", b"b"))],
                      [("x", ("a.tar", b"a")), ("y", ("b.tar", b"b"))]):
            r = await client.post("/deployments", files=files)
            assert r.status_code == 400 and "one package archive per request" in r.json()["error"], r.text
        cut = b'--x\r\nContent-Disposition: form-data; name="package"; filename="m.tar"\r\n\r\npartial-tar'
        r = await client.post("/deployments", content=cut, headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 400 and "closing boundary" in r.json()["error"], r.text
        assert sink.events == []
        r = await client.post("/deployments", files=[("notes", ("README", b"hi")), ("package", ("m.tar", b"tar"))])
        assert r.status_code == 202, r.text
        assert await store.get(sink.events[0].package_uri.removeprefix("store:")) == b"tar"  # type: ignore[attr-defined]
