--[[ kill_clear: start-loop clears the kill it saw, and only that one (compare-and-delete).
KEYS: kill
ARGV: at_ms
REPLIES: ok kept
at_ms is that of the kill the caller saw ("" when it saw none); the kill flag is a hash {run_id, by, at_ms, reason}.
Returns {'ok'} cleared (or there was none and none was expected) | {'kept'} a different kill is in place now ]]
local at = redis.call('HGET', K.kill, 'at_ms')
if not at then return {'ok'} end
if at ~= A.at_ms then return {'kept'} end
redis.call('DEL', K.kill)
return {'ok'}
