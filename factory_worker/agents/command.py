"""The command agent: run the configured argv for one dispatch as a supervised subprocess.

Safety rules (issue text is untrusted input):

* ``{id}`` and ``{title}`` are substituted inside single argv elements, in one pass (a title containing
  ``{id}`` stays literal); there is never a shell, so ``$(...)``, ``;`` and quotes reach the agent as text.
* The dispatch token travels in the environment (``FACTORY_DISPATCH_TOKEN``), never in argv.
* The agent gets its own fresh directory (its cwd, holding ``issue.json``), an allowlisted environment and,
  with ``agent.user``, its own uid/gid: :mod:`.sandbox` says exactly what it is given.

Supervision: the agent gets its own session and process group (``pgid == pid``) and, on Linux,
``PR_SET_PDEATHSIG(SIGKILL)`` (see :mod:`.process`), so it dies with the thread that started it even if the
worker is SIGKILLed;
``run()`` must therefore be called from the thread that stays to supervise it. Where the worker can make one
(``agent.pid_namespace``, :mod:`.pidns`), the agent is PID 1 of its own PID namespace: whatever it started
ends with it, however it ends. The supervising loop polls for exit without reaping (``waitid(WNOWAIT)``) so
the group id cannot be recycled before the group is signalled, renews the claim every ``renew_interval_s``,
polls ``should_stop()`` and enforces the timeout. Stopping is SIGTERM to the group, ``term_grace_s``, then
SIGKILL (:meth:`CommandAgent.stop_group`). Whatever happens, no process of the group is left running when
``run()`` returns; without a namespace, a process that made itself a new session escapes the group and
outlives the agent (its output is cut off: :class:`.logs.LogRelay`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from factory_worker.agents.base import AgentResult, Dispatch
from factory_worker.agents.lease import LeaseKeeper, helpers_after_s
from factory_worker.agents.logs import LogRelay, open_log, prune
from factory_worker.agents.pidns import new_namespace, use_namespace
from factory_worker.agents.process import (
    exit_state,
    group_alive,
    launch,
    live_member,
    pidfd_of,
    signal_group,
    signal_name,
    term_is_default,
)
from factory_worker.agents.sandbox import (
    ISSUE_FILE,
    agent_env,
    agent_identity,
    make_usage_file,
    make_workdir,
    remove_workdir,
    running_as,
)
from factory_worker.agents.usage import UsageFile
from factory_worker.config.settings import AgentSettings
from factory_worker.sources.base import Issue

log = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\{(id|title)\}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_POLL_S = 0.02  # how often the leader's exit is checked between ticks


def substitute_argv(command: list[str], issue: Issue) -> list[str]:
    """``command`` with ``{id}`` / ``{title}`` replaced inside each element (literal text, one pass)."""
    values = {"id": issue.id, "title": issue.title}
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in command]


def anchor_paths(command: list[str]) -> list[str]:
    """``command`` with each argument that names an existing file relative to the worker's cwd (a ``/`` in it,
    no placeholder) made absolute: the agent runs in its own directory, so ``["python", "examples/agent.py"]``
    still means the worker's file. Issue text is never touched (this runs before substitution); ``argv[0]`` is
    resolved by :func:`.process.launch`."""
    return [command[0]] + [
        os.path.abspath(arg)
        if "/" in arg and not os.path.isabs(arg) and "{" not in arg and os.path.exists(arg)
        else arg
        for arg in command[1:]
    ]


def safe_name(text: str, limit: int = 80) -> str:
    """A filesystem-safe, collision-resistant name for ``text`` (an issue or dispatch id)."""
    cleaned = _UNSAFE.sub("_", text).lstrip(".")[:limit] or "_"
    if cleaned != text:
        cleaned = f"{cleaned}-{hashlib.sha256(text.encode('utf-8', 'replace')).hexdigest()[:10]}"
    return cleaned


def _unprepared(issue_id: str, what: str, exc: BaseException, start: float) -> AgentResult:
    """A failed attempt: something the agent needs could not be made (nothing was started)."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
    msg = f"cannot prepare {what}: {why}"
    log.error("issue %s: %s", issue_id, msg)
    return AgentResult("failed", None, time.monotonic() - start, None, msg)


class CommandAgent:
    """Runs ``settings.command`` for a dispatch; implements :class:`~factory_worker.agents.base.AgentRunner`.

    Raises :class:`~factory_worker.config.settings.ConfigError` (naming agent.user) when agents must run as another
    user and this worker cannot switch to it: an agent never runs as the worker instead."""

    def __init__(self, settings: AgentSettings, renew_interval_s: float, lease_ttl_s: float | None = None) -> None:
        self.settings = settings
        self.renew_interval_s = max(0.01, float(renew_interval_s))
        #: the claim's lease: if no renew succeeds for this long the agent is stopped (it is no longer ours)
        self.lease_ttl_s = float(lease_ttl_s) if lease_ttl_s else 3 * self.renew_interval_s
        #: who the agent runs as (None: the worker's own user)
        self.ident = agent_identity(settings)
        #: each agent as PID 1 of its own PID namespace (:mod:`.pidns`)
        self.pidns = use_namespace(settings)

    def log_path(self, dispatch: Dispatch) -> Path:
        """A dispatch's log file: ``<log_dir>/<issue>/<dispatch>.log`` (the worker's; the agent gets an fd)."""
        folder = Path(os.path.abspath(self.settings.log_dir)) / safe_name(dispatch.issue.id)
        return folder / f"{safe_name(dispatch.dispatch_id)}.log"

    def run(
        self,
        dispatch: Dispatch,
        renew: Callable[[], object],
        should_stop: Callable[[], str | None],
        on_start: Callable[[int], None] | None = None,
    ) -> AgentResult:
        issue, start = dispatch.issue, time.monotonic()
        owned = dispatch.workdir is None  # a staged dispatch's directory is its caller's to make and remove
        try:
            if dispatch.workdir is None:  # owned (said again for the type checker)
                workdir, issue_json = make_workdir(
                    self.settings, dispatch.dispatch_id, issue, self.ident, safe_name(dispatch.dispatch_id)
                )
            else:
                workdir, issue_json = dispatch.workdir, dispatch.workdir / ISSUE_FILE
        except Exception as exc:
            return _unprepared(issue.id, f"the agent's directory under {self.settings.workdir_root}", exc, start)
        usage_path: Path | None = None
        try:
            env = agent_env(self.settings, os.environ, workdir, issue_json, issue.id, dispatch.token)
            env.update(dispatch.env)
            try:
                usage_path = make_usage_file(self.settings, dispatch.dispatch_id, self.ident)
            except OSError as exc:
                return _unprepared(issue.id, "the agent's usage file (FACTORY_USAGE)", exc, start)
            env["FACTORY_USAGE"] = str(usage_path)
            spawned = self._spawn(dispatch, workdir, env, start)
            if isinstance(spawned, AgentResult):
                return spawned
            proc, relay = spawned
            keeper = LeaseKeeper(
                renew,
                should_stop,
                self.renew_interval_s,
                self.lease_ttl_s,
                self.settings.term_grace_s,
                issue.id,
                start,
                usage=UsageFile(usage_path),
                report=dispatch.report,
            )
            try:
                outcome, error, lost = self._supervise(
                    proc, relay, keeper, start, on_start, issue.id, dispatch.timeout_s or self.settings.timeout_s
                )
            finally:
                relay.finish()  # the group is gone: the rest is copied, a stray writer cut off; it closes the log
            keeper.last_usage_read()
            res = self._result(proc, outcome, error, lost, start, self.log_path(dispatch), issue.id)
            return replace(res, usage=keeper.usage.as_dict())
        finally:
            if usage_path is not None:
                usage_path.unlink(missing_ok=True)
            if not owned:
                pass
            elif self.settings.keep_workdir:
                log.info("issue %s: kept the agent's directory %s", issue.id, workdir)
            else:
                remove_workdir(workdir, self.ident)

    def _spawn(
        self, dispatch: Dispatch, workdir: Path, env: dict[str, str], start: float
    ) -> tuple[subprocess.Popen, LogRelay] | AgentResult:
        """Start the agent in ``workdir`` with ``env``, as ``self.ident``; its output goes through a pipe to a
        :class:`LogRelay` into the dispatch's log (0600, capped at ``agent.log_max_bytes``)."""
        issue, log_path = dispatch.issue, self.log_path(dispatch)
        argv = substitute_argv(anchor_paths(dispatch.command or self.settings.command), issue)
        prune(Path(os.path.abspath(self.settings.log_dir)), self.settings.log_retention_s)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        header = (
            f"# factory agent: issue={issue.id!r} dispatch={dispatch.dispatch_id!r} started={stamp} "
            f"argv={argv!r} cwd={str(workdir)!r} user={running_as(self.ident)!r}"
            f"{' pidns=own' if self.pidns else ''}\n"
        ).encode("utf-8", "backslashreplace")
        try:
            relay = LogRelay(open_log(log_path), self.settings.log_max_bytes, header)  # owns the log from here
        except OSError as exc:
            return _unprepared(issue.id, f"the agent's log {log_path}", exc, start)
        try:
            exec_argv, extra = launch(argv, self.ident, self.pidns)
            with new_namespace() if self.pidns else contextlib.nullcontext():  # the agent is its PID 1
                proc = subprocess.Popen(
                    exec_argv,
                    stdin=subprocess.DEVNULL,
                    stdout=relay.write_fd,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=workdir,
                    close_fds=True,
                    start_new_session=True,
                    **extra,
                )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            msg = f"cannot start agent {argv[0]!r}: {reason} (log: {log_path})"
            relay.note(f"# {msg}\n".encode("utf-8", "backslashreplace"))
            relay.close()
            log.error("issue %s: %s", issue.id, msg)
            return AgentResult("failed", None, time.monotonic() - start, log_path, msg)
        finally:
            relay.spawned()  # the agent holds the only write end now
        log.info(
            "issue %s: agent started, pid %d, as %s%s, log %s",
            issue.id,
            proc.pid,
            running_as(self.ident),
            " in its own PID namespace" if self.pidns else "",
            log_path,
        )
        return proc, relay  # the relay is started by _supervise

    # -- supervision -----------------------------------------------------------------------------
    def _supervise(self, proc, relay, keeper, start, on_start, issue_id, timeout_s):
        """Wait for the agent while its :class:`LeaseKeeper` renews, reads the stop flags and the usage lines;
        stop the group in time if the claim is lost, a stop is asked, a budget is crossed, it times out, it
        stalled (no byte of output and no usage line for ``agent.stall_s``), or renewals stopped succeeding.
        The keeper's and the log relay's threads start once the agent outlives :func:`.lease.helpers_after_s`
        (before any renew or flag read is due; a short agent costs no thread). Returns (outcome or None,
        error, status_lost)."""
        outcome, error, lost = None, "", False
        tick = min(0.05, self.renew_interval_s)
        stall_s = self.settings.stall_s
        helpers_at = time.monotonic() + helpers_after_s(self.renew_interval_s)
        try:
            if on_start is not None:
                try:
                    on_start(proc.pid)
                except Exception:
                    log.exception("issue %s: on_start(%d) failed; the agent runs on", issue_id, proc.pid)
            while True:
                # until the helpers start, wake for their start too
                wait = tick if keeper.started else min(tick, max(0.001, helpers_at - time.monotonic()))
                state = self._wait(proc, wait)
                if state != "running":
                    lost = state == "lost"
                    break
                now = time.monotonic()
                if now >= helpers_at and not keeper.started:
                    keeper.start()
                    relay.start()
                if keeper.lost is not None:
                    outcome, error = "lease-lost", keeper.lost
                elif keeper.stop_reason is not None:
                    outcome, error = "interrupted", keeper.stop_reason
                elif keeper.budget_stop is not None:
                    outcome, error = keeper.budget_stop
                elif now - start >= timeout_s:
                    outcome, error = "timeout", f"agent ran longer than {timeout_s:g}s"
                elif stall_s and now - max(relay.last_output, keeper.last_usage) >= stall_s:
                    outcome, error = "failed", f"stalled: no output for {stall_s:g} s"
                elif now >= keeper.stop_at:
                    outcome, error = (
                        "lease-lost",
                        (
                            f"the lease could not be renewed for "
                            f"{now - keeper.last_renew_sent:.1f}s: stopped before it expires"
                        ),
                    )
                if outcome is not None:
                    break
        finally:
            keeper.close()
            if outcome is not None:
                log.warning("issue %s: stopping agent group %d (%s: %s)", issue_id, proc.pid, outcome, error)
                relay.start()  # a group being stopped may still write: the pipe must not fill meanwhile
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
        """SIGTERM the agent's group, wait ``term_grace_s`` for it to go, then SIGKILL; reap the leader.

        In its own PID namespace the agent is the init, which gets no signal it has no handler for: an agent
        that neither catches nor ignores SIGTERM would not end, where SIGTERM's default is to end it. So it
        gets SIGKILL instead as soon as nothing else of its group is left (they got the SIGTERM and
        ``term_grace_s`` to go); its end ends the whole namespace, what left the group included."""
        pgid = proc.pid
        signal_group(pgid, signal.SIGTERM)  # the leader is running or a zombie: pgid cannot be reused
        deadline = time.monotonic() + self.settings.term_grace_s
        deaf_init = self.pidns and proc.poll() is None and term_is_default(pgid)
        while True:
            if proc.poll() is not None and not group_alive(pgid):
                return
            if deaf_init and not live_member(pgid, but=pgid):
                signal_group(pgid, signal.SIGKILL)  # as SIGTERM would have ended it
                deaf_init = False
                continue
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
