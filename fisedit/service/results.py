"""Edit requests and results, and what every committed version leaves in the store.

Keys are relative to a tenant's part of the store (`tenants/<tenant>/`):

    sessions/<session>/v<n>/image.png, mask.png, report.json, recipe.json

written create-only once per version, recipe last: a version whose recipe.json exists is
committed, and that recipe is what another worker adopts the session from.
"""

import contextlib
import io
import re
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fisedit.engine.config import Prompt
from fisedit.engine.recipe import SessionRecipe, recipe_of
from fisedit.engine.session import EditReport, EditSession
from fisedit.storage import ObjectExistsError, ObjectNotFoundError, ObjectStore, validate_key

CachePath = Literal["generate", "hit", "restore", "restore+replay", "rebuild"]
"""How the worker came by the session it edited: `generate` made it; `hit` found it in
memory; `restore` loaded its snapshot; `restore+replay` loaded an older snapshot and
replayed the later edits; `rebuild` recomputed it from its recipe."""

STORE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
"""A session's or a job's id: it becomes one segment of a store key."""


def is_store_id(ident: str) -> bool:
    # fullmatch: `$` also matches before a final newline.
    return STORE_ID.fullmatch(ident) is not None


def check_session_id(session_id: str) -> str:
    """Session ids become key segments, so only letters, digits, '-' and '_' pass."""
    if not is_store_id(session_id):
        raise ValueError(
            f"session id {session_id!r} must be 1-128 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return session_id


class EditSpec(BaseModel):
    """One edit: its prompt and, optionally, a mask as PNG bytes (base64 in JSON, at latent
    or image size) or as the key of a PNG in the tenant's store."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64"
    )

    prompt: Prompt
    mask: bytes | None = None
    mask_key: str | None = None
    mask_steps: int | None = Field(None, ge=0)

    @field_validator("mask_key")
    @classmethod
    def _valid_key(cls, key: str | None) -> str | None:
        return None if key is None else validate_key(key)

    @model_validator(mode="after")
    def _one_mask(self) -> "EditSpec":
        if self.mask is not None and self.mask_key is not None:
            raise ValueError("give mask or mask_key, not both")
        return self


class EditRequest(EditSpec):
    """An edit of a session. `extends` names the session's current version, so a chain
    never runs on stale state; `from_version`, an older version to edit instead of that one
    (the new version branches off it, numbered after the newest)."""

    extends: int | None = Field(None, ge=0)
    from_version: int | None = Field(None, ge=0)
    request_id: str | None = None
    """Who asked (a job's edit: `<job id>/<index>`), kept in the result: a retry knows its
    own committed edit from another's."""


class StaleVersionError(ValueError):
    """An edit extends a version that is no longer the session's current one. (An edit of
    an older version names it as `from_version`, and the current one as `extends`, so that
    concurrent clients never edit from under each other.)"""


def check_current(session_id: str, current: int, extends: int | None) -> None:
    """Raises StaleVersionError unless `extends` is None or the session's `current` version."""
    if extends is not None and extends != current:
        raise StaleVersionError(
            f"session {session_id} is at version {current}, not {extends}: "
            "fetch the current version before editing"
        )


def check_from_version(session_id: str, current: int, from_version: int | None) -> None:
    """Raises ValueError (naming `from_version`) unless it is None or one of the session's
    versions, 0 to `current`."""
    if from_version is not None and from_version > current:
        raise ValueError(
            f"from_version: session {session_id} has versions 0 to {current}, not {from_version}"
        )


class EditResult(BaseModel):
    """A committed version: where its files are and what it cost. Keys are relative to the
    tenant's part of the store."""

    session_id: str
    version: int
    worker_id: str
    cache_path: CachePath
    image_key: str
    mask_key: str | None
    report_key: str
    recipe_key: str
    mask_ratio: float
    mac_fraction: float
    latency_s: float
    """Seconds on the worker, bringing the session into memory included."""
    dense_estimate_s: float | None = None
    """Seconds the same image would take as a dense generation: the engine time of the
    session's base generation (version 0, every step dense), CUDA graph capture excluded.
    None in results written before it was recorded."""
    report: EditReport
    request_id: str | None = None
    """The request_id of the edit that made this version, if it had one."""


def version_prefix(session_id: str, version: int) -> str:
    return f"sessions/{session_id}/v{version}/"


def recipe_key(session_id: str, version: int) -> str:
    return version_prefix(session_id, version) + "recipe.json"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def commit(
    store: ObjectStore,
    session: EditSession,
    worker_id: str,
    cache_path: CachePath,
    latency_s: float,
    request_id: str | None = None,
) -> EditResult:
    """Writes the session's current version (image, mask, report, then recipe) and returns
    its result. Writes are create-only: a retry that finds a file keeps the first one."""
    version = session.current
    prefix = version_prefix(session.id, version.number)
    mask_key = None if version.mask is None else prefix + "mask.png"
    result = EditResult(
        session_id=session.id,
        version=version.number,
        worker_id=worker_id,
        cache_path=cache_path,
        image_key=prefix + "image.png",
        mask_key=mask_key,
        report_key=prefix + "report.json",
        recipe_key=recipe_key(session.id, version.number),
        mask_ratio=version.report.mask_ratio,
        mac_fraction=version.report.mac_fraction,
        latency_s=latency_s,
        dense_estimate_s=_dense_estimate_s(session),
        report=version.report,
        request_id=request_id,
    )
    files = {result.image_key: png(version.image)}
    if mask_key is not None:
        files[mask_key] = png(version.mask.numpy().astype(np.uint8) * 255)
    files[result.report_key] = result.model_dump_json().encode()
    files[result.recipe_key] = recipe_of(session).model_dump_json().encode()
    for key, data in files.items():
        with contextlib.suppress(ObjectExistsError):
            store.put(key, data, create_only=True)
    return result


def _dense_estimate_s(session: EditSession) -> float | None:
    base = session.history[0].report
    if base.version != 0:  # a fork starts at a later version: no base generation to go by
        return None
    return base.total_latency_s - base.graph_capture_s


def committed_versions(store: ObjectStore, session_id: str) -> list[int]:
    """Versions of a session with a recipe in the store, oldest first."""
    versions = []
    for key in store.list(f"sessions/{session_id}/"):
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == "recipe.json" and parts[2][1:].isdigit():
            versions.append(int(parts[2][1:]))
    return sorted(versions)


def newest_recipe(store: ObjectStore, session_id: str) -> SessionRecipe | None:
    """The recipe of the session's newest committed version, or None if it has none."""
    versions = committed_versions(store, session_id)
    if not versions:
        return None
    return SessionRecipe.model_validate_json(store.get(recipe_key(session_id, versions[-1])))


def stored_result(store: ObjectStore, session_id: str, version: int) -> EditResult | None:
    """The result of a committed version, or None if that version is not committed."""
    if not store.exists(recipe_key(session_id, version)):
        return None
    try:
        data = store.get(version_prefix(session_id, version) + "report.json")
    except ObjectNotFoundError:
        return None
    return EditResult.model_validate_json(data)
