--[[ complete: the holder marks its issue done, permanently (compare-and-set on the token).
KEYS: claim(issue) inflight started fences done backoff attempts errors counters outbox
ARGV: token issue outbox
REPLIES: ok gone held
Returns {'ok', done_marker} done | {'gone'} no live claim | {'held', current_token} held by another token
The fence moves into the done marker "<fence>:<completed_ms>" (one hash field per done issue). ]]
local stale = not_holder(A.token)
if stale then return stale end
local marker = (string.match(A.token, '^(%d+):') or '0') .. ':' .. now_ms()
local attempt = tonumber(redis.call('HGET', K.attempts, A.issue) or '0') + 1
end_claim(A.issue)
redis.call('HSET', K.done, A.issue, marker)
redis.call('HDEL', K.fences, A.issue)
redis.call('ZREM', K.backoff, A.issue)
redis.call('HDEL', K.attempts, A.issue)
redis.call('HDEL', K.errors, A.issue)
redis.call('HINCRBY', K.counters, 'completed', 1)
emit('done', A.issue, A.token, {'attempt', attempt})
return {'ok', marker}
