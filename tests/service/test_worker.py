"""SessionHost, the EditWorker without Ray: every version committed under deterministic keys,
stale versions refused, lost sessions adopted from the store with the same images."""

import io
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fisedit.engine import Engine, GenerationParams
from fisedit.engine.config import EditConfig, EngineConfig
from fisedit.engine.recipe import SessionRecipe
from fisedit.service.config import ServiceConfig, StoreConfig
from fisedit.service.results import EditRequest, EditResult, StaleVersionError, png
from fisedit.service.worker import SessionHost

ENGINE = EngineConfig(progress=False, edit=EditConfig(mask_steps=1))
BASE = GenerationParams(prompt="a cat on a bench", steps=4, seed=3)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, ENGINE)


def _config(tiny_model_dir, store: StoreConfig) -> ServiceConfig:
    return ServiceConfig(model=tiny_model_dir, engine=ENGINE, store=store)


@pytest.fixture
def config(tiny_model_dir, tmp_path) -> ServiceConfig:
    return _config(tiny_model_dir, StoreConfig(url=str(tmp_path / "store")))


def _image(host: SessionHost, result: EditResult) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(host.store.get(result.image_key))))


def test_every_version_is_committed_under_deterministic_keys(engine, config):
    host = SessionHost(config, "w0", engine)

    made = host.generate("s1", BASE)
    edited = host.edit("s1", EditRequest(prompt="a dog on a bench", extends=0))

    assert (made.version, made.cache_path, made.mask_key) == (0, "generate", None)
    assert (edited.version, edited.cache_path, edited.worker_id) == (1, "hit", "w0")
    assert host.store.list("sessions/s1/v1/") == [
        "sessions/s1/v1/image.png",
        "sessions/s1/v1/mask.png",
        "sessions/s1/v1/recipe.json",
        "sessions/s1/v1/report.json",
    ]
    assert config.store.open().exists("tenants/local/sessions/s1/v1/recipe.json")
    recipe = SessionRecipe.model_validate_json(host.store.get(edited.recipe_key))
    assert [e.params.prompt for e in recipe.edits] == ["a dog on a bench"]
    assert np.array_equal(_image(host, edited), host.pool.get("s1").image)
    assert 0 < edited.mask_ratio <= 1 and 0 < edited.mac_fraction < 1
    # What a dense generation of any version takes: the base generation's engine time.
    base = made.report
    assert made.dense_estimate_s == base.total_latency_s - base.graph_capture_s > 0
    assert edited.dense_estimate_s == made.dense_estimate_s
    assert host.summary["sessions"] == {"s1": 1}


def test_a_retried_generation_returns_the_committed_version(engine, config):
    host = SessionHost(config, "w0", engine)
    first = host.generate("s1", BASE)
    assert host.generate("s1", BASE) == first


def _broken_png(array: np.ndarray) -> bytes:
    """A PNG whose image data chunk claims 3 bytes: Pillow opens it, then fails decoding it
    (with a SyntaxError, "broken PNG file")."""
    data = bytearray(png(array))
    start = data.index(b"IDAT")
    data[start - 4 : start] = (3).to_bytes(4, "big")
    return bytes(data)


def _bomb_png(side: int) -> bytes:
    """A few bytes of PNG whose header claims a side x side image: Pillow refuses to open
    it (DecompressionBombError) above its pixel limit."""
    data = bytearray(png(np.ones((1, 1), np.uint8)))
    start = data.index(b"IHDR") + 4
    data[start : start + 8] = side.to_bytes(4, "big") * 2
    data[start + 13 : start + 17] = zlib.crc32(bytes(data[start - 4 : start + 13])).to_bytes(
        4, "big"
    )
    return bytes(data)


def test_stale_versions_and_bad_masks_are_refused_and_the_session_stays(engine, config):
    host = SessionHost(config, "w0", engine)
    host.generate("s1", BASE)
    host.edit("s1", EditRequest(prompt="a dog on a bench", extends=0))

    with pytest.raises(StaleVersionError, match="at version 1, not 0"):
        host.edit("s1", EditRequest(prompt="a fox on a bench", extends=0))
    for unreadable in (b"not a png", _broken_png(np.ones((32, 32), np.uint8)), _bomb_png(20000)):
        with pytest.raises(ValueError, match="mask: not a readable image"):
            host.edit("s1", EditRequest(prompt="a fox", mask=unreadable, extends=1))
    with pytest.raises(ValueError, match="mask_key: no file 'sessions/s1/v7/mask.png'"):
        host.edit("s1", EditRequest(prompt="a fox", mask_key="sessions/s1/v7/mask.png"))
    with pytest.raises(ValueError, match="mask: mask size .* matches neither"):
        host.edit("s1", EditRequest(prompt="a fox", mask=png(np.ones((5, 7), np.uint8))))
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        host.edit("s1", EditRequest(prompt="a fox", mask=png(np.zeros((32, 32), np.uint8))))
    with pytest.raises(ValueError, match=r"mask: 4096x8 pixels, larger than the image"):
        host.edit("s1", EditRequest(prompt="a fox", mask=png(np.ones((8, 4096), np.uint8))))

    assert host.pool.get("s1").version == 1 and host.summary["sessions"] == {"s1": 1}
    assert host.store.list("sessions/s1/v2/") == []


def test_a_worker_checks_an_edit_against_the_stored_session_without_taking_it(engine, config):
    """What a job's edit would be refused for is found before it is queued: any worker
    checks it against the session as stored (or the one a generation will make)."""
    SessionHost(config, "w0", engine).generate("s1", BASE)
    other = SessionHost(config, "w1", engine)
    square, empty = png(np.ones((32, 32), np.uint8)), png(np.zeros((32, 32), np.uint8))

    other.check_edit("s1", None, EditRequest(prompt="a fox", mask=square))
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        other.check_edit("s1", None, EditRequest(prompt="a fox", mask=empty))
    with pytest.raises(ValueError, match="mask_steps: .* must be smaller"):
        other.check_edit("s1", None, EditRequest(prompt="a fox", mask_steps=BASE.steps))
    with pytest.raises(ValueError, match="mask: mask size .* matches neither"):
        other.check_edit(
            None, BASE.model_copy(update={"height": 64}), EditRequest(prompt="a", mask=square)
        )
    with pytest.raises(KeyError, match="unknown session 's2'"):
        other.check_edit("s2", None, EditRequest(prompt="a fox"))
    assert "s1" not in other.pool and other.summary["sessions"] == {}


def test_another_worker_adopts_a_lost_session_and_edits_it_identically(engine, config):
    holder = SessionHost(config, "w0", engine)
    holder.generate("s1", BASE)
    holder.edit("s1", EditRequest(prompt="a dog on a bench", extends=0))
    holder.snapshot("s1")
    holder.edit("s1", EditRequest(prompt="a dog on a red bench", extends=1))
    undisturbed = holder.edit("s1", EditRequest(prompt="a fox on a red bench", extends=2))
    expected = _image(holder, undisturbed)
    holder.drop("s1")
    for key in holder.store.list("sessions/s1/v3/"):
        holder.store.delete(key)  # the holder died before committing version 3

    other = SessionHost(config, "w1", engine)
    adopted = other.edit("s1", EditRequest(prompt="a fox on a red bench", extends=2))

    assert (adopted.version, adopted.cache_path, adopted.worker_id) == (3, "restore+replay", "w1")
    assert np.array_equal(_image(other, adopted), other.pool.get("s1").image)
    assert np.array_equal(_image(other, adopted), expected)
    assert other.edit("s1", EditRequest(prompt="a fox", extends=3)).cache_path == "hit"


def test_results_go_to_s3_the_same_way(engine, tiny_model_dir, s3_endpoint):
    store = StoreConfig(url=f"s3://fisedit-test/{uuid.uuid4().hex}", endpoint_url=s3_endpoint)
    host = SessionHost(_config(tiny_model_dir, store), "w0", engine)

    host.generate("s1", BASE)
    result = host.edit("s1", EditRequest(prompt="a dog on a bench", extends=0))

    assert np.array_equal(_image(host, result), host.pool.get("s1").image)
    assert store.open().exists(f"tenants/local/{result.recipe_key}")


def test_draining_snapshots_every_session_held_so_it_restores_elsewhere(engine, config):
    holder = SessionHost(config, "w0", engine)
    for session_id in ("s1", "s2"):
        holder.generate(session_id, BASE)
    holder.edit("s1", EditRequest(prompt="a dog on a bench", extends=0))

    manifests = holder.drain()

    assert sorted(manifests) == ["sessions/s1/v1/manifest.json", "sessions/s2/v0/manifest.json"]
    other = SessionHost(config, "w1", engine)
    edited = other.edit("s1", EditRequest(prompt="a fox on a bench", extends=1))
    assert (edited.version, edited.cache_path) == (2, "restore")


def test_a_session_that_cannot_be_snapshotted_does_not_keep_the_others_from_draining(
    engine, config
):
    holder = SessionHost(config, "w0", engine)
    for session_id in ("t1", "t2"):
        holder.generate(session_id, BASE)
    # Something in the way of t1's first shard: its snapshot cannot be written.
    blocked = Path(config.store.url) / "tenants/local/sessions/t1/v0/shard-00000.safetensors"
    blocked.mkdir(parents=True)

    with pytest.raises(RuntimeError, match="w0 snapshotted 1 sessions but not t1: "):
        holder.drain()

    assert holder.store.exists("sessions/t2/v0/manifest.json")
    assert not holder.store.exists("sessions/t1/v0/manifest.json")
