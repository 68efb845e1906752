"""Objects as files under a local directory: the embedded default store."""

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict

from fisedit.storage.base import InvalidKeyError, ObjectStore

# No valid key contains a backslash, so a temp file never passes for an object.
_TMP_PREFIX = ".tmp\\"
# What opening or unlinking a key's path raises when no object file is there.
_NO_OBJECT = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


class LocalConfig(BaseModel):
    """Where a local store keeps its files."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    root: Path


class LocalObjectStore(ObjectStore):
    """Each key is a file under the root; directories follow the key's segments.

    Writes go to a temp file in the target directory, are fsynced, then renamed (or, for
    create-only writes, hard-linked) into place, so readers only ever see whole objects.
    Unlike S3, a key cannot name an object and also prefix others (``a`` and ``a/b``).
    """

    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self._root = config.root.resolve()
        self._root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return self._root.as_uri()

    def _path(self, key: str) -> Path:
        # Defence in depth beyond validate_key: symlinks must not lead out of the root either.
        path = (self._root / key).resolve()
        if not path.is_relative_to(self._root) or path == self._root:
            raise InvalidKeyError(key, f"it resolves outside the store root {self._root}")
        return path

    def _write(self, key: str, stream: IO[bytes], size: int, create_only: bool) -> bool:
        path = self._path(key)
        if path.is_dir():
            raise InvalidKeyError(key, "a local store holds objects below it (a folder)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            above = next(p for p in path.parents if p.is_file()).relative_to(self._root)
            raise InvalidKeyError(
                key, f"a local store holds the object {above.as_posix()!r}, so nothing below it"
            ) from None
        tmp = path.with_name(_TMP_PREFIX + secrets.token_hex(8))
        try:
            with open(tmp, "xb") as file:
                shutil.copyfileobj(stream, file, 1 << 20)
                file.flush()
                os.fsync(file.fileno())
            if create_only:
                # link() fails if the name exists, so of racing writers exactly one wins.
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _open(self, key: str) -> IO[bytes] | None:
        try:
            return open(self._path(key), "rb")
        except _NO_OBJECT:
            return None

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _delete(self, key: str) -> None:
        with suppress(*_NO_OBJECT):
            self._path(key).unlink()

    def _presign_get(self, key: str, expires_s: int) -> str:
        return self._path(key).as_uri()

    def _list(self, prefix: str) -> Iterator[str]:
        # Walk only the directory that holds every key with this prefix.
        top = self._root / prefix.rpartition("/")[0]
        for dirpath, _, filenames in os.walk(top):
            directory = Path(dirpath).relative_to(self._root).as_posix()
            for name in filenames:
                key = name if directory == "." else f"{directory}/{name}"
                if not name.startswith(_TMP_PREFIX) and key.startswith(prefix):
                    yield key


def _fsync_dir(path: Path) -> None:
    # The rename or link is durable only once its directory entry reaches the disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
