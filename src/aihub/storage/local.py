"""Files on local disk, under `DATA_DIR/files` (the embedded default).

Disk I/O runs in worker threads (`asyncio.to_thread`): the event loop never waits on the disk.
The content type is kept beside each file, in `<file>.type`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

from aihub.storage.base import ObjectNotFound, Storage, StoredObject, check_key


class LocalStorage(Storage):
    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        await asyncio.to_thread(self._put, self._path(key), data, content_type)

    async def get(self, key: str) -> StoredObject:
        try:
            data, content_type = await asyncio.to_thread(self._get, self._path(key))
        except FileNotFoundError:
            raise ObjectNotFound() from None
        return StoredObject(data, content_type)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, self._path(key))

    async def delete_prefix(self, prefix: str) -> int:
        return await asyncio.to_thread(self._delete_tree, self._path(prefix.rstrip("/")))

    @staticmethod
    def _put(path: Path, data: bytes, content_type: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        for target, body in (
            (path.with_name(path.name + ".type"), content_type.encode()),
            (path, data),
        ):
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(body)
                os.replace(temporary, target)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise

    @staticmethod
    def _get(path: Path) -> tuple[bytes, str]:
        data = path.read_bytes()
        try:
            content_type = (
                path.with_name(path.name + ".type").read_text() or "application/octet-stream"
            )
        except FileNotFoundError:
            content_type = "application/octet-stream"
        return data, content_type

    @staticmethod
    def _delete(path: Path) -> None:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".type").unlink(missing_ok=True)

    @staticmethod
    def _delete_tree(path: Path) -> int:
        if not path.is_dir():
            return 0
        count = sum(1 for p in path.rglob("*") if p.is_file() and p.suffix != ".type")
        shutil.rmtree(path, ignore_errors=True)
        return count
