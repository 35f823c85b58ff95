--[[ release_queued: free the claim of an agent task whose broker message is gone (a worker died between
popping it and recording it as unacked, a failover lost it) — only while its agent has not started.
KEYS: claim(issue) inflight started counters agent_task(task_id) queued
ARGV: token issue task_id reason
REPLIES: ok running gone held
Returns {'ok'} released (counted released and released_<reason>) | {'running'} its agent started: left alone
      | {'gone'} no live claim | {'held', current_token} held by another token.
Atomic with begin.lua, which marks the task running: a message that is only late either starts first (and
this leaves it alone) or finds its claim released (and runs nothing). ]]
local state = redis.call('HGET', K.agent_task, 'state')
if state and state ~= 'queued' then
  redis.call('ZREM', K.queued, A.task_id)
  return {'running'}
end
redis.call('ZREM', K.queued, A.task_id)
local stale = not_holder(A.token)
if stale then return stale end
end_claim(A.issue)
redis.call('HINCRBY', K.counters, 'released', 1)
redis.call('HINCRBY', K.counters, 'released_' .. A.reason, 1)
return {'ok'}
