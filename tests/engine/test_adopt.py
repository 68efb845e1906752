"""A lost session is adopted from its newest snapshot plus a replay of later edits, or
rebuilt from its recipe; every path gives the session that was lost, bit for bit."""

import numpy as np
import pytest
import torch

from fisedit.engine import EditConfig, Engine, EngineConfig
from fisedit.engine.recipe import SessionRecipe, rebuild, recipe_of, replay
from fisedit.engine.snapshot import restore, snapshot
from fisedit.engine.tiers import SessionPool, adopt
from fisedit.storage import LocalConfig, LocalObjectStore

STEPS = 4
EDITS = ["a dog on a bench", "a dog on a red bench", "a dog on a red bench at night"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    config = EngineConfig(progress=False, edit=EditConfig(mask_steps=1))
    return Engine.from_pretrained(tiny_model_dir, config)


@pytest.fixture(scope="module")
def lost(engine):
    """A session at version 3, with a user mask on its second edit."""
    session = engine.generate("a cat on a bench", steps=STEPS, seed=4)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[4:12, 6:20] = True
    session.edit(EDITS[0])
    session.edit(EDITS[1], mask=mask)
    session.edit(EDITS[2])
    return session


@pytest.fixture(scope="module")
def earlier_snapshots(engine, lost, tmp_path_factory) -> LocalObjectStore:
    """Snapshots of versions 1 and 2 of the lost session (made by an identical chain)."""
    store = LocalObjectStore(LocalConfig(root=tmp_path_factory.mktemp("earlier")))
    recipe = recipe_of(lost)
    session = rebuild(engine, recipe.model_copy(update={"edits": recipe.edits[:1]}))
    snapshot(session, store)
    replay(session, recipe.model_copy(update={"edits": recipe.edits[:2]}))
    snapshot(session, store)
    return store


@pytest.fixture
def store(tmp_path) -> LocalObjectStore:
    return LocalObjectStore(LocalConfig(root=tmp_path))


def _copy_snapshot(source, store, session_id: str, version: int) -> None:
    for key in source.list(f"sessions/{session_id}/v{version}/"):
        store.put(key, source.get(key))


def assert_same_session(a, b) -> None:
    assert (a.id, a.version, a.prompts) == (b.id, b.version, b.prompts)
    for x, y in zip(a.history, b.history, strict=True):
        assert np.array_equal(x.image, y.image)
    assert a.current.cache.tensors.keys() == b.current.cache.tensors.keys()
    for name, tensor in a.current.cache.tensors.items():
        assert torch.equal(tensor, b.current.cache.tensors[name]), name


def test_older_snapshot_plus_replay_equals_the_lost_session(engine, lost, earlier_snapshots, store):
    _copy_snapshot(earlier_snapshots, store, lost.id, 1)

    adopted, path = adopt(engine, recipe_of(lost), store)

    assert path == "restore+replay"
    assert_same_session(adopted, lost)


def test_a_current_snapshot_is_restored_without_replay(engine, lost, store):
    snapshot(lost, store)

    adopted, path = adopt(engine, recipe_of(lost), store)

    assert path == "restore"
    assert_same_session(adopted, lost)


def test_without_a_snapshot_the_recipe_is_rebuilt(engine, lost, store):
    adopted, path = adopt(engine, recipe_of(lost), store)
    assert path == "rebuild"
    assert_same_session(adopted, lost)


def test_a_damaged_newest_snapshot_falls_back_to_an_older_one(
    engine, lost, earlier_snapshots, store
):
    _copy_snapshot(earlier_snapshots, store, lost.id, 2)
    snapshot(lost, store)
    shard = next(k for k in store.list(f"sessions/{lost.id}/v3/") if k.endswith(".safetensors"))
    store.put(shard, b"garbage")

    adopted, path = adopt(engine, recipe_of(lost), store)

    assert path == "restore+replay"
    assert_same_session(adopted, lost)


def test_a_recipe_written_before_size_and_scheduler_were_kept_restores_its_snapshot(
    engine, lost, store
):
    snapshot(lost, store)
    written = recipe_of(lost).model_dump(mode="json")
    for field in ("height", "width", "scheduler"):
        del written["params"][field]

    adopted, path = adopt(engine, SessionRecipe.model_validate(written), store)

    assert path == "restore"
    assert_same_session(adopted, lost)


def test_replay_refuses_a_recipe_with_another_history(engine, lost, earlier_snapshots, store):
    _copy_snapshot(earlier_snapshots, store, lost.id, 2)
    restored = restore(engine, store, lost.id)
    recipe = recipe_of(lost)
    rewritten = recipe.edits[0].model_copy(update={"params": recipe.edits[1].params})

    with pytest.raises(ValueError, match="another history"):
        replay(restored, recipe.model_copy(update={"edits": [rewritten, *recipe.edits[1:]]}))
    with pytest.raises(ValueError, match="newer than its recipe"):
        replay(restored, recipe.model_copy(update={"edits": recipe.edits[:1]}))
    assert restored.version == 2


def test_a_pool_adopts_a_session_into_its_device_tier(engine, lost, earlier_snapshots, store):
    pool = SessionPool(engine, store=store)
    _copy_snapshot(earlier_snapshots, store, lost.id, 2)

    session, path = pool.adopt(recipe_of(lost))

    assert path == "restore+replay" and lost.id in pool and pool.tier(lost.id) == "device"
    assert_same_session(session, lost)
