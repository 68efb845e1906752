"""Session recipes: what a session was made from, enough to recompute it exactly."""

import base64

import numpy as np
import torch
from pydantic import BaseModel

from fisedit.engine.config import EditParams, GenerationParams
from fisedit.engine.session import EditSession, Engine


class ModelMismatchError(ValueError):
    """A session was made with another model than the engine runs."""


class PackedMask(BaseModel):
    """A boolean mask as bits, so recipes stay small JSON."""

    shape: tuple[int, int]
    bits: str

    @classmethod
    def pack(cls, mask: torch.Tensor) -> "PackedMask":
        packed = np.packbits(mask.cpu().numpy().astype(bool))
        return cls(shape=tuple(mask.shape), bits=base64.b64encode(packed.tobytes()).decode())

    def unpack(self) -> torch.Tensor:
        bits = np.frombuffer(base64.b64decode(self.bits), dtype=np.uint8)
        count = self.shape[0] * self.shape[1]
        return torch.from_numpy(np.unpackbits(bits)[:count].reshape(self.shape).astype(bool))


class RecipeEdit(BaseModel):
    """One edit of a recipe: its request and the user mask, if one was given."""

    params: EditParams
    user_mask: PackedMask | None = None


class SessionRecipe(BaseModel):
    """Everything needed to recreate a session by recomputing it."""

    session_id: str
    model_id: str
    config_hash: str
    params: GenerationParams
    edits: list[RecipeEdit] = []


def recipe_of(session: EditSession) -> SessionRecipe:
    """The recipe of a session's history up to its current version."""
    model = session.engine.model
    edits = [
        RecipeEdit(
            params=v.edit,
            user_mask=None if v.user_mask is None else PackedMask.pack(v.user_mask),
        )
        for v in session.history[1:]
    ]
    return SessionRecipe(
        session_id=session.id,
        model_id=model.model_id,
        config_hash=model.config_hash,
        params=session.params,
        edits=edits,
    )


def rebuild(engine: Engine, recipe: SessionRecipe) -> EditSession:
    """Recreates a session by re-running its generation and edits; same seed, same result."""
    check_model(engine, recipe)
    params = recipe.params.model_dump()
    session = engine.generate(params.pop("prompt"), **params)
    session.id = recipe.session_id
    for edit in recipe.edits:
        _apply(session, edit)
    return session


def replay(session: EditSession, recipe: SessionRecipe) -> int:
    """Brings a session (e.g. restored from an older snapshot) up to its recipe by running
    only the edits after its current version: a partial rebuild. Returns how many ran.

    Raises ValueError if the recipe is of another session, is older than the session, or
    records other edits than the session's history.
    """
    if recipe.session_id != session.id:
        raise ValueError(f"recipe of session {recipe.session_id!r} cannot replay {session.id!r}")
    check_model(session.engine, recipe)
    if session.version > len(recipe.edits):
        raise ValueError(
            f"session {session.id!r} is at version {session.version}, newer than its recipe "
            f"(version {len(recipe.edits)})"
        )
    made = [v.edit for v in session.history[1:]]
    recorded = [edit.params for edit in recipe.edits[: session.version]]
    if session.params != recipe.params or made != recorded:
        raise ValueError(f"session {session.id!r} has another history than its recipe")
    later = recipe.edits[session.version :]
    for edit in later:
        _apply(session, edit)
    return len(later)


def _apply(session: EditSession, edit: RecipeEdit) -> None:
    mask = None if edit.user_mask is None else edit.user_mask.unpack()
    session.edit(edit.params.prompt, mask=mask, mask_steps=edit.params.mask_steps)


def check_model(engine: Engine, recipe: SessionRecipe) -> None:
    """Raises ModelMismatchError unless the engine runs the model the recipe was made with."""
    model = engine.model
    if recipe.config_hash != model.config_hash:
        raise ModelMismatchError(
            f"session {recipe.session_id!r} was made with model {recipe.model_id!r} "
            f"(config {recipe.config_hash}); this engine runs {model.model_id!r} "
            f"(config {model.config_hash})"
        )
