"""Files of a session in the JetStream object store ``PB_FILES``: what transitions send, what users upload.

A file is stored under ``<bot>/<session>/<file id>`` (see ``subjects.file_object``) with its name and
content type; the session's log says that it exists (``output_file``, ``input_file_response``), the
store holds its bytes. The gateway serves it at ``subjects.file_url``. Anyone who knows the session
id can fetch the session's files: the session id (an unguessable uuid) is the capability.
"""

from __future__ import annotations

import mimetypes
import re
from typing import BinaryIO

from nats.js import JetStreamContext
from nats.js.api import ObjectInfo, ObjectMeta
from nats.js.errors import ObjectNotFoundError

from petribus import subjects
from petribus.errors import BusError, FileTooLarge

# What a file's name may keep: a plain name, no folders, nothing a shell or a header could misread.
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")
FILE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def safe_name(name: str | None, fallback: str = "file") -> str:
    """A file name fit for a local path or a download: the last path part, odd characters replaced."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _UNSAFE.sub("_", base).strip(" .")[:200]
    return cleaned or fallback


def content_type(name: str, given: str | None = None) -> str:
    if given and "/" in given and len(given) <= 200:
        return given
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def too_large(size: int, limit: int, what: str) -> FileTooLarge:
    return FileTooLarge(
        f"{what} is {size} bytes, larger than this deployment's limit of {limit} bytes "
        f"({limit / 2**20:.1f} MiB); send a smaller file or raise PETRIBUS_MAX_FILE_BYTES"
    )


class FileStore:
    """The sessions' files, over one JetStream context."""

    def __init__(self, js: JetStreamContext, max_bytes: int) -> None:
        self.js = js
        self.max_bytes = max_bytes
        self._store = None

    async def _obs(self):  # type: ignore[no-untyped-def]
        if self._store is None:
            try:
                self._store = await self.js.object_store(subjects.FILES_BUCKET)
            except Exception as exc:  # nats raises several unrelated types here
                raise BusError(f"the file store {subjects.FILES_BUCKET} is not available: {exc}") from exc
        return self._store

    async def put(self, bot: str, session_id: str, file_id: str, data: BinaryIO | bytes, *, name: str,
                  content_type: str) -> int:
        """Store a file; its size in bytes. Refused (and not kept) when it is over the limit."""
        obs = await self._obs()
        key = subjects.file_object(bot, session_id, file_id)
        meta = ObjectMeta(name=key, description=name,
                          headers={"Filename": [name], "Content-Type": [content_type]})
        try:
            info = await obs.put(key, data, meta=meta)
        except Exception as exc:
            raise BusError(f"storing file {name!r} failed: {exc}") from exc
        if info.size > self.max_bytes:  # it grew while it was read
            await self.delete(bot, session_id, file_id)
            raise too_large(info.size, self.max_bytes, f"file {name!r}")
        return int(info.size)

    async def info(self, bot: str, session_id: str, file_id: str) -> ObjectInfo | None:
        obs = await self._obs()
        try:
            return await obs.get_info(subjects.file_object(bot, session_id, file_id))
        except ObjectNotFoundError:
            return None
        except Exception as exc:
            raise BusError(f"reading file {file_id!r} failed: {exc}") from exc

    async def get_into(self, bot: str, session_id: str, file_id: str, dest: BinaryIO) -> None:
        """Write the file's bytes into ``dest`` (checked against the stored digest)."""
        obs = await self._obs()
        try:
            await obs.get(subjects.file_object(bot, session_id, file_id), writeinto=dest)  # type: ignore[arg-type]
        except ObjectNotFoundError:
            raise
        except Exception as exc:
            raise BusError(f"reading file {file_id!r} failed: {exc}") from exc

    async def delete(self, bot: str, session_id: str, file_id: str) -> None:
        obs = await self._obs()
        try:
            await obs.delete(subjects.file_object(bot, session_id, file_id))
        except ObjectNotFoundError:
            pass


def header(info: ObjectInfo, key: str) -> str | None:
    """One of the headers ``FileStore.put`` stored with a file."""
    value = (info.headers or {}).get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else None
