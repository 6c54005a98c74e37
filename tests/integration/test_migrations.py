"""Migrations run once, never concurrently, however many operators start at the same time
(a `helm upgrade` rolls two replicas; each migrates at start-up): real `kubetask db
upgrade` processes, released together on one empty PostgreSQL database."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from kubetask.store import db
from tests.databases import scratch_database

pytestmark = pytest.mark.db

KUBETASK = str(Path(sys.executable).with_name("kubetask"))
PROCESSES = 4


def test_operators_starting_together_migrate_an_empty_database_once(database_url: str) -> None:
    with scratch_database(database_url, "kubetask_migrate", migrate=False) as url:
        gate = threading.Barrier(PROCESSES)
        results: list[subprocess.CompletedProcess[str]] = []
        lock = threading.Lock()

        def one() -> None:
            gate.wait()
            out = subprocess.run(
                [KUBETASK, "db", "upgrade", "--database-url", url],
                capture_output=True,
                text=True,
                timeout=120,
            )
            with lock:
                results.append(out)

        threads = [threading.Thread(target=one) for _ in range(PROCESSES)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        # Without the advisory lock, the losers of the race fail creating tables that the
        # winner created a moment before (DuplicateTable) or on alembic_version's key.
        assert [r.returncode for r in results] == [0] * PROCESSES, [r.stderr[-2000:] for r in results]
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
                tables = conn.execute(
                    text("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
                ).scalar()
        finally:
            engine.dispose()
        head = ScriptDirectory.from_config(db.alembic_config(url)).get_current_head()
        assert versions == [head]
        assert tables is not None and tables > 10
