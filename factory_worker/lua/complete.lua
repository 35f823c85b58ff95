--[[ complete: the holder marks its issue done, permanently (compare-and-set on the token).
KEYS[1] claim key   KEYS[2] inflight (zset)   KEYS[3] fences (hash)   KEYS[4] done (hash)
KEYS[5] backoff (zset)   KEYS[6] attempts (hash)   KEYS[7] errors (hash)   KEYS[8] counters (hash)
KEYS[9] started (hash)
ARGV[1] token ("<fence>:<owner>")   ARGV[2] issue
Returns {1, done_marker} done | {0, ""} no live claim | {-1, current_token} held by another token
The fence moves into the done marker "<fence>:<completed_ms>" (one hash field per done issue). ]]
local cur = redis.call('GET', KEYS[1])
if not cur then return {0, ''} end
if cur ~= ARGV[1] then return {-1, cur} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local issue = ARGV[2]
local fence = string.match(ARGV[1], '^(%d+):') or '0'
local marker = fence .. ':' .. now
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], issue)
redis.call('HSET', KEYS[4], issue, marker)
redis.call('HDEL', KEYS[3], issue)
redis.call('ZREM', KEYS[5], issue)
redis.call('HDEL', KEYS[6], issue)
redis.call('HDEL', KEYS[7], issue)
redis.call('HDEL', KEYS[9], issue)
redis.call('HINCRBY', KEYS[8], 'completed', 1)
return {1, marker}
