"""The one translation of a database that cannot be used into a TransientError: the work is retried later.

A locked or unreadable SQLite file, a file that is not a database, a full disk, a PostgreSQL server that is
down: infrastructure faults, never poison (docs/architecture.md). What stays as it is: IntegrityError (callers
decide: a replayed event, a race), and errors in the statement or the data (a bug, or content to dead-letter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, NotSupportedError, ProgrammingError

from services.core.errors import TransientError

# DBAPI errors about the statement or the data, not about the database being there.
_NOT_THE_DATABASE = (IntegrityError, DataError, ProgrammingError, NotSupportedError)


@contextlib.contextmanager
def unavailable(what: str) -> Iterator[None]:
    """Inside, a database fault raises TransientError("<what> database unavailable (...); ...") from the cause."""
    try:
        yield
    except DBAPIError as exc:
        if isinstance(exc, _NOT_THE_DATABASE):
            raise
        raise TransientError(_message(what, exc.orig if exc.orig is not None else exc)) from exc
    except OSError as exc:
        raise TransientError(_message(what, exc)) from exc


def _message(what: str, cause: BaseException) -> str:
    return (f"{what} database unavailable ({type(cause).__name__}: {cause}): a transient fault, retried later — "
            "check the disk and RELAIS_DATABASE_URL (the file, or the PostgreSQL server, is reachable and writable)")
