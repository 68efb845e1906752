"""EditWorker: a Ray actor per GPU that loads the model once and owns the sessions it serves.

`SessionHost` is the worker without Ray: it edits sessions in a SessionPool, commits every
version to the store, and adopts sessions other workers lost. `EditWorker` wraps it in an
async actor whose engine work runs in one thread, so stats and health answer during an edit.
"""

import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError

from fisedit.engine.config import GenerationParams
from fisedit.engine.session import EditSession, Engine, StepCallback
from fisedit.engine.tiers import SessionPool, UnknownSessionError
from fisedit.service.config import ServiceConfig
from fisedit.service.results import (
    CachePath,
    EditRequest,
    EditResult,
    check_current,
    check_session_id,
    commit,
    newest_recipe,
    stored_result,
)
from fisedit.storage import ObjectNotFoundError

UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, DecompressionBombError)
"""What Pillow raises for bytes that are not a readable image (SyntaxError: a broken PNG;
DecompressionBombError: a header claiming a huge image)."""

POOL_PATHS: dict[str, CachePath] = {
    "device": "hit",
    "host": "hit",
    "store": "restore",
    "recipe": "rebuild",
}
"""The cache path of an edit on a session the pool holds, by the tier it is in."""


def load_engine(config: ServiceConfig) -> Engine:
    """The engine for the configured model; the tiny models are built locally, the same
    on every worker (Engine.from_pretrained builds them deterministically)."""
    return Engine.from_pretrained(config.model, config.engine)


class SessionHost:
    """The sessions of one engine, each committed to the store after every version.

    Not thread-safe: one caller at a time (the EditWorker's engine thread). `summary` is
    replaced, never mutated, after every call, so other threads may read it, and
    `check_edit` reads only the store and the model, so other threads may call it.
    """

    def __init__(self, config: ServiceConfig, worker_id: str, engine: Engine | None = None):
        self.config, self.worker_id = config, worker_id
        self.engine = engine or load_engine(config)
        self.store = config.store.open(f"tenants/{config.tenant}")
        self.pool = SessionPool(self.engine, config.tiers, self.store)
        self.versions: dict[str, int] = {}
        self._adopted: dict[str, CachePath] = {}
        """How sessions taken over by `adopt` came here; their next edit reports it."""
        self.summary: dict = {}
        self._publish()

    def generate(
        self, session_id: str, params: GenerationParams, on_step: StepCallback | None = None
    ) -> EditResult:
        """Generates version 0 of a new session; a retry after it committed returns it.
        `on_step` is called after every denoise step."""
        check_session_id(session_id)
        committed = stored_result(self.store, session_id, 0)
        if committed is not None:
            return committed
        started = time.perf_counter()
        fields = params.model_dump()
        prompt = fields.pop("prompt")
        session = self.pool.generate(prompt, session_id=session_id, on_step=on_step, **fields)
        return self._commit(session, "generate", started)

    def edit(
        self, session_id: str, request: EditRequest, on_step: StepCallback | None = None
    ) -> EditResult:
        """Edits the session's current version, or `from_version` (a branch off an older
        one), first bringing the session here if needed: `extends`, when given, must be the
        current version (StaleVersionError otherwise). On any error the session stays at its
        last committed version. `on_step` is called after every denoise step. An edit that
        changes nothing gives the result of the version it edits."""
        started = time.perf_counter()
        path = self._arrive(session_id, request.extends)
        session = self.pool.get(session_id)
        check_current(session_id, session.version, request.extends)
        edited = self.pool.edit(
            session_id,
            request.prompt,
            mask=self._mask(request, session.params),
            mask_steps=request.mask_steps,
            extends=request.from_version,
            on_step=on_step,
        )
        session = self.pool.get(session_id)
        if edited is not session.current:  # an older version, which changed nothing
            return stored_result(self.store, session_id, edited.number)
        return self._commit(session, path, started, request.request_id)

    def check_edit(
        self, session_id: str | None, params: GenerationParams | None, request: EditRequest
    ) -> None:
        """Raises the ValueError `edit` would for the request's own faults (a mask or
        mask_steps that does not fit the session), without editing or bringing the session
        here: the session `session_id` as stored, or a new one generated with `params`."""
        if params is None:
            recipe = newest_recipe(self.store, check_session_id(session_id))
            if recipe is None:
                raise UnknownSessionError(f"unknown session {session_id!r}: nothing committed")
            params = recipe.params
        params = self.engine.filled_in(params)
        mask = self._mask(request, params)
        self.engine.check_edit(params, request.prompt, mask, request.mask_steps)

    def adopt(self, session_id: str) -> tuple[int, CachePath]:
        """Takes over a session from the store: its newest snapshot plus a replay of later
        edits, or a rebuild. Returns the version and the path taken."""
        recipe = newest_recipe(self.store, check_session_id(session_id))
        if recipe is None:
            raise UnknownSessionError(f"unknown session {session_id!r}: nothing committed")
        session, path = self.pool.adopt(recipe)
        self.versions[session_id] = session.version
        self._adopted[session_id] = path
        self._publish()
        return session.version, path

    def snapshot(self, session_id: str) -> str:
        """Writes the session's current version as a snapshot; returns its manifest key."""
        from fisedit.engine.snapshot import snapshot

        return snapshot(self._held(session_id), self.store)

    def drain(self) -> list[str]:
        """Snapshots every session this worker holds in memory (before it stops), so the
        workers that take them over restore them instead of recomputing; returns the
        manifest keys. A session that cannot be snapshotted does not stop the others; the
        RuntimeError at the end names each (they are rebuilt from their recipes later)."""
        from fisedit.engine.snapshot import snapshot

        keys, failed = [], []
        for session_id in self.pool.resident_ids:
            try:
                keys.append(snapshot(self.pool.get(session_id), self.store))
            except Exception as error:
                failed.append(f"{session_id}: {type(error).__name__}: {error}")
        if failed:
            raise RuntimeError(
                f"{self.worker_id} snapshotted {len(keys)} sessions but not {'; '.join(failed)}"
            )
        return keys

    def drop(self, session_id: str) -> None:
        self.pool.drop(session_id)
        self.versions.pop(session_id, None)
        self._adopted.pop(session_id, None)
        self._publish()

    def _held(self, session_id: str) -> EditSession:
        if session_id not in self.pool:
            raise UnknownSessionError(f"session {session_id!r} is not held by {self.worker_id}")
        return self.pool.get(session_id)

    def _arrive(self, session_id: str, extends: int | None) -> CachePath:
        """Makes sure the pool holds the session's newest version; returns how it got it."""
        held = self.versions.get(session_id)
        if held is not None and (extends is None or extends <= held):
            return self._adopted.pop(session_id, None) or POOL_PATHS[self.pool.tier(session_id)]
        # Not here, or another worker committed newer versions since: take it from the store.
        self.adopt(session_id)
        return self._adopted.pop(session_id)

    def _mask(self, request: EditRequest, params: GenerationParams) -> torch.Tensor | None:
        """The request's mask for a session generated with `params`; a ValueError naming
        the field `mask` if it is not an image, or not of the session's latent or image
        size."""
        data = request.mask
        if request.mask_key is not None:
            try:
                data = self.store.get(request.mask_key)
            except ObjectNotFoundError:
                raise ValueError(f"mask_key: no file {request.mask_key!r}") from None
        if data is None:
            return None
        try:
            image = Image.open(io.BytesIO(data))
        except UNREADABLE as error:
            raise ValueError(f"mask: not a readable image ({error})") from error
        height, width = params.height, params.width
        if image.height > height or image.width > width:  # checked before it is decoded
            raise ValueError(
                f"mask: {image.width}x{image.height} pixels, larger than the image "
                f"({width}x{height})"
            )
        try:
            pixels = np.array(image.convert("L"))
        except UNREADABLE as error:
            raise ValueError(f"mask: not a readable image ({error})") from error
        try:
            return self.engine.load_mask(pixels, params)
        except ValueError as error:
            raise ValueError(f"mask: {error}") from error

    def _commit(
        self, session: EditSession, path: CachePath, started: float, request_id: str | None = None
    ) -> EditResult:
        try:
            latency_s = time.perf_counter() - started
            result = commit(self.store, session, self.worker_id, path, latency_s, request_id)
        except BaseException:
            # The store is the truth: a version it lacks must not live on here.
            self.drop(session.id)
            raise
        self.versions[session.id] = session.version
        self._publish()
        return result

    def _publish(self) -> None:
        tiers = {tier: usage.model_dump() for tier, usage in self.pool.stats().items()}
        self.summary = {
            "worker_id": self.worker_id,
            "sessions": dict(self.versions),
            "tiers": tiers,
            "cache_bytes": sum(usage["bytes"] for usage in tiers.values()),
        }


class EditWorker:
    """The Ray actor around a SessionHost (created with `ray.remote` by `service.deploy`)."""

    def __init__(self, config: ServiceConfig, worker_id: str) -> None:
        self.worker_id = worker_id
        self._host = SessionHost(config, worker_id)
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{worker_id}-engine")
        self._queued = 0
        self._served = 0

    async def _run(self, method, *args):
        self._queued += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._engine_thread, method, *args)
        finally:
            self._queued -= 1
            self._served += 1

    async def generate(
        self, session_id: str, params: GenerationParams, on_step: StepCallback | None = None
    ) -> EditResult:
        return await self._run(self._host.generate, session_id, params, on_step)

    async def edit(
        self, session_id: str, request: EditRequest, on_step: StepCallback | None = None
    ) -> EditResult:
        return await self._run(self._host.edit, session_id, request, on_step)

    async def adopt(self, session_id: str) -> tuple[int, CachePath]:
        return await self._run(self._host.adopt, session_id)

    async def check_edit(
        self, session_id: str | None, params: GenerationParams | None, request: EditRequest
    ) -> None:
        # Beside the engine thread: a check does not wait for the edits queued there.
        await asyncio.to_thread(self._host.check_edit, session_id, params, request)

    async def snapshot(self, session_id: str) -> str:
        return await self._run(self._host.snapshot, session_id)

    async def drain(self) -> list[str]:
        return await self._run(self._host.drain)

    async def drop(self, session_id: str) -> None:
        return await self._run(self._host.drop, session_id)

    async def holds(self) -> dict:
        """The sessions this worker holds (id -> version) and the bytes in each tier."""
        return self._host.summary

    async def stats(self) -> dict:
        """Held sessions, bytes per tier, and queued calls (the one running included)."""
        return {**self._host.summary, "queued": self._queued, "served": self._served}

    async def health(self) -> str:
        return "ok"
