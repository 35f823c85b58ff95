--[[ outbox_newest: is this outbox event the newest of its issue handed to the writer so far? Per issue the id
and the name of the newest event handed over are kept ("<entry id>|<event>"; stream ids only grow), so an
older event retried after a newer one (a failed delivery backing off while the next was delivered) posts its
comment but writes the newer event's labels or workflow state, never its own.
KEYS: outbox_newest
ARGV: issue entry_id event ttl_ms
REPLIES: ok
Returns {'ok', 1, entry_id, event} entry_id is the newest seen for the issue (now recorded)
      | {'ok', 0, newer_id, newer_event} a newer one was handed over already (newer_event: its name; '' when
        recorded by an older version) ]]
local function parts(id)
  local ms, seq = string.match(id or '', '^(%d+)-(%d+)')
  return tonumber(ms), tonumber(seq)
end
local held = redis.call('HGET', K.outbox_newest, A.issue)
local cm, cs = parts(held)
local em, es = parts(A.entry_id)
if cm and em and (cm > em or (cm == em and cs > es)) then
  return {'ok', 0, string.match(held, '^([^|]*)'), string.match(held, '|(.*)$') or ''}
end
redis.call('HSET', K.outbox_newest, A.issue, A.entry_id .. '|' .. A.event)
redis.call('PEXPIRE', K.outbox_newest, A.ttl_ms)
return {'ok', 1, A.entry_id, A.event}
