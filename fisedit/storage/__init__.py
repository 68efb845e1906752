"""Object storage (S3 and local directory); knows neither Ray nor torch."""

from fisedit.storage.base import (
    InvalidKeyError,
    ObjectExistsError,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    open_store,
    validate_key,
)
from fisedit.storage.local import LocalConfig, LocalObjectStore
from fisedit.storage.s3 import S3Config, S3ObjectStore

__all__ = [
    "InvalidKeyError",
    "LocalConfig",
    "LocalObjectStore",
    "ObjectExistsError",
    "ObjectNotFoundError",
    "ObjectStore",
    "S3Config",
    "S3ObjectStore",
    "StorageError",
    "open_store",
    "validate_key",
]
