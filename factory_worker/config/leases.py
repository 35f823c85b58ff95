"""Lease arithmetic shared by the settings' validation and the lease keeper (:mod:`factory_worker.agents.lease`):
how long before a lease's end an agent without renewals must be gone."""

from __future__ import annotations


def margin_s(lease_ttl_s: float) -> float:
    """Safety margin before a lease's end: a tenth of the lease, at most 1 s."""
    return min(1.0, 0.1 * lease_ttl_s)


def stop_lead_s(lease_ttl_s: float, term_grace_s: float) -> float:
    """How long after a successful renew was sent the agent may run on without another one."""
    return lease_ttl_s - margin_s(lease_ttl_s) - term_grace_s
