--[[ begin: the agent task for a claim starts, at most once per token, and never once the loop is killed
or the task revoked (a redelivered, duplicated, revoked or post-kill message runs nothing).
KEYS: ledger claim(issue) inflight started revoked kill agent_task(task_id) agents queued attempts outbox
ARGV: generation token lease_ms issue task_id hostname worker_pid outbox
REPLIES: ok duplicate revoked killed gone held ledger-lost
The loop wrote the agent task record (issue, token, run_id, state "queued") when it sent the task; on
start it becomes state "running" with the worker's hostname and pid, leaves K.queued and joins K.agents, so
kill-loop --release-agents and a revoke can find it by task id.
Returns {'ok', lease_end_ms} started (lease renewed) | {'duplicate'} an agent already started for this token
      | {'revoked'} / {'killed'} must not start (the caller releases the claim)
      | {'gone'} no live claim | {'held', current_token} held by another token
      | {'ledger-lost', current_generation} the ledger is not the caller's (nothing starts) ]]
local lost = ledger_lost(A.generation)
if lost then return lost end
local stale = not_holder(A.token)
if stale then return stale end
if redis.call('HGET', K.started, A.issue) == A.token then return {'duplicate'} end
if redis.call('SISMEMBER', K.revoked, A.task_id) == 1 then return {'revoked'} end
if redis.call('EXISTS', K.kill) == 1 then return {'killed'} end
redis.call('HSET', K.started, A.issue, A.token)
redis.call('HSET', K.agent_task, 'state', 'running', 'hostname', A.hostname, 'worker_pid', A.worker_pid)
redis.call('SADD', K.agents, A.task_id)
redis.call('ZREM', K.queued, A.task_id)
local attempt = tonumber(redis.call('HGET', K.attempts, A.issue) or '0') + 1
emit('dispatched', A.issue, A.token, {'task_id', A.task_id, 'attempt', attempt, 'hostname', A.hostname})
return {'ok', tostring(extend_lease(A.issue, tonumber(A.lease_ms)))}
