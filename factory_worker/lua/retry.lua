--[[ retry: an operator gives a parked or backing-off issue a fresh attempt budget.
KEYS[1] done (hash)   KEYS[2] parked (hash)   KEYS[3] backoff (zset)   KEYS[4] attempts (hash)
KEYS[5] errors (hash)   KEYS[6] counters (hash)
ARGV[1] issue
Returns {"done", marker} refused: done is final
      | {"ok", was_parked (0|1), attempts_before, had_backoff (0|1)}; "retried" is counted only when the
        issue was parked, backing off or had failed attempts (retrying nothing changes nothing) ]]
local issue = ARGV[1]
local done = redis.call('HGET', KEYS[1], issue)
if done then return {'done', done} end
local was_parked = redis.call('HDEL', KEYS[2], issue)
local attempts = redis.call('HGET', KEYS[4], issue) or '0'
local had_backoff = redis.call('ZREM', KEYS[3], issue)
redis.call('HDEL', KEYS[4], issue)
redis.call('HDEL', KEYS[5], issue)
if was_parked + had_backoff > 0 or tonumber(attempts) > 0 then
  redis.call('HINCRBY', KEYS[6], 'retried', 1)
end
return {'ok', was_parked, tonumber(attempts), had_backoff}
