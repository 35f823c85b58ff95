--[[ fail: the holder records a failed attempt (compare-and-set on the token); backoff or park.
KEYS[1] claim key   KEYS[2] inflight (zset)   KEYS[3] backoff (zset)   KEYS[4] parked (hash)
KEYS[5] attempts (hash)   KEYS[6] errors (hash)   KEYS[7] counters (hash)   KEYS[8] started (hash)
ARGV[1] token   ARGV[2] issue   ARGV[3] backoff_base_ms   ARGV[4] backoff_max_ms   ARGV[5] max_attempts
ARGV[6] jitter (a number in [0, 1): the fraction added to the window)   ARGV[7] error text
Returns {1, "backoff", until_ms, attempts} | {1, "parked", parked_ms, attempts}
      | {0, ""} no live claim | {-1, current_token} held by another token
Window: min(base * 2^(n-1), max) * (1 + jitter), n = attempts so far including this one. ]]
local cur = redis.call('GET', KEYS[1])
if not cur then return {0, ''} end
if cur ~= ARGV[1] then return {-1, cur} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local issue = ARGV[2]
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], issue)
redis.call('HDEL', KEYS[8], issue)
local n = redis.call('HINCRBY', KEYS[5], issue, 1)
redis.call('HSET', KEYS[6], issue, ARGV[7])
if n >= tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[4], issue, now)
  redis.call('ZREM', KEYS[3], issue)
  redis.call('HINCRBY', KEYS[7], 'parked', 1)
  return {1, 'parked', tostring(now), n}
end
local base, max = tonumber(ARGV[3]), tonumber(ARGV[4])
local window = max
if n - 1 < 52 then window = math.min(base * 2 ^ (n - 1), max) end
local until_ms = now + math.floor(window * (1 + tonumber(ARGV[6])))
redis.call('ZADD', KEYS[3], until_ms, issue)
redis.call('HINCRBY', KEYS[7], 'backed_off', 1)
return {1, 'backoff', tostring(until_ms), n}
