--[[ escalate: the holder parks its issue for a human (reason "needs-human"): triage was not confident
enough. No attempt is counted; the claim ends, the stage progress goes; `factory-worker retry` releases it.
KEYS: claim(issue) inflight started parked attempts errors counters stages(issue) stage_history(issue) outbox
ARGV: token issue error outbox
REPLIES: ok gone held
error: "needs-human: <why>" (kept as the issue's last error, which explain and the tracker event show).
Returns {'ok', parked_ms} | {'gone'} no live claim | {'held', current_token} held by another token ]]
local stale = not_holder(A.token)
if stale then return stale end
local now = now_ms()
end_claim(A.issue)
record_step('escalated', A.error)
redis.call('DEL', K.stages)
redis.call('HSET', K.parked, A.issue, now)
redis.call('HSET', K.errors, A.issue, A.error)
redis.call('HINCRBY', K.counters, 'escalated', 1)
local attempt = tonumber(redis.call('HGET', K.attempts, A.issue) or '0') + 1
emit('parked', A.issue, A.token, {'attempt', attempt, 'error', A.error, 'reason', 'needs-human'})
return {'ok', tostring(now)}
