import os
import threading

import pytest

from fisedit.storage import (
    InvalidKeyError,
    LocalConfig,
    LocalObjectStore,
    ObjectExistsError,
    ObjectNotFoundError,
)


@pytest.fixture
def root(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def store(root):
    """Local only: replaces the both-backends fixture of conftest.py."""
    return LocalObjectStore(LocalConfig(root=root))


def _files_under(path) -> set[str]:
    return {
        os.path.relpath(os.path.join(dirpath, name), path)
        for dirpath, _, names in os.walk(path)
        for name in names
    }


def test_keys_are_files_under_the_root(store, root):
    store.put("sessions/abc/v3/manifest.json", b"{}")

    assert (root / "sessions" / "abc" / "v3" / "manifest.json").read_bytes() == b"{}"
    assert store.url == root.resolve().as_uri()


@pytest.mark.parametrize(
    "key", ["../outside", "/outside", "a/../../outside", "..\\outside", "a/./../../outside"]
)
def test_invalid_key_writes_nothing_anywhere(store, tmp_path, key):
    with pytest.raises(InvalidKeyError):
        store.put(key, b"x")

    assert _files_under(tmp_path) == set()


def test_symlink_inside_the_root_cannot_lead_outside(store, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (root / "link").symlink_to(outside)

    with pytest.raises(InvalidKeyError, match="resolves outside the store root"):
        store.put("link/planted", b"x")
    with pytest.raises(InvalidKeyError, match="resolves outside the store root"):
        store.get("link/secret")
    with pytest.raises(InvalidKeyError, match="resolves outside the store root"):
        store.delete("link/secret")

    assert _files_under(outside) == {"secret"}


def test_writes_leave_no_temp_files_behind(store, root):
    store.put("a/k", b"first", create_only=True)
    with pytest.raises(ObjectExistsError):
        store.put("a/k", b"second", create_only=True)
    store.put("a/k", b"third")

    assert _files_under(root) == {os.path.join("a", "k")}


def test_list_skips_temp_files_of_writers_in_flight(store):
    stop = threading.Event()

    def write_repeatedly() -> None:
        for n in range(200):
            if stop.is_set():
                return
            store.put(f"k{n % 2}", b"x" * 65536)

    writer = threading.Thread(target=write_repeatedly)
    writer.start()
    try:
        for _ in range(200):
            assert set(store.list()) <= {"k0", "k1"}
    finally:
        stop.set()
        writer.join(timeout=30)


def test_a_directory_is_not_an_object(store):
    store.put("a/b", b"x")

    assert not store.exists("a")
    assert "a" not in store.list()
    store.delete("a")
    with pytest.raises(ObjectNotFoundError):
        store.get("a")
    with pytest.raises(ObjectNotFoundError):
        store.get("a/b/c")
    assert store.get("a/b") == b"x"


def test_an_object_cannot_also_be_a_folder_and_a_write_says_which_key_is_in_the_way(store):
    store.put("a/b", b"x")
    store.put("c", b"y")

    with pytest.raises(InvalidKeyError, match="'a': a local store holds objects below it"):
        store.put("a", b"z")
    with pytest.raises(InvalidKeyError, match="holds the object 'c', so nothing below it"):
        store.put("c/d/e", b"z")
    assert store.list() == ["a/b", "c"]
    assert store.get("a/b") == b"x" and store.get("c") == b"y"


def test_reopening_the_root_sees_the_same_objects(store, root):
    store.put("k", b"v")

    assert LocalObjectStore(LocalConfig(root=root)).get("k") == b"v"


def test_config_rejects_unknown_options(root):
    with pytest.raises(ValueError, match="endpoint_url"):
        LocalConfig(root=root, endpoint_url="http://example.com")
