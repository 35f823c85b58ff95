"""The agent's result file (``FACTORY_RESULT``): one JSON object, every field optional,

    {"summary": str, "title": str, "commit_message": str, "cost_usd": float, "tokens": int}

read after the agent exits, at most ``workspace.result_max_bytes``, validated (:class:`ResultFile`). An empty
file is no result; anything else that is not a valid result (too large, not JSON, a wrong type, a lone
surrogate) is *reported* (:func:`read_result`'s second value, one line) and changes nothing about the
outcome. Unknown fields are ignored (agents may write more).

The file is made by the worker before the agent starts, beside the worktree (not in it: ``git add -A`` would
commit it): owned by the worker, mode 0660 with the agent's group (the agent can write and read it, not chmod
it, and not replace it with a link: the directory is the worker's). Read with ``O_NOFOLLOW``, only a regular
file.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

MAX_TITLE_CHARS = 256
MAX_TEXT_CHARS = 64 * 1024


class ResultFile(BaseModel):
    """What an agent says about its run (all optional)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    summary: str | None = Field(None, max_length=MAX_TEXT_CHARS, strict=True)
    title: str | None = Field(None, max_length=MAX_TITLE_CHARS, strict=True)
    commit_message: str | None = Field(None, max_length=MAX_TEXT_CHARS, strict=True)
    cost_usd: float | None = Field(None, ge=0, allow_inf_nan=False)
    tokens: int | None = Field(None, ge=0, strict=True)

    @field_validator("summary", "title", "commit_message")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("is not valid Unicode text") from None
        if "\x00" in v:
            raise ValueError("contains a NUL character")
        return v

    @field_validator("title")
    @classmethod
    def _one_line(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = " ".join("".join(c if c.isprintable() else " " for c in v).split())
        return v or None


def make_result_file(path: Path, gid: int | None) -> None:
    """An empty result file for the agent: the worker's, writable by ``gid`` (0660), or 0600 when the agent
    is the worker's own user (``gid`` None)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if gid is not None:
            os.fchown(fd, -1, gid)
            os.fchmod(fd, 0o660)
    finally:
        os.close(fd)


def read_result(path: Path, max_bytes: int) -> tuple[ResultFile | None, str | None]:
    """(the result, None) / (None, None) when there is none / (None, what is wrong with it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"FACTORY_RESULT: cannot open it ({exc.strerror})"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "FACTORY_RESULT: not a regular file"
        chunks, size = [], 0
        while size <= max_bytes and (chunk := os.read(fd, max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        return None, f"FACTORY_RESULT: cannot read it ({exc.strerror})"
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        return None, f"FACTORY_RESULT: larger than {max_bytes} bytes"
    if not data.strip():
        return None, None
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"FACTORY_RESULT: not JSON ({str(exc).splitlines()[0][:200]})"
    if not isinstance(value, dict):
        return None, "FACTORY_RESULT: not a JSON object"
    try:
        return ResultFile.model_validate(value), None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "result"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return None, f"FACTORY_RESULT: {where}: {first.get('msg', 'invalid')}{more}"
