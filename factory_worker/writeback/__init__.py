"""writeback/: tracker write-back. The outbox (events written by the ledger's scripts, delivered by every
worker, never lost, never twice) and its writers for GitHub (labels and a comment) and Linear (workflow states
and a comment).

May import: sources (the Linear API client, GitHub's rate-limit reading), ledger, config, net (the one HTTP edge).
"""
