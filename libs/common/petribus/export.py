"""The session export format: a session's log and files as one JSON-lines file, and its verification.

Pure: ``dump`` turns a ``SessionExport`` into lines, ``load`` turns bytes back into one or raises
``BadExport`` naming the line and what is wrong with it. Reading a session from NATS and writing one into
it is the command line's part (``petribus_cli.sessions``).

One JSON object a line, UTF-8, each line ending in ``\\n``:

1. ``{"kind": "header", "format": "petribus-session", "version": 1, "bot", "session_id", "exported_at"}``
2. ``{"kind": "event", "seq", "event"}`` per event, in log order: its stream sequence in the source
   deployment and the event exactly as the bus carries it.
3. per file, ``{"kind": "file", "file_id", "name", "content_type", "size", "sha256", "chunks"}`` and then
   ``chunks`` lines ``{"kind": "chunk", "file_id", "index", "data"}`` (base64, at most ``CHUNK_BYTES``
   bytes each). ``file_id`` is the id the bytes are stored under in the session.
4. ``{"kind": "end", "events", "files", "lines", "sha256"}``: the counts, and the sha256 of every byte
   before this line.

Every line ends with ``"check": "<sha256 hex>"``, the hash of its line number, a colon and the line
without that field, so a changed or moved line is named by its number; the end line makes a truncated
file or a removed line fail as a whole.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from petribus.errors import PetribusError
from petribus.events import Event, decode, encode

FORMAT = "petribus-session"
VERSION = 1
CHUNK_BYTES = 48 * 1024  # 64 KiB of base64 a line
_CHECKED = re.compile(rb'^(\{.*),"check":"([0-9a-f]{64})"\}$', re.DOTALL)


class BadExport(PetribusError, ValueError):
    """A session export that is not whole and unchanged: ``line`` (1-based) says where, when known."""

    code = "bad_export"

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


@dataclass(frozen=True)
class ExportedFile:
    """A file of the session: the id its bytes are stored under, its name and content type, the bytes."""

    file_id: str
    name: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class SessionExport:
    bot: str
    session_id: str
    exported_at: str  # ISO 8601, UTC
    events: list[tuple[int, Event]]
    files: list[ExportedFile]


def dump(export: SessionExport) -> Iterator[bytes]:
    """The export's lines, each ending in ``\\n``."""
    digest = hashlib.sha256()
    number = 0

    def line(body: bytes) -> bytes:
        nonlocal number
        number += 1
        out = _checked(number, body)
        digest.update(out)
        return out

    yield line(_json({"kind": "header", "format": FORMAT, "version": VERSION, "bot": export.bot,
                      "session_id": export.session_id, "exported_at": export.exported_at}))
    for seq, event in export.events:
        yield line(b'{"kind":"event","seq":%d,"event":%s}' % (seq, encode(event)))
    for f in export.files:
        chunks = [f.data[i:i + CHUNK_BYTES] for i in range(0, len(f.data), CHUNK_BYTES)]
        yield line(_json({"kind": "file", "file_id": f.file_id, "name": f.name, "content_type": f.content_type,
                          "size": len(f.data), "sha256": hashlib.sha256(f.data).hexdigest(),
                          "chunks": len(chunks)}))
        for index, chunk in enumerate(chunks):
            yield line(_json({"kind": "chunk", "file_id": f.file_id, "index": index,
                              "data": base64.b64encode(chunk).decode()}))
    yield _checked(number + 1, _json({"kind": "end", "events": len(export.events), "files": len(export.files),
                                      "lines": number, "sha256": digest.hexdigest()}))


def load(data: bytes) -> SessionExport:
    """Verify a whole export and return it; ``BadExport`` at the first thing wrong (nothing is trusted
    before the end line has been checked)."""
    if not data:
        raise BadExport("the file is empty; expected a petribus session export (petribus sessions export)")
    lines = data.split(b"\n")
    if lines[-1]:
        raise BadExport("the file is truncated: its last line is cut short (no newline at its end); "
                        "export the session again", len(lines))
    lines.pop()
    reader = _Reader()
    digest = hashlib.sha256()
    for number, raw in enumerate(lines, start=1):
        entry = _parse(number, raw)
        if entry["kind"] == "end":
            if number != len(lines):
                raise BadExport(f"{len(lines) - number} line(s) follow the end line; the file was added to",
                                number + 1)
            return reader.end(number, entry, digest.hexdigest())
        digest.update(raw + b"\n")
        reader.take(number, entry)
    raise BadExport(f"the file is truncated: it stops after line {len(lines)} without its end line; "
                    "export the session again")


class _Reader:
    """The state of ``load`` between lines: what the header said, the events and files so far."""

    def __init__(self) -> None:
        self.header: dict[str, Any] | None = None
        self.events: list[tuple[int, Event]] = []
        self.files: list[ExportedFile] = []
        self.file: dict[str, Any] | None = None  # the file whose chunks are being read
        self.chunks: list[bytes] = []

    def take(self, number: int, entry: dict[str, Any]) -> None:
        kind = entry["kind"]
        if self.header is None:
            if kind != "header":
                raise BadExport(f"expected the header line, found a {kind!r} line; this is not the start of "
                                "a petribus session export", number)
            self._header(number, entry)
        elif kind == "event":
            self._event(number, entry)
        elif kind == "file":
            self._close(number)
            self.file = _fields(number, entry, {"file_id": str, "name": str, "content_type": str, "size": int,
                                                "sha256": str, "chunks": int})
            self.chunks = []
            if self.file["chunks"] == 0:
                self._close(number)
        elif kind == "chunk":
            self._chunk(number, entry)
        else:
            raise BadExport(f"unknown line kind {kind!r}", number)

    def end(self, number: int, entry: dict[str, Any], digest: str) -> SessionExport:
        if self.header is None:
            raise BadExport("the end line comes before the header", number)
        self._close(number)
        end = _fields(number, entry, {"events": int, "files": int, "lines": int, "sha256": str})
        for what, have in (("events", len(self.events)), ("files", len(self.files)), ("lines", number - 1)):
            if end[what] != have:
                raise BadExport(f"the end line counts {end[what]} {what} but the file holds {have}: "
                                f"{what} were added or removed", number)
        if end["sha256"] != digest:
            raise BadExport("the checksum of the lines before the end line does not match", number)
        return SessionExport(self.header["bot"], self.header["session_id"], self.header["exported_at"],
                             self.events, self.files)

    def _header(self, number: int, entry: dict[str, Any]) -> None:
        if entry.get("format") != FORMAT:
            raise BadExport(f"format {entry.get('format')!r} is not {FORMAT!r}", number)
        version = entry.get("version")
        if version != VERSION:
            raise BadExport(f"format version {version!r}; this petribus reads version {VERSION}"
                            + (" (the file is from a newer petribus: upgrade to import it)"
                               if isinstance(version, int) and version > VERSION else ""), number)
        self.header = _fields(number, entry, {"bot": str, "session_id": str, "exported_at": str})

    def _event(self, number: int, entry: dict[str, Any]) -> None:
        assert self.header is not None
        if self.file is not None or self.files:
            raise BadExport("an event after the files; events come first", number)
        fields = _fields(number, entry, {"seq": int, "event": dict})
        try:
            event = decode(json.dumps(entry["event"]))
        except ValidationError as exc:
            raise BadExport(f"the event does not validate: {_first_error(exc)}", number) from None
        seq = fields["seq"]
        if self.events and seq <= self.events[-1][0]:
            raise BadExport(f"seq {seq} after seq {self.events[-1][0]}: events out of order", number)
        if (event.bot, event.session_id) != (self.header["bot"], self.header["session_id"]):
            raise BadExport(f"an event of {event.bot}/{event.session_id} in the export of "
                            f"{self.header['bot']}/{self.header['session_id']}", number)
        self.events.append((seq, event))

    def _chunk(self, number: int, entry: dict[str, Any]) -> None:
        fields = _fields(number, entry, {"file_id": str, "index": int, "data": str})
        if self.file is None or fields["file_id"] != self.file["file_id"]:
            raise BadExport(f"a chunk of file {fields['file_id']!r} outside that file's lines", number)
        if fields["index"] != len(self.chunks):
            raise BadExport(f"chunk {fields['index']} of file {fields['file_id']!r} where chunk {len(self.chunks)} "
                            "belongs", number)
        try:
            self.chunks.append(base64.b64decode(fields["data"], validate=True))
        except ValueError:
            raise BadExport(f"chunk {fields['index']} of file {fields['file_id']!r} is not base64", number) from None
        if len(self.chunks) == self.file["chunks"]:
            self._close(number)

    def _close(self, number: int) -> None:
        """The file being read is complete: check its bytes against its size and sha256."""
        f = self.file
        if f is None:
            return
        if len(self.chunks) != f["chunks"]:
            raise BadExport(f"file {f['file_id']!r} has {len(self.chunks)} of its {f['chunks']} chunks", number)
        data = b"".join(self.chunks)
        if len(data) != f["size"] or hashlib.sha256(data).hexdigest() != f["sha256"]:
            raise BadExport(f"the bytes of file {f['file_id']!r} ({f['name']}) do not match its size and sha256",
                            number)
        self.files.append(ExportedFile(f["file_id"], f["name"], f["content_type"], data))
        self.file, self.chunks = None, []


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _checked(number: int, body: bytes) -> bytes:
    check = hashlib.sha256(b"%d:" % number + body).hexdigest().encode()
    return body[:-1] + b',"check":"' + check + b'"}\n'


def _parse(number: int, raw: bytes) -> dict[str, Any]:
    """One line's object, after checking its own checksum."""
    found = _CHECKED.match(raw)
    if found is None:
        raise BadExport("no line checksum at its end; the line was cut or is not part of an export", number)
    body = found.group(1) + b"}"
    if hashlib.sha256(b"%d:" % number + body).hexdigest().encode() != found.group(2):
        raise BadExport("the line was changed after export, or moved (its checksum does not match)", number)
    try:
        entry = json.loads(body)
    except ValueError as exc:
        raise BadExport(f"not JSON ({exc})", number) from None
    if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
        raise BadExport("not an object with a 'kind'", number)
    return entry


def _fields(number: int, entry: dict[str, Any], types: dict[str, type]) -> dict[str, Any]:
    for name, kind in types.items():
        value = entry.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise BadExport(f"{entry['kind']} line: {name!r} should be {kind.__name__}, got {value!r}", number)
    return entry


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "(root)"
    return f"{where}: {err['msg']}"
