"""Branching: an edit of an older version makes a new version beside the later ones, and
`undo` returns to the version the current one was edited from; recipes and snapshots keep
every version's parent, so replaying them reproduces every branch (CPU, fp32, bitwise)."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fisedit.engine import EditConfig, Engine, EngineConfig, NoChangeWarning, UnknownVersionError
from fisedit.engine.recipe import SessionRecipe, rebuild, recipe_of
from fisedit.engine.snapshot import restore, snapshot
from fisedit.engine.tiers import adopt
from fisedit.storage import LocalConfig, LocalObjectStore

STEPS = 4
CAT, DOG, RED, FOX = "a cat on a bench", "a dog on a bench", "a dog on a red bench", "a fox"


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    config = EngineConfig(progress=False, edit=EditConfig(mask_steps=1))
    return Engine.from_pretrained(tiny_model_dir, config)


def _mask() -> torch.Tensor:
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[4:12, 6:20] = True
    return mask


@pytest.fixture(scope="module")
def tree(engine):
    """0 -> 1 (DOG) -> 2 (RED, user mask), and 1 -> 3 (FOX): at version 3."""
    session = engine.generate(CAT, steps=STEPS, seed=4)
    session.edit(DOG)
    session.edit(RED, mask=_mask())
    session.edit(FOX, extends=1)
    return session


@pytest.fixture
def store(tmp_path) -> LocalObjectStore:
    return LocalObjectStore(LocalConfig(root=tmp_path))


def assert_same_cache(a, b) -> None:
    assert a.tensors.keys() == b.tensors.keys()
    for name, tensor in a.tensors.items():
        assert torch.equal(tensor, b.tensors[name]), name


def assert_same_session(a, b) -> None:
    assert (a.id, a.version, a.prompts) == (b.id, b.version, b.prompts)
    assert [v.parent for v in a.history] == [v.parent for v in b.history]
    for x, y in zip(a.history, b.history, strict=True):
        assert np.array_equal(x.image, y.image), x.number
    assert_same_cache(a.current.cache, b.current.cache)


def test_an_edit_of_an_older_version_equals_that_edit_made_on_a_fresh_session(engine, tree):
    fresh = engine.generate(CAT, steps=STEPS, seed=4)
    fresh.edit(DOG)
    expected = fresh.edit(FOX)

    branch = tree.current
    assert (branch.number, branch.parent, tree.version) == (3, 1, 3)
    assert np.array_equal(branch.image, expected.image)
    assert torch.equal(branch.mask, expected.mask)
    assert_same_cache(branch.cache, expected.cache)
    # The other branch stays in the history; only the current version holds a cache.
    assert tree.prompts == [CAT, DOG, RED, FOX]
    assert [v.parent for v in tree.history] == [None, 0, 1, 1]
    assert [v.cache is None for v in tree.history] == [True, True, True, False]


@pytest.mark.parametrize("snapshotted", [False, True], ids=["recomputed", "from-snapshot"])
def test_undo_returns_to_the_previous_image_and_cache(engine, store, snapshotted):
    session = engine.generate(CAT, steps=STEPS, seed=5)
    # A copy: the edit records into the generation's cache in place.
    base_image, base_cache = session.image.copy(), session.current.cache.to("cpu")
    if snapshotted:
        session.snapshots = store
        snapshot(session, store)
    session.edit(DOG)

    back = session.undo()

    assert back.number == 0 and session.version == 0 and session.current is back
    assert np.array_equal(session.image, base_image)
    assert_same_cache(session.current.cache, base_cache)
    assert session.history[1].cache is None
    with pytest.raises(UnknownVersionError, match="at version 0, its generation"):
        session.undo()
    # The undone version stays; the next edit branches off version 0 beside it.
    again = session.edit(FOX)
    assert (again.number, again.parent) == (2, 0)


def test_replaying_a_recipe_with_branches_reproduces_every_version(engine, tree, store):
    branched = tree.fork()
    branched.id = tree.id
    branched.undo()  # back at version 1, with versions 2 and 3 made from it
    recipe = recipe_of(branched)
    assert [e.parent for e in recipe.edits] == [0, 1, 1] and recipe.version == 1
    assert SessionRecipe.model_validate_json(recipe.model_dump_json()) == recipe

    assert_same_session(rebuild(engine, recipe), branched)
    # A snapshot keeps the parents, and an older one plus a replay gives the session too.
    snapshot(tree, store)
    assert_same_session(restore(engine, store, tree.id), tree)
    adopted, path = adopt(engine, recipe, store)
    assert path == "restore" and adopted.snapshots is store
    assert_same_session(adopted, branched)


def test_recipes_written_before_branching_read_as_a_chain():
    edits = [{"params": {"prompt": p, "mask_steps": 1}} for p in (DOG, RED)]
    recipe = SessionRecipe(
        session_id="s", model_id="tiny", config_hash="0", params={"prompt": CAT}, edits=edits
    )
    assert [e.parent for e in recipe.edits] == [0, 1] and recipe.version == 2


def test_an_edit_of_an_older_version_that_changes_nothing_recomputes_nothing(tree):
    session = tree.fork()
    current = session.current

    # CLIP's tokenizer ignores case: version 1's text embeddings.
    with pytest.warns(NoChangeWarning, match="version 1's prompt .*stays at version 3"):
        same = session.edit(DOG.upper(), extends=1)

    assert same is session.history[1] and same.cache is None
    assert session.current is current and current.cache is not None
    assert len(session.history) == 4


def test_a_version_that_does_not_exist_is_named_in_the_error(tree):
    session = tree.fork()
    before = (session.version, session.current.cache)

    versions = r"\(its versions are 0 to 3\)"
    with pytest.raises(UnknownVersionError, match=rf"has no version 7 {versions}"):
        session.edit(DOG, extends=7)
    with pytest.raises(UnknownVersionError, match=rf"has no version -1 {versions}"):
        session.checkout(-1)
    assert (session.version, session.current.cache) == before

    recipe = recipe_of(tree).model_dump()
    recipe["edits"][2]["parent"] = 5
    with pytest.raises(ValidationError, match="edit 3 extends version 5, which is not an earlier"):
        SessionRecipe.model_validate(recipe)
    recipe["edits"][2]["parent"], recipe["current"] = 1, 9
    with pytest.raises(ValidationError, match="current version 9 does not exist"):
        SessionRecipe.model_validate(recipe)
