"""The dispatch ledger in Redis: the Ledger, every key name, the closed vocabularies, Lua scripts and their contracts, the guard, the audit, the stage ledger, the Redis client."""
