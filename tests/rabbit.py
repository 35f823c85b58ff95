"""A RabbitMQ vhost of a test run's own on the local broker (127.0.0.1:5672, guest/guest), made and deleted with
``rabbitmqctl`` or, where that is missing, the management HTTP API (:15672)."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import urllib.request
import uuid
from dataclasses import dataclass

HOST, PORT, API = "127.0.0.1", 5672, "http://127.0.0.1:15672/api"
USER = PASSWORD = "guest"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _api(method: str, path: str, body: dict | None = None) -> None:
    req = urllib.request.Request(f"{API}{path}", method=method, data=json.dumps(body or {}).encode())
    req.add_header("content-type", "application/json")
    req.add_header("authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    urllib.request.urlopen(req, timeout=10).close()


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@dataclass
class VHost:
    name: str
    via: str  # "rabbitmqctl" or "api"

    @property
    def url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@{HOST}:{PORT}/{self.name}"

    @classmethod
    def create(cls) -> VHost | str:
        """The vhost made, or why none could be (a one-line skip reason)."""
        if not _answers(PORT):
            return f"no RabbitMQ answers on {HOST}:{PORT}"
        name = "factory-test-" + uuid.uuid4().hex[:8]
        try:
            if shutil.which("rabbitmqctl"):
                _ctl("add_vhost", name)
                _ctl("set_permissions", "-p", name, USER, ".*", ".*", ".*")
                return cls(name, "rabbitmqctl")
            if _answers(15672):
                _api("PUT", f"/vhosts/{name}")
                _api("PUT", f"/permissions/{name}/{USER}", {"configure": ".*", "write": ".*", "read": ".*"})
                return cls(name, "api")
        except (OSError, subprocess.SubprocessError) as exc:
            return f"RabbitMQ on {HOST}:{PORT} answers but no vhost could be made: {exc}"
        return f"RabbitMQ on {HOST}:{PORT} answers, but neither rabbitmqctl nor its management API (:15672) does"

    def delete(self) -> None:
        try:
            if self.via == "rabbitmqctl":
                _ctl("delete_vhost", self.name)
            else:
                _api("DELETE", f"/vhosts/{self.name}")
        except (OSError, subprocess.SubprocessError):
            pass


def queue_counts(url: str, queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of ``queue`` in the vhost of ``url`` (rabbitmqctl, else the API)."""
    vhost = url.rsplit("/", 1)[1]
    if shutil.which("rabbitmqctl"):
        out = subprocess.run(
            [
                "rabbitmqctl",
                "-q",
                "list_queues",
                "-p",
                vhost,
                "--no-table-headers",
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        for line in out.splitlines():
            name, ready, unacked = line.split()
            if name == queue:
                return int(ready), int(unacked)
        return 0, 0
    req = urllib.request.Request(f"{API}/queues/{vhost}/{queue}")
    req.add_header("authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        q = json.load(resp)
    return int(q.get("messages_ready", 0)), int(q.get("messages_unacknowledged", 0))
