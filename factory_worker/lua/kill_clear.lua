--[[ kill_clear: start-loop clears the kill it saw, and only that one (compare-and-delete).
KEYS[1] loop kill flag (hash {run_id, by, at_ms, reason})
ARGV[1] at_ms of the kill the caller saw ("" when it saw none)
Returns 1 cleared (or there was none and none was expected) | 0 a different kill is in place now: keep it ]]
local at = redis.call('HGET', KEYS[1], 'at_ms')
if not at then return 1 end
if at ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
