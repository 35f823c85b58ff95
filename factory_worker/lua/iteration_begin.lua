--[[ iteration_begin: an iteration of a running run renews the loop lease and publishes its heartbeat,
atomically, so a run that kill-loop (or anything) has ended can never flip the heartbeat back to running.
KEYS: loop_lease run(run_id) heartbeat
ARGV: run_id lease_ms heartbeat_json heartbeat_ms
REPLIES: ok lost-lease ended
Returns {'ok'} lease renewed and heartbeat written | {'lost-lease'} the lease is not held by run_id
      | {'ended'} the run is not running ]]
if redis.call('HGET', K.run, 'status') ~= 'running' then return {'ended'} end
if redis.call('GET', K.loop_lease) ~= A.run_id then return {'lost-lease'} end
redis.call('PEXPIRE', K.loop_lease, A.lease_ms)
redis.call('SET', K.heartbeat, A.heartbeat_json, 'PX', A.heartbeat_ms)
return {'ok'}
