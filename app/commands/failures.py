"""What stopped a server command (``serve``, ``meter``, a worker of ``serve --workers``) at start, as one line."""

from __future__ import annotations

import errno

from app.commands.database import CommandError, db_failure
from common.errors import ConfigError


def start_failure(exc: BaseException, db_url: str, meter: str) -> CommandError | ConfigError | None:
    """One line for what stopped a gateway or meter daemon (the energy source, the database, a port); None for an
    error nobody anticipated (a bug: ``app.cli`` reports it, with its traceback on request)."""
    import sqlalchemy as sa

    from meter.sources.nvml import NvmlUnavailableError

    if isinstance(exc, CommandError | ConfigError):
        return exc
    if isinstance(exc, NvmlUnavailableError):
        return CommandError(f"{meter}: {exc} (--meter none serves without metering)")
    if isinstance(exc, sa.exc.SQLAlchemyError):
        return db_failure(exc, db_url)
    if isinstance(exc, OSError):
        bind = exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) or "cannot listen" in str(exc)
        return CommandError(f"{exc}{' (another process on that port? change the listen address)' if bind else ''}")
    return None
