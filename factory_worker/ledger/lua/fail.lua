--[[ fail: the holder records a failed attempt (compare-and-set on the token); backoff or park.
KEYS: claim(issue) inflight started backoff parked attempts errors counters stages(issue) stage_history(issue) outbox
ARGV: token issue backoff_base_ms backoff_max_ms max_attempts jitter error outbox
REPLIES: ok gone held
jitter is a number in [0, 1): the fraction added to the window.
Returns {'ok', 'backoff', until_ms, attempts} | {'ok', 'parked', parked_ms, attempts}
      | {'gone'} no live claim | {'held', current_token} held by another token
Window: min(base * 2^(n-1), max) * (1 + jitter), n = attempts so far including this one. ]]
local stale = not_holder(A.token)
if stale then return stale end
local now = now_ms()
end_claim(A.issue)
record_step('failed', A.error)
redis.call('DEL', K.stages)  -- the next attempt of a staged dispatch starts from its first stage
local n = redis.call('HINCRBY', K.attempts, A.issue, 1)
redis.call('HSET', K.errors, A.issue, A.error)
if n >= tonumber(A.max_attempts) then
  redis.call('HSET', K.parked, A.issue, now)
  redis.call('ZREM', K.backoff, A.issue)
  redis.call('HINCRBY', K.counters, 'parked', 1)
  emit('parked', A.issue, A.token, {'attempt', n, 'error', A.error})
  return {'ok', 'parked', tostring(now), n}
end
local base, max = tonumber(A.backoff_base_ms), tonumber(A.backoff_max_ms)
local window = max
if n - 1 < 52 then window = math.min(base * 2 ^ (n - 1), max) end
local until_ms = now + math.floor(window * (1 + tonumber(A.jitter)))
redis.call('ZADD', K.backoff, until_ms, A.issue)
redis.call('HINCRBY', K.counters, 'backed_off', 1)
emit('backoff', A.issue, A.token, {'attempt', n, 'error', A.error, 'until_ms', until_ms})
return {'ok', 'backoff', tostring(until_ms), n}
