--[[ stage: a staged dispatch's progress through its stages, by token (the claim's holder only).
KEYS: claim(issue) inflight stages(issue) stage_history(issue) attempts revoked kill agent_task(task_id) agents queued counters
ARGV: op token issue lease_ms step stage task_id run_id sent_ms hostname worker_pid round retries plan feedback workdir outcome record_ttl_ms progress_ttl_ms thread
REPLIES: ok moved duplicate revoked killed gone held
One claim covers every stage of an attempt; K.stages holds where the attempt is, keyed by issue and bound to
the attempt number (HGET attempts + 1) when a claim opens it: progress of another attempt is dropped then,
so only a new claim of the SAME attempt (the old holder died, or was released) resumes where it was.
Every op first checks that `token` holds the claim ({'gone'} / {'held', current}): a late write by a dead
holder changes nothing (fencing). Steps are numbered 1, 2, ...; each runs at most once per token, and once a
step is finished (op next) no message for it can start it again.
op "open"   (the claim's first task, after begin): create the progress if this attempt has none (step 1 =
            `stage`, with `plan` and `workdir`), else keep it; a step left "running" by an earlier token (a
            dead or released holder) becomes "pending": it runs again, the steps before it do not. Records
            the task `task_id` that will run the current step (state queued, in K.queued), and sets the
            claim's lease to `lease_ms` (the queue lease). -> {'ok', step, stage, resumed (0|1), thread}
op "start"  (a stage task starts step `step` of stage `stage`): {'moved', step, stage} when the progress is
            elsewhere (that step is done, or none exists), {'duplicate'} when it is already running, then
            {'revoked'} / {'killed'} (nothing starts; the caller releases the claim); else marks it running
            by `token`, the task record running (hostname, worker_pid), in K.agents, out of K.queued, and
            renews the lease to `lease_ms`. -> {'ok', round, retries, plan, feedback, workdir, history, thread}
op "next"   (the task running step `step` finished it with `outcome` and hands over): only while that step
            is running by `token` (else {'moved', step, state}); step + 1 = `stage` becomes pending with
            `round`, `retries`, `plan` (kept when empty) and `feedback`; records and queues the next task
            `task_id`; lease set to `lease_ms` (the queue lease); the finished step is appended to
            K.stage_history (with its round and outcome). -> {'ok', new_step}
op "thread" (after open, with Slack on): record the attempt's Slack thread `thread` ("<channel>:<ts>"), kept
            for every later stage and a resumed attempt. -> {'ok'} ({'moved', '', ''} without progress) ]]
local stale = not_holder(A.token)
if stale then return stale end
local p = K.stages
local function queue_stage_task(step, stage)
  queue_task(K.agent_task, A.task_id, A.issue, A.token, A.run_id, A.sent_ms, A.record_ttl_ms,
             {'stage', stage, 'step', step})
end
if A.op == 'open' then
  local attempt = tostring(tonumber(redis.call('HGET', K.attempts, A.issue) or '0') + 1)
  if redis.call('EXISTS', p) == 1 and redis.call('HGET', p, 'attempt') ~= attempt then
    redis.call('DEL', p)  -- an older attempt's progress (or one from before a retry): never resumed
  end
  local resumed = 0
  if redis.call('EXISTS', p) == 0 then
    redis.call('HSET', p, 'attempt', attempt, 'step', '1', 'stage', A.stage, 'state', 'pending', 'round', '1',
               'retries', '0', 'plan', A.plan, 'feedback', '', 'workdir', A.workdir, 'history', '')
  else
    resumed = 1
    redis.call('HSET', p, 'state', 'pending')
    redis.call('HINCRBY', K.counters, 'stages_resumed', 1)
  end
  local step, stage = redis.call('HGET', p, 'step'), redis.call('HGET', p, 'stage')
  redis.call('HSET', p, 'token', A.token, 'task_id', A.task_id)
  queue_stage_task(step, stage)
  redis.call('PEXPIRE', p, A.progress_ttl_ms)
  extend_lease(A.issue, tonumber(A.lease_ms))
  return {'ok', step, stage, resumed, redis.call('HGET', p, 'thread') or ''}
end
if A.op == 'thread' then
  if redis.call('EXISTS', p) == 0 then return {'moved', '', ''} end
  redis.call('HSET', p, 'thread', A.thread)
  return {'ok'}
end
local cur = redis.call('HMGET', p, 'step', 'stage', 'state', 'token')
if A.op == 'start' then
  if not cur[1] or cur[1] ~= A.step or cur[2] ~= A.stage then return {'moved', cur[1] or '', cur[2] or ''} end
  if cur[3] == 'running' then return {'duplicate'} end
  if redis.call('SISMEMBER', K.revoked, A.task_id) == 1 then return {'revoked'} end
  if redis.call('EXISTS', K.kill) == 1 then return {'killed'} end
  redis.call('HSET', p, 'state', 'running', 'token', A.token, 'task_id', A.task_id, 'started_ms', tostring(now_ms()))
  redis.call('PEXPIRE', p, A.progress_ttl_ms)
  redis.call('HSET', K.agent_task, 'state', 'running', 'hostname', A.hostname, 'worker_pid', A.worker_pid)
  redis.call('SADD', K.agents, A.task_id)
  redis.call('ZREM', K.queued, A.task_id)
  redis.call('HINCRBY', K.counters, 'stages_started', 1)
  extend_lease(A.issue, tonumber(A.lease_ms))
  local f = redis.call('HMGET', p, 'round', 'retries', 'plan', 'feedback', 'workdir', 'history', 'thread')
  return {'ok', f[1] or '1', f[2] or '0', f[3] or '[]', f[4] or '', f[5] or '', f[6] or '', f[7] or ''}
end
-- op "next"
if not cur[1] or cur[1] ~= A.step or cur[3] ~= 'running' or cur[4] ~= A.token then
  return {'moved', cur[1] or '', cur[3] or ''}
end
record_step(A.outcome)  -- the finished step, in the issue's history (kept after the attempt)
local step = tostring(tonumber(cur[1]) + 1)
local history = redis.call('HGET', p, 'history') or ''
if history ~= '' then history = history .. ',' end
history = history .. cur[1] .. ':' .. cur[2] .. ':' .. A.outcome
redis.call('HSET', p, 'step', step, 'stage', A.stage, 'state', 'pending', 'round', A.round, 'retries', A.retries,
           'feedback', A.feedback, 'history', history, 'task_id', A.task_id)
if A.plan ~= '' then redis.call('HSET', p, 'plan', A.plan) end
redis.call('PEXPIRE', p, A.progress_ttl_ms)
queue_stage_task(step, A.stage)
extend_lease(A.issue, tonumber(A.lease_ms))
return {'ok', step}
