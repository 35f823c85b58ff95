--[[ iteration_begin: an iteration of a running run renews the loop lease and publishes its heartbeat,
atomically, so a run that kill-loop (or anything) has ended can never flip the heartbeat back to running.
KEYS: loop_lease run(run_id) heartbeat
ARGV: run_id lease_ms heartbeat_json heartbeat_ms worker
REPLIES: ok lost-lease ended
worker: the Celery node running this iteration, kept as the run's ``holder`` (a kickoff may take the lease
over from a run whose holder's presence key is gone: see ``lease_takeover``).
Returns {'ok'} lease renewed and heartbeat written | {'lost-lease'} the lease is not held by run_id
      | {'ended'} the run is not running ]]
if redis.call('HGET', K.run, 'status') ~= 'running' then return {'ended'} end
if redis.call('GET', K.loop_lease) ~= A.run_id then return {'lost-lease'} end
redis.call('PEXPIRE', K.loop_lease, A.lease_ms)
if A.worker ~= '' then redis.call('HSET', K.run, 'holder', A.worker) end
redis.call('SET', K.heartbeat, A.heartbeat_json, 'PX', A.heartbeat_ms)
return {'ok'}
