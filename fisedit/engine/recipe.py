"""Session recipes: what a session was made from, enough to recompute it exactly."""

import base64

import numpy as np
import torch
from pydantic import BaseModel, model_validator

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
    """One edit of a recipe: its request, the user mask if one was given, and the version
    it extends."""

    params: EditParams
    user_mask: PackedMask | None = None
    parent: int | None = None
    """The version this edit extends; None (in recipes written before branching) for the
    one made just before it."""


class SessionRecipe(BaseModel):
    """Everything needed to recreate a session by recomputing it: the generation, then
    every edit in the order made (edit i makes version i + 1), each naming its parent."""

    session_id: str
    model_id: str
    config_hash: str
    params: GenerationParams
    edits: list[RecipeEdit] = []
    current: int | None = None
    """The session's current version where it is not the newest (after an undo)."""

    @model_validator(mode="after")
    def _versions_exist(self) -> "SessionRecipe":
        for number, edit in enumerate(self.edits, start=1):
            if edit.parent is None:
                edit.parent = number - 1
            elif not 0 <= edit.parent < number:
                raise ValueError(
                    f"edit {number} extends version {edit.parent}, which is not an earlier "
                    f"version (0 to {number - 1})"
                )
        if self.current is not None and not 0 <= self.current <= len(self.edits):
            raise ValueError(
                f"current version {self.current} does not exist (versions 0 to {len(self.edits)})"
            )
        return self

    @property
    def version(self) -> int:
        """The session's current version."""
        return len(self.edits) if self.current is None else self.current


def recipe_of(session: EditSession) -> SessionRecipe:
    """The recipe of a session's history: every version and which one is current."""
    model = session.engine.model
    edits = [
        RecipeEdit(
            params=v.edit,
            user_mask=None if v.user_mask is None else PackedMask.pack(v.user_mask),
            parent=v.parent,
        )
        for v in session.history[1:]
    ]
    newest = len(session.history) - 1
    return SessionRecipe(
        session_id=session.id,
        model_id=model.model_id,
        config_hash=model.config_hash,
        params=session.params,
        edits=edits,
        current=None if session.version == newest else session.version,
    )


def rebuild(engine: Engine, recipe: SessionRecipe) -> EditSession:
    """Recreates a session by re-running its generation and edits; same seed, same result."""
    check_model(engine, recipe)
    params = recipe.params.model_dump()
    session = engine.generate(params.pop("prompt"), **params)
    session.id = recipe.session_id
    for edit in recipe.edits:
        _apply(session, edit)
    session.checkout(recipe.version)
    return session


def replay(session: EditSession, recipe: SessionRecipe) -> int:
    """Brings a session (e.g. restored from an older snapshot) up to its recipe by running
    only the edits after its newest version, then moving to the recipe's current version: a
    partial rebuild. Returns how many edits ran.

    Raises ValueError if the recipe is of another session, is older than the session, or
    records other edits than the session's history.
    """
    if recipe.session_id != session.id:
        raise ValueError(f"recipe of session {recipe.session_id!r} cannot replay {session.id!r}")
    check_model(session.engine, recipe)
    newest = len(session.history) - 1
    if newest > len(recipe.edits):
        raise ValueError(
            f"session {session.id!r} has versions up to {newest}, newer than its recipe "
            f"(versions up to {len(recipe.edits)})"
        )
    made = [(v.edit, v.parent) for v in session.history[1:]]
    recorded = [(edit.params, edit.parent) for edit in recipe.edits[:newest]]
    # Filled in as the session's were: a recipe written before a field existed lacks it.
    if session.params != session.engine.filled_in(recipe.params) or made != recorded:
        raise ValueError(f"session {session.id!r} has another history than its recipe")
    later = recipe.edits[newest:]
    for edit in later:
        _apply(session, edit)
    session.checkout(recipe.version)
    return len(later)


def _apply(session: EditSession, edit: RecipeEdit) -> None:
    mask = None if edit.user_mask is None else edit.user_mask.unpack()
    session.edit(
        edit.params.prompt, mask=mask, mask_steps=edit.params.mask_steps, extends=edit.parent
    )


def check_model(engine: Engine, recipe: SessionRecipe) -> None:
    """Raises ModelMismatchError unless the engine runs the model the recipe was made with."""
    model = engine.model
    if recipe.config_hash != model.config_hash:
        raise ModelMismatchError(
            f"session {recipe.session_id!r} was made with model {recipe.model_id!r} "
            f"(config {recipe.config_hash}); this engine runs {model.model_id!r} "
            f"(config {model.config_hash})"
        )
