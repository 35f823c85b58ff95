"""The one error type of a call to a service: every client's error is (or subclasses) :class:`HttpError`."""

from __future__ import annotations


class HttpError(Exception):
    """A call to a service failed; its message is one line and never carries a secret.

    ``retry_after``: the wait (s) the service asked for, already within the caller's cap (see
    :func:`~factory_worker.net.retry_after.retry_after_s`); None when it asked for none. ``permanent``:
    retrying the same request cannot help (an issue that does not exist, a request refused as invalid).
    ``status``: the HTTP status of the answer; None when there was none (a timeout, a refused connection)
    or the failure is not an answer's (a request that could not be made)."""

    def __init__(
        self, message: str, retry_after: float | None = None, permanent: bool = False, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after, self.permanent, self.status = retry_after, permanent, status
