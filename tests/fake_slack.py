"""A stateful local fake of the two Slack Web API methods factory_worker uses, built from Slack's documented
fields and status codes: ``chat.postMessage`` (JSON ``channel``, ``text``, ``thread_ts`` -> ``{"ok": true,
"channel", "ts", "message"}``; ``{"ok": false, "error": "channel_not_found"}`` for an unknown channel) and
``conversations.replies`` (``channel``, ``ts``, ``oldest``, ``limit``, ``cursor`` -> ``{"ok": true,
"messages": [parent, replies...], "has_more", "response_metadata": {"next_cursor"}}``; messages carry
``ts``, ``user`` or ``bot_id``, ``text``). Rate limiting is HTTP 429 with ``Retry-After`` (seconds). Faults:
``fail(method, status, times, headers)``; every read is recorded in ``reads`` (time, thread ts), every post in
``posts`` (time, thread ts or "", text); ``stall_s`` makes every answer late (slow pages)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fake_http import FakeServer, Response, read_body

CHANNEL = "C0FACTORY"
BOT = "B0BOT"


class FakeSlack(FakeServer):
    def __init__(self, page_size: int = 100) -> None:
        self.lock = threading.Lock()
        self.threads: dict[str, list[dict[str, Any]]] = {}
        self.reads: list[tuple[float, str]] = []
        self.posts: list[tuple[float, str, str]] = []
        self.faults: list[dict[str, Any]] = []
        self.page_size = page_size
        self._n = 0
        super().__init__()

    @property
    def url(self) -> str:
        return f"{self.base_url}/api"

    def _ts(self) -> str:
        self._n += 1
        return f"{1_800_000_000 + self._n}.{self._n:06d}"

    def reply(self, thread_ts: str, text: str, user: str = "U0HUMAN") -> str:
        """A human answers in the thread."""
        with self.lock:
            ts = self._ts()
            self.threads[thread_ts].append({"ts": ts, "user": user, "text": text, "thread_ts": thread_ts})
            return ts

    def fail(self, method: str, status: int, times: int = 1, headers: dict[str, str] | None = None) -> None:
        with self.lock:
            self.faults.append({"method": method, "status": status, "times": times, "headers": headers or {}})

    def reads_of(self, thread_ts: str, after: float = 0.0) -> int:
        with self.lock:
            return sum(1 for t, ts in self.reads if ts == thread_ts and t > after)

    def handle(self, method: str, params: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self.lock:
            if method == "conversations.replies":  # every read counts, answered or refused
                self.reads.append((time.time(), params.get("ts", "")))
            for f in self.faults:
                if f["method"] == method and f["times"] > 0:
                    f["times"] -= 1
                    return f["status"], {"ok": False, "error": "ratelimited"}, f["headers"]
        if method == "chat.postMessage":
            return self._post(params)
        if method == "conversations.replies":
            return self._replies(params)
        return 200, {"ok": False, "error": "unknown_method"}, {}

    def _post(self, p: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self.lock:
            self.posts.append((time.time(), str(p.get("thread_ts") or ""), str(p.get("text", ""))))
        if p.get("channel") != CHANNEL:
            return 200, {"ok": False, "error": "channel_not_found"}, {}
        with self.lock:
            ts = self._ts()
            msg = {"ts": ts, "bot_id": BOT, "text": p.get("text", "")}
            parent = p.get("thread_ts")
            if parent:
                if parent not in self.threads:
                    return 200, {"ok": False, "error": "thread_not_found"}, {}
                self.threads[parent].append({**msg, "thread_ts": parent})
            else:
                self.threads[ts] = [msg]
        return 200, {"ok": True, "channel": CHANNEL, "ts": ts, "message": msg}, {}

    def _replies(self, p: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        ts = p.get("ts", "")
        with self.lock:
            if p.get("channel") != CHANNEL or ts not in self.threads:
                return 200, {"ok": False, "error": "thread_not_found"}, {}
            oldest = p.get("oldest", "0")
            msgs = [self.threads[ts][0]] + [m for m in self.threads[ts][1:] if m["ts"] > oldest]
        start = int(p.get("cursor") or 0)
        page = msgs[start : start + self.page_size]
        more = start + self.page_size < len(msgs)
        return (
            200,
            {
                "ok": True,
                "messages": page,
                "has_more": more,
                "response_metadata": {"next_cursor": str(start + self.page_size) if more else ""},
            },
            {},
        )

    def route(self, handler: BaseHTTPRequestHandler) -> Response:
        parts = urlsplit(handler.path)
        method = parts.path.rsplit("/", 1)[-1]
        if handler.command == "POST":
            params = json.loads(read_body(handler) or b"{}")
        else:
            params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        return self.handle(method, params)
