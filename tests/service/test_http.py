"""The HTTP API over real HTTP: Ray Serve on a local Ray, one worker, the tiny model.

Sessions, edits (stale ones refused), images, jobs with their event stream, tenants, bad
input, backpressure, metrics and the OpenAPI document."""

import argparse
import base64
import io
import json
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx2 as httpx
import numpy as np
import pytest
import ray
from PIL import Image
from ray import serve

from fisedit.engine.config import EditConfig, EngineConfig
from fisedit.service import deploy
from fisedit.service.commands import add_serve_arguments
from fisedit.service.config import (
    HttpConfig,
    RetryPolicy,
    ServiceConfig,
    StoreConfig,
    WorkerResources,
)
from fisedit.service.http import (
    ApiError,
    Gateway,
    build_app,
    hash_key,
    local_config,
)

STEPS = 4
TIMEOUT = 240
KEYS = {"alice": "alice-secret-key", "bob": "bob-secret-key"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def config(tiny_model_dir, tmp_path_factory) -> ServiceConfig:
    keys_file = tmp_path_factory.mktemp("secrets") / "api-keys.json"
    keys_file.write_text(json.dumps({tenant: hash_key(key) for tenant, key in KEYS.items()}))
    return ServiceConfig(
        model=tiny_model_dir,
        engine=EngineConfig(progress=False, edit=EditConfig(mask_steps=1)),
        store=StoreConfig(url=str(tmp_path_factory.mktemp("store"))),
        namespace=f"test-{uuid.uuid4().hex[:8]}",
        workers=1,
        worker_resources=WorkerResources(num_cpus=1),
        retry=RetryPolicy(attempts=3, backoff_s=0.2),
        call_timeout_s=TIMEOUT,
        http=HttpConfig(
            port=_free_port(),
            api_keys_file=str(keys_file),
            max_in_flight_per_tenant=2,
            max_prompt_chars=200,
            max_mask_bytes=4096,
        ),
    )


@pytest.fixture(scope="module")
def base_url(config) -> str:
    """The service on one local Ray and Serve for the module."""
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


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _image(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.array(Image.open(io.BytesIO(response.content)))


def _field(response, status: int) -> list:
    """The location of the first problem a 4xx answer names."""
    assert response.status_code == status, response.text
    return response.json()["detail"][0]["loc"]


def test_a_whole_session_over_http(alice):
    made = alice.post("/v1/sessions", json={"prompt": "a cat on a bench", "steps": STEPS})
    assert made.status_code == 201, made.text
    session_id = made.json()["session_id"]
    assert made.json()["version"] == 0 and len(session_id) == 32
    assert _image(alice.get(made.json()["image_url"])).shape == (128, 128, 3)

    mask = np.zeros((32, 32), np.uint8)  # the latent size
    mask[8:24, 8:24] = 255
    edits = f"/v1/sessions/{session_id}/edits"
    first = alice.post(edits, json={"prompt": "a dog on a bench", "mask": _png(mask), "extends": 0})
    second = alice.post(edits, json={"prompt": "a dog on a red bench"}, headers={"If-Match": '"1"'})
    mask_key = f"sessions/{session_id}/v1/mask.png"
    third = alice.post(edits, json={"prompt": "a fox on a red bench", "mask_key": mask_key})

    assert [r.status_code for r in (first, second, third)] == [200] * 3, first.text
    assert [r.json()["version"] for r in (first, second, third)] == [1, 2, 3]
    assert first.json()["cache_path"] == "hit"
    assert 0 < first.json()["mask_ratio"] < 1 and 0 < first.json()["mac_fraction"] < 1
    history = alice.get(f"/v1/sessions/{session_id}").json()["versions"]
    assert [v["prompt"] for v in history] == [
        "a cat on a bench",
        "a dog on a bench",
        "a dog on a red bench",
        "a fox on a red bench",
    ]
    assert set(np.unique(_image(alice.get(first.json()["mask_url"])))) <= {0, 255}

    assert alice.delete(f"/v1/sessions/{session_id}").status_code == 204
    assert alice.get(f"/v1/sessions/{session_id}").status_code == 404
    assert alice.get(first.json()["image_url"]).status_code == 404


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
    ],
)
def test_invalid_generations_are_refused_naming_the_field(alice, body, status, field):
    assert _field(alice.post("/v1/sessions", json=body), status) == field


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
    escape = {"prompt": "a dog", "mask_key": f"sessions/{session['session_id']}/v0/.."}
    assert _field(alice.post(edits, json=escape), 422)[-1] == "mask_key"
    bad_match = alice.post(edits, json={"prompt": "a dog"}, headers={"If-Match": "latest"})
    assert _field(bad_match, 422) == ["header", "If-Match"]
    assert _field(alice.post("/v1/sessions/no%20such/edits", json={"prompt": "x"}), 404)
    assert _field(alice.post("/v1/jobs", json={"prompt": "a", "edits": [{}] * 2}), 422)
    assert len(alice.get(f"/v1/sessions/{session['session_id']}").json()["versions"]) >= 1


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

    events = []
    with alice.stream("GET", job.json()["events_url"]) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            elif line.startswith("data: ") and events[-1] in ("edited", "end"):
                last = json.loads(line[6:])

    assert events == ["queued", "started", "generated", "edited", "edited", "succeeded", "end"]
    assert last["state"] == "succeeded" and [v["version"] for v in last["results"]] == [1, 2]
    assert _image(alice.get(last["results"][-1]["image_url"])).shape == (128, 128, 3)


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
        assert anyone.get("/readyz").json()["workers"] == ["worker-0"]
        metrics = anyone.get("/metrics").text
        spec = anyone.get("/openapi.json").json()
        assert anyone.get("/docs").status_code == 200

    assert 'fisedit_http_requests_total{method="POST",route="/v1/sessions",status="201"}' in metrics
    assert 'fisedit_sessions{worker="worker-0"}' in metrics
    assert 'fisedit_jobs{state="queued"}' in metrics and "fisedit_cache_hit_ratio" in metrics
    assert {"/v1/sessions", "/v1/sessions/{session_id}/edits", "/v1/jobs/{job_id}/events"} <= set(
        spec["paths"]
    )
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_fisedit_serve_runs_the_embedded_defaults_anonymously_on_localhost():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)

    config = local_config(parser.parse_args(["--port", "9001"]))

    assert (config.model, config.workers, config.store.url) == ("tiny", 1, "fisedit-store")
    assert (config.http.host, config.http.port, config.http.anonymous) == ("127.0.0.1", 9001, True)
    with pytest.raises(ValueError, match="localhost only"):
        HttpConfig(host="0.0.0.0", anonymous=True)


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
    name = content["schema"]["$ref"].rsplit("/", 1)[1]
    return list(spec["components"]["schemas"][name]["properties"])


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
