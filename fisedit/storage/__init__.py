"""Object storage (S3 and local directory); knows neither Ray nor torch.

Importing this package does not import boto3: the S3 store loads it when used, so the
engine and its benchmarks run where boto3 is not installed (the GPU machine).
"""

from fisedit.storage.base import (
    InvalidKeyError,
    ObjectExistsError,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    StoreNotFoundError,
    open_store,
    validate_key,
)
from fisedit.storage.local import LocalConfig, LocalObjectStore

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
    "StoreNotFoundError",
    "open_store",
    "validate_key",
]


def __getattr__(name: str):
    if name in ("S3Config", "S3ObjectStore"):
        from fisedit.storage import s3

        return getattr(s3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
