"""Operating a deployment: operator actions, doctor, metrics, the dev stack, an embedded redis-server."""
