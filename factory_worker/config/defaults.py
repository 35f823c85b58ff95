"""Defaults that the settings and the CLI's early path (standard library only) share."""

import re

#: a heartbeat older than this is stale (``loop.stale_after_s``)
DEFAULT_STALE_AFTER_S = 60.0
#: what a namespace (the prefix of every key and queue) may be made of
NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
