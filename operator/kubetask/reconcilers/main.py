"""``kubetask operator``: runs kopf with kubetask's handlers."""

from __future__ import annotations

import asyncio
import logging

import kopf


def run_operator(*, namespaces: list[str] | None = None, verbose: bool = False) -> None:
    from kubetask.reconcilers import handlers  # noqa: F401  (registers the handlers)
    from kubetask.settings import settings

    cfg = settings()
    logging.basicConfig(
        level=logging.DEBUG if verbose else getattr(logging, cfg.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    watched = namespaces or cfg.namespaces
    kopf.configure(verbose=verbose)
    # standalone: no kopf peering objects; replicas coordinate through PostgreSQL.
    asyncio.run(kopf.operator(clusterwide=not watched, namespaces=watched or (), standalone=True))
