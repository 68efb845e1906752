"""SessionRouter: the authoritative map session -> worker, with each session's version.

New sessions go to the least-loaded worker (calls in flight first, cache bytes second);
follow-ups go to the holder. A holder that dies loses nothing: the next worker adopts the
session from the store (snapshot plus replay, or rebuild). An edit that names a stale
version is refused. A restarted router rebuilds its map from what the workers hold, and
sessions no worker holds are found through their recipes in the store.
"""

import asyncio
import contextlib
import random
import uuid
import weakref
from collections import Counter
from dataclasses import dataclass

import ray
from ray.exceptions import ActorDiedError, RayActorError

from fisedit.engine.config import GenerationParams
from fisedit.engine.session import StepCallback
from fisedit.engine.snapshot import snapshot_versions
from fisedit.engine.tiers import UnknownSessionError
from fisedit.service.config import ServiceConfig
from fisedit.service.names import worker_name
from fisedit.service.results import (
    EditRequest,
    EditResult,
    StaleVersionError,
    check_current,
    check_from_version,
    check_session_id,
    committed_versions,
    stored_result,
)
from fisedit.storage import validate_key

PROBE_S = 10.0
"""How long a worker has to say what it holds (answered off its engine thread, so only a
worker that is not up takes longer: it must not stall the router)."""


class NoWorkerError(RuntimeError):
    """No live worker could take the call (transient: workers may come back)."""


@dataclass
class Placement:
    """Where a session lives (None: only in the store) and its newest committed version
    (None: to be read from the store)."""

    worker_id: str | None
    version: int | None


class SessionRouter:
    """The Ray actor (named, see `service.deploy`) that sends each session's calls to its holder.

    Store calls run in threads: a slow or unreachable store must not stall the event loop
    that answers every other session.
    """

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.store = config.store.open(f"tenants/{config.tenant}")
        self.workers: dict[str, ray.actor.ActorHandle] = {}
        self.placements: dict[str, Placement] = {}
        self.in_flight: Counter[str] = Counter()
        self.paths: Counter[str] = Counter()
        self.migrations = 0
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        """Per session; one no call holds or awaits is forgotten (asked about many ids, the
        router keeps no lock per id)."""
        self._map_rebuilt: asyncio.Task | None = None

    async def generate(
        self,
        params: GenerationParams,
        session_id: str | None = None,
        on_step: StepCallback | None = None,
    ) -> EditResult:
        """Generates a new session (version 0) on the least-loaded worker. Given an id that
        already has a version 0, returns that: a retried generation makes nothing twice.
        The worker calls `on_step` after every denoise step."""
        await self._ready()
        session_id = check_session_id(session_id or uuid.uuid4().hex)
        async with self._lock(session_id):
            committed = await asyncio.to_thread(stored_result, self.store, session_id, 0)
            if committed is not None:
                return committed
            result = await self._dispatch(None, "generate", session_id, params, on_step)
            self.placements[session_id] = Placement(result.worker_id, 0)
            self.paths[result.cache_path] += 1
            return result

    async def edit(
        self, session_id: str, request: EditRequest, on_step: StepCallback | None = None
    ) -> EditResult:
        """Edits a session on its holder; without one, another worker adopts it first.

        `request.extends`, when given, must be the session's current version
        (StaleVersionError otherwise); without it the edit extends the current version.
        `request.from_version` edits an older version instead (a branch). The worker calls
        `on_step` after every denoise step.
        """
        await self._ready()
        async with self._lock(session_id):
            placement = await self._placement(session_id)
            current = placement.version
            check_current(session_id, current, request.extends)
            check_from_version(session_id, current, request.from_version)
            request = request.model_copy(update={"extends": current})
            holder = placement.worker_id
            if self.config.affinity:
                placement = await self._bounded(session_id, placement)
            else:
                placement = await self._scattered(session_id, placement)
            try:
                result = await self._dispatch(placement, "edit", session_id, request, on_step)
            except (TimeoutError, StaleVersionError):
                # The worker may be at a version this map has not seen (an edit that timed
                # out here went on to commit there): the next call reads it from the store.
                self.placements[session_id] = Placement(placement.worker_id, None)
                raise
            # An edit that changed nothing gives the version it edited, maybe an older one.
            self.placements[session_id] = Placement(result.worker_id, max(result.version, current))
            self.paths[result.cache_path] += 1
            if holder is not None and holder != result.worker_id and holder in self.workers:
                self.workers[holder].drop.remote(session_id)  # its copy is stale now
            return result

    async def check_edit(
        self, session_id: str | None, params: GenerationParams | None, request: EditRequest
    ) -> None:
        """Raises the ValueError an edit with `request` would for its own faults (a mask or
        mask_steps that does not fit the session), without running it: a worker checks it
        against the session `session_id` (its holder, if any) or against a new one generated
        with `params`."""
        await self._ready()
        placement = None if session_id is None else await self._placement(session_id)
        await self._dispatch(placement, "check_edit", session_id, params, request)

    async def snapshot(self, session_id: str) -> str:
        """Has the holder snapshot the session's current version; returns the manifest key."""
        await self._ready()
        async with self._lock(session_id):
            placement = await self._placement(session_id)
            if placement.worker_id is None:
                raise UnknownSessionError(f"session {session_id!r} is held by no worker")
            return await self._dispatch(placement, "snapshot", session_id)

    async def version(self, session_id: str) -> int:
        """The session's newest committed version."""
        await self._ready()
        return (await self._placement(session_id)).version

    async def history(self, session_id: str) -> list[EditResult]:
        """Every committed version of the session, oldest first."""
        return await asyncio.to_thread(self._history, check_session_id(session_id))

    def _history(self, session_id: str) -> list[EditResult]:
        versions = committed_versions(self.store, session_id)
        if not versions:
            raise UnknownSessionError(f"unknown session {session_id!r}")
        return [stored_result(self.store, session_id, v) for v in versions]

    async def delete(self, session_id: str) -> None:
        """Forgets the session: its holder drops it and every file of it leaves the store."""
        await self._ready()
        async with self._lock(session_id):
            placement = await self._placement(session_id)
            if placement.worker_id in self.workers:
                # Waited for a while only: a busy or lost holder must not keep the lock (it
                # drops its copy when its queue gets there).
                drop = self.workers[placement.worker_id].drop.remote(session_id)
                with contextlib.suppress(TimeoutError, RayActorError):
                    await asyncio.wait_for(drop, PROBE_S)
            del self.placements[session_id]
            await asyncio.to_thread(self._delete_files, session_id)

    def _delete_files(self, session_id: str) -> None:
        for key in self.store.list(f"sessions/{session_id}/"):
            self.store.delete(key)

    async def result(self, session_id: str, version: int) -> EditResult | None:
        return await asyncio.to_thread(
            stored_result, self.store, check_session_id(session_id), version
        )

    async def read(self, key: str) -> bytes:
        """An object of this tenant's part of the store (an image, mask or report)."""
        return await asyncio.to_thread(self.store.get, validate_key(key))

    async def stats(self) -> dict:
        await self._ready()
        return {
            "sessions": len(self.placements),
            "held": Counter(p.worker_id for p in self.placements.values() if p.worker_id),
            "paths": dict(self.paths),
            "migrations": self.migrations,
            "workers": sorted(self.workers),
        }

    async def _bounded(self, session_id: str, placement: Placement) -> Placement:
        """Where the edit should run: a less-loaded worker instead of a holder past the
        configured load, when the session's current version has a snapshot to restore."""
        limit, holder = self.config.queue.migrate_above, placement.worker_id
        if limit is None or holder is None or self.in_flight[holder] <= limit:
            return placement
        snapshots = await asyncio.to_thread(snapshot_versions, self.store, session_id)
        if placement.version not in snapshots:
            return placement
        try:
            target = await self._least_loaded(exclude={holder})
        except NoWorkerError:
            return placement
        if self.in_flight[target] >= self.in_flight[holder]:
            return placement
        self.migrations += 1
        return Placement(target, placement.version)

    async def _scattered(self, session_id: str, placement: Placement) -> Placement:
        """Without affinity (the service benchmark's baseline) an edit goes to a random
        worker; the holder snapshots the session first, so that worker restores it."""
        await self._discover()
        if not self.workers:
            raise NoWorkerError("no live worker")
        target = random.choice(sorted(self.workers))
        if placement.worker_id not in (None, target):
            await self._dispatch(placement, "snapshot", session_id)
        return Placement(target, placement.version)

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            lock = self._locks[session_id] = asyncio.Lock()
        return lock

    async def _placement(self, session_id: str) -> Placement:
        placement = self.placements.get(check_session_id(session_id))
        if placement is None or placement.version is None:
            versions = await asyncio.to_thread(committed_versions, self.store, session_id)
            if not versions:
                raise UnknownSessionError(f"unknown session {session_id!r}")
            holder = None if placement is None else placement.worker_id
            placement = self.placements[session_id] = Placement(holder, versions[-1])
        return placement

    async def _dispatch(self, placement: Placement | None, method: str, session_id: str, *args):
        """Calls the holder (or, for a new or orphaned session, the least-loaded worker);
        a worker that dies mid-call is skipped and the call goes to another."""
        tried: set[str] = set()
        while True:
            worker_id = placement.worker_id if placement else None
            if worker_id not in self.workers or worker_id in tried:
                worker_id = await self._least_loaded(exclude=tried)
            self.in_flight[worker_id] += 1
            try:
                call = getattr(self.workers[worker_id], method).remote(session_id, *args)
                result = await asyncio.wait_for(call, self.config.call_timeout_s)
            except TimeoutError:
                raise TimeoutError(
                    f"{method} of session {session_id} on {worker_id} took over "
                    f"{self.config.call_timeout_s} s (it may still finish there)"
                ) from None
            except RayActorError as error:
                tried.add(worker_id)
                self._lost(worker_id, error)
                if placement is not None:
                    # It may have committed before it died: then that is the result.
                    committed = await asyncio.to_thread(
                        stored_result, self.store, session_id, placement.version + 1
                    )
                    if committed is not None:
                        return committed
                    placement = Placement(None, placement.version)
                continue
            finally:
                self.in_flight[worker_id] -= 1
            return result

    async def _least_loaded(self, exclude: set[str]) -> str:
        await self._discover()
        candidates = [w for w in self.workers if w not in exclude]
        stats = await asyncio.gather(*(self._stats(w) for w in candidates), return_exceptions=True)
        loads = [
            (self.in_flight[w], s["cache_bytes"], w)
            for w, s in zip(candidates, stats, strict=True)
            if isinstance(s, dict)
        ]
        if not loads:
            raise NoWorkerError(f"no live worker (tried {sorted(exclude) or 'none'})")
        return min(loads)[2]

    async def _stats(self, worker_id: str) -> dict:
        try:
            return await asyncio.wait_for(self.workers[worker_id].stats.remote(), PROBE_S)
        except RayActorError as error:
            self._lost(worker_id, error)
            raise

    def _lost(self, worker_id: str, error: RayActorError) -> None:
        """Forgets what a worker held; a dead one is looked up again by name later."""
        for placement in self.placements.values():
            if placement.worker_id == worker_id:
                placement.worker_id = None
        if isinstance(error, ActorDiedError):
            self.workers.pop(worker_id, None)

    async def _discover(self) -> list[str]:
        """Looks up workers not yet known (started, or restarted, since); returns the new."""
        found = []
        for index in range(self.config.workers):
            name = worker_name(index)
            if name in self.workers:
                continue
            try:
                self.workers[name] = ray.get_actor(name, namespace=self.config.namespace)
                found.append(name)
            except ValueError:
                continue
        return found

    async def _ready(self) -> None:
        if self._map_rebuilt is None:
            self._map_rebuilt = asyncio.ensure_future(self._rebuild_map())
        await asyncio.shield(self._map_rebuilt)

    async def _rebuild_map(self) -> None:
        """Asks every worker what it holds (after a router restart the map is empty)."""
        names = await self._discover()
        holdings = await asyncio.gather(
            *(asyncio.wait_for(self.workers[n].holds.remote(), PROBE_S) for n in names),
            return_exceptions=True,
        )
        for worker_id, held in zip(names, holdings, strict=True):
            if isinstance(held, BaseException):
                continue
            for session_id, version in held["sessions"].items():
                known = self.placements.get(session_id)
                if known is None or known.version is None or version > known.version:
                    self.placements[session_id] = Placement(worker_id, version)
