"""The command agent: run the configured argv for one dispatch as a supervised subprocess.

Safety rules (issue text is untrusted input):

* ``{id}`` and ``{title}`` are substituted inside single argv elements, in one pass (a title containing
  ``{id}`` stays literal); there is never a shell, so ``$(...)``, ``;`` and quotes reach the agent as text.
* The dispatch token travels in the environment (``FACTORY_DISPATCH_TOKEN``), never in argv.

Supervision: the agent gets its own session and process group (``pgid == pid``) and, on Linux,
``PR_SET_PDEATHSIG(SIGKILL)`` (see :mod:`.process`), so it dies with the thread that started it even if the
worker is SIGKILLed;
``run()`` must therefore be called from the thread that stays to supervise it. The supervising loop polls
for exit without reaping (``waitid(WNOWAIT)``) so the group id cannot be recycled before the group is
signalled, renews the claim every ``renew_interval_s``, polls ``should_stop()`` and enforces the timeout.
Stopping is SIGTERM to the group, ``term_grace_s``, then SIGKILL. Whatever happens, no process of the
group is left running when ``run()`` returns (a process that makes itself a new session escapes the
group: that is out of reach without cgroups).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..config import AgentSettings
from ..sources.base import Issue
from .base import AgentResult, Dispatch
from .lease import LeaseKeeper
from .process import exit_state, group_alive, launch, pidfd_of, signal_group, signal_name

log = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\{(id|title)\}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_POLL_S = 0.02  # how often the leader's exit is checked between ticks


def substitute_argv(command: list[str], issue: Issue) -> list[str]:
    """``command`` with ``{id}`` / ``{title}`` replaced inside each element (literal text, one pass)."""
    values = {"id": issue.id, "title": issue.title}
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in command]


def safe_name(text: str, limit: int = 80) -> str:
    """A filesystem-safe, collision-resistant name for ``text`` (an issue or dispatch id)."""
    cleaned = _UNSAFE.sub("_", text).lstrip(".")[:limit] or "_"
    if cleaned != text:
        cleaned = f"{cleaned}-{hashlib.sha256(text.encode('utf-8', 'replace')).hexdigest()[:10]}"
    return cleaned


#: factory_worker's own settings (credentials among them) are not the agent's business.
_SETTINGS_ENV = ("FACTORY_REDIS_URL", "FACTORY_BROKER_URL", "FACTORY_NAMESPACE", "FACTORY_CONFIG")


def agent_env(environ: "os._Environ[str] | dict[str, str]") -> dict[str, str]:
    """The worker's environment minus factory_worker's settings (``FACTORY_X__Y`` and the URLs)."""
    return {k: v for k, v in environ.items()
            if not (k in _SETTINGS_ENV or (k.startswith("FACTORY_") and "__" in k))}


class CommandAgent:
    """Runs ``settings.command`` for a dispatch; implements :class:`~factory_worker.agents.base.AgentRunner`."""

    def __init__(self, settings: AgentSettings, renew_interval_s: float, lease_ttl_s: float | None = None) -> None:
        self.settings = settings
        self.renew_interval_s = max(0.01, float(renew_interval_s))
        #: the claim's lease: if no renew succeeds for this long the agent is stopped (it is no longer ours)
        self.lease_ttl_s = float(lease_ttl_s) if lease_ttl_s else 3 * self.renew_interval_s

    def paths(self, dispatch: Dispatch) -> tuple[Path, Path]:
        """(log file, issue JSON file) of a dispatch: ``<log_dir>/<issue>/<dispatch>.{log,issue.json}``."""
        folder = Path(os.path.abspath(self.settings.log_dir)) / safe_name(dispatch.issue.id)
        name = safe_name(dispatch.dispatch_id)
        return folder / f"{name}.log", folder / f"{name}.issue.json"

    def run(
        self,
        dispatch: Dispatch,
        renew: Callable[[], object],
        should_stop: Callable[[], str | None],
        on_start: Callable[[int], None] | None = None,
    ) -> AgentResult:
        issue = dispatch.issue
        argv = substitute_argv(self.settings.command, issue)
        log_path, issue_json = self.paths(dispatch)
        start = time.monotonic()
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            issue_json.write_text(json.dumps(issue.as_json_dict(), ensure_ascii=False, indent=2) + "\n")
            logf = open(log_path, "ab")
        except Exception as exc:  # noqa: BLE001 - disk full, bad path, unserializable data: a failed attempt
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            msg = f"cannot write the agent's log or issue file under {log_path.parent}: {why}"
            log.error("issue %s: %s", issue.id, msg)
            return AgentResult("failed", None, time.monotonic() - start, None, msg)
        env = agent_env(os.environ)
        env.update(
            FACTORY_ISSUE_ID=issue.id, FACTORY_ISSUE_JSON=str(issue_json), FACTORY_DISPATCH_TOKEN=str(dispatch.token)
        )
        with logf:
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            logf.write(
                f"# factory agent: issue={issue.id!r} dispatch={dispatch.dispatch_id!r} "
                f"started={stamp} argv={argv!r}\n".encode("utf-8", "backslashreplace")
            )
            logf.flush()
            try:
                exec_argv, preexec = launch(argv)
                proc = subprocess.Popen(
                    exec_argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                    close_fds=True, start_new_session=True, preexec_fn=preexec,
                )
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                msg = f"cannot start agent {argv[0]!r}: {reason} (log: {log_path})"
                logf.write(f"# {msg}\n".encode("utf-8", "backslashreplace"))
                log.error("issue %s: %s", issue.id, msg)
                return AgentResult("failed", None, time.monotonic() - start, log_path, msg)
        log.info("issue %s: agent started, pid %d, log %s", issue.id, proc.pid, log_path)
        outcome, error, lost = self._supervise(proc, start, renew, should_stop, on_start, issue.id)
        return self._result(proc, outcome, error, lost, start, log_path, issue.id)

    # -- supervision -----------------------------------------------------------------------------
    def _supervise(self, proc, start, renew, should_stop, on_start, issue_id):
        """Wait for the agent while a :class:`LeaseKeeper` renews and reads the stop flags; stop the group
        in time if the claim is lost, a stop is asked, it times out, or renewals stopped succeeding.
        Returns (outcome or None, error, status_lost)."""
        outcome, error, lost = None, "", False
        tick = min(0.05, self.renew_interval_s)
        keeper = LeaseKeeper(renew, should_stop, self.renew_interval_s, self.lease_ttl_s, self.settings.term_grace_s,
                             issue_id, start).start()
        try:
            if on_start is not None:
                try:
                    on_start(proc.pid)
                except Exception:
                    log.exception("issue %s: on_start(%d) failed; the agent runs on", issue_id, proc.pid)
            while True:
                state = self._wait(proc, tick)
                if state != "running":
                    lost = state == "lost"
                    break
                now = time.monotonic()
                if keeper.lost is not None:
                    outcome, error = "lease-lost", keeper.lost
                elif keeper.stop_reason is not None:
                    outcome, error = "interrupted", keeper.stop_reason
                elif now - start >= self.settings.timeout_s:
                    outcome, error = "timeout", f"agent ran longer than {self.settings.timeout_s:g}s"
                elif now >= keeper.stop_at:
                    outcome, error = "lease-lost", (f"the lease could not be renewed for "
                                                    f"{now - keeper.last_renew_sent:.1f}s: stopped before it expires")
                if outcome is not None:
                    break
        finally:
            keeper.close()
            if outcome is not None:
                log.warning("issue %s: stopping agent group %d (%s: %s)", issue_id, proc.pid, outcome, error)
            self.stop_group(proc)
        return outcome, error, lost

    @staticmethod
    def _wait(proc: subprocess.Popen, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        pidfd = pidfd_of(proc)
        nap = 0.001  # without a pidfd: short agents are seen exiting within ms, long ones cost a check per _POLL_S
        while True:
            state = exit_state(proc)
            remaining = deadline - time.monotonic()
            if state != "running" or remaining <= 0:
                return state
            if pidfd is not None:  # readable the moment the agent exits (it stays unreaped)
                select.select([pidfd], [], [], remaining)
                continue
            time.sleep(min(nap, remaining))
            nap = min(nap * 2, _POLL_S)

    @staticmethod
    def _should_stop(should_stop: Callable[[], str | None], issue_id: str) -> str | None:
        try:
            return should_stop()
        except Exception:
            log.exception("issue %s: should_stop() failed; carrying on", issue_id)
            return None

    def stop_group(self, proc: subprocess.Popen) -> None:
        """SIGTERM the agent's group, wait ``term_grace_s`` for it to go, then SIGKILL; reap the leader."""
        pgid = proc.pid
        signal_group(pgid, signal.SIGTERM)  # the leader is running or a zombie: pgid cannot be reused
        deadline = time.monotonic() + self.settings.term_grace_s
        while True:
            if proc.poll() is not None and not group_alive(pgid):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        log.warning("agent group %d outlived SIGTERM by %gs: SIGKILL", pgid, self.settings.term_grace_s)
        signal_group(pgid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("agent %d did not die after SIGKILL", pgid)
        deadline = time.monotonic() + 1.0
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(_POLL_S)

    def _result(self, proc, outcome, error, lost, start, log_path: Path, issue_id: str) -> AgentResult:
        rc = None if lost else proc.returncode
        if outcome is None:
            if lost:
                outcome, error = "failed", "the agent's exit status was lost (reaped elsewhere)"
            elif rc == 0:
                outcome = "ok"
            elif rc is not None and rc > 0:
                outcome, error = "failed", f"agent exited with code {rc}"
            else:
                outcome, error = "signalled", f"agent was killed by signal {signal_name(-(rc or 0))}"
        if outcome in ("failed", "signalled", "timeout"):
            error = f"{error} (log: {log_path})"
        duration = time.monotonic() - start
        try:
            with open(log_path, "ab") as fh:
                fh.write(f"# exit: outcome={outcome} code={rc} duration={duration:.2f}s\n".encode())
        except OSError:
            pass
        level = logging.INFO if outcome == "ok" else logging.WARNING
        log.log(level, "issue %s: agent %s in %.2fs%s", issue_id, outcome, duration, f": {error}" if error else "")
        return AgentResult(outcome, rc, duration, log_path, error)
