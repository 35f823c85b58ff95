--[[ release: the holder frees its claim without counting an attempt (e.g. reason "interrupted").
KEYS[1] claim key   KEYS[2] inflight (zset)   KEYS[3] counters (hash)   KEYS[4] started (hash)
ARGV[1] token   ARGV[2] issue   ARGV[3] reason
Returns {1, reason} released | {0, ""} no live claim | {-1, current_token} held by another token ]]
local cur = redis.call('GET', KEYS[1])
if not cur then return {0, ''} end
if cur ~= ARGV[1] then return {-1, cur} end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('HINCRBY', KEYS[3], 'released', 1)
if ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[3], 'released_' .. ARGV[3], 1) end
return {1, ARGV[3]}
