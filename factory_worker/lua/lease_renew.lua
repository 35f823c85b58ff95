--[[ lease_renew: extend the loop lease, only for the run holding it (never someone else's).
KEYS[1] loop lease (string: run id)
ARGV[1] run_id   ARGV[2] ttl_ms
Returns 1 renewed | 0 the lease is not held by run_id ]]
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
