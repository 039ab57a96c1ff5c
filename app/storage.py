"""Where uploads and adapters are kept: a local directory by default.

A backend stores objects under string keys such as `uploads/<file_id>.jsonl` and
`adapters/<run_name>.zip`. Writers stream: nothing holds a whole object in memory.
"""

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from app.settings import Settings

CHUNK_BYTES = 1024 * 1024


class ObjectWriter(ABC):
    """A streaming write of one object that becomes visible only on `commit`."""

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None:
        """Discard what was written; safe to call more than once and after `commit`."""


class Storage(ABC):
    @abstractmethod
    def open_writer(self, key: str) -> ObjectWriter: ...

    @abstractmethod
    def open_reader(self, key: str) -> BinaryIO:
        """Open an object for reading; raises FileNotFoundError when it does not exist."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def put_file(self, key: str, path: Path) -> None:
        writer = self.open_writer(key)
        try:
            with open(path, "rb") as source:
                while chunk := source.read(CHUNK_BYTES):
                    writer.write(chunk)
            writer.commit()
        finally:
            writer.abort()

    def get_file(self, key: str, path: Path) -> None:
        with self.open_reader(key) as source, open(path, "wb") as target:
            shutil.copyfileobj(source, target, CHUNK_BYTES)

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        with self.open_reader(key) as source:
            while chunk := source.read(CHUNK_BYTES):
                yield chunk

    def presigned_url(self, key: str, ttl_s: int) -> str | None:
        """Return a direct download link where the backend has one, else None."""
        return None


class _LocalWriter(ObjectWriter):
    def __init__(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        self._target = target
        handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
        self._temp = Path(temp_name)
        self._file = os.fdopen(handle, "wb")
        self._done = False

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self) -> None:
        self._file.close()
        os.replace(self._temp, self._target)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._file.close()
        self._temp.unlink(missing_ok=True)
        self._done = True


class LocalStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key {key!r} leaves the storage directory")
        return path

    def open_writer(self, key: str) -> ObjectWriter:
        return _LocalWriter(self._path(key))

    def open_reader(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def local_path(self, key: str) -> Path:
        return self._path(key)


def make_storage(settings: Settings) -> Storage:
    parsed = urlparse(settings.storage_url)
    if parsed.scheme == "file":
        return LocalStorage(Path(parsed.path))
    if parsed.scheme == "s3":
        from app.storage_s3 import S3Storage

        return S3Storage.from_settings(settings)
    raise ValueError(
        f"RUNDPO_STORAGE_URL={settings.storage_url!r} is not supported; "
        "use file:///PATH or s3://BUCKET/PREFIX"
    )


def upload_key(file_id: str) -> str:
    return f"uploads/{file_id}.jsonl"


def adapter_key(run_name: str) -> str:
    return f"adapters/{run_name}.zip"
