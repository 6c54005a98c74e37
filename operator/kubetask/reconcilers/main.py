"""``kubetask operator``: runs kopf with kubetask's handlers."""

from __future__ import annotations

import asyncio
import logging

import kopf


def run_operator(*, namespaces: list[str] | None = None, verbose: bool = False) -> None:
    from kubetask.reconcilers import handlers  # noqa: F401  (registers the handlers)
    from kubetask.settings import settings

    cfg = settings()
    if namespaces:
        # `--namespace` is KUBETASK_NAMESPACES: the handlers, the controller and the API
        # read the one settings object.
        cfg.namespaces = list(namespaces)
    watched = cfg.namespaces
    kopf.configure(verbose=verbose)  # the one logging setup (kopf's format, on the root logger)
    logging.getLogger().setLevel(
        logging.DEBUG if verbose else getattr(logging, cfg.log_level.upper(), logging.INFO)
    )
    if not verbose:
        # kopf reports every handled event at INFO; ours are the interesting lines.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # standalone: no kopf peering objects; replicas coordinate through PostgreSQL.
    asyncio.run(kopf.operator(clusterwide=not watched, namespaces=watched or (), standalone=True))
