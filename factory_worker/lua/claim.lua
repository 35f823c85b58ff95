--[[ claim: gate a batch of candidate issues and claim every claimable one, atomically.
KEYS[1] fences (hash)   KEYS[2] done (hash)      KEYS[3] inflight (zset)
KEYS[4] backoff (zset)  KEYS[5] parked (hash)    KEYS[6] attempts (hash)   KEYS[7] counters (hash)
KEYS[8] loop kill flag (hash): while it exists nothing is claimed (atomic with the kill-loop that sets it)
KEYS[9] loop pause flag (hash): likewise while paused
KEYS[9+i] the claim key of issue i, for i = 1..n
ARGV[1] lease_ms   ARGV[2] max_in_flight   ARGV[3] owner (random, unique per call)   ARGV[3+i] issue id i
Returns a flat array, ONE string per issue, in input order (one entry keeps the reply small to parse):
  "<fence>:<owner>.<i>"              claimed: the token (starts with a digit). fence comes from a per-issue
                                     counter that only grows; ".<i>" (position in this call) makes every
                                     claim's token unique, even for issues claimed in one call
  "done:<fence>:<completed_ms>"      completed before (the done marker is "<fence>:<completed_ms>")
  "in-flight:<pttl_ms>"              someone holds a live lease
  "parked:<parked_ms>:<attempts>"    dead-lettered after max attempts
  "backoff:<until_ms>:<attempts>"    a failed attempt's backoff window is open
  "max-in-flight:<in_flight>:<cap>"  the cluster-wide cap is reached
  "duplicate"                        the same issue appeared earlier in this batch
  "killed" / "paused"                the loop is killed / paused: every issue of the batch gets this
Time is the server's (TIME), so every worker sees one clock. An inflight entry stops counting against the
cap only once its score (the lease end) is more than 1 ms in the past: Redis keeps a key alive through
the millisecond it expires at, and a script's expiry clock may lag TIME by a millisecond, so the cap
never undercounts a claim that is still live. ]]
for _, fw in ipairs({{8, 'killed'}, {9, 'paused'}}) do
  local flag, why = fw[1], fw[2]
  if redis.call('EXISTS', KEYS[flag]) == 1 then
    local out = {}
    for i = 1, #ARGV - 3 do out[i] = why end
    redis.call('HINCRBY', KEYS[7], 'skipped_' .. why, #ARGV - 3)
    return out
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local owner = ARGV[3]
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. (now - 1))
local inflight = redis.call('ZCARD', KEYS[3])
local out, seen = {}, {}
local claimed, deduped, s_backoff, s_parked, s_cap = 0, 0, 0, 0, 0
for i = 1, #ARGV - 3 do
  local issue = ARGV[3 + i]
  local ckey = KEYS[9 + i]
  if seen[issue] then
    out[i] = 'duplicate'; deduped = deduped + 1
  else
    seen[issue] = true
    local done = redis.call('HGET', KEYS[2], issue)
    if done then
      out[i] = 'done:' .. done; deduped = deduped + 1
    else
      local pttl = redis.call('PTTL', ckey)
      if pttl >= 0 or pttl == -1 then
        out[i] = 'in-flight:' .. pttl; deduped = deduped + 1
      else
        local parked = redis.call('HGET', KEYS[5], issue)
        local until_ms = tonumber(redis.call('ZSCORE', KEYS[4], issue) or '0')
        if parked then
          out[i] = 'parked:' .. parked .. ':' .. (redis.call('HGET', KEYS[6], issue) or '0')
          s_parked = s_parked + 1
        elseif until_ms > now then
          out[i] = 'backoff:' .. until_ms .. ':' .. (redis.call('HGET', KEYS[6], issue) or '0')
          s_backoff = s_backoff + 1
        elseif inflight >= cap then
          out[i] = 'max-in-flight:' .. inflight .. ':' .. cap; s_cap = s_cap + 1
        else
          local fence = redis.call('HINCRBY', KEYS[1], issue, 1)
          local token = fence .. ':' .. owner .. '.' .. i
          redis.call('SET', ckey, token, 'PX', lease)
          redis.call('ZADD', KEYS[3], now + lease, issue)
          if until_ms > 0 then redis.call('ZREM', KEYS[4], issue) end
          inflight = inflight + 1
          out[i] = token; claimed = claimed + 1
        end
      end
    end
  end
end
if claimed > 0 then redis.call('HINCRBY', KEYS[7], 'claimed', claimed) end
if deduped > 0 then redis.call('HINCRBY', KEYS[7], 'deduped', deduped) end
if s_backoff > 0 then redis.call('HINCRBY', KEYS[7], 'skipped_backoff', s_backoff) end
if s_parked > 0 then redis.call('HINCRBY', KEYS[7], 'skipped_parked', s_parked) end
if s_cap > 0 then redis.call('HINCRBY', KEYS[7], 'skipped_cap', s_cap) end
return out
