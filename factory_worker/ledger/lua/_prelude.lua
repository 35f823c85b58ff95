-- Shared by every script: scripts.py prepends it, after the generated K (keys) and A (args) tables.

-- The ledger-loss guard: nil when the ledger's generation is `generation`, else the reply
-- {'ledger-lost', current_generation_or_empty}: this ledger is not the one the caller worked in (emptied,
-- evicted, failed over to a stale replica...), so nothing may be claimed or started (see guard.py).
local function ledger_lost(generation)
  local current = redis.call('HGET', K.ledger, 'generation') or ''
  if current ~= generation then return {'ledger-lost', current} end
  return nil
end

-- Redis server time in ms: the one clock every worker shares.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The holder check of every compare-and-set on a claim: nil when `token` holds K.claim, else the reply
-- to return: {'gone'} (no live claim: expired or finished) or {'held', current_token}.
local function not_holder(token)
  local cur = redis.call('GET', K.claim)
  if not cur then return {'gone'} end
  if cur ~= token then return {'held', cur} end
  return nil
end

-- The end of a claim (complete, fail, release): its key, its in-flight entry and its started mark go.
local function end_claim(issue)
  redis.call('DEL', K.claim)
  redis.call('ZREM', K.inflight, issue)
  redis.call('HDEL', K.started, issue)
end

-- The tracker outbox (see outbox.py): with ARGV outbox = '1', append one event to K.outbox, in the same
-- script as the ledger transition it reports, so it is never lost and never written without it.
-- `fields`: further field/value pairs. Only scripts that declare K.outbox and A.outbox call it.
local function emit(event, issue, token, fields)
  if A.outbox ~= '1' then return end
  local entry = {'event', event, 'issue', issue, 'token', token or '', 'at_ms', tostring(now_ms())}
  for _, v in ipairs(fields or {}) do entry[#entry + 1] = tostring(v) end
  redis.call('XADD', K.outbox, '*', unpack(entry))
end

-- Extend a held claim's lease to now + lease_ms (key expiry and in-flight score); returns the new end.
local function extend_lease(issue, lease_ms)
  local lease_end = now_ms() + lease_ms
  redis.call('PEXPIRE', K.claim, lease_ms)
  redis.call('ZADD', K.inflight, lease_end, issue)
  return lease_end
end

-- The fleet's live agent slots: the sum of K.slots entries ("<slots>:<expires_ms>") whose expiry is after
-- `now`; with `prune`, entries past it (a worker gone past its presence TTL) are removed. Only scripts that
-- declare K.slots call it.
local function live_slots(now, prune)
  local total = 0
  local flat = redis.call('HGETALL', K.slots)
  for j = 1, #flat, 2 do
    local n, expires = string.match(flat[j + 1], '^(%d+):(%d+)$')
    if n and tonumber(expires) > now then
      total = total + tonumber(n)
    elseif prune then
      redis.call('HDEL', K.slots, flat[j])
    end
  end
  return total
end

-- The record of an agent (or stage) task about to be sent: `key` (its agent_task key) -> issue, token, run,
-- state queued (+ `extra` field/value pairs), expiring after `ttl_ms`; the task id in K.queued at `sent_ms`
-- (the lost-message sweep's clock). Written here only; begin.lua / stage.lua op start flip it to running.
local function queue_task(key, task_id, issue, token, run_id, sent_ms, ttl_ms, extra)
  redis.call('HSET', key, 'issue', issue, 'token', token, 'run_id', run_id, 'state', 'queued', unpack(extra or {}))
  redis.call('PEXPIRE', key, ttl_ms)
  redis.call('ZADD', K.queued, sent_ms, task_id)
end

-- A staged attempt's step, kept after the attempt ends (explain and dispatches show it): one JSON object
-- {attempt, step, stage, round, outcome[, error], at_ms} from the progress hash K.stages (its current step),
-- appended to K.stage_history, the latest STAGE_HISTORY_MAX, for STAGE_HISTORY_TTL_MS after the last
-- (Keys.STAGE_HISTORY_MAX / _TTL_S). Nothing without progress (a single agent's dispatch). Only scripts that
-- declare K.stages and K.stage_history call it.
local STAGE_HISTORY_MAX, STAGE_HISTORY_TTL_MS = 50, 2592000000
local function record_step(outcome, error)
  local f = redis.call('HMGET', K.stages, 'attempt', 'step', 'stage', 'round')
  if not f[2] then return end
  local entry = {attempt = tonumber(f[1]) or 0, step = tonumber(f[2]) or 0, stage = f[3] or '',
                 round = tonumber(f[4]) or 1, outcome = outcome, at_ms = now_ms()}
  if error and error ~= '' then entry.error = string.sub(error, 1, 300) end
  redis.call('RPUSH', K.stage_history, cjson.encode(entry))
  redis.call('LTRIM', K.stage_history, -STAGE_HISTORY_MAX, -1)
  redis.call('PEXPIRE', K.stage_history, STAGE_HISTORY_TTL_MS)
end
