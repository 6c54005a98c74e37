"""``kubetask deploy``: code-first deploy of the ``@task`` functions of a Python package.

The steps, one module each:

- :mod:`~kubetask.deploy.discover`: which files make the package, and which ``@task``
  functions they define (imported in a child process, :mod:`~kubetask.deploy.index`, so
  the user's module code cannot disturb the command; no task body is ever called);
- :mod:`~kubetask.deploy.image`: an image FROM the runner image with the package, tagged
  by a hash of the package's files and the runner image (unchanged code: nothing built),
  built with buildah or docker and imported into the local cluster's containerd;
- :mod:`~kubetask.deploy.manifests`: one Task per function, its spec the decorator's
  :class:`~kubetask.spec.TaskSpec` plus the image and entrypoint, applied with
  server-side apply after a server-side dry run of all of them (all or nothing).

docs/deploy.md is the user's guide.
"""

from __future__ import annotations


class DeployError(Exception):
    """Something the user has to fix; the message says what. Nothing was applied."""
