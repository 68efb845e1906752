"""Session snapshots in an object store.

A snapshot of version v of session s lives under `sessions/<s>/v<v>/`: safetensors shards
first, then `manifest.json`, which lists every tensor, shard size and checksum. A version
without a manifest does not exist, so a writer that dies midway leaves nothing readable.
"""

import contextlib
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from fisedit.engine.cache import ActivationCache
from fisedit.engine.config import EditParams
from fisedit.engine.recipe import ModelMismatchError, SessionRecipe, check_model, recipe_of
from fisedit.engine.session import EditReport, EditSession, Engine, Version
from fisedit.storage import ObjectExistsError, ObjectNotFoundError, ObjectStore

# 2: transformer blocks cache attn1's (normalised) input, no longer the block's input.
# 3: the block statistics of every GroupNorm input a sparse layer normalises.
FORMAT = "fisedit-snapshot/3"
SHARD_BYTES = 256 * 2**20


class SnapshotError(ValueError):
    """A snapshot is missing, incomplete, corrupted, or made with another model."""


class VersionRecord(BaseModel):
    """A version's metadata in a manifest; its tensors are in the shards."""

    number: int
    prompt: str
    report: EditReport
    edit: EditParams | None = None
    has_mask: bool = False
    has_user_mask: bool = False


class Manifest(BaseModel):
    """The index of one snapshot, written after all of its shards."""

    format: str = FORMAT
    recipe: SessionRecipe
    scheduler_config: dict
    steps: int
    dtype: str | None = None
    """The dtype the cache was recorded in (None in snapshots written before it was kept)."""
    dense_below: int | None = None
    """The SparseConfig.dense_below the cache was recorded under: layers whose outputs'
    side is below it recorded no maps (None in snapshots written before, where every layer
    recorded them)."""
    versions: list[VersionRecord]
    tensors: dict[str, str]
    """Tensor name -> shard file."""
    shards: dict[str, tuple[int, str]]
    """Shard file -> (bytes, sha256)."""


def _prefix(session_id: str, version: int) -> str:
    return f"sessions/{session_id}/v{version}/"


def _dtype_name(engine: Engine) -> str:
    return str(engine.model.dtype).removeprefix("torch.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _tensors(session: EditSession) -> dict[str, torch.Tensor]:
    tensors = {f"cache/{k}": v for k, v in session.current_cache().tensors.items()}
    for v in session.history:
        tensors[f"image/{v.number}"] = torch.from_numpy(np.ascontiguousarray(v.image))
        if v.mask is not None:
            tensors[f"mask/{v.number}"] = v.mask
        if v.user_mask is not None:
            tensors[f"user_mask/{v.number}"] = v.user_mask
    return {k: t.detach().cpu().contiguous() for k, t in tensors.items()}


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def snapshot(session: EditSession, store: ObjectStore, shard_bytes: int = SHARD_BYTES) -> str:
    """Writes the session's current version to `store`; returns the manifest key.

    Versions are immutable, so a version already snapshotted is left as it is (the history
    it lists may lack versions made since, on other branches: the session's recipe has them).
    """
    prefix = _prefix(session.id, session.version)
    manifest_key = prefix + "manifest.json"
    if store.exists(manifest_key):
        return manifest_key
    index, shards = {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        for number, shard in enumerate(_shards(_tensors(session), shard_bytes)):
            name = f"shard-{number:05d}.safetensors"
            path = Path(workdir) / name
            save_file(shard, str(path))
            shards[name] = (path.stat().st_size, _sha256(path))
            index.update(dict.fromkeys(shard, name))
            store.put_file(prefix + name, path)
            path.unlink()
    manifest = Manifest(
        recipe=recipe_of(session),
        scheduler_config=session.engine.model.scheduler_config,
        steps=session.params.steps,
        dtype=_dtype_name(session.engine),
        dense_below=session.engine.config.sparse.dense_below,
        versions=[
            VersionRecord(
                number=v.number,
                prompt=v.prompt,
                report=v.report,
                edit=v.edit,
                has_mask=v.mask is not None,
                has_user_mask=v.user_mask is not None,
            )
            for v in session.history
        ],
        tensors=index,
        shards=shards,
    )
    # Losing the create-only race is fine: the winner wrote the same immutable version.
    with contextlib.suppress(ObjectExistsError):
        store.put(manifest_key, manifest.model_dump_json().encode(), create_only=True)
    return manifest_key


def snapshot_versions(store: ObjectStore, session_id: str) -> list[int]:
    """Versions of a session that have a complete snapshot, oldest first."""
    keys = store.list(f"sessions/{session_id}/")
    versions = []
    for key in keys:
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == "manifest.json" and parts[2].startswith("v"):
            versions.append(int(parts[2][1:]))
    return sorted(versions)


def delete_snapshot(store: ObjectStore, session_id: str, version: int) -> None:
    """Removes a version's snapshot: its manifest first, so that no reader ever finds a
    manifest whose shards are gone."""
    prefix = _prefix(session_id, version)
    store.delete(prefix + "manifest.json")
    for key in store.list(prefix):
        store.delete(key)


def restore(
    engine: Engine, store: ObjectStore, session_id: str, version: int | None = None
) -> EditSession:
    """Loads the newest complete snapshot of a session (or `version`) into a new session.

    Every shard is checked against the manifest before anything is built, so a damaged
    snapshot raises SnapshotError and no session is returned.
    """
    available = snapshot_versions(store, session_id)
    if version is None and not available:
        raise SnapshotError(f"no complete snapshot of session {session_id!r}")
    version = available[-1] if version is None else version
    if version not in available:
        raise SnapshotError(
            f"session {session_id!r} has no complete snapshot of version {version} "
            f"(complete versions: {available or 'none'})"
        )
    manifest, tensors = _read(engine, store, _prefix(session_id, version))
    return _session(engine, manifest, tensors, store)


def stored_cache(
    engine: Engine, store: ObjectStore, session_id: str, version: int
) -> ActivationCache | None:
    """The cache of a session's version from its snapshot; None if it has no complete and
    intact one."""
    if version not in snapshot_versions(store, session_id):
        return None
    try:
        manifest, tensors = _read(engine, store, _prefix(session_id, version))
    except SnapshotError:
        return None
    return _cache(engine, manifest, tensors)


def _read(
    engine: Engine, store: ObjectStore, prefix: str
) -> tuple[Manifest, dict[str, torch.Tensor]]:
    try:
        manifest = Manifest.model_validate_json(store.get(prefix + "manifest.json"))
    except ValueError as error:
        raise SnapshotError(f"the manifest of {prefix} is unreadable: {error}") from error
    if manifest.format != FORMAT:
        raise SnapshotError(f"{prefix} has format {manifest.format!r}, expected {FORMAT!r}")
    try:
        check_model(engine, manifest.recipe)
    except ModelMismatchError as error:
        raise SnapshotError(f"cannot restore {prefix}: {error}") from error
    # A cache recorded in another dtype cannot be edited by this engine's layers.
    if manifest.dtype not in (None, _dtype_name(engine)):
        raise SnapshotError(
            f"cannot restore {prefix}: its cache was recorded in {manifest.dtype}; "
            f"this engine runs {_dtype_name(engine)}"
        )
    # Sparse steps read the maps of every layer at a side from this engine's dense_below up.
    dense_below = engine.config.sparse.dense_below
    if manifest.dense_below is not None and manifest.dense_below > dense_below:
        raise SnapshotError(
            f"cannot restore {prefix}: its cache has no maps of layers whose outputs' side is "
            f"below {manifest.dense_below} (recorded with SparseConfig.dense_below="
            f"{manifest.dense_below}), which this engine's sparse steps read (dense_below="
            f"{dense_below})"
        )
    cached = [name.removeprefix("cache/") for name in manifest.tensors if name.startswith("cache/")]
    try:
        engine.check_recorded_maps(cached)
    except ValueError as error:
        raise SnapshotError(f"cannot restore {prefix}: {error}") from error
    return manifest, _load_shards(store, prefix, manifest, engine.model.device)


def _load_shards(
    store: ObjectStore, prefix: str, manifest: Manifest, device: torch.device
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, (size, sha256) in manifest.shards.items():
            path = Path(workdir) / name
            try:
                store.get_file(prefix + name, path)
            except ObjectNotFoundError as error:
                raise SnapshotError(f"shard {prefix + name} is missing") from error
            actual = path.stat().st_size
            if actual != size:
                raise SnapshotError(
                    f"shard {prefix + name} is truncated or padded: {actual} bytes, "
                    f"the manifest says {size}"
                )
            if _sha256(path) != sha256:
                raise SnapshotError(f"shard {prefix + name} is corrupted (checksum mismatch)")
            tensors.update(load_file(str(path)))
    missing = set(manifest.tensors) - set(tensors)
    if missing:
        raise SnapshotError(f"{prefix} lacks tensors listed in its manifest: {sorted(missing)}")
    return {k: t.to(device) if k.startswith("cache/") else t for k, t in tensors.items()}


def _cache(engine: Engine, manifest: Manifest, tensors: dict[str, torch.Tensor]):
    recorded = {k.removeprefix("cache/"): t for k, t in tensors.items() if k.startswith("cache/")}
    # Shards hold maps NCHW; the engine may run (and read its cache) NHWC.
    return ActivationCache(manifest.steps, recorded).to(
        engine.model.device, channels_last=engine.config.channels_last
    )


def _session(
    engine: Engine, manifest: Manifest, tensors: dict[str, torch.Tensor], store: ObjectStore
) -> EditSession:
    history = [
        Version(
            number=record.number,
            prompt=record.prompt,
            image=tensors[f"image/{record.number}"].numpy(),
            cache=None,
            report=record.report,
            mask=tensors[f"mask/{record.number}"] if record.has_mask else None,
            edit=record.edit,
            user_mask=tensors[f"user_mask/{record.number}"] if record.has_user_mask else None,
        )
        for record in manifest.versions
    ]
    recipe = manifest.recipe
    current = history[recipe.version]
    current.cache = _cache(engine, manifest, tensors)
    params = engine.filled_in(recipe.params)
    return EditSession(
        engine, params, current, id=recipe.session_id, history=history, snapshots=store
    )
