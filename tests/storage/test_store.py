"""Behaviour every backend shares: each test runs against a local and an S3 store."""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit
from urllib.request import urlopen

import pytest

from fisedit.storage import (
    InvalidKeyError,
    LocalObjectStore,
    ObjectExistsError,
    ObjectNotFoundError,
)

MiB = 1 << 20
# Over the stores' lowered 5 MiB threshold: S3 uploads it in three parts (5 + 5 + 1 MiB).
LARGE = 11 * MiB
WAIT_S = 30


def test_put_then_get_returns_the_bytes(store):
    store.put("sessions/abc/v3/manifest.json", b'{"version": 3}')

    assert store.get("sessions/abc/v3/manifest.json") == b'{"version": 3}'
    assert store.exists("sessions/abc/v3/manifest.json")


def test_put_replaces_an_existing_object(store):
    store.put("k", b"old")
    store.put("k", b"new")

    assert store.get("k") == b"new"


def test_empty_object_round_trips(store):
    store.put("empty", b"")

    assert store.get("empty") == b""
    assert store.list() == ["empty"]


def test_put_file_then_get_file_round_trips(store, tmp_path):
    source, target = tmp_path / "source.bin", tmp_path / "target.bin"
    source.write_bytes(b"image bytes \x00\xff")

    store.put_file("images/1.png", source)
    store.get_file("images/1.png", target)

    assert target.read_bytes() == b"image bytes \x00\xff"


def test_missing_object_raises_not_found(store, tmp_path):
    with pytest.raises(ObjectNotFoundError, match="no object at key 'nothing/here'") as caught:
        store.get("nothing/here")

    assert isinstance(caught.value, KeyError)
    assert caught.value.key == "nothing/here"
    assert str(caught.value) == f"{store.url}: no object at key 'nothing/here'"
    assert not store.exists("nothing/here")


def test_get_file_of_missing_object_leaves_no_file(store, tmp_path):
    with pytest.raises(ObjectNotFoundError):
        store.get_file("missing", tmp_path / "out.bin")

    assert not (tmp_path / "out.bin").exists()


def test_delete_removes_and_is_idempotent(store):
    store.put("k", b"v")

    store.delete("k")
    store.delete("k")
    store.delete("never/existed")

    assert not store.exists("k")
    assert store.list() == []


def test_list_is_recursive_sorted_and_filtered_by_prefix(store):
    for key in ["b/2", "a/1", "a/b/c", "ab", "a/0", "a/b/a"]:
        store.put(key, key.encode())

    assert store.list() == ["a/0", "a/1", "a/b/a", "a/b/c", "ab", "b/2"]
    assert store.list("a/") == ["a/0", "a/1", "a/b/a", "a/b/c"]
    assert store.list("a") == ["a/0", "a/1", "a/b/a", "a/b/c", "ab"]
    assert store.list("a/b/") == ["a/b/a", "a/b/c"]
    assert store.list("a/b/c") == ["a/b/c"]
    assert store.list("c/") == []


def test_list_of_an_empty_store_is_empty(store):
    assert store.list() == []


def test_create_only_write_to_a_taken_key_fails_and_keeps_the_first(store, tmp_path):
    source = tmp_path / "second.bin"
    source.write_bytes(b"second")
    store.put("k", b"first", create_only=True)

    with pytest.raises(ObjectExistsError, match="'k' already exists") as caught:
        store.put("k", b"second", create_only=True)
    with pytest.raises(ObjectExistsError):
        store.put_file("k", source, create_only=True)

    assert caught.value.key == "k"
    assert store.get("k") == b"first"


def test_create_only_write_succeeds_after_delete(store):
    store.put("k", b"first", create_only=True)
    store.delete("k")

    store.put("k", b"second", create_only=True)

    assert store.get("k") == b"second"


def _create_after(start: threading.Barrier, store, key: str, payload: bytes) -> bool:
    start.wait()
    try:
        store.put(key, payload, create_only=True)
    except ObjectExistsError:
        return False
    return True


def test_concurrent_create_only_writers_have_exactly_one_winner(store):
    # Two writers, as in a retried job racing its original. moto checks If-None-Match and
    # then writes without a lock, so many writers per round could expose moto, not us.
    writers, rounds = 2, 20
    with ThreadPoolExecutor(writers) as pool:
        for round_ in range(rounds):
            key = f"race/{round_}"
            payloads = [f"writer {w} round {round_} ".encode() * 1000 for w in range(writers)]
            start = threading.Barrier(writers, timeout=WAIT_S)

            futures = [pool.submit(_create_after, start, store, key, p) for p in payloads]
            won = [future.result(timeout=WAIT_S) for future in futures]

            assert won.count(True) == 1, f"round {round_}: {won}"
            assert store.get(key) == payloads[won.index(True)]
    assert len(store.list("race/")) == rounds


def test_large_object_round_trips_byte_exact(store, tmp_path):
    data = os.urandom(LARGE)
    source, target = tmp_path / "large.bin", tmp_path / "copy.bin"
    source.write_bytes(data)

    store.put("large/bytes", data)
    store.put_file("large/file", source)
    store.get_file("large/file", target)

    assert store.get("large/bytes") == data
    assert target.read_bytes() == data


def test_create_only_large_object_keeps_the_first(store):
    first, second = os.urandom(LARGE), os.urandom(LARGE)
    store.put("large", first, create_only=True)

    with pytest.raises(ObjectExistsError):
        store.put("large", second, create_only=True)

    assert store.get("large") == first


def test_readers_only_see_whole_objects_while_a_writer_replaces_them(store):
    versions = [bytes([n]) * MiB for n in range(2)]
    store.put("k", versions[0])
    done = threading.Event()

    def replace_repeatedly() -> None:
        for n in range(20):
            store.put("k", versions[n % 2])
        done.set()

    writer = threading.Thread(target=replace_repeatedly)
    writer.start()
    reads = 0
    while not done.is_set() and reads < 1000:
        assert store.get("k") in versions
        assert store.list() == ["k"]
        reads += 1
    writer.join(timeout=WAIT_S)

    assert done.is_set()
    assert reads > 0


def test_presigned_url_serves_the_bytes(store):
    store.put("images/out.png", b"png bytes")

    url = store.presign_get("images/out.png", expires_s=60)

    expected_scheme = "file" if isinstance(store, LocalObjectStore) else "http"
    assert urlsplit(url).scheme == expected_scheme
    with urlopen(url, timeout=WAIT_S) as response:
        assert response.read() == b"png bytes"


@pytest.mark.parametrize("expires_s", [0, -1, 7 * 24 * 3600 + 1])
def test_presign_rejects_lifetimes_outside_seven_days(store, expires_s):
    with pytest.raises(ValueError, match="expires_s"):
        store.presign_get("k", expires_s=expires_s)


@pytest.mark.parametrize(
    "call",
    [
        lambda s, p: s.put("../escape", b"x"),
        lambda s, p: s.put_file("../escape", p),
        lambda s, p: s.get("../escape"),
        lambda s, p: s.get_file("../escape", p),
        lambda s, p: s.exists("../escape"),
        lambda s, p: s.delete("../escape"),
        lambda s, p: s.presign_get("../escape"),
        lambda s, p: s.list("../"),
    ],
    ids=["put", "put_file", "get", "get_file", "exists", "delete", "presign_get", "list"],
)
def test_every_method_rejects_an_invalid_key(store, tmp_path, call):
    path = tmp_path / "file.bin"
    path.write_bytes(b"x")

    with pytest.raises(InvalidKeyError, match="'..' segment"):
        call(store, path)

    assert path.read_bytes() == b"x"
    assert store.list() == []
