"""The file issue source: a ``.jsonl`` / ``.json`` file, or a directory of them.

* ``.jsonl``: one JSON object per line; blank lines are ignored.
* ``.json``: a JSON array of objects, or an object with an ``"issues"`` array.
* a directory: its ``*.jsonl`` / ``*.json`` files in sorted name order (not recursive; other files ignored).
* a file given directly with another extension is read as JSON lines.

A malformed item (bad JSON, not an object, a missing or mistyped field) is reported as one line
``path:LINE: reason`` (``path: item N: reason`` for a ``.json`` array, N being the 0-based index), logged
as a warning, and skipped; the other items are unaffected. When two items share an id the first one (in
file order) wins and the later ones are reported. :meth:`FileSource.get` of an id known only from malformed
items raises :class:`MalformedIssue` with its line. Issue text is data only: nothing in it is evaluated.

Parsed files are cached by (inode, size, mtime): polling an unchanged 10k-issue file costs a ``stat`` and
one pass over the cached issues, and warnings for a bad file are logged once per change, not per poll.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from factory_worker.sources.base import Issue, MalformedIssue, PollResult, SourceError, validation_reason

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json")
#: A file modified less than this long before it was read is not cached: a same-size rewrite within the
#: filesystem's timestamp granularity would otherwise go unnoticed (git's "racy clean" problem).
RACY_NS = 2_000_000_000


@dataclass
class _Parsed:
    """One file's valid issues (with where they came from) and its problems."""

    stamp: tuple[int, int, int] | None
    issues: list[tuple[Issue, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: id -> its error line, for items with a readable id that failed validation (``get`` says why)
    malformed: dict[str, str] = field(default_factory=dict)
    data: bytes | None = None  # kept only for a recently modified file (not cacheable by its stamp)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validate(obj: Any, where: str, out: _Parsed) -> None:
    if not isinstance(obj, dict):
        out.errors.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
        return
    try:
        out.issues.append((Issue.model_validate(obj), where))
        return
    except ValidationError as exc:
        out.errors.append(f"{where}: {_one_line(validation_reason(exc))}")
    except Exception as exc:
        out.errors.append(f"{where}: rejected: {type(exc).__name__}: {_one_line(str(exc))}")
    ident = obj.get("id")
    if isinstance(ident, str) and 0 < len(ident) <= 256:
        out.malformed.setdefault(ident, out.errors[-1])


def _parse_jsonl(path: Path, data: bytes, out: _Parsed) -> None:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            out.errors.append(f"{where}: invalid JSON: {_one_line(str(exc))}")
            continue
        except RecursionError:
            out.errors.append(f"{where}: invalid JSON: nested too deeply")
            continue
        _validate(obj, where, out)


def _parse_json(path: Path, data: bytes, out: _Parsed) -> None:
    try:
        doc = json.loads(data.removeprefix(b"\xef\xbb\xbf"))
    except json.JSONDecodeError as exc:
        out.errors.append(f"{path}:{exc.lineno}: invalid JSON: {_one_line(exc.msg)}")
        return
    except ValueError as exc:
        out.errors.append(f"{path}: invalid JSON: {_one_line(str(exc))}")
        return
    except RecursionError:
        out.errors.append(f"{path}: invalid JSON: nested too deeply")
        return
    if isinstance(doc, dict) and isinstance(doc.get("issues"), list):
        doc = doc["issues"]
    if not isinstance(doc, list):
        out.errors.append(f'{path}: expected a JSON array of issues or an object with an "issues" array')
        return
    for index, obj in enumerate(doc):
        _validate(obj, f"{path}: item {index}", out)


class FileSource:
    """Issues from a ``.jsonl`` / ``.json`` file or a directory of them (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], ready_states: Iterable[str] = ("ready",)) -> None:
        self.path = Path(path)
        self.ready_states = frozenset(ready_states)
        self._cache: dict[Path, _Parsed] = {}
        self._lock = threading.Lock()
        self._merged_parts: list[_Parsed] = []
        self._merged: tuple[dict[str, Issue], list[str], dict[str, str]] | None = None

    def __repr__(self) -> str:
        return f"FileSource({str(self.path)!r}, ready_states={sorted(self.ready_states)!r})"

    # -- reading ---------------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        try:
            if self.path.is_dir():
                return sorted(p for p in self.path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        except OSError as exc:
            raise SourceError(f"issue source {self.path}: cannot list directory: {exc.strerror or exc}") from None
        if not self.path.exists():
            raise SourceError(f"issue source {self.path}: no such file or directory")
        return [self.path]

    def _read(self, path: Path, top_level: bool) -> _Parsed:
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._cache.get(path)
            if cached is not None and cached.stamp == stamp:
                return cached
            racy = time.time_ns() - st.st_mtime_ns < RACY_NS
            data = path.read_bytes()
        except OSError as exc:
            msg = f"{path}: cannot read: {exc.strerror or exc}"
            if top_level:
                raise SourceError(f"issue source {msg}") from None
            log.warning("issue source: %s", msg)
            self._cache.pop(path, None)
            return _Parsed(stamp=None, errors=[msg])
        if cached is not None and cached.data is not None and cached.data == data:
            return cached  # a recently modified file whose bytes did not change: no new warnings
        parsed = _Parsed(stamp=None if racy else stamp, data=data if racy else None)
        (_parse_json if path.suffix == ".json" else _parse_jsonl)(path, data, parsed)
        for err in parsed.errors:
            log.warning("issue source: skipped %s", err)
        self._cache[path] = parsed
        return parsed

    def _load(self) -> tuple[dict[str, Issue], list[str], dict[str, str]]:
        """Every valid issue by id (first occurrence wins), every problem in file order, and the error line of
        each id known only from malformed items."""
        with self._lock:
            files = self._files()
            top_level = files == [self.path]
            parsed = [self._read(p, top_level) for p in files]
            for stale in set(self._cache) - set(files):
                del self._cache[stale]
            if (
                self._merged is not None
                and len(parsed) == len(self._merged_parts)
                and all(a is b for a, b in zip(parsed, self._merged_parts))
            ):
                return self._merged
            by_id: dict[str, Issue] = {}
            first_at: dict[str, str] = {}
            errors: list[str] = []
            malformed: dict[str, str] = {}
            for part in parsed:
                errors.extend(part.errors)
                for ident, line in part.malformed.items():
                    malformed.setdefault(ident, line)
                for issue, where in part.issues:
                    if issue.id in by_id:
                        msg = f"{where}: duplicate id {issue.id!r} (first at {first_at[issue.id]}); skipped"
                        log.warning("issue source: %s", msg)
                        errors.append(msg)
                        continue
                    by_id[issue.id] = issue
                    first_at[issue.id] = where
            for ident in set(malformed) & set(by_id):
                del malformed[ident]
            self._merged_parts, self._merged = parsed, (by_id, errors, malformed)
            return self._merged

    # -- IssueSource -----------------------------------------------------------------------------
    def poll(self) -> PollResult:
        """The issues whose state is ready, in file order, plus one line per skipped item."""
        by_id, errors, _ = self._load()
        ready = [i for i in by_id.values() if i.state in self.ready_states]
        return PollResult(issues=ready, errors=list(errors), seen=len(by_id))

    def get(self, issue_id: str) -> Issue | None:
        """The issue with this id, whatever its state, or None; :class:`MalformedIssue` (the poll's line) when
        the id is known only from items that failed validation."""
        by_id, _, malformed = self._load()
        issue = by_id.get(issue_id)
        if issue is None and issue_id in malformed:
            raise MalformedIssue(malformed[issue_id])
        return issue
