"""Snapshots in an object store, restore, and rebuild from a recipe: all exact."""

import numpy as np
import pytest
import torch

from fisedit.engine import EditConfig, Engine, EngineConfig, SparseConfig
from fisedit.engine.recipe import ModelMismatchError, rebuild, recipe_of
from fisedit.engine.snapshot import (
    Manifest,
    SnapshotError,
    delete_snapshot,
    restore,
    snapshot,
    snapshot_versions,
)
from fisedit.engine.tiers import adopt
from fisedit.storage import LocalConfig, LocalObjectStore

STEPS = 8
CAT, DOG, RED_DOG = "a cat on a bench", "a dog on a bench", "a dog on a red bench"


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    config = EngineConfig(progress=False, edit=EditConfig(mask_steps=3))
    return Engine.from_pretrained(tiny_model_dir, config)


@pytest.fixture
def local_store(tmp_path) -> LocalObjectStore:
    return LocalObjectStore(LocalConfig(root=tmp_path / "store"))


def _user_mask() -> torch.Tensor:
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[5:14, 9:20] = True
    return mask


def _edited_session(engine):
    session = engine.generate(CAT, steps=STEPS, seed=11)
    session.edit(DOG)
    session.edit("a dog on a bench at noon", mask=_user_mask())
    return session


def assert_same_version(a, b) -> None:
    assert a.number == b.number and a.prompt == b.prompt
    assert np.array_equal(a.image, b.image)
    assert a.cache.tensors.keys() == b.cache.tensors.keys()
    for name, tensor in a.cache.tensors.items():
        assert torch.equal(tensor, b.cache.tensors[name]), name


def test_edit_after_restore_equals_edit_on_the_session_that_stayed(engine, store):
    session = _edited_session(engine)

    key = snapshot(session, store)
    restored = restore(engine, store, session.id)

    assert key == f"sessions/{session.id}/v2/manifest.json"
    assert restored.id == session.id and restored.prompts == session.prompts
    assert torch.equal(restored.history[2].user_mask, _user_mask())
    assert_same_version(restored.current, session.current)
    assert restored.current.cache.tensors["conv_in.out"][0].is_contiguous(
        memory_format=torch.channels_last
    )
    assert_same_version(restored.edit(RED_DOG), session.edit(RED_DOG))


def test_manifest_indexes_every_shard(engine, local_store):
    session = engine.generate(CAT, steps=STEPS, seed=12)
    shard_limit = session.current.cache.nbytes // 3

    manifest_key = snapshot(session, local_store, shard_bytes=shard_limit)

    manifest = Manifest.model_validate_json(local_store.get(manifest_key))
    shards = sorted(f"sessions/{session.id}/v0/{s}" for s in manifest.shards)
    assert len(shards) >= 3
    assert sorted([*shards, manifest_key]) == local_store.list(f"sessions/{session.id}/v0/")
    assert manifest.recipe.config_hash == engine.model.config_hash
    assert manifest.versions[0].prompt == CAT and manifest.steps == STEPS
    assert set(manifest.tensors) >= {"cache/latents", "image/0"}


class FailingStore(LocalObjectStore):
    """A local store whose connection drops after a number of file uploads."""

    def __init__(self, root, uploads_before_failure: int) -> None:
        super().__init__(LocalConfig(root=root))
        self.uploads_left = uploads_before_failure

    def put_file(self, key, path, *, create_only=False) -> None:
        if self.uploads_left == 0:
            raise ConnectionError("connection lost")
        self.uploads_left -= 1
        super().put_file(key, path, create_only=create_only)


def test_a_snapshot_interrupted_midway_does_not_exist(engine, tmp_path):
    session = engine.generate(CAT, steps=STEPS, seed=12)
    store = FailingStore(tmp_path, uploads_before_failure=2)
    shard_limit = session.current.cache.nbytes // 4

    with pytest.raises(ConnectionError):
        snapshot(session, store, shard_bytes=shard_limit)

    assert len(store.list(f"sessions/{session.id}/")) == 2
    assert snapshot_versions(store, session.id) == []
    with pytest.raises(SnapshotError, match="no complete snapshot"):
        restore(engine, store, session.id)


def test_snapshot_of_a_version_is_written_once(engine, local_store):
    session = engine.generate(CAT, steps=STEPS, seed=13)
    key = snapshot(session, local_store)
    before = local_store.get(key)

    assert snapshot(session, local_store) == key
    assert local_store.get(key) == before


def test_restore_takes_the_newest_complete_version(engine, local_store):
    session = engine.generate(CAT, steps=STEPS, seed=14)
    snapshot(session, local_store)
    session.edit(DOG)
    snapshot(session, local_store)
    session.edit(RED_DOG)
    snapshot(session, local_store)
    # A version whose manifest never landed does not exist.
    local_store.delete(f"sessions/{session.id}/v2/manifest.json")

    assert snapshot_versions(local_store, session.id) == [0, 1]
    assert restore(engine, local_store, session.id).version == 1
    assert restore(engine, local_store, session.id, version=0).version == 0
    with pytest.raises(SnapshotError, match="no complete snapshot of version 2"):
        restore(engine, local_store, session.id, version=2)
    with pytest.raises(SnapshotError, match="no complete snapshot of session 'nobody'"):
        restore(engine, local_store, "nobody")


def test_a_deleted_snapshot_leaves_the_other_versions(engine, local_store):
    session = engine.generate(CAT, steps=STEPS, seed=14)
    snapshot(session, local_store)
    session.edit(DOG)
    snapshot(session, local_store)

    delete_snapshot(local_store, session.id, 0)

    assert local_store.list(f"sessions/{session.id}/v0/") == []
    assert snapshot_versions(local_store, session.id) == [1]
    assert restore(engine, local_store, session.id).prompts == [CAT, DOG]


def _shard_key(store, session) -> str:
    return next(k for k in store.list(f"sessions/{session.id}/") if k.endswith(".safetensors"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) // 2], "truncated"),
        (lambda data: data[:-9] + bytes(b ^ 0xFF for b in data[-9:]), "corrupted"),
        (None, "missing"),
    ],
    ids=["truncated", "corrupted", "missing"],
)
def test_damaged_snapshot_is_a_clear_error(engine, store, damage, message):
    session = engine.generate(CAT, steps=STEPS, seed=15)
    snapshot(session, store)
    key = _shard_key(store, session)
    if damage is None:
        store.delete(key)
    else:
        store.put(key, damage(store.get(key)))

    with pytest.raises(SnapshotError, match=message):
        restore(engine, store, session.id)


def test_snapshot_of_another_model_is_refused(engine, tiny_model_dirs, local_store):
    session = engine.generate(CAT, steps=STEPS, seed=16)
    snapshot(session, local_store)
    other = Engine.from_pretrained(tiny_model_dirs["sd2"], EngineConfig(progress=False))

    with pytest.raises(SnapshotError, match="was made with model"):
        restore(other, local_store, session.id)
    with pytest.raises(ModelMismatchError):
        rebuild(other, recipe_of(session))


def test_snapshot_recorded_in_another_dtype_is_refused_and_the_recipe_rebuilt(
    engine, tiny_model_dir, local_store
):
    session = engine.generate(CAT, steps=STEPS, seed=17)
    snapshot(session, local_store)
    bf16 = Engine.from_pretrained(tiny_model_dir, EngineConfig(progress=False, dtype="bfloat16"))

    with pytest.raises(SnapshotError, match="recorded in float32; this engine runs bfloat16"):
        restore(bf16, local_store, session.id)
    adopted, path = adopt(bf16, recipe_of(session), local_store)
    assert path == "rebuild"
    assert {t.dtype for t in adopted.current.cache.tensors.values()} >= {torch.bfloat16}


def test_rebuild_from_the_recipe_alone_is_identical(engine):
    session = _edited_session(engine)
    recipe = recipe_of(session)

    rebuilt = rebuild(engine, recipe)

    assert rebuilt.id == session.id and rebuilt.version == 2
    assert [e.params.prompt for e in recipe.edits] == session.prompts[1:]
    assert recipe.edits[0].user_mask is None
    assert torch.equal(recipe.edits[1].user_mask.unpack(), _user_mask())
    assert_same_version(rebuilt.current, session.current)
    assert_same_version(rebuilt.edit(RED_DOG), session.edit(RED_DOG))


@pytest.mark.parametrize(
    ("sparse", "message", "needed"),
    [
        # Self-attention's keys and values, where the default records its input.
        (
            SparseConfig(cached_keys_values=True),
            r"lacks \d+ maps .*cached_keys_values=True",
            "down_blocks.0.attentions.0.block0.attn1_kv",
        ),
        # Single-pixel output blocks split GroupNorm's statistics blocks, so a transformer
        # reads its input outside the region too: the resnet before it records its output.
        (
            SparseConfig(block_size=1),
            r"lacks \d+ maps .*block_size=1",
            "down_blocks.0.resnets.0.out",
        ),
        # Sparse 8x8 layers read the maps that the default, running them dense, records not.
        (
            SparseConfig(dense_below=1),
            r"no maps of layers whose outputs' side is below 16 .*\(dense_below=1\)",
            "mid_block.resnets.0.norm2_in",
        ),
    ],
    ids=["cached-keys-values", "block-size-1", "dense-below-1"],
)
def test_snapshot_recorded_with_other_cached_maps_is_refused_and_the_recipe_rebuilt(
    engine, tiny_model_dir, local_store, sparse, message, needed
):
    """A cache recorded under another SparseConfig may lack maps this engine's sparse steps
    read: restoring refuses it by name, and adopting the session rebuilds it from its
    recipe."""
    session = engine.generate(CAT, steps=STEPS, seed=18)
    snapshot(session, local_store)
    other = Engine.from_pretrained(tiny_model_dir, EngineConfig(progress=False, sparse=sparse))

    with pytest.raises(SnapshotError, match=message):
        restore(other, local_store, session.id)
    adopted, path = adopt(other, recipe_of(session), local_store)
    assert path == "rebuild"
    assert needed not in session.current.cache
    assert needed in adopted.current.cache
