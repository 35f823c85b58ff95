"""Housekeeping each loop iteration does after dispatching: what a dead worker or a lost broker message
leaves behind, which nothing else would ever clean up.

* :func:`forget_dead_agents`: running-agent entries whose claims are gone (their worker died, or could not
  clean up while cut off from Redis).
* :func:`release_lost_messages`: claims whose agent task was sent but whose broker message is gone — not
  in the agent queue, not in kombu's unacked hash, its agent never started (a worker SIGKILLed between
  popping the message and recording it as unacked, a Redis failover that lost it). Without this such a
  claim would wait for its queue lease (by default the visibility timeout + 60 s) before the gate could
  grant it again. The release is atomic with ``begin.lua`` (``release_queued.lua``), so an agent that does
  start was never released, and a message that was only late runs nothing. Redis brokers only: on RabbitMQ
  (``amqp://``) a dead consumer's unacknowledged delivery is redelivered by RabbitMQ itself, and agent tasks
  are acknowledged only once ``begin`` answered (``worker/acks.py``), so the loop skips this sweep there.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import redis

from factory_worker.context import Context
from factory_worker.ledger.redis_client import decoded_hash, decoded_members
from factory_worker.ledger.scripts import scripts_for
from factory_worker.ledger.states import ReleaseReason

log = logging.getLogger(__name__)

#: A sent task is only suspected lost this long after it was sent (covers the publish in transit and
#: the sender's clock against the sweeper's).
LOST_AFTER_S = 10.0
#: kombu's Redis transport keeps delivered, unacknowledged messages in this hash (its default name).
KOMBU_UNACKED = "unacked"
#: A suspect is checked again after this pause: a message between a consumer's BRPOP and kombu's unacked
#: record, or between its acknowledgement and ``begin``, is absent for milliseconds only.
RECHECK_S = 0.25


def forget_dead_agents(ctx: Context) -> list[str]:
    """Drop from the running-agents set the tasks whose claims are gone (expired, re-claimed, settled):
    their worker died (SIGKILL, OOM), or it lives on but its own clean-up failed because Redis was out of
    its reach when the agent ended (a partition, a frozen Redis: tests/integration/test_partition.py).
    Either way nothing else would ever remove them. An agent is stopped before its claim can expire, so a
    task whose claim is gone has no agent left; a live worker's clean-up that comes after this finds nothing
    to do. Returns the task ids dropped."""
    dropped = []
    for task_id in decoded_members(ctx.redis.smembers(ctx.keys.agents)):
        rec = decoded_hash(ctx.redis.hgetall(ctx.keys.agent_task(task_id)))
        if rec.get("issue") and rec.get("token") and ctx.ledger.current_token(rec["issue"]) == rec["token"]:
            continue  # still held: its agent may be running, its lease has not run out yet
        if rec.get("issue") and rec.get("token"):
            _forget_started(ctx, rec["issue"], rec["token"])
        p = ctx.redis.pipeline(transaction=False)
        p.srem(ctx.keys.agents, task_id)
        p.delete(ctx.keys.agent_task(task_id))
        p.execute()
        dropped.append(task_id)
    if dropped:
        log.info("forgot %d agent task(s) whose claims are gone: %s", len(dropped), ", ".join(sorted(dropped)))
    return dropped


def _forget_started(ctx: Context, issue: str, token: str) -> None:
    """Remove the started mark of a dead holder's token, only if it is still that token (WATCH: a new
    holder's mark is never touched; on a race the next sweep tries again)."""
    with ctx.redis.pipeline() as p:
        try:
            p.watch(ctx.keys.started)
            if p.hget(ctx.keys.started, issue) == token:
                p.multi()
                p.hdel(ctx.keys.started, issue)
                p.execute()
        except redis.WatchError:
            pass


def release_lost_messages(
    ctx: Context, broker: redis.Redis, queue: str, now_s: float | None = None, recheck_s: float = RECHECK_S
) -> list[str]:
    """Release the claims of sent agent tasks whose broker message is gone; returns their task ids.

    ``broker``: a client of the broker's Redis (the ledger's when they are one), ``queue``: the agent
    queue's name. Only tasks sent more than :data:`LOST_AFTER_S` ago are looked at, and only those absent
    from the queue and the unacked hash twice, :data:`RECHECK_S` apart.
    """
    now_s = time.time() if now_s is None else now_s
    old = decoded_members(ctx.redis.zrangebyscore(ctx.keys.queued, "-inf", int((now_s - LOST_AFTER_S) * 1000)))
    if not old:
        return []
    suspects = [t for t in old if t not in broker_task_ids(broker, queue)]
    if suspects and recheck_s:
        time.sleep(recheck_s)
        present = broker_task_ids(broker, queue)
        suspects = [t for t in suspects if t not in present]
    released = []
    script = scripts_for(ctx.redis)["release_queued"]
    for task_id in suspects:
        rec = decoded_hash(ctx.redis.hgetall(ctx.keys.agent_task(task_id)))
        if not rec.get("issue") or not rec.get("token"):
            ctx.redis.zrem(ctx.keys.queued, task_id)
            continue
        reply = script(
            ctx.keys, token=rec["token"], issue=rec["issue"], task_id=task_id, reason=ReleaseReason.MESSAGE_LOST
        )
        if reply.status == "ok":
            released.append(task_id)
            log.warning(
                "agent task %s for %s: its broker message is gone and its agent never started; claim "
                "released (the gate grants it again)",
                task_id,
                rec["issue"],
            )
    return released


def broker_task_ids(broker: redis.Redis, queue: str) -> set[str]:
    """Task ids of the messages waiting in ``queue`` or delivered and not yet acknowledged (kombu)."""
    ids = set(_ids(broker.lrange(queue, 0, -1), unacked=False))
    ids.update(_ids(broker.hvals(KOMBU_UNACKED), unacked=True))
    return ids


def _ids(raws: Iterable[Any], unacked: bool) -> Iterable[str]:
    for raw in raws:
        try:
            msg = json.loads(raw)
            if unacked:  # [message, exchange, routing_key]
                msg = msg[0]
            task_id = msg["headers"]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if isinstance(task_id, str):
            yield task_id
