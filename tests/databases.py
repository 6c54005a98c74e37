"""Scratch PostgreSQL databases, for the tests and the benchmarks alike."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from kubetask.store import db


@contextlib.contextmanager
def scratch_database(admin_url: str, prefix: str, *, migrate: bool = True) -> Iterator[str]:
    """A fresh database ``<prefix>_<random>``, created through ``admin_url``'s connection
    (migrated when ``migrate``; an operator migrates its own at start), dropped at the end
    even if something still holds a connection to it. Yields its URL."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        if migrate:
            db.upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
