--[[ claim: gate a batch of candidate issues and claim every claimable one, atomically.
KEYS[1] fences (hash)   KEYS[2] done (hash)      KEYS[3] inflight (zset)
KEYS[4] backoff (zset)  KEYS[5] parked (hash)    KEYS[6] attempts (hash)   KEYS[7] counters (hash)
KEYS[7+i] the claim key of issue i, for i = 1..n
ARGV[1] lease_ms   ARGV[2] max_in_flight   ARGV[3] owner (random, unique per call)   ARGV[3+i] issue id i
Returns a flat array, three entries per issue, in input order: code, a, b
  "ok", token, fence                 claimed: token = "<fence>:<owner>", fence from a per-issue counter
  "done", done_marker, ""            completed before ("<fence>:<completed_ms>")
  "in-flight", pttl_ms, ""           someone holds a live lease
  "parked", parked_ms, attempts      dead-lettered after max attempts
  "backoff", until_ms, attempts      a failed attempt's backoff window is open
  "max-in-flight", in_flight, cap    the cluster-wide cap is reached
  "duplicate", "", ""                the same issue appeared earlier in this batch
Time is the server's (TIME), so every worker sees one clock. ]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local owner = ARGV[3]
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local inflight = redis.call('ZCARD', KEYS[3])
local out, seen = {}, {}
local c = {claimed = 0, deduped = 0, skipped_backoff = 0, skipped_parked = 0, skipped_cap = 0}
local function put(code, a, b) out[#out + 1] = code; out[#out + 1] = a; out[#out + 1] = b end
for i = 1, #ARGV - 3 do
  local issue = ARGV[3 + i]
  local ckey = KEYS[7 + i]
  if seen[issue] then
    put('duplicate', '', ''); c.deduped = c.deduped + 1
  else
    seen[issue] = true
    local done = redis.call('HGET', KEYS[2], issue)
    if done then
      put('done', done, ''); c.deduped = c.deduped + 1
    else
      local pttl = redis.call('PTTL', ckey)
      if pttl >= 0 or pttl == -1 then
        put('in-flight', tostring(pttl), ''); c.deduped = c.deduped + 1
      else
        local parked = redis.call('HGET', KEYS[5], issue)
        local until_ms = tonumber(redis.call('ZSCORE', KEYS[4], issue) or '0')
        if parked then
          put('parked', parked, redis.call('HGET', KEYS[6], issue) or '0'); c.skipped_parked = c.skipped_parked + 1
        elseif until_ms > now then
          put('backoff', tostring(until_ms), redis.call('HGET', KEYS[6], issue) or '0')
          c.skipped_backoff = c.skipped_backoff + 1
        elseif inflight >= cap then
          put('max-in-flight', tostring(inflight), tostring(cap)); c.skipped_cap = c.skipped_cap + 1
        else
          local fence = redis.call('HINCRBY', KEYS[1], issue, 1)
          local token = fence .. ':' .. owner
          redis.call('SET', ckey, token, 'PX', lease)
          redis.call('ZADD', KEYS[3], now + lease, issue)
          if until_ms > 0 then redis.call('ZREM', KEYS[4], issue) end
          inflight = inflight + 1
          put('ok', token, tostring(fence)); c.claimed = c.claimed + 1
        end
      end
    end
  end
end
for name, n in pairs(c) do
  if n > 0 then redis.call('HINCRBY', KEYS[7], name, n) end
end
return out
