"""The object store interface, its errors, key validation and open_store."""

import io
import os
import shutil
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import unquote, urlsplit

MAX_KEY_BYTES = 1024
# A local store keeps a segment as a file name; every backend keeps the same limit.
MAX_SEGMENT_BYTES = 255
# SigV4 presigned URLs cannot outlive seven days; every backend keeps the same limit.
MAX_PRESIGN_S = 7 * 24 * 3600


class StorageError(Exception):
    """Base of the errors this package raises."""


class ObjectNotFoundError(StorageError, KeyError):
    """No object is stored under the key."""

    def __init__(self, key: str, store: str) -> None:
        super().__init__(f"{store}: no object at key {key!r}")
        self.key, self.store = key, store

    # KeyError.__str__ would wrap the message in quotes.
    __str__ = StorageError.__str__

    def __reduce__(self):  # pickled as its arguments, so it crosses processes (Ray) intact
        return type(self), (self.key, self.store)


class ObjectExistsError(StorageError):
    """A create-only write found the key taken: another writer won."""

    def __init__(self, key: str, store: str) -> None:
        super().__init__(f"{store}: object {key!r} already exists (create-only write)")
        self.key, self.store = key, store

    def __reduce__(self):
        return type(self), (self.key, self.store)


class StoreNotFoundError(StorageError):
    """The store itself is missing (an S3 bucket that does not exist): every call fails
    until it is created, rather than reading as empty."""

    def __init__(self, store: str, reason: str) -> None:
        super().__init__(f"{store}: {reason}")
        self.store, self.reason = store, reason

    def __reduce__(self):
        return type(self), (self.store, self.reason)


class InvalidKeyError(StorageError, ValueError):
    """The key is not a safe relative POSIX path."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"invalid key {key!r}: {reason}")
        self.key, self.reason = key, reason

    def __reduce__(self):
        return type(self), (self.key, self.reason)


def _key_problem(key: str) -> str | None:
    if not key:
        return "it is empty"
    if key.startswith("/"):
        return "it is absolute (starts with '/')"
    if "\\" in key:
        return "it contains a backslash"
    if any(unicodedata.category(char) == "Cc" for char in key):
        return "it contains a NUL or other control character"
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        return "it is not valid UTF-8 (lone surrogate)"
    if size > MAX_KEY_BYTES:
        return f"it is {size} bytes in UTF-8, over the limit of {MAX_KEY_BYTES}"
    segments = key.split("/")
    if "" in segments:
        return "it has an empty segment ('//' or a trailing '/')"
    if "." in segments or ".." in segments:
        return "it has a '.' or '..' segment"
    longest = max(len(segment.encode()) for segment in segments)
    if longest > MAX_SEGMENT_BYTES:
        return f"it has a segment of {longest} bytes, over the limit of {MAX_SEGMENT_BYTES}"
    return None


def validate_key(key: str) -> str:
    """Return key if it is a relative POSIX path such as ``sessions/abc/v3/manifest.json``.

    Raises InvalidKeyError saying why otherwise; a valid key cannot leave the store's prefix.
    """
    if (problem := _key_problem(key)) is not None:
        raise InvalidKeyError(key, problem)
    return key


def validate_prefix(prefix: str) -> str:
    """Return prefix if it is "" or a valid key, optionally ending with "/"."""
    if prefix:
        validate_key(prefix.removesuffix("/"))
    return prefix


class ObjectStore(ABC):
    """Bytes under keys. Public methods validate keys, then call the backend's hooks."""

    @property
    @abstractmethod
    def url(self) -> str:
        """Where the store lives, as s3://bucket/prefix or file:///root."""

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        """Store data under key, atomically replacing any object there.

        With create_only the write fails with ObjectExistsError if the key exists; of several
        concurrent create-only writers exactly one succeeds.
        """
        self._put(validate_key(key), io.BytesIO(data), len(data), create_only)

    def put_file(
        self, key: str, path: str | os.PathLike[str], *, create_only: bool = False
    ) -> None:
        """Like put, streaming the content from a local file."""
        key = validate_key(key)
        with open(path, "rb") as file:
            self._put(key, file, os.fstat(file.fileno()).st_size, create_only)

    def get(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFoundError if there is none."""
        with self._reader(key) as stream:
            return stream.read()

    def get_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Write the object to a local file; ObjectNotFoundError if there is none."""
        with self._reader(key) as stream, open(path, "wb") as file:
            shutil.copyfileobj(stream, file, 1 << 20)

    def exists(self, key: str) -> bool:
        """Whether an object is stored under key."""
        return self._exists(validate_key(key))

    def check(self) -> None:
        """Returns if the store can be used now; raises StoreNotFoundError if it does not
        exist, the backend's own error if it cannot be reached."""
        self.exists("probe")

    def delete(self, key: str) -> None:
        """Remove the object under key, if any."""
        self._delete(validate_key(key))

    def presign_get(self, key: str, expires_s: int = 3600) -> str:
        """A URL from which a client can GET the object for expires_s seconds."""
        if not 0 < expires_s <= MAX_PRESIGN_S:
            raise ValueError(f"expires_s must be in 1..{MAX_PRESIGN_S}, got {expires_s}")
        return self._presign_get(validate_key(key), expires_s)

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys (recursively) that start with prefix ("" or e.g. "sessions/abc/")."""
        return sorted(self._list(validate_prefix(prefix)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _put(self, key: str, stream: IO[bytes], size: int, create_only: bool) -> None:
        if not self._write(key, stream, size, create_only):
            raise ObjectExistsError(key, self.url)

    def _reader(self, key: str) -> IO[bytes]:
        stream = self._open(validate_key(key))
        if stream is None:
            raise ObjectNotFoundError(key, self.url)
        return stream

    @abstractmethod
    def _write(self, key: str, stream: IO[bytes], size: int, create_only: bool) -> bool:
        """Store size bytes read from stream; False if create_only and the key exists."""

    @abstractmethod
    def _open(self, key: str) -> IO[bytes] | None:
        """A readable stream of the object, or None if there is none."""

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    @abstractmethod
    def _presign_get(self, key: str, expires_s: int) -> str: ...

    @abstractmethod
    def _list(self, prefix: str) -> Iterator[str]:
        """The keys starting with prefix, in any order."""


def open_store(url: str, **options: Any) -> ObjectStore:
    """Open ``s3://bucket/prefix``, ``file:///abs/path`` or a plain directory path.

    Options go to the backend's config, e.g. ``endpoint_url`` and ``region`` for S3.
    """
    # Imported here because the backends import this module (and S3's needs boto3).
    from fisedit.storage.local import LocalConfig, LocalObjectStore

    if "://" not in url:
        return LocalObjectStore(LocalConfig(root=url, **options))
    parts = urlsplit(url)
    if parts.scheme == "s3":
        from fisedit.storage.s3 import S3Config, S3ObjectStore

        return S3ObjectStore(S3Config(bucket=parts.netloc, prefix=parts.path, **options))
    if parts.scheme == "file" and parts.netloc in ("", "localhost"):
        return LocalObjectStore(LocalConfig(root=unquote(parts.path), **options))
    raise ValueError(f"unsupported store URL {url!r}: expected s3://, file:/// or a path")
