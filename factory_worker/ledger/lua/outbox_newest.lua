--[[ outbox_newest: is this outbox event the newest of its issue handed to the writer so far? Per issue the id
of the newest event handed over is kept (stream ids only grow), so an older event retried after a newer one
(a failed delivery backing off while the next was delivered) posts its comment but does not undo the newer
event's labels or workflow state.
KEYS: outbox_newest
ARGV: issue entry_id ttl_ms
REPLIES: ok
Returns {'ok', 1} entry_id is the newest seen for the issue (now recorded) | {'ok', 0} a newer one was handed
over already ]]
local function parts(id)
  local ms, seq = string.match(id or '', '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local cm, cs = parts(redis.call('HGET', K.outbox_newest, A.issue))
local em, es = parts(A.entry_id)
if cm and em and (cm > em or (cm == em and cs > es)) then return {'ok', 0} end
redis.call('HSET', K.outbox_newest, A.issue, A.entry_id)
redis.call('PEXPIRE', K.outbox_newest, A.ttl_ms)
return {'ok', 1}
