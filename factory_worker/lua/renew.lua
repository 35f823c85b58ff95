--[[ renew: extend a live claim's lease, only for its holder (compare-and-set on the token).
KEYS[1] claim key   KEYS[2] inflight (zset)
ARGV[1] token   ARGV[2] lease_ms   ARGV[3] issue
Returns {1, expires_ms} renewed | {0, ""} no live claim (expired or released) | {-1, current_token} held by another token ]]
local cur = redis.call('GET', KEYS[1])
if not cur then return {0, ''} end
if cur ~= ARGV[1] then return {-1, cur} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease)
redis.call('ZADD', KEYS[2], now + lease, ARGV[3])
return {1, tostring(now + lease)}
