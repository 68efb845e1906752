"""The service configuration: defaults, YAML, validation, and the store it opens."""

import pytest
from pydantic import ValidationError

from fisedit.service.config import RetryPolicy, ServiceConfig, StoreConfig
from fisedit.storage import LocalObjectStore, S3ObjectStore


def test_defaults_run_embedded_on_one_machine():
    config = ServiceConfig()
    assert config.model == "tiny" and config.workers == 2 and config.tenant == "local"
    assert config.store.url == "fisedit-store" and config.worker_resources.num_gpus == 0
    assert config.engine.progress is False


def test_yaml_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "service.yaml"
    path.write_text(
        "model: /models/sd15\n"
        "workers: 4\n"
        "worker_resources: {num_gpus: 1, num_cpus: 4}\n"
        "tiers: {device_bytes: 1000, host_bytes: 2000}\n"
        "store: {url: 's3://bucket/fisedit', endpoint_url: 'http://minio:9000'}\n"
        "engine: {device: cuda, dtype: float16, edit: {mask_steps: 5}}\n"
        "retry: {attempts: 3, backoff_s: 0.1}\n"
    )
    config = ServiceConfig.from_yaml(path)
    assert config.workers == 4 and config.worker_resources.num_gpus == 1
    assert config.tiers.host_bytes == 2000 and config.engine.edit.mask_steps == 5
    assert config.store.endpoint_url == "http://minio:9000"

    path.write_text(config.to_yaml())
    assert ServiceConfig.from_yaml(path) == config


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("workers: 0\n", "workers"),
        ("tenant: a/b\n", "tenant"),
        ("retry: {attempts: 0}\n", "retry.attempts"),
        ("worker_resources: {gpus: 1}\n", "worker_resources.gpus"),
    ],
)
def test_invalid_yaml_names_the_field(tmp_path, yaml_text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValidationError, match=field):
        ServiceConfig.from_yaml(path)


def test_a_file_that_is_not_yaml_is_an_error_naming_it(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: tiny\nworkers: [1\n")
    with pytest.raises(ValueError, match=f"{path}: not valid YAML"):
        ServiceConfig.from_yaml(path)


def test_backoff_grows_to_its_cap():
    policy = RetryPolicy(backoff_s=0.5, backoff_factor=2, max_backoff_s=3)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]


def test_store_config_opens_local_and_s3_stores(tmp_path, s3_endpoint):
    assert isinstance(StoreConfig(url=str(tmp_path)).open(), LocalObjectStore)
    config = StoreConfig(url="s3://fisedit-test/service", endpoint_url=s3_endpoint, max_attempts=2)
    store = config.open()
    assert isinstance(store, S3ObjectStore) and store.config.max_attempts == 2
    assert config.open("tenants/local").url == "s3://fisedit-test/service/tenants/local"
    store.put("probe", b"x")
    assert store.get("probe") == b"x"
