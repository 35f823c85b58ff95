"""One step of a dispatch: the agent's run for a single agent, or one stage's run for a staged attempt.

What a step gets (:func:`dispatch_for`: a single agent its fresh directory, or with a workspace its worktree; a
stage its command, timeout, the attempt's shared directory (with a workspace: the attempt's worktree), its
feedback file and ``FACTORY_STAGE`` / ``_ROUND`` / ``_STEP``), its side of the
Slack thread (:func:`converse`: a single agent opens one, a stage joins its attempt's), and the run itself
(:func:`run_step`: the runner renewing the claim by token and polling the stop flags, :class:`StopCheck`).
"""

from __future__ import annotations

import logging
import time

from factory_worker.agents import AgentResult, AgentRunner, CommandAgent, Dispatch
from factory_worker.agents.sandbox import Identity, check_workdir_root, make_inbox, shared_workdir, write_feedback
from factory_worker.chat.inbox import AgentInbox, TrackerRelay
from factory_worker.chat.notify import clean
from factory_worker.chat.slack import Conversation, join_conversation, open_conversation
from factory_worker.config.stages import TRIAGE
from factory_worker.context import Context
from factory_worker.dispatch.job import Job
from factory_worker.dispatch.usage import usage_report
from factory_worker.ledger.outage import FailureLog
from factory_worker.ledger.stages import Progress
from factory_worker.loop.presence import SHUTDOWN
from factory_worker.workspace import Prepared

log = logging.getLogger(__name__)

#: How often (s) the Redis stop flags are read while an agent runs.
STOP_POLL_S = 0.5


def renew_interval(ctx: Context) -> float:
    return max(0.05, ctx.settings.dispatch.lease_ttl_s / 3)


def make_runner(ctx: Context) -> AgentRunner:
    return CommandAgent(ctx.settings.agent, renew_interval(ctx), ctx.settings.dispatch.lease_ttl_s)


class StopCheck:
    """Polls the agent's stop flag and the worker's shutdown deadline, at most every STOP_POLL_S."""

    def __init__(self, ctx: Context, task_id: str, hostname: str) -> None:
        self.ctx, self.task_id, self.hostname = ctx, task_id, hostname
        self._next = time.monotonic() + STOP_POLL_S  # begin() just checked revoke and kill
        self._reason: str | None = None
        self._deadline: float | None = None  # local monotonic time of the worker's shutdown deadline
        self._failures = FailureLog(f"reading the stop flags of {task_id}", log)

    def __call__(self) -> str | None:
        if self._reason:
            return self._reason
        now = time.monotonic()
        if self._deadline is not None and now >= self._deadline:
            self._reason = "worker shutdown: soft-shutdown window elapsed"
            return self._reason
        if now < self._next:
            return None
        self._next = now + STOP_POLL_S
        local = SHUTDOWN.agents_stop_at()  # this worker's own shutdown from shared memory, as often as from Redis
        if local is not None:  # (an agent that begins past it runs its first poll interval, as before)
            self._deadline = local if self._deadline is None else min(self._deadline, local)
            if now >= self._deadline:
                self._reason = "worker shutdown: soft-shutdown window elapsed"
                return self._reason
        k = self.ctx.keys
        try:
            p = self.ctx.redis.pipeline(transaction=False)
            p.get(k.agent_stop(self.task_id))
            p.get(k.worker_shutdown(self.hostname))
            p.time()
            stop, deadline, (sec, usec) = p.execute()
            self._failures.ok()
        except Exception as exc:
            self._failures.failed(exc)
            return None
        if stop:
            self._reason = f"stopped by operator ({stop})"
        elif deadline:
            left_s = (int(deadline) - (int(sec) * 1000 + int(usec) // 1000)) / 1000
            self._deadline = time.monotonic() + left_s  # then checked locally on every tick
            if left_s <= 0:
                self._reason = "worker shutdown: soft-shutdown window elapsed"
        return self._reason


def dispatch_for(job: Job, prog: Progress | None, ident: Identity | None, tree: Prepared | None = None) -> Dispatch:
    """What the runner is given: a single agent's dispatch (``agent.command`` in a fresh directory), or, with
    the attempt's progress ``prog``, the step's stage command in the attempt's shared directory, with its
    feedback file. With the step's worktree ``tree`` (a workspace), that is the directory (the runner neither
    makes nor removes it) and its environment is added (``FACTORY_REPO_DIR``... and ``FACTORY_ISSUE_JSON``,
    beside the worktree: the runner's own, in the directory, would be committed)."""
    if prog is None:
        if tree is None:
            return Dispatch(issue=job.issue, token=job.token, dispatch_id=job.task_id)
        env = tree_env(job, tree)
        return Dispatch(issue=job.issue, token=job.token, dispatch_id=job.task_id, env=env, workdir=tree.cwd)
    agent = job.ctx.settings.agent
    if prog.stage == TRIAGE and agent.triage is not None:
        command, timeout_s = agent.triage.command, agent.triage.timeout_s
    else:
        cfg = agent.stage(prog.stage)
        if cfg is None:
            raise ValueError(f"stage {prog.stage!r} is not configured (agent.stages)")
        command, timeout_s = cfg.command, cfg.timeout_s or agent.timeout_s
    if tree is None:
        workdir, feedback = shared_workdir(agent, prog.workdir, job.issue, ident)
    else:  # the feedback file stays beside the attempt directory it would have had
        workdir, feedback = tree.cwd, check_workdir_root(agent, ident) / f"{prog.workdir}.feedback"
    write_feedback(feedback, prog.feedback, ident)
    env = {
        "FACTORY_WORKDIR": str(workdir),
        "FACTORY_FEEDBACK": str(feedback),
        "FACTORY_STAGE": prog.stage,
        "FACTORY_ROUND": str(prog.round),
        "FACTORY_STEP": str(prog.step),
        **(tree_env(job, tree) if tree is not None else {}),
    }
    return Dispatch(
        issue=job.issue,
        token=job.token,
        dispatch_id=job.task_id,
        env=env,
        command=command,
        timeout_s=timeout_s,
        workdir=workdir,
    )


def tree_env(job: Job, tree: Prepared) -> dict[str, str]:
    """What an agent in worktree ``tree`` gets added: its variables, and ``HOME`` beside the worktree (unless
    ``HOME`` is allowlisted): a tool's config or cache written to the home directory is not in the worktree,
    where the factory would commit it."""
    env = dict(tree.env)
    if "HOME" not in job.ctx.settings.agent.env_allowlist:
        env["HOME"] = str(tree.home)
    return env


def converse(job: Job, dispatch: Dispatch, ident: Identity | None, prog: Progress | None) -> AgentInbox | None:
    """The step's ``FACTORY_INBOX`` and what feeds it: with ``slack.channel`` set its side of the Slack thread
    (a single agent opens its thread; a stage joins its attempt's, ``prog.thread``, opened at hand-over, and
    posts its start there), with tracker comments relayed (``webhooks.relays_comments``) the comments on its
    issue. None when both are off or failed: the step runs anyway."""
    slack = job.ctx.settings.slack
    use_slack = bool(slack.channel) and (prog is None or bool(prog.thread))
    relay_comments = job.ctx.settings.webhooks.relays_comments
    if not use_slack and not relay_comments:
        return None
    try:
        inbox = make_inbox(job.ctx.settings.agent, job.task_id, ident, job.issue_id)
    except OSError as exc:
        log.warning("%s: no inbox, it could not be made (%s)", job.label, exc)
        return None
    conversation: Conversation | None = None
    if use_slack:
        try:
            if prog is None:
                conversation = open_conversation(slack, inbox, job.issue.id, job.issue.title, job.task_id)
            else:
                conversation = join_conversation(slack, inbox, prog.thread)
        except Exception as exc:
            log.warning("%s: no Slack thread (%s: %s)", job.label, type(exc).__name__, exc)
            conversation = None
    if conversation is None and not relay_comments:
        inbox.unlink(missing_ok=True)
        return None
    dispatch.env["FACTORY_INBOX"] = str(inbox)
    if prog is not None and conversation is not None:
        tell(
            conversation,
            f"factory-worker: stage {clean(prog.stage, 64)} started (step {clean(prog.step, 20)}, "
            f"round {clean(prog.round, 20)})",
        )
    relay = TrackerRelay(job.ctx.redis, job.ctx.keys, job.task_id, inbox).start() if relay_comments else None
    return AgentInbox(inbox, conversation, relay)


def tell(conversation: Conversation | AgentInbox | None, text: str) -> None:
    """Post ``text`` in the step's thread, if any; nothing Slack does can fail the step."""
    if conversation is None:
        return
    try:
        conversation.post(text)
    except Exception as exc:
        log.warning("could not post in the Slack thread: %s: %s", type(exc).__name__, exc)


def run_step(job: Job, runner: AgentRunner, dispatch: Dispatch) -> AgentResult:
    """Run the step's agent to its end, renewing the claim by token and polling the stop flags."""
    ctx, issue_id, token = job.ctx, dispatch.issue.id, job.token
    dispatch.report = usage_report(job)
    return runner.run(
        dispatch, renew=lambda: ctx.ledger.renew(issue_id, token), should_stop=StopCheck(ctx, job.task_id, job.hostname)
    )
