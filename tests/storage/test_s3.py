import os
import pickle
import re
import uuid

import pytest
from pydantic import ValidationError

from fisedit.storage import ObjectExistsError, S3Config, S3ObjectStore, StoreNotFoundError

MiB = 1 << 20


@pytest.fixture
def prefix() -> str:
    return f"tests/{uuid.uuid4().hex}"


@pytest.fixture
def store(make_s3_store, prefix):
    """S3 only: replaces the both-backends fixture of conftest.py."""
    return make_s3_store(prefix)


def _etag(s3_client, store, key: str) -> str:
    head = s3_client.head_object(Bucket=store.config.bucket, Key=f"{store.config.prefix}/{key}")
    return head["ETag"].strip('"')


def test_keys_live_under_the_prefix(store, s3_client, prefix):
    store.put("sessions/abc/manifest.json", b"{}")

    stored = s3_client.get_object(
        Bucket=store.config.bucket, Key=f"{prefix}/sessions/abc/manifest.json"
    )
    assert stored["Body"].read() == b"{}"
    assert store.url == f"s3://{store.config.bucket}/{prefix}"


def test_objects_over_the_threshold_are_uploaded_in_parts(store, s3_client, tmp_path):
    data = os.urandom(11 * MiB)
    source = tmp_path / "large.bin"
    source.write_bytes(data)

    store.put("large/bytes", data)
    store.put_file("large/file", source)
    store.put("small", os.urandom(5 * MiB))

    # A multipart ETag ends in "-<number of parts>": 5 + 5 + 1 MiB.
    assert _etag(s3_client, store, "large/bytes").endswith("-3")
    assert _etag(s3_client, store, "large/file").endswith("-3")
    assert "-" not in _etag(s3_client, store, "small")
    assert store.get("large/bytes") == data
    assert store.get("large/file") == data


def test_lost_create_only_multipart_upload_is_aborted(store, s3_client, prefix):
    first = os.urandom(6 * MiB)
    store.put("large", first, create_only=True)

    with pytest.raises(ObjectExistsError):
        store.put("large", os.urandom(6 * MiB), create_only=True)

    assert _etag(s3_client, store, "large").endswith("-2")
    assert store.get("large") == first
    uploads = s3_client.list_multipart_uploads(Bucket=store.config.bucket, Prefix=prefix)
    assert uploads.get("Uploads", []) == []


def test_stores_with_different_prefixes_do_not_see_each_other(make_s3_store, prefix):
    tenant_a, tenant_ab = make_s3_store(f"{prefix}/a"), make_s3_store(f"{prefix}/ab")
    tenant_a.put("shared/key", b"from a")
    tenant_ab.put("shared/key", b"from ab")
    tenant_ab.put("only-ab", b"x")

    tenant_a.delete("only-ab")
    tenant_a.put("only-ab-in-a", b"y", create_only=True)

    assert tenant_a.list() == ["only-ab-in-a", "shared/key"]
    assert tenant_ab.list() == ["only-ab", "shared/key"]
    assert tenant_a.get("shared/key") == b"from a"
    assert tenant_ab.get("shared/key") == b"from ab"


def test_presigned_url_names_the_bucket_and_key(store, prefix):
    url = store.presign_get("images/out.png", expires_s=60)

    assert f"/{store.config.bucket}/{prefix}/images/out.png?" in url
    assert "X-Amz-Expires=60" in url


@pytest.mark.parametrize(("given", "kept"), [("", ""), ("/a/b/", "a/b"), ("a", "a")])
def test_config_strips_slashes_from_the_prefix(given, kept):
    assert S3Config(bucket="bucket", prefix=given).prefix == kept


@pytest.mark.parametrize(
    "options",
    [
        {"prefix": "a/../b"},
        {"prefix": "a//b"},
        {"bucket": ""},
        {"part_size": 5 * MiB - 1},
        {"max_attempts": 0},
        {"endpoint": "http://typo"},
    ],
)
def test_config_rejects_bad_settings(options):
    with pytest.raises(ValidationError):
        S3Config(**{"bucket": "bucket", **options})


KEY = "sessions/abc/manifest.json"
STORE_CALLS = {
    "check": lambda store: store.check(),
    "exists": lambda store: store.exists(KEY),
    "get": lambda store: store.get(KEY),
    "put": lambda store: store.put(KEY, b"{}"),
    "list": lambda store: store.list("sessions/"),
    "delete": lambda store: store.delete(KEY),
}


@pytest.mark.parametrize("call", STORE_CALLS.values(), ids=STORE_CALLS.keys())
def test_a_missing_bucket_fails_every_call_naming_it_rather_than_reading_as_empty(
    s3_endpoint, call
):
    store = S3ObjectStore(S3Config(bucket="no-such-bucket", endpoint_url=s3_endpoint))
    named = f"bucket 'no-such-bucket' does not exist at {re.escape(s3_endpoint)}"
    with pytest.raises(StoreNotFoundError, match=named):
        call(store)


def test_a_missing_store_error_crosses_processes_whole():
    error = StoreNotFoundError("s3://no-such-bucket/", "gone")
    assert str(pickle.loads(pickle.dumps(error))) == "s3://no-such-bucket/: gone"
