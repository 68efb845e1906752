"""Session caches kept within byte budgets: device, pinned host memory, object store."""

import logging
from collections import OrderedDict
from typing import Literal

from pydantic import BaseModel

from fisedit.engine.config import TierConfig
from fisedit.engine.recipe import SessionRecipe, rebuild, recipe_of, replay
from fisedit.engine.session import EditSession, Engine, StepCallback, Version
from fisedit.engine.snapshot import SnapshotError, restore, snapshot, snapshot_versions
from fisedit.storage import ObjectStore

log = logging.getLogger(__name__)

Tier = Literal["device", "host", "store", "recipe"]
TIERS: tuple[Tier, ...] = ("device", "host", "store", "recipe")
AdoptPath = Literal["restore", "restore+replay", "rebuild"]


class TierUsage(BaseModel):
    """Sessions and cache bytes in one tier."""

    sessions: int = 0
    bytes: int = 0


class CacheBudgetError(MemoryError):
    """An edit would need more device memory than the budget, even with the session alone."""


class UnknownSessionError(KeyError):
    """No session with this id is held, stored or remembered."""


class SessionPool:
    """The sessions an engine serves, in least-recently-used order across cache tiers.

    When device memory is over budget, the least recently used sessions move to (pinned)
    host memory, where edits read them with asynchronous prefetch. When host memory is over
    budget, they leave memory: their recipe is kept, and with a store they are snapshotted;
    on next use they are restored from the snapshot, or recomputed from the recipe. On a CPU
    engine the device and host tiers are the same memory, but edits still read host-tier
    caches through the prefetcher, as on a GPU.
    """

    def __init__(
        self, engine: Engine, config: TierConfig | None = None, store: ObjectStore | None = None
    ) -> None:
        self.engine, self.config, self.store = engine, config or TierConfig(), store
        self._resident: OrderedDict[str, EditSession] = OrderedDict()
        self._tier: dict[str, Tier] = {}
        self._recipes: dict[str, SessionRecipe] = {}

    def generate(self, prompt: str, session_id: str | None = None, **params) -> EditSession:
        session = self.engine.generate(prompt, **params)
        if session_id is not None:
            session.id = session_id
        self._admit(session)
        return session

    def adopt(self, recipe: SessionRecipe) -> tuple[EditSession, AdoptPath]:
        """Takes over a session another engine lost (see `adopt`), replacing any copy here."""
        self.drop(recipe.session_id)
        session, path = adopt(self.engine, recipe, self.store)
        self._admit(session)
        return session, path

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._tier

    @property
    def resident_ids(self) -> list[str]:
        """Sessions whose cache is in memory (device or host), least recently used first."""
        return list(self._resident)

    def edit(
        self,
        session_id: str,
        prompt: str,
        mask=None,
        mask_steps: int | None = None,
        extends: int | None = None,
        on_step: StepCallback | None = None,
    ) -> Version:
        """Edits a session wherever it lives (see EditSession.edit); a new version is on the
        device.

        An edit of a device-resident session records into its cache in place. One of a
        host-resident session makes the new version's cache on the device while it runs,
        so other sessions leave the device first; CacheBudgetError if even that is not room.
        Bad input, and a prompt that changes nothing (NoChangeWarning), move no session.
        """
        session = self.get(session_id)
        if session.makes_new_version(prompt, mask, mask_steps, extends):
            self._enforce(keep=session_id, reserve=session.edit_bytes(extends))
        try:
            version = session.edit(prompt, mask, mask_steps, extends, on_step)
        except Exception:
            # One that failed while writing the cache in place left none: every held
            # session has one.
            session.current_cache()
            raise
        finally:
            self._file(session)
        self._enforce(keep=session_id)
        return version

    def get(self, session_id: str) -> EditSession:
        """The session, brought back into memory if it was evicted."""
        if session_id in self._resident:
            self._resident.move_to_end(session_id)
            return self._resident[session_id]
        if session_id not in self._recipes:
            raise UnknownSessionError(f"unknown session {session_id!r}")
        # From its snapshot when it has one, at the version it was at (see `adopt`). The
        # recipe is kept until that succeeds: a failed adopt (the store unreachable, say)
        # can be tried again.
        session, _ = adopt(self.engine, self._recipes[session_id], self.store)
        del self._recipes[session_id]
        self._admit(session)
        return session

    def tier(self, session_id: str) -> Tier:
        try:
            return self._tier[session_id]
        except KeyError:
            raise UnknownSessionError(f"unknown session {session_id!r}") from None

    def drop(self, session_id: str) -> None:
        self._resident.pop(session_id, None)
        self._recipes.pop(session_id, None)
        self._tier.pop(session_id, None)

    def stats(self) -> dict[Tier, TierUsage]:
        usage = {tier: TierUsage() for tier in TIERS}
        for session_id, tier in self._tier.items():
            usage[tier].sessions += 1
            session = self._resident.get(session_id)
            if session is not None:
                usage[tier].bytes += session.current.cache.nbytes
        return usage

    def _admit(self, session: EditSession) -> None:
        session.snapshots = self.store
        self._resident[session.id] = session
        self._file(session)
        self._enforce(keep=session.id)

    def _file(self, session: EditSession) -> None:
        """Files a resident session under the tier its cache is in."""
        cache = session.current.cache
        if cache is not None:
            self._tier[session.id] = "host" if cache.host_resident else "device"

    def _bytes(self, tier: Tier) -> int:
        return sum(
            s.current.cache.nbytes for i, s in self._resident.items() if self._tier[i] == tier
        )

    def _least_recent(self, tier: Tier, keep: str) -> str | None:
        return next((i for i in self._resident if self._tier[i] == tier and i != keep), None)

    def _enforce(self, keep: str, reserve: int = 0) -> None:
        """Moves least recently used sessions down the tiers until budgets hold, with
        `reserve` more bytes free on the device for an edit of `keep`."""
        budgets = (("device", self.config.device_bytes), ("host", self.config.host_bytes))
        for tier, budget in budgets:
            needed = reserve if tier == "device" else 0
            while budget is not None and self._bytes(tier) + needed > budget:
                victim = self._least_recent(tier, keep)
                if victim is None and needed:
                    raise CacheBudgetError(
                        f"editing session {keep!r} needs {needed} bytes for the new version's "
                        f"cache beside {self._bytes(tier)} bytes on the device; the device "
                        f"budget is {budget} bytes"
                    )
                if victim is None:
                    break
                if tier == "device":
                    self._to_host(victim)
                else:
                    self._out_of_memory(victim)

    def _to_host(self, session_id: str) -> None:
        session = self._resident[session_id]
        session.current.cache = session.current.cache.to_host()
        self._tier[session_id] = "host"

    def _out_of_memory(self, session_id: str) -> None:
        session = self._resident.pop(session_id)
        self._recipes[session_id] = recipe_of(session)
        self._tier[session_id] = "recipe"
        if self.store is None:
            return
        try:
            snapshot(session, self.store)
        except Exception as error:  # the call that made room must not fail for it
            log.warning(
                "session %s left memory unsnapshotted (%s): its recipe remains", session_id, error
            )
            return
        self._tier[session_id] = "store"


def adopt(
    engine: Engine, recipe: SessionRecipe, store: ObjectStore | None = None
) -> tuple[EditSession, AdoptPath]:
    """Recreates a session at its recipe's version as cheaply as the store allows.

    The newest complete snapshot no newer than the recipe is restored and only the edits
    after it are replayed, then the session moves to the recipe's current version; without
    a usable snapshot the whole recipe is recomputed. Every path gives the same session, bit
    for bit; the returned path says which one ran.
    """
    newest = len(recipe.edits)
    versions = snapshot_versions(store, recipe.session_id) if store is not None else []
    for version in reversed([v for v in versions if v <= newest]):
        try:
            session = restore(engine, store, recipe.session_id, version)
        except SnapshotError:
            continue  # a damaged snapshot: an older one, or the recipe, still works
        return session, "restore+replay" if replay(session, recipe) else "restore"
    return rebuild(engine, recipe), "rebuild"
