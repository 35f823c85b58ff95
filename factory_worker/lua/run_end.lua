--[[ run_end: end a run exactly once.
KEYS[1] run record (hash)
ARGV[1] status (finished|stopping|killed|failed)   ARGV[2] reason   ARGV[3] now_ms
Returns 1 this call ended the run | 0 it had already ended (or does not exist) ]]
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'reason', ARGV[2], 'finished_ms', ARGV[3])
return 1
