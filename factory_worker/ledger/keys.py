"""Every Redis key name factory_worker uses, built from one namespace.

All keys share the hash tag ``{<namespace>}`` so that every Lua script's keys live in one Redis Cluster
slot. Nothing else in the package spells a key by hand: see docs/ARCHITECTURE.md for the layout.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

from factory_worker.config.defaults import NAMESPACE_PATTERN  # noqa: F401 - this module's API too

#: What a namespace may be (``FACTORY_NAMESPACE``, 1-64 characters): it is in every key name.


def utc_day(epoch_s: float | None = None) -> str:
    """The UTC day (``YYYY-MM-DD``) a spend counts in: the ``day`` of :meth:`Keys.spend`."""
    return time.strftime("%Y-%m-%d", time.gmtime(epoch_s))


@dataclass(frozen=True)
class Keys:
    """Key builder for one namespace (``FACTORY_NAMESPACE``)."""

    namespace: str = "factory"

    # -- lifetimes and limits of what the keys hold (used by the code that writes them) ------------------
    #: ``agent(task_id)`` records are kept this long (``run(run_id)`` records: ``loop.run_retention_s``).
    AGENT_TASK_TTL_S = 7 * 24 * 3600
    #: ``revoked`` task ids are kept this long (past any run's life).
    REVOKED_TTL_S = 24 * 3600
    #: ``agent_stop(task_id)`` flags and ``notified(...)`` marks expire after these.
    AGENT_STOP_TTL_S = 3600
    NOTIFIED_TTL_S = 24 * 3600
    #: The backlog keeps at most this many waiting issues (a freed slot needs only the next one).
    BACKLOG_MAX = 256
    #: ``outbox_newest`` lives this long after its last write.
    OUTBOX_NEWEST_TTL_S = 7 * 24 * 3600
    #: Done markers are spread over this many hashes (``done_bucket``); never change it on a live ledger.
    DONE_BUCKETS = 4096
    #: ``errors`` and a run's ``last_error`` keep this many characters.
    ERROR_MAX_CHARS = 500
    #: A staged dispatch's progress (``stages(issue)``) expires this long after its last write; it is deleted
    #: when its attempt ends (complete, fail, park, escalation) and kept over a release (to resume).
    STAGE_PROGRESS_TTL_S = 7 * 24 * 3600
    #: ``stage_history(issue)`` keeps this many steps (the latest), this long after its last write.
    STAGE_HISTORY_MAX = 50
    STAGE_HISTORY_TTL_S = 30 * 24 * 3600
    #: ``loop_failing`` expires this long after the last failed iteration.
    LOOP_FAILING_TTL_S = 7 * 24 * 3600
    #: A stage's feedback (the output of a rejecting or failing stage) is kept to this many bytes.
    FEEDBACK_MAX_BYTES = 64 * 1024
    #: ``inbox(task_id)`` expires this long after its last line (its dispatch's relay drains and deletes it).
    INBOX_TTL_S = 3600
    #: ``inbox(task_id)`` keeps at most this many undelivered lines (the oldest go first).
    INBOX_MAX_LINES = 1000
    #: ``result(issue)`` (an issue's last result) expires this long after it was written.
    RESULT_TTL_S = 90 * 24 * 3600
    #: A result's summary keeps this many characters in the ledger and in the ``done`` outbox event.
    RESULT_SUMMARY_MAX_CHARS = 2000
    #: Fields of ``counters`` that sum what the agents' results reported: cost (micro-dollars) and tokens.
    COST_COUNTER = "result_cost_microusd"
    TOKENS_COUNTER = "result_tokens"

    #: A day's ``spend(day)`` hash lives this long after its last write.
    SPEND_TTL_S = 8 * 24 * 3600

    @staticmethod
    def live_from(now_ms: int) -> int:
        """Lowest ``inflight`` score still live at ``now_ms`` (as ``claim.lua`` counts): Redis keeps a key
        alive through the millisecond it expires at and a script's expiry clock may lag TIME by 1 ms."""
        return now_ms - 1

    @property
    def prefix(self) -> str:
        return "{%s}" % self.namespace

    def _k(self, *parts: str) -> str:
        return ":".join(("{%s}" % self.namespace, *parts))

    # -- broker queues (kombu's lists in the broker's Redis, named here so every side agrees) -----------
    @property
    def loop_queue(self) -> str:
        """The Celery queue of the loop's tasks (kickoff, iteration, finish): ``<namespace>.loop``."""
        return f"{self.namespace}.loop"

    @property
    def agent_queue(self) -> str:
        """The Celery queue of agent tasks: ``<namespace>.agents``."""
        return f"{self.namespace}.agents"

    # -- dispatch ledger ------------------------------------------------------------------------------
    def claim(self, issue: str) -> str:
        """String: the owner token of a live claim, with the lease as its PX expiry."""
        return self._k("claim", issue)

    @property
    def fences(self) -> str:
        """Hash issue -> last fencing number issued (only grows; moved into ``done`` on completion)."""
        return self._k("fences")

    @property
    def done(self) -> str:
        """Hash issue -> ``<fence>:<completed_ms>``: the done markers written before they were bucketed
        (still read by the gate, ``retry``, listings and the audit; nothing new is written here)."""
        return self._k("done")

    def done_bucket(self, issue: str) -> str:
        """Hash issue -> ``<fence>:<completed_ms>``: the permanent done marker, in one of DONE_BUCKETS small
        hashes chosen by the issue's CRC-32, so each stays a compact listpack (about 30 bytes a done issue
        instead of about 90 in one big hash)."""
        return self._k("done", f"b{zlib.crc32(issue.encode('utf-8', 'surrogatepass')) % self.DONE_BUCKETS}")

    def done_bucket_pattern(self) -> str:
        """Match every done bucket (``SCAN``)."""
        return self._k("done", "b*")

    @property
    def done_count(self) -> str:
        """String: how many done markers the buckets hold (``complete.lua`` counts each new one)."""
        return self._k("done", "n")

    @property
    def inflight(self) -> str:
        """Sorted set issue -> lease expiry (ms): counts claims against the in-flight cap."""
        return self._k("inflight")

    @property
    def backoff(self) -> str:
        """Sorted set issue -> end of its backoff window (ms)."""
        return self._k("backoff")

    @property
    def parked(self) -> str:
        """Hash issue -> parked-at (ms): dead-lettered until an operator retries it."""
        return self._k("parked")

    @property
    def attempts(self) -> str:
        """Hash issue -> failed attempts counted so far."""
        return self._k("attempts")

    @property
    def errors(self) -> str:
        """Hash issue -> the last error text (truncated)."""
        return self._k("errors")

    @property
    def started(self) -> str:
        """Hash issue -> the token whose agent has started (a second start for that token is refused)."""
        return self._k("started")

    def stages(self, issue: str) -> str:
        """Hash: a staged dispatch's progress through its stages, for the issue's current attempt: attempt,
        step (1, 2, ...), stage (the step's stage name), state (pending|running), token (whose task started
        the step), task_id, round, retries, plan (JSON list of stage names), feedback, workdir (the attempt's
        shared directory's name), history, thread (the attempt's Slack thread, ``<channel>:<ts>``). Written
        only by ``stage.lua`` (by token), deleted by
        ``complete``/``fail``/``escalate``; a new claim of the same attempt resumes from it."""
        return self._k("stage", issue)

    def stage_history(self, issue: str) -> str:
        """List of JSON objects, oldest first: every step of the issue's staged attempts, ``{attempt, step,
        stage, round, outcome, at_ms}`` (``outcome`` an Outcome or StageOutcome word; the step that ends an
        attempt: ``done``, ``failed`` with ``error``, ``escalated``), written by ``stage.lua`` (op next) and
        ``complete``/``fail``/``escalate``, kept after the attempt ends (STAGE_HISTORY_MAX entries,
        STAGE_HISTORY_TTL_S) so ``explain`` and ``dispatches`` tell what happened."""
        return self._k("stagelog", issue)

    def usage(self, issue: str) -> str:
        """Hash: an issue's usage summed over its attempts (the agents' ``FACTORY_USAGE`` lines): cost_usd,
        tokens, wall_s (agent run time), lines, malformed. Written by ``usage.lua``; ``retry`` deletes it (a
        fresh budget)."""
        return self._k("usage", issue)

    @property
    def concurrency(self) -> str:
        """Hash issue -> the concurrency keys it counted against at its last claim (``claim.lua``: joined by
        ``\\x1f``); read only for live in-flight claims, so a claim's end (or lease) releases its keys."""
        return self._k("concurrency")

    def spend(self, day: str) -> str:
        """Hash: the fleet's usage in one UTC day (``YYYY-MM-DD``): cost_usd, tokens, lines. Written by
        ``usage.lua``, read by ``claim.lua`` (``budget.day_usd``); expires :data:`SPEND_TTL_S` after its last
        write."""
        return self._k("spend", day)

    def result(self, issue: str) -> str:
        """String (JSON, RESULT_TTL_S): the issue's last result, what its latest settled dispatch made in the
        workspace: summary, branch, head sha, pull request URL, cost, tokens (``ledger/results.py``); written
        in the round trip of that dispatch's settle."""
        return self._k("result", issue)

    @property
    def counters(self) -> str:
        """Hash of ledger and loop counters (claimed, deduped, backed_off, parked, completed, ...)."""
        return self._k("counters")

    # -- loop and runs --------------------------------------------------------------------------------
    @property
    def heartbeat(self) -> str:
        """String (JSON) with expiry: the loop heartbeat."""
        return self._k("heartbeat")

    @property
    def loop_lease(self) -> str:
        """String: the run id holding the loop (overlap policy SKIP), with a TTL."""
        return self._k("loop", "lease")

    @property
    def kill(self) -> str:
        """Hash {run_id, by, at_ms, reason}: present while the loop is killed."""
        return self._k("loop", "kill")

    @property
    def paused(self) -> str:
        """Hash {by, at_ms}: present while the loop is paused."""
        return self._k("loop", "paused")

    @property
    def loop_failing(self) -> str:
        """Hash {since_ms, last_ms, error, failures, run_id} (LOOP_FAILING_TTL_S): the loop's iterations have
        failed since ``since_ms`` (the source down, the broker unreachable...); written by every failed
        iteration, deleted by the next one that succeeds. ``loop-status`` says it."""
        return self._k("loop", "failing")

    @property
    def current_run(self) -> str:
        """String: id of the latest run."""
        return self._k("run", "current")

    def run(self, run_id: str) -> str:
        """Hash: the run record (status, task ids, iterations, failures, started/finished)."""
        return self._k("run", run_id)

    @property
    def revoked(self) -> str:
        """Set of task ids revoked by kill-loop (durable, unlike a worker's in-memory revoke list)."""
        return self._k("revoked")

    # -- agents and workers ---------------------------------------------------------------------------
    def agent_task(self, task_id: str) -> str:
        """Hash {issue, token, run_id, state (queued|running), hostname, worker_pid} (AGENT_TASK_TTL_S): maps an
        agent task to its claim. The loop writes it when it sends the task; ``begin.lua`` marks it running."""
        return self._k("agent", task_id)

    # -- tracker outbox ---------------------------------------------------------------------------------
    @property
    def outbox(self) -> str:
        """Stream of tracker events (dispatched, done, backoff, parked, released, retried), each written by
        the script of the ledger transition it reports; consumer group ``writers`` (``outbox.py``)."""
        return self._k("outbox")

    @property
    def outbox_retry(self) -> str:
        """Hash entry id -> ``<attempts>:<not_before_ms>:<last error>``: delivery attempts of an event."""
        return self._k("outbox", "retry")

    @property
    def outbox_newest(self) -> str:
        """Hash issue -> ``<entry id>|<event>`` of the newest outbox event handed to the writer
        (``outbox_newest.lua``): an older event retried later comments but writes the newer one's labels or
        workflow state, and a delivery during which a newer one was handed over writes them again. Expires
        ``OUTBOX_NEWEST_TTL_S`` after its last write (far past any event's retries)."""
        return self._k("outbox", "newest")

    @property
    def outbox_parked(self) -> str:
        """Hash entry id -> JSON {event fields, attempts, error}: events given up after their attempts."""
        return self._k("outbox", "parked")

    @property
    def queued(self) -> str:
        """Zset agent task id -> sent at (ms, the sender's clock): tasks sent whose agent has not started; the
        sender adds, ``begin.lua`` removes, and the loop's sweep releases the claims of those whose broker
        message is gone (``sweep.release_lost_messages``)."""
        return self._k("queued")

    @property
    def agents(self) -> str:
        """Set of agent task ids currently running (for --release-agents and teardown)."""
        return self._k("agents")

    def agent_stop(self, task_id: str) -> str:
        """String flag: the agent of this task must stop and release its claim as interrupted."""
        return self._k("agent", task_id, "stop")

    def inbox(self, task_id: str) -> str:
        """List of JSON lines for the running agent of this task (tracker comments, from the webhook receiver):
        the dispatch's relay moves them into its ``FACTORY_INBOX`` file. At most INBOX_MAX_LINES, INBOX_TTL_S."""
        return self._k("agent", task_id, "inbox")

    # -- webhooks -------------------------------------------------------------------------------------
    def webhook_seen(self, service: str, delivery: str) -> str:
        """String with expiry (``webhooks.dedupe_ttl_s``): a delivery of ``service`` already accepted, by the
        SHA-256 of its delivery id (``SET NX``): a redelivery is acknowledged and ignored."""
        return self._k("webhook", service, delivery)

    @property
    def ledger(self) -> str:
        """Hash {generation, created_ms}: the ledger's identity, created once; a process that worked in one
        generation refuses to claim or start in another (``guard.py``)."""
        return self._k("ledger")

    @property
    def ledger_lost(self) -> str:
        """Hash generation -> JSON {by, at_ms}: processes that found their ledger gone report it here."""
        return self._k("ledger", "lost")

    @property
    def ledger_superseded(self) -> str:
        """Set of generations an operator accepted the current ledger for (``factory-worker ledger accept``)."""
        return self._k("ledger", "superseded")

    @property
    def backlog(self) -> str:
        """List of issue JSON: the last poll's ready issues that wait for room, in source order (replaced
        by every poll, at most BACKLOG_MAX, expires); a freed slot takes the next one (``loop.refill``)."""
        return self._k("backlog")

    @property
    def slots(self) -> str:
        """Hash worker node -> ``<agent slots>:<expires_ms>``: the fleet's advertised agent capacity (a dead
        worker's entry stops counting at its expiry and is pruned by the gate)."""
        return self._k("slots")

    def worker(self, hostname: str) -> str:
        """String (JSON) with expiry: a worker's liveness heartbeat."""
        return self._k("worker", hostname)

    def worker_shutdown(self, hostname: str) -> str:
        """String: deadline (ms) by which a warm-shutting-down worker's agents must have stopped."""
        return self._k("shutdown", hostname)

    def beat(self, node: str) -> str:
        """String (JSON) with expiry: a live ``celery beat``'s presence (``beat("*")`` matches them all)."""
        return self._k("beat", node)

    def notified(self, event: str, subject: str) -> str:
        """String with expiry: ``event`` about ``subject`` was already notified (no repeats)."""
        return self._k("notified", event, subject)

    def worker_pattern(self) -> str:
        return self._k("worker", "*")

    def pattern(self) -> str:
        """Match every key of the namespace (teardown, tests)."""
        return self.prefix + ":*"
