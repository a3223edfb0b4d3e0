"""What a running transition asks of its session's people, and the files it hands them.

``context.confirm``, ``context.get_file`` and ``context.send_file`` in a worker become calls on the
pipe; the firing hands them here. Each turns into events of the session's log, appended in order with
what the transition said before (through the firing's outbox):

- confirm: ``confirm_request`` (a new request id), then the first ``confirm_response`` to it, awaited
  on an ordered consumer of the session (no polling). When ``timeout`` passes first, a
  ``confirm_response`` with ``reason="timeout"`` and ``accepted=false`` is appended (as the answer,
  through ``answers.answer_once``): so the log, not this process, says how the question ended, and
  a late answer from a client is refused.
- get_file: ``input_file_request`` with an upload URL; the gateway stores the upload in ``PB_FILES``
  and appends ``input_file_response``; the bytes are written to a folder of this firing and the
  transition gets the path. A timeout is recorded like confirm's, and raised in the transition.
- send_file: the file (read here: workers run on this machine) goes to ``PB_FILES``, then
  ``output_file`` with its download URL is appended. Only a file inside the run's own folder or the
  bot's volumes is sent, judged on its real path (symlinks resolved): a transition cannot have the
  executor read ``/etc/passwd`` or another run's files for it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from petribus import subjects
from petribus.answers import answer_once, to_file_request, to_question
from petribus.bus import EventLog
from petribus.errors import AlreadyAnswered, PetribusError, UnknownRequest
from petribus.events import (
    ConfirmRequest,
    ConfirmResponse,
    InputFileRequest,
    InputFileResponse,
    OutputFile,
    _Event,
)
from petribus.files import FileStore, content_type, safe_name, too_large
from petribus.work import WorkItem
from petribus_executor.effects import Effect, Effects

Append = Callable[[_Event, str], Awaitable[int]]  # the firing's ordered append (event, Msg-Id): its seq


class Interactions:
    """Shared by all firings of one executor; per-firing state is only the firing's file folder."""

    def __init__(self, events: EventLog, files: FileStore) -> None:
        self.events = events
        self.files = files
        self._folders: dict[str, Path] = {}

    async def confirm(self, item: WorkItem, append: Append, effects: Effects, payload: dict[str, Any]) -> bool:
        timeout = payload.get("timeout")
        effect = effects.next("confirm")
        rid = effect.id
        ask = ConfirmRequest(id=rid, bot=item.bot, session_id=item.session_id, request_id=rid,
                             firing_id=item.firing_id, transition=item.transition,
                             description=str(payload.get("description", "")), timeout=timeout,
                             cause=item.firing_id, trace=item.trace)
        asked_at = await _ask(item, append, effects, effect, ask)
        got = await self.events.wait_for(item.bot, item.session_id, after=asked_at, timeout=timeout,
                                         match=_answering(ConfirmResponse, "request_id", rid))
        if got is not None:
            return bool(getattr(got[1], "accepted", False))
        lapsed = ConfirmResponse(bot=item.bot, session_id=item.session_id, request_id=rid, accepted=False,
                                 reason="timeout", trace=item.trace)
        answer = await self._settle(item, asked_at, rid, to_question(lapsed), ConfirmResponse, "request_id")
        return bool(answer is not None and answer.accepted)  # type: ignore[attr-defined]

    async def get_file(self, item: WorkItem, append: Append, effects: Effects, payload: dict[str, Any]) -> str:
        timeout = payload.get("timeout")
        description = str(payload.get("description", ""))
        effect = effects.next("get_file")
        fid = effect.id
        ask = InputFileRequest(id=fid, bot=item.bot, session_id=item.session_id, request_id=fid, file_id=fid,
                               firing_id=item.firing_id, transition=item.transition, description=description,
                               upload_url=subjects.file_url(item.bot, item.session_id, fid), timeout=timeout,
                               max_bytes=self.files.max_bytes, cause=item.firing_id, trace=item.trace)
        asked_at = await _ask(item, append, effects, effect, ask)
        got = await self.events.wait_for(item.bot, item.session_id, after=asked_at, timeout=timeout,
                                         match=_answering(InputFileResponse, "file_id", fid))
        answer: Any = got[1] if got is not None else None
        if answer is None:
            lapsed = InputFileResponse(bot=item.bot, session_id=item.session_id, file_id=fid,
                                       reason="timeout", trace=item.trace)
            answer = await self._settle(item, asked_at, fid, to_file_request(lapsed), InputFileResponse,
                                        "file_id")
        if answer is None or answer.reason is not None:
            raise PetribusError(f"context.get_file({description!r}): no file was uploaded within "
                                f"{timeout:g}s; the request has lapsed", code="file_timeout")
        run_dir = payload.get("host_dir")
        folder = (Path(run_dir) if isinstance(run_dir, str) else self._folder(item.firing_id)) / fid
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / safe_name(answer.name, fallback=fid)
        with open(path, "wb") as out:
            await self.files.get_into(item.bot, item.session_id, answer.stored_id or fid, out)
        return str(path)

    async def send_file(self, item: WorkItem, append: Append, effects: Effects, payload: dict[str, Any]) -> None:
        shown = str(payload.get("shown_path") or payload.get("path", ""))
        effect = effects.next("send_file")
        if effects.landed(effect):
            return  # an earlier run of this firing sent it: the user has it once
        path = _inside(str(payload.get("path", "")), shown, payload.get("host_dir"), payload.get("allowed") or ())
        try:
            info = await asyncio.to_thread(os.stat, path)
        except OSError as exc:
            raise PetribusError(f"context.send_file({shown!r}): cannot read it ({exc.strerror})",
                                code="file_not_found") from None
        if not stat.S_ISREG(info.st_mode):
            raise PetribusError(f"context.send_file({shown!r}): not a regular file", code="file_not_found")
        name = safe_name(os.path.basename(path))
        if info.st_size > self.files.max_bytes:
            raise too_large(info.st_size, self.files.max_bytes, f"context.send_file({name!r}): the file")
        fid = effect.id
        kind = content_type(name)
        with open(path, "rb") as source:
            size = await self.files.put(item.bot, item.session_id, fid, source, name=name, content_type=kind)
        description = payload.get("description")
        try:
            await append(OutputFile(id=fid, bot=item.bot, session_id=item.session_id, firing_id=item.firing_id,
                                    transition=item.transition, file_id=fid, name=name, size=size,
                                    description=None if description is None else str(description),
                                    url=subjects.file_url(item.bot, item.session_id, fid), content_type=kind,
                                    cause=item.firing_id, trace=item.trace), effect.key)
        except Exception:
            tombstones = getattr(self.events, "tombstones", None)
            if tombstones is not None and tombstones.deleted(item.bot, item.session_id):
                # The session was deleted while the file was stored: its deletion could not know of it.
                await self.files.delete(item.bot, item.session_id, fid)
            raise

    def cleanup(self, firing_id: str) -> None:
        """Remove the firing's folder of received files: the run that used them is over."""
        folder = self._folders.pop(firing_id, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def _folder(self, firing_id: str) -> Path:
        folder = self._folders.get(firing_id)
        if folder is None:
            folder = self._folders[firing_id] = Path(tempfile.mkdtemp(prefix=f"petribus-{firing_id[:12]}-"))
        return folder

    async def _settle(self, item: WorkItem, after: int, target: str, decide: Any, kind: type,
                      field: str) -> Any:
        """Time is up: record that as the answer, unless an answer landed first; the answer that counts."""
        try:
            _, answer = await answer_once(self.events, item.bot, item.session_id, decide, target=target)
            return answer
        except (AlreadyAnswered, UnknownRequest):
            found = _answering(kind, field, target)
            for _, event in await self.events.read(item.bot, item.session_id, after=after):
                if found(event):
                    return event
            return None


def _inside(path: str, shown: str, run_dir: Any, allowed: Any) -> str:
    """``path`` with its symlinks resolved, if that lies inside the run's folder or one of the ``allowed``
    folders (the bot's volumes); else a ``PetribusError`` saying where files may be sent from."""
    real = os.path.realpath(path)
    roots = [r for r in [run_dir, *allowed] if isinstance(r, str) and r]
    for root in roots:
        base = os.path.realpath(root)
        if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
            return real
    where = "its own folder (context.workdir)" + (" or the bot's volumes" if len(roots) > 1 else "")
    target = f" (it resolves to {real!r})" if os.path.normpath(path) != real else ""
    raise PetribusError(
        f"context.send_file({shown!r}) refused: a transition may only send files from {where}, after "
        f"symlinks are resolved{target}; write or copy the file there first",
        code="file_not_allowed",
    )


async def _ask(item: WorkItem, append: Append, effects: Effects, effect: Effect, ask: _Event) -> int:
    """Append a question once per firing, whichever run asks it; the sequence to look for its answer after.

    A re-run asks the question its earlier run asked (same id): the answer may be in the log already, so
    it is looked for from the firing's claim on. A first run looks from the question itself.
    """
    if effects.landed(effect):
        return item.fired_seq
    asked_at = await append(ask, effect.key)
    return item.fired_seq if effects.rerun else asked_at


def _answering(kind: type, field: str, target: str) -> Callable[[Any], bool]:
    """Matches the answer (an event of ``kind``) whose ``field`` names ``target``."""
    return lambda event: isinstance(event, kind) and getattr(event, field, None) == target
