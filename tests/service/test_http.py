"""The HTTP API over real HTTP: Ray Serve on a local Ray, two workers, the tiny model, the
store on S3 (moto's server over HTTP).

Sessions, edits (stale ones refused, masks uploaded), images, jobs with their event stream
(steps included), tenants, bad input, backpressure, timeouts, a worker killed mid-edit, a
session deleted under its job, metrics, and the OpenAPI document (schemathesis)."""

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from urllib.parse import quote

import httpx2 as httpx
import numpy as np
import pytest
import ray
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from polling import wait_until
from ray import serve
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from fisedit.engine.config import EditConfig, EngineConfig, GenerationParams
from fisedit.service import deploy
from fisedit.service.commands import add_serve_arguments
from fisedit.service.config import (
    HttpConfig,
    QueueLimits,
    RetryPolicy,
    ServiceConfig,
    StoreConfig,
    WorkerResources,
)
from fisedit.service.http import (
    ApiError,
    Gateway,
    _job_events,
    build_app,
    hash_key,
    local_config,
    serve_cli_app,
)
from fisedit.service.names import ROUTER

STEPS = 4
TIMEOUT = 240
KEYS = {"alice": "alice-secret-key", "bob": "bob-secret-key"}
BUCKET = "http-api"


@pytest.fixture(scope="module")
def config(tiny_model_dir, tmp_path_factory, s3_endpoint, s3_client, free_port) -> ServiceConfig:
    s3_client.create_bucket(Bucket=BUCKET)
    keys_file = tmp_path_factory.mktemp("secrets") / "api-keys.json"
    keys_file.write_text(json.dumps({tenant: hash_key(key) for tenant, key in KEYS.items()}))
    return ServiceConfig(
        model=tiny_model_dir,
        engine=EngineConfig(progress=False, edit=EditConfig(mask_steps=1)),
        store=StoreConfig(url=f"s3://{BUCKET}/service", endpoint_url=s3_endpoint),
        namespace=f"test-{uuid.uuid4().hex[:8]}",
        workers=2,
        worker_resources=WorkerResources(num_cpus=1),
        queue=QueueLimits(max_edits_per_job=3),
        retry=RetryPolicy(attempts=3, backoff_s=0.2),
        call_timeout_s=TIMEOUT,
        http=HttpConfig(
            port=free_port(),
            api_keys_file=str(keys_file),
            max_in_flight_per_tenant=2,
            max_prompt_chars=200,
            max_body_bytes=1 << 16,
            max_mask_bytes=4096,
            max_steps=8,
            max_image_side=128,
        ),
    )


@pytest.fixture(scope="module")
def base_url(config) -> str:
    """The service on one local Ray and Serve for the module (its actors inherit the S3
    endpoint's credentials from the environment)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=2,
            object_store_memory=150 * 2**20,
            include_dashboard=False,
            log_to_driver=False,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": config.http.port})
        serve.run(build_app(config), name="fisedit", route_prefix="/")
        yield f"http://127.0.0.1:{config.http.port}"
        serve.shutdown()
        deploy.stop(config)
        ray.shutdown()


def _client(base_url: str, tenant: str | None = "alice", key: str | None = None):
    headers = {}
    if tenant is not None:
        headers["Authorization"] = f"Bearer {key or KEYS[tenant]}"
    return httpx.Client(base_url=base_url, headers=headers, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def alice(base_url):
    with _client(base_url) as client:
        yield client


@pytest.fixture(scope="module")
def bob(base_url):
    with _client(base_url, "bob") as client:
        yield client


@pytest.fixture(scope="module")
def session(alice) -> dict:
    """A session of alice's, generated once for the module."""
    made = alice.post("/v1/sessions", json={"prompt": "a cat on a bench", "steps": STEPS})
    assert made.status_code == 201, made.text
    return made.json()


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _png(array: np.ndarray) -> str:
    """A PNG as JSON carries it: base64."""
    return base64.b64encode(_png_bytes(array)).decode()


def _stored(s3_client, prefix: str) -> list[str]:
    """Keys in the tenant's part of the bucket under `prefix`, read behind the service."""
    root = "service/tenants/local/"
    listing = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=root + prefix)
    return [item["Key"].removeprefix(root) for item in listing.get("Contents", [])]


def _events(stream) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of a Server-Sent Events stream, as they arrive."""
    kind = None
    for line in stream.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield kind, json.loads(line[6:])


def _image(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.array(Image.open(io.BytesIO(response.content)))


def _field(response, status: int) -> list:
    """The location of the first problem a 4xx answer names."""
    assert response.status_code == status, response.text
    return response.json()["detail"][0]["loc"]


def test_a_whole_session_over_http(alice, s3_client):
    made = alice.post("/v1/sessions", json={"prompt": "a cat on a bench", "steps": STEPS})
    assert made.status_code == 201, made.text
    session_id = made.json()["session_id"]
    assert made.json()["version"] == 0 and len(session_id) == 32
    assert _image(alice.get(made.json()["image_url"])).shape == (128, 128, 3)

    mask = np.zeros((32, 32), np.uint8)  # the latent size
    mask[8:24, 8:24] = 255
    edits = f"/v1/sessions/{session_id}/edits"
    upload = {"mask": ("mask.png", _png_bytes(mask), "image/png")}
    first = alice.post(edits, data={"prompt": "a dog on a bench", "extends": "0"}, files=upload)
    second = alice.post(edits, json={"prompt": "a dog on a red bench"}, headers={"If-Match": '"1"'})
    mask_key = f"sessions/{session_id}/v1/mask.png"
    third = alice.post(edits, json={"prompt": "a fox on a red bench", "mask_key": mask_key})

    # An edit of an older version: a branch off it, after the newest.
    branch = {"prompt": "a cat on a red bench", "from_version": 1}
    fourth = alice.post(edits, json=branch, headers={"If-Match": '"3"'})

    assert [r.status_code for r in (first, second, third, fourth)] == [200] * 4, first.text
    assert [r.json()["version"] for r in (first, second, third, fourth)] == [1, 2, 3, 4]
    assert first.json()["cache_path"] == "hit"
    assert 0 < first.json()["mask_ratio"] < 1 and 0 < first.json()["mac_fraction"] < 1
    history = alice.get(f"/v1/sessions/{session_id}").json()["versions"]
    assert [v["prompt"] for v in history] == [
        "a cat on a bench",
        "a dog on a bench",
        "a dog on a red bench",
        "a fox on a red bench",
        "a cat on a red bench",
    ]
    assert [v["parent"] for v in history] == [None, 0, 1, 2, 1]
    stored_mask = _image(alice.get(first.json()["mask_url"]))
    assert set(np.unique(stored_mask)) == {0, 255}
    assert stored_mask.mean() == pytest.approx(255 * first.json()["mask_ratio"])

    assert alice.delete(f"/v1/sessions/{session_id}").status_code == 204
    assert alice.get(f"/v1/sessions/{session_id}").status_code == 404
    assert alice.get(first.json()["image_url"]).status_code == 404
    assert _stored(s3_client, f"sessions/{session_id}/") == []
    assert _stored(s3_client, f"owners/alice/sessions/{session_id}") == []


def test_a_stale_version_is_refused_and_the_session_is_unchanged(alice, session):
    edits = f"/v1/sessions/{session['session_id']}/edits"
    current = len(alice.get(f"/v1/sessions/{session['session_id']}").json()["versions"]) - 1
    stale = current + 5

    by_header = alice.post(edits, json={"prompt": "a dog"}, headers={"If-Match": str(stale)})
    by_body = alice.post(edits, json={"prompt": "a dog", "extends": stale})

    assert by_header.status_code == by_body.status_code == 409
    assert "version" in by_header.json()["detail"][0]["msg"]
    history = alice.get(f"/v1/sessions/{session['session_id']}").json()["versions"]
    assert len(history) == current + 1


def test_another_tenant_gets_404_and_no_key_401(base_url, alice, bob, session):
    session_id = session["session_id"]
    chain, key = {"prompt": "a cat", "steps": STEPS}, {"Idempotency-Key": "same-key"}
    job = alice.post("/v1/jobs", json=chain, headers=key).json()
    bobs = bob.post("/v1/jobs", json=chain, headers=key).json()

    assert bobs["job_id"] != job["job_id"]  # an idempotency key is its tenant's own

    assert bob.get(f"/v1/sessions/{session_id}").status_code == 404
    assert bob.get(session["image_url"]).status_code == 404
    assert bob.post(f"/v1/sessions/{session_id}/edits", json={"prompt": "x"}).status_code == 404
    assert bob.delete(f"/v1/sessions/{session_id}").status_code == 404
    assert bob.get(f"/v1/jobs/{job['job_id']}").status_code == 404
    assert bob.post(f"/v1/jobs/{job['job_id']}/cancel").status_code == 404
    assert bob.get(job["events_url"]).status_code == 404
    assert bob.get(f"/v1/sessions/{job['session_id']}").status_code == 404
    assert job["job_id"] not in [j["job_id"] for j in bob.get("/v1/jobs").json()]
    assert job["job_id"] in [j["job_id"] for j in alice.get("/v1/jobs").json()]
    with _client(base_url, None) as nobody, _client(base_url, "bob", "wrong") as wrong:
        for client in (nobody, wrong):
            refused = client.get(f"/v1/sessions/{session_id}")
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"steps": STEPS}, 422, ["body", "prompt"]),
        ({"prompt": "a cat", "steps": 1}, 422, ["body", "steps"]),
        ({"prompt": "a cat", "scheduler": "nope"}, 422, ["body", "scheduler"]),
        ({"prompt": "a cat", "colour": "red"}, 422, ["body", "colour"]),
        ({"prompt": "a cat " * 50}, 422, ["body", "prompt"]),
        ({"prompt": "a cat", "steps": STEPS, "width": 120}, 422, ["body", "width"]),  # 16s
    ],
)
def test_invalid_generations_are_refused_naming_the_field(alice, body, status, field):
    assert _field(alice.post("/v1/sessions", json=body), status) == field


def test_a_body_over_the_limit_is_refused_whether_or_not_it_declares_its_length(alice):
    body = json.dumps({"prompt": "a cat", "negative_prompt": "x" * (1 << 16)}).encode()

    declared = alice.post("/v1/sessions", content=body)
    chunked = alice.post("/v1/sessions", content=iter([body[:1000], body[1000:]]))

    assert "content-length" not in chunked.request.headers
    assert _field(declared, 413) == _field(chunked, 413) == ["body"]


def test_invalid_edits_are_refused_naming_the_field(alice, session):
    edits = f"/v1/sessions/{session['session_id']}/edits"
    big = np.random.default_rng(0).integers(0, 255, (128, 128), np.uint8)

    assert _field(alice.post(edits, json={"prompt": "a dog", "mask": "@@"}), 422)[-1] == "mask"
    not_png = base64.b64encode(b"not a png").decode()
    assert _field(alice.post(edits, json={"prompt": "a dog", "mask": not_png}), 422)[-1] == "mask"
    assert _field(alice.post(edits, json={"prompt": "a dog", "mask": _png(big)}), 413)[-1] == "mask"
    foreign = {"prompt": "a dog", "mask_key": "sessions/someone-else/v1/mask.png"}
    assert _field(alice.post(edits, json=foreign), 422)[-1] == "mask_key"
    both = alice.post(edits, json={"prompt": "a dog", "mask": not_png, "mask_key": "a.png"})
    assert _field(both, 422) == ["body"] and "mask_key" in both.json()["detail"][0]["msg"]
    too_late = alice.post(edits, json={"prompt": "a dog", "mask_steps": STEPS})
    assert _field(too_late, 422) == ["body", "mask_steps"]
    missing = {"prompt": "a dog", "mask_key": f"sessions/{session['session_id']}/v7/mask.png"}
    assert _field(alice.post(edits, json=missing), 422)[-1] == "mask_key"
    escape = {"prompt": "a dog", "mask_key": f"sessions/{session['session_id']}/v0/.."}
    assert _field(alice.post(edits, json=escape), 422)[-1] == "mask_key"
    bad_match = alice.post(edits, json={"prompt": "a dog"}, headers={"If-Match": "latest"})
    assert _field(bad_match, 422) == ["header", "If-Match"]
    wrong_size = alice.post(edits, json={"prompt": "a dog", "mask": _png(np.ones((40, 40), bool))})
    assert _field(wrong_size, 422)[-1] == "mask" and "size" in wrong_size.json()["detail"][0]["msg"]
    for prefer in ({}, {"Prefer": "respond-async"}):
        beyond = alice.post(edits, json={"prompt": "a dog", "from_version": 99}, headers=prefer)
        assert _field(beyond, 422) == ["body", "from_version"] and "not 99" in beyond.text
    new_branch = alice.post("/v1/jobs", json={"prompt": "a cat", "from_version": 0})
    assert _field(new_branch, 422) == ["body"] and "give it with session_id" in new_branch.text
    superscript = alice.post(edits, json={"prompt": "a dog"}, headers={"If-Match": b"\xb2"})
    assert _field(superscript, 422) == ["header", "If-Match"]
    assert _field(alice.post("/v1/sessions/no%20such/edits", json={"prompt": "x"}), 404)
    for ident in ("abc%0A", f"{session['session_id']}%0A"):
        assert _field(alice.get(f"/v1/sessions/{ident}"), 404) == ["path", "session_id"]
        assert _field(alice.get(f"/v1/jobs/{ident}"), 404) == ["path", "job_id"]
    assert _field(alice.post("/v1/jobs", json={"prompt": "a", "edits": [{}] * 2}), 422)
    for start in ({}, {"prompt": "a cat", "session_id": session["session_id"]}):
        no_start = alice.post("/v1/jobs", json=start | {"steps": STEPS})
        assert _field(no_start, 422) == ["body"]
        assert "give prompt (a new session) or session_id" in no_start.json()["detail"][0]["msg"]
    assert len(alice.get(f"/v1/sessions/{session['session_id']}").json()["versions"]) >= 1


def test_invalid_mask_uploads_are_refused_naming_the_field(alice, session):
    edits = f"/v1/sessions/{session['session_id']}/edits"
    versions = len(alice.get(f"/v1/sessions/{session['session_id']}").json()["versions"])

    def upload(png: bytes, **fields):
        files = {"mask": ("mask.png", png, "image/png")}
        return alice.post(edits, data={"prompt": "a dog", **fields}, files=files)

    noise = np.random.default_rng(0).integers(0, 255, (128, 128), np.uint8)
    assert _field(upload(_png_bytes(noise)), 413) == ["body", "mask"]  # over max_mask_bytes
    assert _field(upload(b"not a png"), 422) == ["body", "mask"]
    broken = bytearray(_png_bytes(np.ones((32, 32), bool)))
    broken[broken.index(b"IDAT") - 1] = 3  # its image data claims 3 bytes: a broken PNG
    assert _field(upload(bytes(broken)), 422) == ["body", "mask"]
    too_big = upload(_png_bytes(np.ones((2000, 2000), bool)))  # refused before decoding
    assert _field(too_big, 422) == ["body", "mask"] and "larger" in too_big.text
    wrong_size = upload(_png_bytes(np.ones((40, 40), bool)))
    assert _field(wrong_size, 422) == ["body", "mask"] and "latent size" in wrong_size.text
    empty = upload(_png_bytes(np.zeros((32, 32), bool)))
    assert _field(empty, 422) == ["body", "mask"] and "empty" in empty.text
    square = _png_bytes(np.ones((32, 32), bool))
    assert _field(upload(square, extends="latest"), 422) == ["body", "extends"]
    assert _field(upload(square, colour="red"), 422) == ["body", "colour"]
    assert _field(upload(square, prompt=""), 422) == ["body", "prompt"]
    two = alice.post(edits, data={"prompt": "a dog"}, files=[("mask", square), ("mask", square)])
    assert _field(two, 422) == ["body"]
    other_file = alice.post(edits, data={"prompt": "a dog"}, files={"x": square})
    assert _field(other_file, 422) == ["body", "x"]
    after = alice.get(f"/v1/sessions/{session['session_id']}").json()["versions"]
    assert len(after) == versions  # nothing refused made a version


def test_a_chain_job_streams_its_events_to_the_end(alice):
    chain = {
        "prompt": "a cat on a bench",
        "steps": STEPS,
        "seed": 3,
        "edits": [{"prompt": "a dog on a bench"}, {"prompt": "a dog on a red bench"}],
    }
    key = {"Idempotency-Key": f"chain-{uuid.uuid4().hex}"}
    job = alice.post("/v1/jobs", json=chain, headers=key)
    again = alice.post("/v1/jobs", json=chain, headers=key)
    assert job.status_code == again.status_code == 201, job.text
    assert again.json()["job_id"] == job.json()["job_id"]

    with alice.stream("GET", job.json()["events_url"]) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = list(_events(stream))

    kinds = [kind for kind, _ in events if kind != "step"]
    assert kinds == ["queued", "started", "generated", "edited", "edited", "succeeded", "end"]
    last = events[-1][1]
    assert last["state"] == "succeeded" and [v["version"] for v in last["results"]] == [1, 2]
    assert _image(alice.get(last["results"][-1]["image_url"])).shape == (128, 128, 3)
    # Each step event is of the edit running then (None: the base image), in order.
    steps, running = [], None
    for kind, data in events:
        if kind == "generated":
            running = 0
        elif kind == "edited":
            running = data["edit"] + 1
        elif kind == "step":
            assert data["edit"] == running and data["steps"] == STEPS, data
            steps.append((data["edit"], data["step"]))
    assert steps and steps == sorted(steps, key=lambda s: (-1 if s[0] is None else s[0], s[1]))
    assert all(1 <= step <= STEPS for _, step in steps)

    # Opened again after the third event (as a client whose stream ended does), it goes on
    # from the fourth; step events are not numbered.
    url, after_third = job.json()["events_url"], {"Last-Event-ID": "3"}
    with alice.stream("GET", url, headers=after_third) as stream:
        lines = [line for line in stream.iter_lines() if line.startswith(("id:", "event:"))]
    assert lines == [
        "id: 4", "event: edited", "id: 5", "event: edited", "id: 6", "event: succeeded",
        "event: end",
    ]  # fmt: skip
    assert _field(alice.get(url, headers={"Last-Event-ID": "x"}), 422) == [
        "header", "Last-Event-ID"
    ]  # fmt: skip


def test_a_stream_open_past_the_request_timeout_ends_with_continue_and_goes_on(alice, config):
    edits = [{"prompt": p} for p in ("a dog", "a dog on a bench", "a fox on a bench")]
    job = alice.post("/v1/jobs", json={"prompt": "a cat", "steps": 8, "edits": edits}).json()
    short = config.http.model_copy(update={"request_timeout_s": 1.0})

    async def stream(gateway: Gateway, after: int) -> list[str]:
        lines = []
        async for chunk in _job_events(gateway, "alice", job["job_id"], after):
            lines += [line for line in chunk.decode().splitlines() if line[:3] in ("id:", "eve")]
        return lines

    first = asyncio.run(stream(Gateway(config.model_copy(update={"http": short})), 0))
    assert first[-1] == "event: continue", first  # the job runs for seconds
    ids = [int(line[4:]) for line in first if line.startswith("id:")]
    rest = asyncio.run(stream(Gateway(config), ids[-1]))  # this one lasts until the job ends
    assert rest[-1] == "event: end"
    ids += [int(line[4:]) for line in rest if line.startswith("id:")]
    assert ids == list(range(1, len(ids) + 1)) and len(ids) == 1 + 1 + 1 + 3 + 1


def test_an_edit_with_prefer_respond_async_answers_202_with_a_job(alice, session):
    session_id = session["session_id"]
    current = len(alice.get(f"/v1/sessions/{session_id}").json()["versions"]) - 1

    accepted = alice.post(
        f"/v1/sessions/{session_id}/edits",
        json={"prompt": "a cat on a blue bench"},
        headers={"Prefer": "respond-async", "If-Match": str(current)},
    )

    assert accepted.status_code == 202, accepted.text
    with alice.stream("GET", f"/v1/jobs/{accepted.json()['job_id']}/events") as stream:
        for _ in stream.iter_lines():
            pass
    job = alice.get(accepted.json()["status_url"]).json()
    assert job["state"] == "succeeded" and job["results"][0]["version"] == current + 1


def test_queued_edits_with_bad_input_are_refused_at_once_naming_the_edit(alice, session):
    """An edit queued as a job (with `Prefer: respond-async`, or in a chain) is checked
    against its session before it is queued, as a synchronous edit is: a mask that does not
    fit gets a 422 naming it, no job is made, and the session keeps its version."""
    session_id = session["session_id"]
    versions = len(alice.get(f"/v1/sessions/{session_id}").json()["versions"])
    jobs = {job["job_id"] for job in alice.get("/v1/jobs").json()}
    wrong_size = {"prompt": "a dog", "mask": _png(np.ones((40, 40), bool))}

    queued = alice.post(
        f"/v1/sessions/{session_id}/edits", json=wrong_size, headers={"Prefer": "respond-async"}
    )
    assert _field(queued, 422) == ["body", "mask"] and "size" in queued.text
    empty = {"prompt": "a dog", "mask": _png(np.zeros((32, 32), bool))}
    chain = {"session_id": session_id, "steps": STEPS, "edits": [{"prompt": "a"}, empty]}
    chain = alice.post("/v1/jobs", json=chain)
    assert _field(chain, 422) == ["body", "edits", "1", "mask"] and "empty" in chain.text
    # A new session's edits are checked against the size it will have.
    new = alice.post("/v1/jobs", json={"prompt": "a cat", "steps": STEPS, "edits": [wrong_size]})
    assert _field(new, 422) == ["body", "edits", "0", "mask"]
    too_late = {"prompt": "a dog", "mask_steps": STEPS}
    new = alice.post("/v1/jobs", json={"prompt": "a cat", "steps": STEPS, "edits": [too_late]})
    assert _field(new, 422) == ["body", "edits", "0", "mask_steps"]

    assert {job["job_id"] for job in alice.get("/v1/jobs").json()} == jobs
    assert len(alice.get(f"/v1/sessions/{session_id}").json()["versions"]) == versions


def test_requests_past_a_tenants_bound_get_429_and_accepted_ones_finish(alice):
    def generate(seed: int):
        return alice.post("/v1/sessions", json={"prompt": "a cat", "steps": STEPS, "seed": seed})

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(generate, range(6)))

    statuses = sorted(a.status_code for a in answers)
    assert 429 in statuses and set(statuses) <= {201, 429}, statuses
    assert all(a.headers["retry-after"] == "2" for a in answers if a.status_code == 429)
    for made in (a.json() for a in answers if a.status_code == 201):
        assert alice.get(f"/v1/sessions/{made['session_id']}").status_code == 200


def test_probes_metrics_and_openapi(base_url, alice, session):
    with _client(base_url, None) as anyone:
        assert anyone.get("/healthz").json() == {"status": "ok"}
        assert anyone.get("/readyz").json()["workers"] == ["worker-0", "worker-1"]
        metrics = anyone.get("/metrics").text
        spec = anyone.get("/openapi.json").json()
        assert anyone.get("/docs").status_code == 200

    assert 'fisedit_http_requests_total{method="POST",route="/v1/sessions",status="201"}' in metrics
    assert 'fisedit_sessions{worker="worker-0"}' in metrics
    assert 'fisedit_jobs{state="queued"}' in metrics and "fisedit_cache_hit_ratio" in metrics
    assert 'fisedit_worker_calls{worker="worker-1"}' in metrics
    assert 'fisedit_tier_sessions{tier="device",worker="worker-0"}' in metrics
    assert {"/v1/sessions", "/v1/sessions/{session_id}/edits", "/v1/jobs/{job_id}/events"} <= set(
        spec["paths"]
    )
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    # The service's own limits, not the models' wider ones (max_steps 8, sides 128, 200 chars).
    generate = spec["components"]["schemas"]["GenerateBody"]["properties"]
    assert (generate["steps"]["maximum"], generate["negative_prompt"]["maxLength"]) == (8, 200)
    assert generate["height"]["anyOf"][0]["maximum"] == 128
    edit_body = spec["paths"]["/v1/sessions/{session_id}/edits"]["post"]["requestBody"]
    assert {
        c["schema"]["properties"]["prompt"]["maxLength"] for c in edit_body["content"].values()
    } == {200}


def test_deleting_a_session_stops_its_running_job_and_leaves_no_record(alice, s3_client):
    chain = {"prompt": "a cat on a bench", "steps": 8, "seed": 4}
    chain["edits"] = [{"prompt": p} for p in ("a dog on a bench", "a fox", "a fox at night")]
    key = {"Idempotency-Key": f"doomed-{uuid.uuid4().hex}"}
    job = alice.post("/v1/jobs", json=chain, headers=key).json()
    session_id = job["session_id"]

    with alice.stream("GET", job["events_url"]) as stream:
        events = _events(stream)
        next(kind for kind, _ in events if kind in ("step", "generated"))  # it runs
        deleted = alice.delete(f"/v1/sessions/{session_id}")
        rest = list(events)

    # Defined behaviour: the job stops and goes with its session; its stream ends with a
    # 404 error event; nothing of either is left in the store, ownership records included.
    assert deleted.status_code == 204, deleted.text
    assert rest[-1][0] == "error" and rest[-1][1]["status"] == 404
    assert rest[-1][1]["detail"][0]["type"] == "not_found"
    assert alice.get(f"/v1/jobs/{job['job_id']}").status_code == 404
    assert job["job_id"] not in [j["job_id"] for j in alice.get("/v1/jobs").json()]
    assert alice.get(f"/v1/sessions/{session_id}").status_code == 404
    for prefix in (f"sessions/{session_id}/", f"jobs/{job['job_id']}", "owners/alice/jobs/"):
        assert [k for k in _stored(s3_client, prefix) if job["job_id"] in k] == []
    assert _stored(s3_client, f"owners/alice/sessions/{session_id}") == []
    again = alice.post("/v1/jobs", json=chain | {"edits": []}, headers=key).json()
    assert again["job_id"] != job["job_id"]  # its idempotency key went with it


def test_a_worker_killed_during_a_synchronous_edit_fails_over_and_writes_nothing_half(
    alice, config, s3_client
):
    made = alice.post("/v1/sessions", json={"prompt": "a cat on a bench", "steps": 8, "seed": 9})
    session_id, holder = made.json()["session_id"], made.json()["worker_id"]
    worker = ray.get_actor(holder, namespace=config.namespace)

    with ThreadPoolExecutor(1) as pool:
        edits = f"/v1/sessions/{session_id}/edits"
        answer = pool.submit(alice.post, edits, json={"prompt": "a dog on a bench", "extends": 0})

        def running() -> bool:
            if ray.get(worker.stats.remote(), timeout=60)["queued"]:
                return True
            assert not answer.done(), answer.result().text
            return False

        wait_until(running, "edit started on the holder", 600, interval=0.01)
        ray.kill(worker, no_restart=False)  # Ray restarts it, empty
        edited = answer.result(timeout=600)

    # The router retried on the other worker, which rebuilt the session from the store
    # (unless the holder committed before it died: then that version is the answer).
    assert edited.status_code == 200, edited.text
    assert edited.json()["version"] == 1
    history = alice.get(f"/v1/sessions/{session_id}").json()["versions"]
    assert [(v["version"], v["prompt"]) for v in history] == [
        (0, "a cat on a bench"),
        (1, "a dog on a bench"),
    ]
    files = {"image.png", "report.json", "recipe.json"}
    stored = _stored(s3_client, f"sessions/{session_id}/")
    assert {k.split("/", 2)[2] for k in stored} >= {f"v{v}/{f}" for v in (0, 1) for f in files}
    assert {k.split("/")[2] for k in stored} == {"v0", "v1"}
    assert _image(alice.get(edited.json()["image_url"])).shape == (128, 128, 3)


def test_a_call_past_the_request_timeout_answers_504_with_a_json_body(alice, config, tmp_path):
    """(`alice` brings the service up.)"""
    tight = config.http.model_copy(update={"request_timeout_s": 0.5})
    gateway = Gateway(config.model_copy(update={"http": tight}))
    release = tmp_path / "release"

    def held(done: int, total: int) -> None:  # nested: Ray pickles it by value
        deadline = time.monotonic() + TIMEOUT
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    # A generation held at its first step until the test lets it go: no answer in time.
    params = GenerationParams(prompt="a cat", steps=STEPS)
    try:
        with pytest.raises(ApiError) as timed_out:
            asyncio.run(gateway.call(ROUTER, "generate", params, None, held))
    finally:
        release.touch()

    answer = timed_out.value.response()
    assert answer.status_code == 504 and answer.media_type == "application/json"
    assert json.loads(answer.body)["detail"][0]["type"] == "timeout"


def test_fisedit_serve_runs_the_embedded_defaults_anonymously_on_localhost(tmp_path):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)

    config = local_config(parser.parse_args(["--port", "9001"]))

    assert (config.model, config.workers, config.store.url) == ("tiny", 1, "fisedit-store")
    assert (config.http.host, config.http.port, config.http.anonymous) == ("127.0.0.1", 9001, True)
    # A config file, with the flags given set over it.
    (tmp_path / "service.yaml").write_text("workers: 3\nhttp: {port: 8100}\n")
    given = ["--config", str(tmp_path / "service.yaml"), "--store", str(tmp_path / "s")]
    from_file = local_config(parser.parse_args([*given, "--model", "tiny-sd2"]))
    assert (from_file.workers, from_file.http.port, from_file.model) == (3, 8100, "tiny-sd2")
    assert from_file.store.url == str(tmp_path / "s") and not from_file.http.anonymous
    with pytest.raises(ValueError, match="localhost only"):
        HttpConfig(host="0.0.0.0", anonymous=True)
    # Under `serve run`, Serve's http_options decide the address: anonymous mode is refused.
    with pytest.raises(ValueError, match="http.anonymous: anonymous mode is only for"):
        serve_cli_app(config)


def test_importing_the_app_module_reads_no_config_and_serve_run_gets_the_named_one(tmp_path):
    """`serve run fisedit.service.http:app` reads $FISEDIT_CONFIG when it asks for `app`;
    `fisedit serve` and Serve's replicas import the module without it."""
    code = (
        "import fisedit.service.http as http\n"
        "try:\n    http.app\nexcept OSError as error:\n    print('app:', error)\n"
    )
    environment = os.environ | {"FISEDIT_CONFIG": str(tmp_path / "missing.yaml")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=environment
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        done.stdout.strip()
        == f"app: [Errno 2] No such file or directory: '{tmp_path}/missing.yaml'"
    )


NASTY = [None, "", -1, 2**70, 1.5, "x" * 5000, "../../etc/passwd", "\u0000é", [], {"a": 1}, True]
NASTY_IDS = ["..", "a/../b", "x" * 300, "ab cd", "é", "%00", "-1", "0" * 32]
INVALID_BASE = {"prompt": "", "steps": 1, "mask_steps": -1}
"""Two invalid fields in every body, so that changing one never starts real work."""


def _operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield path, method.upper(), operation


def _body_fields(spec: dict, operation: dict) -> list[str]:
    content = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if content is None:
        return []
    schema = content["schema"]
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return list(schema["properties"])


def test_no_input_a_client_can_send_gets_a_5xx(alice, session):
    """A bounded sweep over the OpenAPI document: every operation, its path parameters and
    body fields set to ill-typed, out-of-range and hostile values, and bodies that are not
    JSON objects at all."""
    spec = alice.get("/openapi.json").json()
    ids = {"session_id": session["session_id"], "version": "0", "job_id": "0" * 32}
    answers = []
    for path, method, operation in _operations(spec):
        for name in ids:
            if "{" + name + "}" in path:
                for value in NASTY_IDS:
                    url = path.format(**ids | {name: quote(value, safe="")})
                    answers.append(alice.request(method, url, json=INVALID_BASE))
        url, fields = path.format(**ids), _body_fields(spec, operation)
        base = {k: v for k, v in INVALID_BASE.items() if k in fields}
        for field in fields:
            for value in NASTY:
                answers.append(alice.request(method, url, json=base | {field: value}))
        if fields:
            for raw in (b"not json", b"[1, 2]", b"1e999999", b"{" * 5000, b""):
                headers = {"Content-Type": "application/json"}
                answers.append(alice.request(method, url, content=raw, headers=headers))

    assert len(answers) > 250
    failures = [
        (a.request.method, str(a.request.url), a.status_code, a.text[:200]) for a in answers
    ]
    assert [f for f in failures if f[2] >= 500] == []


def test_a_full_replica_answers_503_and_a_tenant_past_its_share_429(tmp_path):
    http = HttpConfig(max_in_flight=2, max_in_flight_per_tenant=1, retry_after_s=3)
    gateway = Gateway(ServiceConfig(store=StoreConfig(url=str(tmp_path)), http=http))

    with gateway.admitted("alice"):
        with pytest.raises(ApiError) as over_share, gateway.admitted("alice"):
            pass
        with gateway.admitted("bob"), pytest.raises(ApiError) as full, gateway.admitted("carol"):
            pass
    with gateway.admitted("alice"):  # every slot came back
        pass

    assert (over_share.value.status, full.value.status) == (429, 503)
    assert over_share.value.headers == full.value.headers == {"Retry-After": "3"}


def test_open_event_streams_are_bounded_apart_from_requests(tmp_path):
    http = HttpConfig(max_in_flight=1, max_streams=2, max_streams_per_tenant=1, retry_after_s=3)
    gateway = Gateway(ServiceConfig(store=StoreConfig(url=str(tmp_path)), http=http))

    with gateway.admitted("alice", "stream"):
        with pytest.raises(ApiError) as over_share:
            gateway.check_room("alice", "stream")
        with gateway.admitted("bob", "stream"):
            with pytest.raises(ApiError) as full:
                gateway.check_room("carol", "stream")
            with gateway.admitted("alice"):  # a request still has its room
                pass
    with gateway.admitted("alice", "stream"):  # every slot came back
        pass

    assert (over_share.value.status, full.value.status) == (429, 503)
    assert over_share.value.msg == "over 1 open event streams; retry later"


SCHEMA_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
BOUNDED = settings(
    max_examples=6,
    deadline=timedelta(seconds=60),  # per example: a guard against a hang, not a benchmark
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    database=None,
)


def test_schemathesis_finds_no_5xx_and_every_answer_matches_the_openapi_document(base_url):
    """The document's examples, then valid and invalid requests generated from it, a few per
    operation (the service's small step and size limits keep any real work short)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    auth = {"Authorization": f"Bearer {KEYS['alice']}"}
    failures = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @BOUNDED
            @given(case=operation.as_strategy(mode))
            def check(case):
                case.call_and_validate(headers=auth, checks=SCHEMA_CHECKS, timeout=TIMEOUT)

            try:
                check()
            except Unsatisfiable:
                pass  # nothing invalid to send: no parameters, no body
            except (Exception, BaseExceptionGroup) as error:  # schemathesis' FailureGroup
                failures[f"{mode.value} {operation.label}"] = str(error)[:2000]

    assert failures == {}
