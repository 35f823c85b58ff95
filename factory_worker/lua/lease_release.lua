--[[ lease_release: free the loop lease by run id (compare-and-delete, never a plain DEL).
KEYS[1] loop lease (string: run id)
ARGV[1] run_id
Returns 1 released | 0 the lease is not held by run_id ]]
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
