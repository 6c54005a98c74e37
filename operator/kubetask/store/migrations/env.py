"""Alembic environment: migrations run synchronously over psycopg 3."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from kubetask.store.tables import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        # One migration at a time across operator replicas starting together.
        connection.exec_driver_sql("SELECT pg_advisory_lock(7428301)")
        try:
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
        finally:
            connection.exec_driver_sql("SELECT pg_advisory_unlock(7428301)")
            connection.commit()
    engine.dispose()


run_migrations_online()
