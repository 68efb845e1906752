"""Session caches move down the tiers in least-recently-used order when over budget."""

import numpy as np
import pytest

from fisedit.engine import EditConfig, Engine, EngineConfig, NoChangeWarning
from fisedit.engine.snapshot import snapshot_versions
from fisedit.engine.tiers import CacheBudgetError, SessionPool, TierConfig, UnknownSessionError
from fisedit.storage import LocalConfig, LocalObjectStore

STEPS = 6


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    config = EngineConfig(progress=False, edit=EditConfig(mask_steps=2))
    return Engine.from_pretrained(tiny_model_dir, config)


@pytest.fixture(scope="module")
def session_bytes(engine) -> int:
    return engine.generate("a cat", steps=STEPS).current.cache.nbytes


def _pool(engine, session_bytes, store=None) -> SessionPool:
    """Room for two sessions on the device and one in host memory."""
    budget = TierConfig(device_bytes=2 * session_bytes, host_bytes=session_bytes)
    return SessionPool(engine, budget, store)


def _tiers(pool, *sessions) -> list[str]:
    return [pool.tier(s.id) for s in sessions]


def test_least_recently_used_sessions_move_down_the_tiers(engine, session_bytes, tmp_path):
    store = LocalObjectStore(LocalConfig(root=tmp_path))
    pool = _pool(engine, session_bytes, store)

    a, b, c = (pool.generate(p, steps=STEPS, seed=i) for i, p in enumerate(["a", "b", "c"]))
    assert _tiers(pool, a, b, c) == ["host", "device", "device"]

    pool.get(b.id)  # b becomes the most recently used
    d = pool.generate("d", steps=STEPS, seed=3)
    assert _tiers(pool, a, b, c, d) == ["store", "device", "host", "device"]
    assert snapshot_versions(store, a.id) == [0]

    stats = pool.stats()
    assert (stats["device"].sessions, stats["device"].bytes) == (2, 2 * session_bytes)
    assert (stats["host"].sessions, stats["host"].bytes) == (1, session_bytes)
    assert (stats["store"].sessions, stats["store"].bytes) == (1, 0)


def test_an_evicted_session_edits_exactly_like_one_that_stayed(engine, session_bytes, tmp_path):
    pool = _pool(engine, session_bytes, LocalObjectStore(LocalConfig(root=tmp_path)))
    stayed = engine.generate("a cat on a bench", steps=STEPS, seed=7)
    evicted = pool.generate("a cat on a bench", steps=STEPS, seed=7)
    for i in range(3):
        pool.generate(f"filler {i}", steps=STEPS, seed=i)
    assert pool.tier(evicted.id) == "store"

    version = pool.edit(evicted.id, "a dog on a bench")

    assert np.array_equal(version.image, stayed.edit("a dog on a bench").image)
    assert pool.tier(evicted.id) == "device" and pool.get(evicted.id).version == 1


def test_host_tier_sessions_are_edited_in_place(engine, session_bytes):
    pool = _pool(engine, session_bytes)
    first = pool.generate("a cat", steps=STEPS, seed=1)
    pool.generate("b", steps=STEPS, seed=2)
    pool.generate("c", steps=STEPS, seed=3)
    assert pool.tier(first.id) == "host"

    version = pool.edit(first.id, "a dog")

    assert version.number == 1 and pool.tier(first.id) == "device"


def test_without_a_store_evicted_sessions_are_rebuilt_from_their_recipe(engine, session_bytes):
    pool = _pool(engine, session_bytes)
    first = pool.generate("a cat", steps=STEPS, seed=5)
    pool.edit(first.id, "a dog")
    image = first.image
    for i in range(3):
        pool.generate(f"filler {i}", steps=STEPS, seed=i)
    assert pool.tier(first.id) == "recipe"

    rebuilt = pool.get(first.id)

    assert rebuilt is not first and rebuilt.version == 1
    assert np.array_equal(rebuilt.image, image)


def test_a_session_the_store_cannot_take_leaves_memory_with_its_recipe(
    engine, session_bytes, tmp_path
):
    class FullStore(LocalObjectStore):
        def put_file(self, key, path, *, create_only=False):
            raise OSError(28, "No space left on device")

    pool = _pool(engine, session_bytes, FullStore(LocalConfig(root=tmp_path)))
    first = pool.generate("a cat", steps=STEPS, seed=5)
    for i in range(3):
        pool.generate(f"filler {i}", steps=STEPS, seed=i)  # each still succeeds
    assert pool.tier(first.id) == "recipe"

    assert np.array_equal(pool.get(first.id).image, first.image)


def test_unknown_and_dropped_sessions_are_clear_errors(engine, session_bytes):
    pool = _pool(engine, session_bytes)
    session = pool.generate("a cat", steps=STEPS)
    pool.drop(session.id)

    with pytest.raises(UnknownSessionError, match="unknown session"):
        pool.get(session.id)
    with pytest.raises(UnknownSessionError):
        pool.tier("nobody")


def test_an_edit_of_a_device_session_records_in_place_and_needs_no_room(engine, session_bytes):
    pool = _pool(engine, session_bytes)
    older = pool.generate("a cat", steps=STEPS, seed=1)
    edited = pool.generate("a cat on a bench", steps=STEPS, seed=2)
    assert _tiers(pool, older, edited) == ["device", "device"]

    pool.edit(edited.id, "a dog on a bench")

    assert _tiers(pool, older, edited) == ["device", "device"]


def test_an_edit_of_a_host_session_makes_room_for_its_new_cache_first(engine, session_bytes):
    pool = _pool(engine, session_bytes)
    on_host = pool.generate("a cat", steps=STEPS, seed=1)
    older = pool.generate("b", steps=STEPS, seed=2)
    newer = pool.generate("c", steps=STEPS, seed=3)
    assert _tiers(pool, on_host, older, newer) == ["host", "device", "device"]

    pool.edit(on_host.id, "a dog")

    # The edit made its device cache beside the host one: `older` had to leave the device
    # first, and the host, which held the edited session's cache until the edit ended.
    assert _tiers(pool, on_host, older, newer) == ["device", "recipe", "device"]


def test_a_branch_makes_room_for_the_older_versions_cache_beside_the_current_one(
    engine, session_bytes
):
    pool = _pool(engine, session_bytes)
    older = pool.generate("a cat", steps=STEPS, seed=1)
    branched = pool.generate("a cat on a bench", steps=STEPS, seed=2)
    pool.edit(branched.id, "a dog on a bench")
    assert _tiers(pool, older, branched) == ["device", "device"]
    assert branched.edit_bytes(extends=0) == session_bytes

    pool.edit(branched.id, "a fox on a bench", extends=0)

    # Version 0's cache was recomputed beside version 1's: `older` left the device first.
    assert (branched.version, branched.current.parent) == (2, 0)
    assert _tiers(pool, older, branched) == ["host", "device"]


def test_bad_input_and_a_prompt_that_changes_nothing_move_no_session(engine, session_bytes):
    pool = _pool(engine, session_bytes)
    on_host = pool.generate("a cat", steps=STEPS, seed=1)
    older = pool.generate("b", steps=STEPS, seed=2)
    newer = pool.generate("c", steps=STEPS, seed=3)

    with pytest.raises(ValueError, match="mask"):
        pool.edit(on_host.id, "a dog", mask=np.ones((3, 5), dtype=bool))
    assert _tiers(pool, on_host, older, newer) == ["host", "device", "device"]
    with pytest.warns(NoChangeWarning):
        version = pool.edit(on_host.id, "a cat")

    assert version.number == 0 and on_host.current.cache.host_resident
    assert _tiers(pool, on_host, older, newer) == ["host", "device", "device"]
    assert pool.stats()["device"].bytes == 2 * session_bytes


def test_a_session_the_store_could_not_return_can_be_asked_for_again(
    engine, session_bytes, tmp_path
):
    class Unreachable(Exception):
        pass

    class FlakyStore(LocalObjectStore):
        """Fails its first download, as a store behind a flaky network does."""

        failures = 1

        def get_file(self, key, path):
            if self.failures:
                self.failures -= 1
                raise Unreachable(f"could not reach the store for {key}")
            return super().get_file(key, path)

    pool = SessionPool(
        engine, TierConfig(device_bytes=0, host_bytes=0), FlakyStore(LocalConfig(root=tmp_path))
    )
    session = pool.generate("a cat", steps=STEPS, seed=1)
    pool.generate("a dog", steps=STEPS, seed=2)
    assert pool.tier(session.id) == "store"

    with pytest.raises(Unreachable):
        pool.get(session.id)
    returned = pool.get(session.id)

    assert returned.id == session.id and np.array_equal(returned.image, session.image)


def test_an_edit_that_cannot_fit_its_new_cache_is_refused(engine, session_bytes):
    pool = SessionPool(engine, TierConfig(device_bytes=session_bytes // 2))
    session = pool.generate("a cat", steps=STEPS, seed=1)
    pool.generate("a dog", steps=STEPS, seed=2)
    assert pool.tier(session.id) == "host"

    with pytest.raises(CacheBudgetError, match="device budget"):
        pool.edit(session.id, "a dog")
    assert pool.get(session.id).version == 0


def test_an_edit_that_fails_midway_leaves_its_session_at_its_version_with_a_cache(
    engine, session_bytes
):
    pool = _pool(engine, session_bytes)
    session = pool.generate("a cat", steps=STEPS, seed=1)

    def interrupt(step: int, steps: int) -> None:
        if step == steps:  # the last step: the cache is written in place by then
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        pool.edit(session.id, "a dog", on_step=interrupt)

    held = pool.get(session.id)
    assert held.version == 0 and held.current.cache is not None
    alone = engine.generate("a cat", steps=STEPS, seed=1).edit("a dog")
    assert np.array_equal(pool.edit(session.id, "a dog").image, alone.image)
