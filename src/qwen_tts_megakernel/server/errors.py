"""Errors of the machine, not of the request, as API errors: a full disk (507) and an exhausted memory (500), each
naming its cause, in the API's JSON shape (never a plain-text 500 or a traceback)."""

from __future__ import annotations

import errno

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def resource_refusal(exc: BaseException) -> tuple[int, str] | None:
    """(status, message) for an exhausted resource, or None for any other error."""
    if isinstance(exc, MemoryError):
        return 500, ("the server ran out of memory for this request (MemoryError); other requests go on, retry "
                     "later or with a smaller input")
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return 507, f"the server's disk is full ({exc.strerror or 'no space left on device'}); nothing was stored"
    return None


def install_resource_handlers(app, error) -> None:
    """Exception handlers that answer MemoryError and a full disk on any route with `error(status, message, ...)`
    (the app's JSON error); other OSErrors stay server errors."""

    async def handle(request, exc):
        refusal = resource_refusal(exc)
        if refusal is None:
            raise exc
        return error(*refusal, kind="resources")

    app.add_exception_handler(MemoryError, handle)
    app.add_exception_handler(OSError, handle)
