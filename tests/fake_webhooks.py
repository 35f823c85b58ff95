"""Deliveries signed and shaped as the services document them, and a client that posts them.

- GitHub (``x-webhooks`` of /work/shared/specs/api.github.com.json: ``issues-labeled``, ``issue-comment-created``):
  headers ``X-GitHub-Event``, ``X-GitHub-Delivery`` (a GUID), ``X-Hub-Signature-256: sha256=<hmac hex>``; body
  ``{action, issue{number, title, state, labels[{name}], ...}, repository{full_name}, sender{login}}`` and for a
  comment ``comment{id, body, user{login, id, type}, author_association, created_at, html_url}``.
- Linear (developers.linear.app, "Webhooks"): headers ``Linear-Signature`` (hex HMAC SHA-256 of the raw body),
  ``Linear-Delivery`` (a UUID), ``Linear-Event``; body ``{action, type, actor, createdAt, data, url,
  updatedFrom, organizationId, webhookTimestamp (ms), webhookId}``.
- Slack (Events API): ``X-Slack-Request-Timestamp`` (s), ``X-Slack-Signature: v0=<hmac hex of
  "v0:<ts>:<body>">``; bodies ``{type: url_verification, challenge, token}`` or ``{type: event_callback,
  event_id, event_time, team_id, event{type, ...}}``.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import time
import uuid
from typing import Any

GITHUB_SECRET = "gh-webhook-secret-for-tests"
LINEAR_SECRET = "lin_wh_secret_for_tests"
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
REPO = "acme/widgets"


def _hex(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def github(
    event: str, payload: dict[str, Any], secret: str = GITHUB_SECRET, delivery: str | None = None
) -> tuple[dict[str, str], bytes]:
    body = json.dumps(payload).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/123abc",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-GitHub-Hook-Id": "12312312",
        "X-Hub-Signature-256": "sha256=" + _hex(secret, body),
    }
    return headers, body


def github_issue(number: int, action: str = "labeled", labels: tuple[str, ...] = ("agent",), repo: str = REPO) -> dict:
    return {
        "action": action,
        "issue": {
            "number": number,
            "title": f"issue {number}",
            "state": "open",
            "labels": [{"name": n} for n in labels],
            "user": {"login": "octocat", "id": 1},
            "author_association": "OWNER",
            "html_url": f"https://github.com/{repo}/issues/{number}",
        },
        "label": {"name": labels[0] if labels else "agent"},
        "repository": {"full_name": repo, "name": repo.split("/")[1], "owner": {"login": repo.split("/")[0]}},
        "sender": {"login": "octocat", "id": 1, "type": "User"},
    }


def github_comment(number: int, body: str, association: str = "MEMBER", login: str = "alice", repo: str = REPO) -> dict:
    return {
        "action": "created",
        "issue": {"number": number, "title": f"issue {number}", "state": "open", "labels": []},
        "comment": {
            "id": 1000 + number,
            "body": body,
            "user": {"login": login, "id": 42, "type": "User"},
            "author_association": association,
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
            "html_url": f"https://github.com/{repo}/issues/{number}#issuecomment-{1000 + number}",
            "performed_via_github_app": None,
        },
        "repository": {"full_name": repo},
        "sender": {"login": login, "id": 42, "type": "User"},
    }


def linear(
    payload: dict[str, Any], secret: str = LINEAR_SECRET, delivery: str | None = None, at_ms: int | None = None
) -> tuple[dict[str, str], bytes]:
    payload = {**payload, "webhookTimestamp": int(time.time() * 1000) if at_ms is None else at_ms}
    payload.setdefault("webhookId", "0b2b6c8e-5a1e-4b7a-9d7e-111111111111")
    body = json.dumps(payload).encode()
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "Linear-Delivery": delivery or str(uuid.uuid4()),
        "Linear-Event": str(payload.get("type", "")),
        "Linear-Signature": _hex(secret, body),
        "User-Agent": "Linear-Webhook",
    }
    return headers, body


def linear_issue(identifier: str, action: str = "update", updated_from: dict | None = None, team: str = "ENG") -> dict:
    return {
        "action": action,
        "type": "Issue",
        "actor": {"id": "user-1", "name": "Ada", "type": "user"},
        "createdAt": "2026-01-01T00:00:00.000Z",
        "data": {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, identifier)),
            "identifier": identifier,
            "title": f"issue {identifier}",
            "state": {"id": "state-1", "name": "Todo", "type": "unstarted"},
            "team": {"id": "team-1", "key": team, "name": team},
            "labels": [],
        },
        "updatedFrom": {"stateId": "state-0"} if updated_from is None else updated_from,
        "url": f"https://linear.app/acme/issue/{identifier}",
        "organizationId": "org-1",
    }


def linear_comment(identifier: str, body: str, user_id: str = "user-1", name: str = "Ada") -> dict:
    return {
        "action": "create",
        "type": "Comment",
        "actor": {"id": user_id, "name": name, "type": "user"},
        "createdAt": "2026-01-01T00:00:00.000Z",
        "data": {
            "id": str(uuid.uuid4()),
            "body": body,
            "issueId": str(uuid.uuid5(uuid.NAMESPACE_URL, identifier)),
            "issue": {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, identifier)), "identifier": identifier},
            "userId": user_id,
            "user": {"id": user_id, "name": name},
            "createdAt": "2026-01-01T00:00:00.000Z",
        },
        "url": f"https://linear.app/acme/issue/{identifier}#comment-1",
        "organizationId": "org-1",
    }


def slack(payload: dict[str, Any], secret: str = SLACK_SECRET, at_s: int | None = None) -> tuple[dict[str, str], bytes]:
    body = json.dumps(payload).encode()
    stamp = str(int(time.time()) if at_s is None else at_s)
    headers = {
        "Content-Type": "application/json",
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": "v0=" + _hex(secret, b"v0:" + stamp.encode() + b":" + body),
    }
    return headers, body


def slack_event(event_id: str | None = None, text: str = "hello") -> dict:
    return {
        "token": "legacy-verification-token",
        "team_id": "T1",
        "api_app_id": "A1",
        "type": "event_callback",
        "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
        "event_time": int(time.time()),
        "event": {"type": "message", "channel": "C1", "user": "U1", "text": text, "ts": "1.2", "thread_ts": "1.1"},
    }


def post(port: int, path: str, headers: dict[str, str], body: bytes, timeout: float = 5.0) -> tuple[int, dict, dict]:
    """POST to the receiver on 127.0.0.1; (status, JSON answer or {}, response headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={**headers, "Content-Length": str(len(body))})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {}
        return resp.status, answer, dict(resp.getheaders())
    finally:
        conn.close()
