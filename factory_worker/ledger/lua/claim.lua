--[[ claim: THE gate. Decide for a batch of candidate issues whether each may be dispatched now, and (mode
"claim") claim every one that may, atomically. Mode "dry" takes the very same decisions and writes nothing:
dry runs and `explain` ask this script, so they can never disagree with a real claim.
KEYS: ledger fences done inflight backoff parked attempts counters kill paused slots started spend(day) concurrency claim(issue)* done_bucket(issue)*
ARGV: generation queue_lease_ms max_in_flight owner mode use_slots day day_usd groups issue*
REPLIES: ok ledger-lost
generation: the ledger generation the caller works in; any other (or none) -> {'ledger-lost', current}.
started: a new claim clears the started mark a dead holder left (so started marks are live claims only).
kill / paused: while either flag exists nothing is claimed (atomic with the kill-loop / pause that sets it);
an issue that is done, in flight, parked or backing off still says so (explain of a done issue says done).
owner is random and unique per call; mode is "claim" or "dry".
queue_lease_ms: a new claim's lease while its agent message waits in the broker (begin.lua switches it to
the running lease); the in-flight count is queued + running claims.
slots (hash worker -> "<agent slots>:<expires_ms>") with use_slots "1": the fleet's live agent slots bound
the in-flight count too, so nothing is claimed that no worker could start (no live worker: nothing).
Returns {'ok', entry_1, ..., entry_n}: ONE string per issue, in input order:
  "<fence>:<owner>.<i>"              claimed: the token (starts with a digit). fence comes from a per-issue
                                     counter that only grows; ".<i>" (position in this call) makes every
                                     claim's token unique, even for issues claimed in one call
  "claimable:<fence>"                (dry mode) would be claimed now, with this fence
  "done:<fence>:<completed_ms>"      completed before (the done marker is "<fence>:<completed_ms>")
  "in-flight:<pttl_ms>"              someone holds a live lease
  "parked:<parked_ms>:<attempts>"    dead-lettered after max attempts
  "backoff:<until_ms>:<attempts>"    a failed attempt's backoff window is open
  "max-in-flight:<in_flight>:<cap>"  the cluster-wide cap is reached
  "no-free-slot:<in_flight>:<slots>" every live agent slot is taken (queued + running claims)
  "day-budget:<spent>:<budget>"      the fleet spent day_usd (> 0) in the UTC day `day` (spend(day))
  "concurrency-key:<n>:<limit>:<key>" a concurrency key of the issue holds <limit> live claims
  "duplicate"                        the same issue appeared earlier in this batch
  "killed" / "paused"                the loop is killed / paused: every issue the above do not describe
An inflight entry stops counting against the cap only once its score (the lease end) is more than 1 ms in
the past: Redis keeps a key alive through the millisecond it expires at, and a script's expiry clock may
lag TIME by a millisecond, so the cap never undercounts a claim that is still live.
groups: '' (no concurrency rule), else one field per issue in input order, joined by \30; a field is its
keys and limits, "key\31limit\31key\31limit..." (empty: no key). The live claims of each key are counted
from the in-flight set (each member's keys in the concurrency hash), so a claim's end, or its lease running
out, releases its keys as it frees its in-flight slot. ]]
local lost = ledger_lost(A.generation)
if lost then return lost end
local n = #ARGV - A_N
local dry = A.mode == 'dry'
local function count(field, by)
  if by > 0 and not dry then redis.call('HINCRBY', K.counters, field, by) end
end
local halt = nil  -- the loop-wide stop: checked after what the issue itself is (done, in flight, ...)
if redis.call('EXISTS', K.kill) == 1 then halt = 'killed'
elseif redis.call('EXISTS', K.paused) == 1 then halt = 'paused' end
local day_budget = tonumber(A.day_usd) or 0
local day_spent = 0
if day_budget > 0 then day_spent = tonumber(redis.call('HGET', K.spend, 'cost_usd') or '0') or 0 end
local now = now_ms()
local lease = tonumber(A.queue_lease_ms)
local cap = tonumber(A.max_in_flight)
local slots = nil
if A.use_slots == '1' then slots = live_slots(now, not dry) end
local inflight
if dry then
  inflight = redis.call('ZCOUNT', K.inflight, now - 1, '+inf')
else
  redis.call('ZREMRANGEBYSCORE', K.inflight, '-inf', '(' .. (now - 1))
  inflight = redis.call('ZCARD', K.inflight)
end
local keyed = A.groups ~= ''
local held, fields = {}, {}
if keyed then
  local live = redis.call('ZRANGEBYSCORE', K.inflight, now - 1, '+inf')
  for from = 1, #live, 1000 do  -- HMGET in chunks: unpack() has a limit of a few thousand values
    local upto = math.min(from + 999, #live)
    local ks = redis.call('HMGET', K.concurrency, unpack(live, from, upto))
    for j = 1, upto - from + 1 do
      if ks[j] then
        for key in string.gmatch(ks[j], '[^\31]+') do held[key] = (held[key] or 0) + 1 end
      end
    end
  end
  for field in string.gmatch(A.groups .. '\30', '([^\30]*)\30') do fields[#fields + 1] = field end
end
local function parse_keys(i)
  local pairs_, names, key = {}, {}, nil
  for part in string.gmatch(fields[i] or '', '[^\31]+') do
    if key == nil then key = part else
      pairs_[#pairs_ + 1] = {key, tonumber(part)}; names[#names + 1] = key; key = nil
    end
  end
  return pairs_, table.concat(names, '\31')
end
local out, seen = {'ok'}, {}
local claimed, deduped, s_backoff, s_parked, s_cap, s_slot, s_halt, s_day, s_key = 0, 0, 0, 0, 0, 0, 0, 0, 0
for i = 1, n do
  local issue = ARGV[A_N + i]
  local ckey = KEYS[K_N + (i - 1) * K_E + 1]
  local dkey = KEYS[K_N + (i - 1) * K_E + 2]
  local entry
  if seen[issue] then
    entry = 'duplicate'; deduped = deduped + 1
  else
    seen[issue] = true
    local done = redis.call('HGET', dkey, issue) or redis.call('HGET', K.done, issue)  -- bucket, else legacy
    local pttl = done and -2 or redis.call('PTTL', ckey)
    if done then
      entry = 'done:' .. done; deduped = deduped + 1
    elseif pttl >= 0 or pttl == -1 then
      entry = 'in-flight:' .. pttl; deduped = deduped + 1
    else
      local parked = redis.call('HGET', K.parked, issue)
      local until_ms = tonumber(redis.call('ZSCORE', K.backoff, issue) or '0')
      if parked then
        entry = 'parked:' .. parked .. ':' .. (redis.call('HGET', K.attempts, issue) or '0')
        s_parked = s_parked + 1
      elseif until_ms > now then
        entry = 'backoff:' .. until_ms .. ':' .. (redis.call('HGET', K.attempts, issue) or '0')
        s_backoff = s_backoff + 1
      elseif halt then
        entry = halt; s_halt = s_halt + 1
      elseif day_budget > 0 and day_spent >= day_budget then
        entry = 'day-budget:' .. day_spent .. ':' .. day_budget; s_day = s_day + 1
      elseif inflight >= cap then
        entry = 'max-in-flight:' .. inflight .. ':' .. cap; s_cap = s_cap + 1
      elseif slots and inflight >= slots then
        entry = 'no-free-slot:' .. inflight .. ':' .. slots; s_slot = s_slot + 1
      end
      local mine, joined = {}, ''
      if keyed and not entry then
        mine, joined = parse_keys(i)
        for _, kl in ipairs(mine) do
          if (held[kl[1]] or 0) >= kl[2] then
            entry = 'concurrency-key:' .. (held[kl[1]] or 0) .. ':' .. kl[2] .. ':' .. kl[1]; s_key = s_key + 1
            break
          end
        end
      end
      if entry then
        -- decided above
      elseif dry then
        entry = 'claimable:' .. (tonumber(redis.call('HGET', K.fences, issue) or '0') + 1)
        inflight = inflight + 1
        for _, kl in ipairs(mine) do held[kl[1]] = (held[kl[1]] or 0) + 1 end
      else
        local fence = redis.call('HINCRBY', K.fences, issue, 1)
        entry = fence .. ':' .. A.owner .. '.' .. i
        redis.call('SET', ckey, entry, 'PX', lease)
        redis.call('HDEL', K.started, issue)  -- a dead holder's mark: the new token has started nothing
        redis.call('ZADD', K.inflight, now + lease, issue)
        if until_ms > 0 then redis.call('ZREM', K.backoff, issue) end
        if keyed then
          if joined ~= '' then redis.call('HSET', K.concurrency, issue, joined)
          else redis.call('HDEL', K.concurrency, issue) end
          for _, kl in ipairs(mine) do held[kl[1]] = (held[kl[1]] or 0) + 1 end
        end
        inflight = inflight + 1
        claimed = claimed + 1
      end
    end
  end
  out[i + 1] = entry
end
count('claimed', claimed)
count('deduped', deduped)
count('skipped_backoff', s_backoff)
count('skipped_parked', s_parked)
count('skipped_cap', s_cap)
count('skipped_no_slot', s_slot)
count('skipped_day_budget', s_day)
count('skipped_concurrency', s_key)
if halt then count('skipped_' .. halt, s_halt) end
return out
