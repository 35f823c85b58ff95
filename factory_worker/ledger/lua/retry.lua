--[[ retry: an operator gives a parked or backing-off issue a fresh attempt budget (and a fresh usage budget:
its usage sums go).
KEYS: done_bucket(issue) done parked backoff attempts errors counters outbox usage(issue)
ARGV: issue outbox
REPLIES: ok done
Returns {'done', marker} refused: done is final
      | {'ok', was_parked (0|1), attempts_before, had_backoff (0|1)}; "retried" is counted only when the
        issue was parked, backing off or had failed attempts (retrying nothing changes nothing) ]]
local done = redis.call('HGET', K.done_bucket, A.issue) or redis.call('HGET', K.done, A.issue)
if done then return {'done', done} end
local was_parked = redis.call('HDEL', K.parked, A.issue)
local attempts = redis.call('HGET', K.attempts, A.issue) or '0'
local had_backoff = redis.call('ZREM', K.backoff, A.issue)
redis.call('HDEL', K.attempts, A.issue)
redis.call('HDEL', K.errors, A.issue)
redis.call('DEL', K.usage)
if was_parked + had_backoff > 0 or tonumber(attempts) > 0 then
  redis.call('HINCRBY', K.counters, 'retried', 1)
  emit('retried', A.issue, '', {'was_parked', was_parked})
end
return {'ok', was_parked, tonumber(attempts), had_backoff}
