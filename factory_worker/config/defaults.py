"""Defaults that the settings and the CLI's early path (standard library only) share."""

#: a heartbeat older than this is stale (``loop.stale_after_s``)
DEFAULT_STALE_AFTER_S = 60.0
