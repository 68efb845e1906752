import pytest

from fisedit.storage import LocalObjectStore, S3ObjectStore, open_store


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://images/sessions/prod", "images", "sessions/prod"),
        ("s3://images/sessions/prod/", "images", "sessions/prod"),
        ("s3://images/", "images", ""),
        ("s3://images", "images", ""),
    ],
)
def test_s3_url_gives_an_s3_store(url, bucket, prefix):
    store = open_store(url, endpoint_url="http://127.0.0.1:9000", region="eu-west-1")

    assert isinstance(store, S3ObjectStore)
    assert (store.config.bucket, store.config.prefix) == (bucket, prefix)
    assert store.config.endpoint_url == "http://127.0.0.1:9000"
    assert store.config.region == "eu-west-1"


def test_file_url_gives_a_local_store(tmp_path):
    root = tmp_path / "my store"

    store = open_store(root.as_uri())

    assert isinstance(store, LocalObjectStore)
    assert store.config.root == root
    assert root.is_dir()
    assert store.url == root.as_uri()


def test_absolute_path_gives_a_local_store(tmp_path):
    store = open_store(str(tmp_path / "store"))

    assert isinstance(store, LocalObjectStore)
    assert store.config.root == tmp_path / "store"


def test_relative_path_is_resolved_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    store = open_store("data/store")
    store.put("k", b"v")

    assert (tmp_path / "data" / "store" / "k").read_bytes() == b"v"


@pytest.mark.parametrize(
    "url", ["gs://bucket/prefix", "http://host/path", "file://host/path", "file://relative"]
)
def test_unsupported_url_is_rejected(url):
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store(url)


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "s3://bucket/a/../b"])
def test_bad_s3_url_is_rejected(url):
    with pytest.raises(ValueError):
        open_store(url)


def test_unknown_option_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="endpoint"):
        open_store("s3://bucket", endpoint="http://typo")
    with pytest.raises(ValueError, match="region"):
        open_store(str(tmp_path), region="eu-west-1")


def test_a_store_reopened_from_its_url_sees_the_same_objects(store):
    store.put("k", b"v")

    options = (
        {"endpoint_url": store.config.endpoint_url} if isinstance(store, S3ObjectStore) else {}
    )
    assert open_store(store.url, **options).get("k") == b"v"
