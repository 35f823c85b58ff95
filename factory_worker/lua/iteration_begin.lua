--[[ iteration_begin: an iteration of a running run renews the loop lease and publishes its heartbeat,
atomically, so a run that kill-loop (or anything) has ended can never flip the heartbeat back to running.
KEYS[1] loop lease (string: run id)   KEYS[2] run record (hash)   KEYS[3] heartbeat (string)
ARGV[1] run_id   ARGV[2] lease ttl_ms   ARGV[3] heartbeat JSON   ARGV[4] heartbeat ttl_ms
Returns 1 lease renewed and heartbeat written | 0 the lease is not held by run_id | -1 the run is not running ]]
if redis.call('HGET', KEYS[2], 'status') ~= 'running' then return -1 end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
return 1
