"""The HTTP API: a FastAPI ingress on Ray Serve in front of the router and the job queue.

The ingress holds no session state (any replica serves any request): it authenticates the
caller, checks the request, calls the SessionRouter or the JobQueue (named actors in the
config's namespace) and maps their answers and errors to HTTP.

Tenants: an API key (a bearer token) names its tenant; keys are stored as sha256 hashes.
What a tenant makes (sessions, jobs, and so their images) is recorded under
`owners/<tenant>/` in the store, and every read checks that record: another tenant's id is
answered 404, exactly as an unknown one.

    serve run deploy/serve.yaml                  # the whole service from one ServiceConfig
    serve run fisedit.service.http:app           # the same, config from $FISEDIT_CONFIG
"""

import argparse
import asyncio
import collections
import copy
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import ray
from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.deployment import Application
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fisedit.engine.config import GenerationParams, Prompt
from fisedit.engine.recipe import SessionRecipe
from fisedit.service import deploy
from fisedit.service.config import HttpConfig, ServiceConfig
from fisedit.service.jobs import (
    FINISHED,
    IDEMPOTENCY_KEY,
    ChainSpec,
    JobRecord,
    QueueFullError,
    one_start,
    root_cause,
)
from fisedit.service.names import JOB_QUEUE, ROUTER, worker_name
from fisedit.service.results import (
    STORE_ID,
    EditRequest,
    EditResult,
    EditSpec,
    StaleVersionError,
    is_store_id,
)
from fisedit.service.router import NoWorkerError
from fisedit.storage import ObjectNotFoundError, StorageError, validate_key

log = logging.getLogger(__name__)

CONFIG_ENV = "FISEDIT_CONFIG"
API_KEYS_ENV = "FISEDIT_API_KEYS"
UNLIMITED = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/"})
"""Paths outside the in-flight bounds: probes, scrapes and the studio's page (`/` and files
under /studio/) must answer under load."""
Slot = Literal["request", "stream"]
"""What a gateway bounds per replica and tenant: requests in flight, open event streams."""
SSE_WAIT_S = 15.0
"""Longest wait of an event stream for its job's next change (then it asks again)."""
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
STUDIO = Path(__file__).with_name("studio")
"""The edit studio's static page (served at `/`, its assets under /studio/)."""


# API keys


def hash_key(api_key: str) -> str:
    """The sha256 hex digest under which a key is stored."""
    return hashlib.sha256(api_key.encode()).hexdigest()


class ApiKeys:
    """Tenant of each API key, from hashes only; a lookup compares against every hash in
    constant time, so neither a key's validity nor its tenant leaks through timing."""

    def __init__(self, hashes: dict[str, str | list[str]]) -> None:
        self._hashes: list[tuple[bytes, str]] = []
        for tenant, digests in hashes.items():
            if "/" in tenant:
                raise ValueError(f"API keys: tenant {tenant!r} must not contain '/'")
            validate_key(tenant)
            for digest in [digests] if isinstance(digests, str) else digests:
                if len(digest) != 64:
                    raise ValueError(f"API keys: {tenant!r}: expected a sha256 hex digest")
                self._hashes.append((digest.lower().encode(), tenant))

    @classmethod
    def load(cls, http: HttpConfig) -> "ApiKeys":
        """From the config's keys file, else the FISEDIT_API_KEYS variable (same JSON)."""
        if http.api_keys_file is not None:
            text = Path(http.api_keys_file).read_text()
        else:
            text = os.environ.get(API_KEYS_ENV, "{}")
        return cls(json.loads(text))

    def tenant(self, api_key: str) -> str | None:
        digest, found = hash_key(api_key).encode(), None
        for stored, tenant in self._hashes:
            if hmac.compare_digest(stored, digest):
                found = tenant
        return found


# Errors


class ApiError(Exception):
    """A client error (or a retryable refusal), answered as FastAPI answers a bad request:
    {"detail": [{"loc": [...], "msg": ..., "type": ...}]}."""

    def __init__(
        self, status: int, loc: list[str], msg: str, kind: str, headers: dict | None = None
    ) -> None:
        super().__init__(msg)
        self.status, self.loc, self.msg, self.kind, self.headers = status, loc, msg, kind, headers

    def response(self) -> JSONResponse:
        detail = [{"loc": self.loc, "msg": self.msg, "type": self.kind}]
        return JSONResponse({"detail": detail}, self.status, headers=self.headers)


class Problem(BaseModel):
    loc: list[str | int] = Field(description="Where: body, path, query or header, then names.")
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error answer: what was wrong, and where."""

    detail: list[Problem]


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "A body that cannot be parsed.",
        401: "No API key, or an unknown one.",
        404: "No such thing of yours.",
        409: "A stale version.",
        413: "A body or mask over its size limit.",
        429: "Over the tenant's share of requests in flight; see Retry-After.",
        503: "The service is full or a part of it unavailable; see Retry-After.",
        504: "No answer in time (accepted work goes on).",
    }.items()
}
"""The error answers every operation may give (422 is FastAPI's own)."""


def _not_found(kind: str, ident: str) -> ApiError:
    return ApiError(404, ["path", f"{kind}_id"], f"unknown {kind} {ident!r}", "not_found")


def _field_of(message: str) -> tuple[list[str], str]:
    """Service errors read "field: reason" when they know the field the client sent (a
    dotted path, as `edits.1.mask`, for one inside a list)."""
    field, sep, reason = message.partition(": ")
    path = field.split(".")
    if sep and path[0].isidentifier() and all(p.isidentifier() or p.isdigit() for p in path):
        return ["body", *path], reason
    return ["body"], message


# Request and response bodies


class EditBody(EditSpec):
    """One edit: a new prompt and, optionally, a mask (PNG, base64) or the store key of a
    mask of one of your sessions (e.g. `sessions/<id>/v1/mask.png`)."""

    def spec(self) -> EditSpec:
        return EditSpec(**{name: getattr(self, name) for name in EditSpec.model_fields})


def _example(**body) -> ConfigDict:
    """An example body, for the docs page and for clients generated from the document."""
    return ConfigDict(json_schema_extra={"examples": [body]})


class SessionEditBody(EditBody):
    model_config = _example(prompt="a dog on a bench", extends=0)

    extends: int | None = Field(
        None, ge=0, description="The session's current version (or send it as If-Match)."
    )
    from_version: int | None = Field(
        None,
        ge=0,
        description="An older version to edit instead of the current one: the new version "
        "branches off it, and the later versions stay.",
    )


class GenerateBody(GenerationParams):
    """A new session's base image."""

    model_config = ConfigDict(frozen=True, extra="forbid") | _example(prompt="a cat", steps=4)


class JobBody(GenerateBody):
    """An edit chain: generate from `prompt` (or continue `session_id`), then the edits."""

    model_config = _example(prompt="a cat", steps=4, edits=[{"prompt": "a dog"}])

    prompt: Prompt | None = None
    session_id: str | None = Field(None, pattern=STORE_ID.pattern)
    from_version: int | None = Field(
        None, ge=0, description="With session_id: the version the first edit edits."
    )
    edits: list[EditBody] = Field(default_factory=list)

    _one_start = model_validator(mode="after")(one_start)


class Version(BaseModel):
    """A committed version of a session and what it cost."""

    session_id: str
    version: int
    parent: int | None = Field(description="The version this one was edited from.")
    prompt: str
    image_url: str
    mask_url: str | None
    mask_ratio: float
    mac_fraction: float
    latency_s: float
    dense_estimate_s: float | None
    cache_path: str
    worker_id: str

    @classmethod
    def of(cls, result: EditResult) -> "Version":
        base = f"/v1/sessions/{result.session_id}/versions/{result.version}"
        return cls(
            session_id=result.session_id,
            version=result.version,
            parent=result.report.base_version,
            prompt=result.report.prompt,
            image_url=f"{base}/image.png",
            mask_url=None if result.mask_key is None else f"{base}/mask.png",
            mask_ratio=result.mask_ratio,
            mac_fraction=result.mac_fraction,
            latency_s=result.latency_s,
            dense_estimate_s=result.dense_estimate_s,
            cache_path=result.cache_path,
            worker_id=result.worker_id,
        )


class History(BaseModel):
    session_id: str
    versions: list[Version]


class Job(BaseModel):
    job_id: str
    state: str
    session_id: str
    done: int
    total: int
    generated: Version | None
    results: list[Version]
    error: str | None
    events_url: str

    @classmethod
    def of(cls, record: JobRecord) -> "Job":
        done, total = record.progress
        return cls(
            job_id=record.job_id,
            state=record.state,
            session_id=record.session_id,
            done=done,
            total=total,
            generated=record.generated and Version.of(record.generated),
            results=[Version.of(r) for r in record.results],
            error=record.error,
            events_url=f"/v1/jobs/{record.job_id}/events",
        )


class Accepted(BaseModel):
    job_id: str
    status_url: str


# The per-replica state


class Metrics:
    """Request counts and latencies of this replica; service state is read at each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fisedit_http_requests", "HTTP requests", ["method", "route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "fisedit_http_request_seconds", "HTTP request latency", ["method", "route"],
            registry=self.registry,
        )  # fmt: skip
        self.rejected = Counter(
            "fisedit_http_rejected", "Requests refused by a bound", ["reason"],
            registry=self.registry,
        )  # fmt: skip


class Gateway:
    """What one ingress replica holds: keys, bounds, metrics, handles. No session state."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config, self.http = config, config.http
        self.keys = ApiKeys.load(self.http)
        self.store = config.store.open(f"tenants/{config.tenant}")
        self.metrics = Metrics()
        self.held: collections.Counter[tuple[Slot, str | None]] = collections.Counter()
        """Slots held, by kind and tenant (None: the replica's total)."""
        if self.http.anonymous:
            log.warning(
                "fisedit HTTP API in anonymous mode: no API key is checked, every request "
                "acts as tenant %r (for localhost only)",
                config.tenant,
            )

    def tenant(self, api_key: str | None) -> str | None:
        if self.http.anonymous:
            return self.config.tenant
        return None if api_key is None else self.keys.tenant(api_key)

    def check_room(self, tenant: str | None, slot: Slot = "request") -> None:
        """ApiError 503 if the replica's slots of this kind (a request in flight, an open
        event stream) are all held, 429 if the tenant holds its share of them."""
        retry = {"Retry-After": str(self.http.retry_after_s)}
        http = self.http
        limit, share, what = {
            "request": (http.max_in_flight, http.max_in_flight_per_tenant, "requests in flight"),
            "stream": (http.max_streams, http.max_streams_per_tenant, "open event streams"),
        }[slot]
        if self.held[slot, None] >= limit:
            self.metrics.rejected.labels("service_full").inc()
            raise ApiError(503, [], "the service is at capacity; retry later", "busy", retry)
        held = self.held[slot, tenant]
        if tenant is not None and held >= share:
            self.metrics.rejected.labels("tenant_limit").inc()
            raise ApiError(429, [], f"over {held} {what}; retry later", "rate", retry)

    @contextmanager
    def admitted(self, tenant: str | None, slot: Slot = "request"):
        """Holds a slot of this kind (see check_room, which raises when there is none)."""
        self.check_room(tenant, slot)
        keys = [(slot, None)] if tenant is None else [(slot, None), (slot, tenant)]
        self.held.update(keys)
        try:
            yield
        finally:
            self.held.subtract(keys)

    async def call(self, actor: str, method: str, *args, loc: list[str] | None = None) -> Any:
        """Calls a service actor; its errors come back as ApiErrors (or as themselves, for
        the server's own faults). `loc` names the input an invalid-input error is about."""
        try:
            handle = ray.get_actor(actor, namespace=self.config.namespace)
        except ValueError:  # not started, or restarting
            raise self.api_error(NoWorkerError(f"{actor} is not running"), loc) from None
        try:
            ref = getattr(handle, method).remote(*args)
            return await asyncio.wait_for(ref, self.http.request_timeout_s)
        except Exception as error:
            raise self.api_error(root_cause(error), loc) from error

    def api_error(self, error: BaseException, loc: list[str] | None) -> BaseException:
        retry = {"Retry-After": str(self.http.retry_after_s)}
        if isinstance(error, StaleVersionError):
            return ApiError(409, loc or ["body", "extends"], str(error), "stale_version")
        if isinstance(error, ObjectNotFoundError):  # its message names the store's URL
            return ApiError(404, loc or ["path"], f"no file {error.key!r}", "not_found")
        if isinstance(error, KeyError):  # an unknown session or job
            message = error.args[0] if error.args else str(error)
            return ApiError(404, loc or ["path"], str(message), "not_found")
        if isinstance(error, ValueError):
            field, reason = _field_of(str(error))
            return ApiError(422, loc or field, reason, "value_error")
        if isinstance(error, QueueFullError | NoWorkerError | RayActorError | StorageError):
            return ApiError(503, [], f"{type(error).__name__}: {error}", "unavailable", retry)
        if isinstance(error, TimeoutError):
            return ApiError(
                504, [], "no answer in time; accepted work goes on, see the history", "timeout"
            )
        return error

    # Ownership: owners/<tenant>/<kind>/<id>, an empty object per thing a tenant made.

    def own(self, tenant: str, kind: str, ident: str) -> None:
        self.store.put(f"owners/{tenant}/{kind}/{ident}", b"")

    def owns(self, tenant: str, kind: str, ident: str) -> bool:
        return is_store_id(ident) and self.store.exists(f"owners/{tenant}/{kind}/{ident}")

    def owned(self, tenant: str, kind: str) -> list[str]:
        return [key.rsplit("/", 1)[1] for key in self.store.list(f"owners/{tenant}/{kind}/")]

    def disown(self, tenant: str, kind: str, ident: str) -> None:
        self.store.delete(f"owners/{tenant}/{kind}/{ident}")

    def check_session(self, tenant: str, session_id: str) -> str:
        if not self.owns(tenant, "sessions", session_id):
            raise _not_found("session", session_id)
        return session_id

    def check_job(self, tenant: str, job_id: str) -> str:
        if not self.owns(tenant, "jobs", job_id):
            raise _not_found("job", job_id)
        return job_id

    def check_prompt(self, loc: list[str], prompt: str | None) -> None:
        if prompt is not None and len(prompt) > self.http.max_prompt_chars:
            raise ApiError(
                422, loc, f"{len(prompt)} characters, over {self.http.max_prompt_chars}", "length"
            )

    def check_generation(self, body: GenerateBody) -> None:
        """Prompt lengths, and the steps and image sides this service allows."""
        self.check_prompt(["body", "prompt"], body.prompt)
        self.check_prompt(["body", "negative_prompt"], body.negative_prompt)
        limits = {"steps": self.http.max_steps}
        limits |= dict.fromkeys(("height", "width"), self.http.max_image_side)
        for field, limit in limits.items():
            value = getattr(body, field)
            if value is not None and value > limit:
                raise ApiError(422, ["body", field], f"{value}, over {limit}", "too_large")

    def check_edit(self, tenant: str, loc: list[str], edit: EditBody) -> None:
        self.check_prompt([*loc, "prompt"], edit.prompt)
        if edit.mask is not None and len(edit.mask) > self.http.max_mask_bytes:
            raise ApiError(
                413, [*loc, "mask"], f"over {self.http.max_mask_bytes} bytes", "too_large"
            )
        if edit.mask_key is not None:
            parts = edit.mask_key.split("/")
            if not (
                len(parts) == 4
                and parts[0] == "sessions"
                and self.owns(tenant, "sessions", parts[1])
            ):
                raise ApiError(
                    422, [*loc, "mask_key"], "not a file of one of your sessions", "value_error"
                )

    async def scrape(self) -> bytes:
        """This replica's request metrics plus the service's state, in Prometheus text."""
        state = CollectorRegistry()
        stats = await self.call(ROUTER, "stats")
        jobs = await self.call(JOB_QUEUE, "list_jobs")
        paths = Gauge("fisedit_cache_path", "Edits by cache path", ["path"], registry=state)
        for path, count in stats["paths"].items():
            paths.labels(path).set(count)
        hits = sum(n for p, n in stats["paths"].items() if p == "hit")
        edits = sum(n for p, n in stats["paths"].items() if p != "generate")
        Gauge("fisedit_cache_hit_ratio", "Edits served from memory", registry=state).set(
            hits / edits if edits else 0.0
        )
        sessions = Gauge("fisedit_sessions", "Sessions held", ["worker"], registry=state)
        for worker in stats["workers"]:
            sessions.labels(worker).set(stats["held"].get(worker, 0))
        depth = Gauge("fisedit_jobs", "Jobs by state", ["state"], registry=state)
        for job_state in ("queued", "running", "succeeded", "failed", "cancelled"):
            depth.labels(job_state).set(sum(r.state == job_state for r in jobs))
        labels = ["worker", "tier"]
        tier_bytes = Gauge("fisedit_cache_bytes", "Cache bytes", labels, registry=state)
        tier_sessions = Gauge("fisedit_tier_sessions", "Sessions cached", labels, registry=state)
        queued = Gauge(
            "fisedit_worker_calls", "Calls queued or running on a worker", ["worker"],
            registry=state,
        )  # fmt: skip
        for index in range(self.config.workers):
            try:
                summary = await self.call(worker_name(index), "stats")
            except (ApiError, ValueError):
                continue
            worker = summary["worker_id"]
            queued.labels(worker).set(summary["queued"])
            for tier, usage in summary["tiers"].items():
                tier_bytes.labels(worker, tier).set(usage["bytes"])
                tier_sessions.labels(worker, tier).set(usage["sessions"])
        return generate_latest(self.metrics.registry) + generate_latest(state)


_gateway: Gateway | None = None
"""The replica's Gateway: one Ingress per replica process, made in its constructor."""


def gateway() -> Gateway:
    assert _gateway is not None, "the Ingress deployment makes the gateway"
    return _gateway


def _open_gateway(config: ServiceConfig) -> None:
    # Module-level, so it sets this module's global: Serve ships the Ingress class by value,
    # with its own copy of the globals its methods read.
    global _gateway
    deploy.start(config)  # idempotent: actors already up are found by name
    _gateway = Gateway(config)


# The FastAPI app

api = FastAPI(
    title="FISEdit",
    version="1",
    description="Text-to-image sessions edited a few words at a time, and edit-chain jobs.",
    responses=ERRORS,
)
bearer = HTTPBearer(auto_error=False, description="An API key; its tenant owns what it makes.")
GatewayDep = Annotated[Gateway, Depends(gateway)]


def caller(
    gw: GatewayDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The caller's tenant; 401 without a valid API key."""
    tenant = gw.tenant(credentials.credentials if credentials else None)
    if tenant is None:
        raise ApiError(
            401, ["header", "Authorization"], "missing or unknown API key", "unauthorized",
            {"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
    return tenant


TenantDep = Annotated[str, Depends(caller)]


@api.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return error.response()


@api.exception_handler(HTTPException)
async def _refused(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own refusals (a body it cannot parse, an unknown path or method), in the
    one error format."""
    loc = ["body"] if error.status_code == 400 else []
    refusal = ApiError(error.status_code, loc, str(error.detail), "refused", error.headers)
    return refusal.response()


@api.exception_handler(StorageError)
async def _store_unavailable(request: Request, error: StorageError) -> JSONResponse:
    """The ingress's own store calls (ownership records) failing: retryable."""
    log.warning("store error: %s", error)
    return gateway().api_error(error, None).response()


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
    return JSONResponse({"detail": detail}, 422)


class UndeclaredBodyLimit:
    """Reads a body that declares no length (sent chunked) before the app does, refusing it
    with 413 past the body limit; a declared length is checked before anything is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", ()))
        if scope["type"] != "http" or b"content-length" in headers:
            return await self.app(scope, receive, send)
        limit, chunks, size, more = gateway().http.max_body_bytes, [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > limit:
                refusal = ApiError(413, ["body"], f"over {limit} bytes", "too_large").response()
                return await refusal(scope, receive, send)
        body: Message | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)


api.add_middleware(UndeclaredBodyLimit)  # inside the one below, which measures its answers


@api.middleware("http")
async def _bounded_and_measured(request: Request, call_next: Callable) -> Response:
    """Refuses oversized bodies and requests past the in-flight bounds; counts and times
    every request by its route template."""
    gw, started = gateway(), time.perf_counter()
    try:
        length = int(request.headers.get("content-length") or 0)
    except ValueError:
        length = 0
    if length > gw.http.max_body_bytes:
        response = ApiError(
            413, ["body"], f"over {gw.http.max_body_bytes} bytes", "too_large"
        ).response()
    elif request.url.path in UNLIMITED or request.url.path.startswith("/studio/"):
        response = await call_next(request)
    else:
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth[:7].lower() == "bearer " else None
        try:
            with gw.admitted(gw.tenant(token)):
                response = await call_next(request)
        except ApiError as error:
            response = error.response()
    route = getattr(request.scope.get("route"), "path", "unmatched")
    gw.metrics.requests.labels(request.method, route, response.status_code).inc()
    gw.metrics.latency.labels(request.method, route).observe(time.perf_counter() - started)
    return response


@api.get("/healthz")
async def healthz() -> dict:
    """Liveness: this replica answers."""
    return {"status": "ok"}


@api.get("/readyz", responses={503: {"description": "No worker, or the store unreachable."}})
async def readyz(gw: GatewayDep) -> JSONResponse:
    """Readiness: workers up and the store reachable."""
    try:
        stats = await gw.call(ROUTER, "stats")
        gw.store.check()
    except Exception as error:
        return JSONResponse({"status": "unavailable", "reason": str(error)}, 503)
    if not stats["workers"]:
        return JSONResponse({"status": "unavailable", "reason": "no worker"}, 503)
    return JSONResponse({"status": "ready", "workers": stats["workers"]})


@api.get("/metrics", response_class=Response)
async def metrics(gw: GatewayDep) -> Response:
    """Prometheus text: requests, latencies, queue depth, cache paths, sessions per worker."""
    return Response(await gw.scrape(), media_type=CONTENT_TYPE_LATEST)


@api.post("/v1/sessions", status_code=201)
async def create_session(body: GenerateBody, tenant: TenantDep, gw: GatewayDep) -> Version:
    """Generates a new session's base image (version 0)."""
    gw.check_generation(body)
    session_id = os.urandom(16).hex()
    gw.own(tenant, "sessions", session_id)  # before it exists: no window without an owner
    params = GenerationParams(**body.model_dump())
    return Version.of(await gw.call(ROUTER, "generate", params, session_id))


def _if_match(if_match: str | None) -> int | None:
    """A version from an If-Match header: 3, "3" or W/"3"."""
    if if_match is None:
        return None
    return _header_number("If-Match", if_match.strip().removeprefix("W/").strip('"'), "a version")


def _header_number(header: str, text: str, what: str) -> int:
    """A header's non-negative integer; 422 naming the header if it is not one."""
    if not (text.isascii() and text.isdigit()):  # isdigit alone passes superscripts
        raise ApiError(422, ["header", header], f"expected {what} number", "value_error")
    return int(text)


def _form_schema() -> dict:
    """SessionEditBody as a form: the same fields, the mask a PNG file."""
    schema = SessionEditBody.model_json_schema()
    schema["properties"]["mask"] = {
        "type": "string", "format": "binary", "description": "A PNG, at latent or image size.",
    }  # fmt: skip
    return schema


EDIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SessionEditBody.model_json_schema()},
            "multipart/form-data": {"schema": _form_schema()},
        },
    }
}


async def edit_body(request: Request, gw: GatewayDep) -> SessionEditBody:
    """The edit a request sends: JSON (a mask as base64 or a store key) or a form with the
    mask as a PNG file."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type not in FORM_TYPES:
            return SessionEditBody.model_validate_json(await request.body())
        try:
            form = await request.form(max_files=1, max_fields=len(SessionEditBody.model_fields))
        except HTTPException as error:  # the form's own parse errors
            raise ApiError(422, ["body"], str(error.detail), "form") from None
        fields: dict[str, Any] = {}
        for name, value in form.multi_items():
            if not isinstance(value, UploadFile):
                fields[name] = value
            elif name != "mask":
                raise ApiError(422, ["body", name], "only the mask is a file", "value_error")
            elif (value.size or 0) > gw.http.max_mask_bytes:
                raise ApiError(
                    413, ["body", "mask"], f"over {gw.http.max_mask_bytes} bytes", "too_large"
                )
            else:
                fields[name] = await value.read()
        return SessionEditBody.model_validate(fields)
    except ValidationError as error:
        problems = [{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]
        raise RequestValidationError(problems) from None


@api.post(
    "/v1/sessions/{session_id}/edits",
    responses={202: {"model": Accepted}},
    openapi_extra=EDIT_BODY,
)
async def edit_session(
    session_id: str,
    tenant: TenantDep,
    body: Annotated[SessionEditBody, Depends(edit_body)],
    gw: GatewayDep,
    if_match: Annotated[str | None, Header()] = None,
    prefer: Annotated[str | None, Header()] = None,
) -> Version:
    """Edits the session to a new prompt; with `Prefer: respond-async`, queues it as a job
    and answers 202 with the job's id. The body is JSON, or a form whose `mask` is a PNG
    file."""
    gw.check_session(tenant, session_id)
    gw.check_edit(tenant, ["body"], body)
    extends = _if_match(if_match)
    if extends is not None and body.extends is not None and extends != body.extends:
        raise ApiError(
            422, ["header", "If-Match"], f"names {extends}, the body {body.extends}", "conflict"
        )
    extends = body.extends if extends is None else extends
    if prefer is not None and "respond-async" in prefer.lower():
        current = await gw.call(ROUTER, "version", session_id, loc=["path", "session_id"])
        if extends is not None and extends != current:
            raise ApiError(
                409, ["body", "extends"], f"session {session_id} is at version {current}",
                "stale_version",
            )  # fmt: skip
        spec = ChainSpec(session_id=session_id, from_version=body.from_version, edits=[body.spec()])
        try:
            job_id = await _submit(gw, tenant, spec)
        except ApiError as error:
            # The queue checks the chain's one edit (body.edits.0.mask): this body is it.
            if error.loc[:3] == ["body", "edits", "0"]:
                error.loc = ["body", *error.loc[3:]]
            raise
        accepted = Accepted(job_id=job_id, status_url=f"/v1/jobs/{job_id}")
        return JSONResponse(accepted.model_dump(), 202)
    request = EditRequest(**dict(body.spec()), extends=extends, from_version=body.from_version)
    return Version.of(await gw.call(ROUTER, "edit", session_id, request))


@api.get("/v1/sessions/{session_id}")
async def session_history(session_id: str, tenant: TenantDep, gw: GatewayDep) -> History:
    """Every committed version of the session, oldest first."""
    gw.check_session(tenant, session_id)
    results = await gw.call(ROUTER, "history", session_id, loc=["path", "session_id"])
    return History(session_id=session_id, versions=[Version.of(r) for r in results])


async def _version_file(
    gw: Gateway, tenant: str, session_id: str, version: int, name: str, media: str = "image/png"
):
    gw.check_session(tenant, session_id)
    key = f"sessions/{session_id}/v{version}/{name}"
    data = await gw.call(ROUTER, "read", key, loc=["path", "version"])
    return Response(data, media_type=media)


PNG = {200: {"content": {"image/png": {}}, "description": "A PNG."}}


@api.get("/v1/sessions/{session_id}/versions/{version}/image.png", responses=PNG)
async def version_image(
    session_id: str, version: Annotated[int, PathParam(ge=0)], tenant: TenantDep, gw: GatewayDep
) -> Response:
    return await _version_file(gw, tenant, session_id, version, "image.png")


@api.get("/v1/sessions/{session_id}/versions/{version}/mask.png", responses=PNG)
async def version_mask(
    session_id: str, version: Annotated[int, PathParam(ge=0)], tenant: TenantDep, gw: GatewayDep
) -> Response:
    return await _version_file(gw, tenant, session_id, version, "mask.png")


@api.get(
    "/v1/sessions/{session_id}/versions/{version}/recipe.json",
    responses={200: {"model": SessionRecipe, "description": "The session's recipe."}},
)
async def version_recipe(
    session_id: str, version: Annotated[int, PathParam(ge=0)], tenant: TenantDep, gw: GatewayDep
) -> Response:
    """The session's recipe at this version: the model, the generation settings and every
    edit up to it, enough to recompute the version exactly."""
    return await _version_file(
        gw, tenant, session_id, version, "recipe.json", media="application/json"
    )


@api.delete("/v1/sessions/{session_id}", status_code=204)
async def delete_session(session_id: str, tenant: TenantDep, gw: GatewayDep) -> Response:
    """Deletes the session, every file of it and every job on it. A job on it that has not
    finished stops; an edit it runs when the session is deleted finishes and is deleted too."""
    gw.check_session(tenant, session_id)
    jobs = await gw.call(JOB_QUEUE, "forget_session", session_id)
    try:
        await gw.call(ROUTER, "delete", session_id, loc=["path", "session_id"])
    except ApiError as error:
        if error.status != 404:  # else nothing committed yet: only the records go
            raise
    for job_id in jobs:
        gw.disown(tenant, "jobs", job_id)
    gw.disown(tenant, "sessions", session_id)
    return Response(status_code=204)


async def _submit(gw: Gateway, tenant: str, spec: ChainSpec) -> str:
    job_id = await gw.call(JOB_QUEUE, "submit", spec)
    gw.own(tenant, "jobs", job_id)
    if spec.session_id is None:
        gw.own(tenant, "sessions", job_id)  # a job's new session has the job's id
    return job_id


@api.post("/v1/jobs", status_code=201)
async def submit_job(
    body: JobBody,
    tenant: TenantDep,
    gw: GatewayDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Job:
    """Queues an edit chain. The same Idempotency-Key returns the same job."""
    gw.check_generation(body)
    limit = gw.config.queue.max_edits_per_job
    if len(body.edits) > limit:
        raise ApiError(422, ["body", "edits"], f"{len(body.edits)} edits, over {limit}", "length")
    for index, edit in enumerate(body.edits):
        gw.check_edit(tenant, ["body", "edits", str(index)], edit)
    if body.session_id is not None:
        gw.check_session(tenant, body.session_id)
    key = None
    if idempotency_key is not None:
        if not IDEMPOTENCY_KEY.match(idempotency_key):
            raise ApiError(
                422, ["header", "Idempotency-Key"], "1-128 letters, digits, '.', '-' or '_'",
                "value_error",
            )  # fmt: skip
        key = hash_key(f"{tenant}\0{idempotency_key}")  # a key is the tenant's own
    fields = body.model_dump(exclude={"edits"}, exclude_none=True)
    spec = ChainSpec(**fields, edits=[e.spec() for e in body.edits], idempotency_key=key)
    job_id = await _submit(gw, tenant, spec)
    return Job.of(await gw.call(JOB_QUEUE, "status", job_id))


@api.get("/v1/jobs")
async def list_jobs(tenant: TenantDep, gw: GatewayDep) -> list[Job]:
    """The caller's jobs: unfinished ones, and the newest finished ones the queue keeps in
    memory (`queue.kept_finished_jobs`); any job's status is still at /v1/jobs/{job_id}."""
    mine = set(gw.owned(tenant, "jobs"))
    return [Job.of(r) for r in await gw.call(JOB_QUEUE, "list_jobs") if r.job_id in mine]


@api.get("/v1/jobs/{job_id}")
async def job_status(job_id: str, tenant: TenantDep, gw: GatewayDep) -> Job:
    gw.check_job(tenant, job_id)
    return Job.of(await gw.call(JOB_QUEUE, "status", job_id, loc=["path", "job_id"]))


@api.post("/v1/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, tenant: TenantDep, gw: GatewayDep) -> Job:
    """Stops the job: its running edit at the next denoise step (the session stays at its
    last committed version), and every edit after it."""
    gw.check_job(tenant, job_id)
    return Job.of(await gw.call(JOB_QUEUE, "cancel", job_id, loc=["path", "job_id"]))


def _sse(kind: str, data: dict, event_id: int | None = None) -> bytes:
    line = "" if event_id is None else f"id: {event_id}\n"
    return f"{line}event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


async def _job_events(
    gw: Gateway, tenant: str | None, job_id: str, after: int
) -> AsyncIterator[bytes]:
    """The job's event stream, holding a stream slot while open. A failure (the job deleted
    with its session, the queue unavailable, no slot left) ends it with an `error` event:
    the HTTP status the failure would have had (`status`) and its `detail`."""
    try:
        with gw.admitted(tenant, "stream"):
            async for chunk in _events_of(gw, job_id, after):
                yield chunk
    except ApiError as error:
        yield _sse("error", {"status": error.status, **json.loads(error.response().body)})


async def _events_of(gw: Gateway, job_id: str, after: int) -> AsyncIterator[bytes]:
    """Each event of the job after the first `after` as it happens (with the version it
    committed, if any; its id is its number), each denoise step it sees (`step`: the
    newest, when steps come faster than it reads), then the end state, after which the
    stream closes. A stream lasts at most `http.request_timeout_s` (Serve would cut it
    later): it then ends with `continue`, and the client opens it again, sending the id of
    the last event it had as Last-Event-ID."""
    seen, sent, last_step = -1, after, None
    wait_s = min(SSE_WAIT_S, gw.http.request_timeout_s / 2)
    close_at = time.monotonic() + gw.http.request_timeout_s - wait_s
    while True:
        seen, record = await gw.call(JOB_QUEUE, "watch", job_id, seen, wait_s)
        for number, event in enumerate(record.events[sent:], start=sent + 1):
            data = event.model_dump() | {"done": record.progress[0], "total": record.progress[1]}
            if event.kind == "generated" and record.generated is not None:
                data["version"] = Version.of(record.generated).model_dump()
            elif event.kind == "edited" and event.edit is not None:
                data["version"] = Version.of(record.results[event.edit]).model_dump()
            yield _sse(event.kind, data, number)
        sent = max(sent, len(record.events))
        if record.state in FINISHED:
            yield _sse("end", Job.of(record).model_dump())
            return
        if time.monotonic() >= close_at:
            yield _sse("continue", {"last_event_id": sent})
            return
        step = record.step
        if step is not None and step != last_step and step.edit == record.running_edit:
            last_step = step
            yield _sse("step", step.model_dump() | {"job_id": job_id})


@api.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events."}},
)
async def job_events(
    job_id: str,
    tenant: TenantDep,
    gw: GatewayDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-Sent Events: `queued`, `started`, a `step` per denoise step seen (data: `edit`,
    None for the base image, `step` and `steps`), `generated` and `edited` with each
    committed version, `retry`, the final state, then `end` with the job. A stream open
    for `request_timeout_s` ends with `continue`: open it again with Last-Event-ID (the id
    of the last event received) to go on from there. An open stream holds one of the
    replica's `max_streams` (429 past the tenant's share)."""
    after = (
        0 if last_event_id is None else _header_number("Last-Event-ID", last_event_id, "an event")
    )
    gw.check_job(tenant, job_id)
    gw.check_room(tenant, "stream")  # answered here; the stream holds its slot once open
    events = _job_events(gw, tenant, job_id, after)
    return StreamingResponse(events, media_type="text/event-stream")


# The edit studio: a static page calling the API above from the browser


@api.get("/", include_in_schema=False)
async def studio() -> FileResponse:
    return FileResponse(STUDIO / "index.html")


api.mount("/studio", StaticFiles(directory=STUDIO), name="studio")


def _with_limits(document: dict, http: HttpConfig) -> dict:
    """The document with this service's bounds (`http.max_*`) on what request bodies send,
    in place of the body models' own, wider ones, so clients made from it send valid input."""
    bounds = {
        "prompt": ("maxLength", http.max_prompt_chars),
        "negative_prompt": ("maxLength", http.max_prompt_chars),
        "steps": ("maximum", http.max_steps),
        "height": ("maximum", http.max_image_side),
        "width": ("maximum", http.max_image_side),
    }
    schemas = document["components"]["schemas"]
    bodies = [schemas[model.__name__] for model in (GenerateBody, JobBody, EditBody)]
    bodies += [
        content["schema"]
        for path in document["paths"].values()
        for operation in path.values()
        for content in operation.get("requestBody", {}).get("content", {}).values()
        if "properties" in content["schema"]  # the inline ones; the others are above
    ]
    for body in bodies:
        for name, field in body["properties"].items():
            if name in bounds:
                keyword, bound = bounds[name]
                for branch in field.get("anyOf", [field]):
                    if branch.get("type") != "null":
                        branch[keyword] = bound
    return document


def _openapi() -> dict:
    """FastAPI's document with the replica's own limits, made once."""
    if api.openapi_schema is None:
        api.openapi_schema = _with_limits(copy.deepcopy(FastAPI.openapi(api)), gateway().http)
    return api.openapi_schema


api.openapi = _openapi


# The Serve application


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """The FastAPI app on Serve; the first replica starts the service's actors if needed."""

    def __init__(self, config: ServiceConfig) -> None:
        _open_gateway(config)


def build_app(config: ServiceConfig) -> Application:
    """The Serve application of the whole service, from its config."""
    http = config.http
    return Ingress.options(
        num_replicas=http.replicas,
        # The gateway's own bounds answer first (429/503 with Retry-After); these stop Serve
        # from queueing without bound behind them, with room for every open stream and
        # for probes beside the requests in flight.
        max_ongoing_requests=http.max_in_flight + http.max_streams + 8,
        max_queued_requests=http.max_in_flight,
    ).bind(config)


def load_config(path: str | None = None) -> ServiceConfig:
    """The config at `path`, else at $FISEDIT_CONFIG, else the defaults."""
    path = path or os.environ.get(CONFIG_ENV)
    return ServiceConfig.from_yaml(path) if path else ServiceConfig()


def serve_cli_app(config: ServiceConfig) -> Application:
    """The application `serve run` and `serve deploy` start. They listen where the Serve
    config says (`http_options.host`, 0.0.0.0 in deploy/serve.yaml), which the service
    config cannot see, so anonymous mode is refused here."""
    if config.http.anonymous:
        raise ValueError(
            "http.anonymous: anonymous mode is only for `fisedit serve` on localhost; under "
            "`serve run` or `serve deploy` the Serve config decides where the API listens, "
            "so clients need API keys"
        )
    return build_app(config)


def app_builder(args: dict) -> Application:
    """For a Serve config file: `import_path: fisedit.service.http:app_builder` with
    `args: {config: path/to/service.yaml}`."""
    return serve_cli_app(load_config(args.get("config")))


def __getattr__(name: str) -> Application:
    # `app`, for `serve run fisedit.service.http:app`, is built when Serve asks for it, from
    # $FISEDIT_CONFIG: importing this module (`fisedit serve`, a replica) reads no config.
    if name == "app":
        return serve_cli_app(load_config())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# `fisedit serve`: the whole service on this machine


def local_config(args: argparse.Namespace) -> ServiceConfig:
    """The config `fisedit serve` runs: the file given, else one CPU worker on the local
    store with the tiny model, anonymous on 127.0.0.1; --model, --store and --port set over
    either."""
    if args.config:
        settings = ServiceConfig.from_yaml(args.config).model_dump()
    else:
        http = HttpConfig(host="127.0.0.1", anonymous=True)
        settings = ServiceConfig(model="tiny", workers=1, http=http).model_dump()
    if args.model is not None:
        settings["model"] = args.model
    if args.store is not None:
        settings["store"]["url"] = args.store
    if args.port is not None:
        settings["http"]["port"] = args.port
    return ServiceConfig.model_validate(settings)


def serve_command(args: argparse.Namespace) -> None:
    """Runs the service on this machine (local Ray and Serve) until Ctrl-C."""
    config = local_config(args)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, local cluster
    ray.init(namespace=config.namespace, include_dashboard=False)
    try:
        serve.start(http_options={"host": config.http.host, "port": config.http.port})
        serve.run(build_app(config), name="fisedit", route_prefix="/")
        url = f"http://{config.http.host}:{config.http.port}"
        print(f"FISEdit studio at {url}/, API docs at {url}/docs; Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        deploy.stop(config)
        ray.shutdown()
