import pickle

import pytest

from fisedit.storage import InvalidKeyError, ObjectExistsError, ObjectNotFoundError, validate_key
from fisedit.storage.base import validate_prefix

BAD_KEYS = [
    ("", "it is empty"),
    ("/etc/passwd", "it is absolute"),
    ("/", "it is absolute"),
    ("..", "'..' segment"),
    ("../escape", "'..' segment"),
    ("sessions/../../escape", "'..' segment"),
    ("sessions/..", "'..' segment"),
    (".", "'.' or '..' segment"),
    ("./manifest.json", "'.' or '..' segment"),
    ("sessions/./v1", "'.' or '..' segment"),
    ("sessions//v1", "empty segment"),
    ("sessions/", "empty segment"),
    ("sessions\\v1", "backslash"),
    ("..\\escape", "backslash"),
    ("a\x00b", "control character"),
    ("line\nbreak", "control character"),
    ("tab\there", "control character"),
    ("del\x7f", "control character"),
    ("c1\x85", "control character"),
    ("lone\udc80surrogate", "not valid UTF-8"),
    ("k" * 1025, "1025 bytes in UTF-8, over the limit of 1024"),
    ("é" * 513, "1026 bytes in UTF-8, over the limit of 1024"),
    ("a/" + "k" * 256, "a segment of 256 bytes, over the limit of 255"),
    ("é" * 128, "a segment of 256 bytes, over the limit of 255"),
]

GOOD_KEYS = [
    "manifest.json",
    "sessions/abc/v3/manifest.json",
    "/".join(["k" * 255] * 4),  # 1023 bytes
    "/".join(["é" * 127] * 4),
    "k" * 255,
    ".hidden/.config",
    "...",
    "a/..b/c..",
    "with space/und-dash_underscore+plus=equals@at",
    "unicode/画像/ß.png",
]


@pytest.mark.parametrize(("key", "reason"), BAD_KEYS)
def test_bad_key_is_rejected_saying_why(key, reason):
    with pytest.raises(InvalidKeyError) as caught:
        validate_key(key)

    assert str(caught.value).startswith(f"invalid key {key!r}: ")
    assert reason in str(caught.value)
    assert caught.value.key == key


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_good_key_is_returned_unchanged(key):
    assert validate_key(key) == key


def test_invalid_key_error_is_a_value_error():
    with pytest.raises(ValueError):
        validate_key("../escape")


@pytest.mark.parametrize("prefix", ["", "sessions/", "sessions/abc/v", "sessions"])
def test_list_prefix_may_be_empty_partial_or_end_with_a_slash(prefix):
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/", "/sessions/", "sessions//", "../", "a/../b/", "a\\b"])
def test_bad_list_prefix_is_rejected(prefix):
    with pytest.raises(InvalidKeyError):
        validate_prefix(prefix)


@pytest.mark.parametrize(
    "error",
    [
        ObjectNotFoundError("a/b", "file:///store"),
        ObjectExistsError("a/b", "file:///store"),
        InvalidKeyError("../a", "leaves the store"),
    ],
)
def test_errors_survive_pickling_so_they_cross_processes(error):
    copy = pickle.loads(pickle.dumps(error))

    assert type(copy) is type(error) and str(copy) == str(error) and copy.key == error.key
