"""``python -m kubetask.cli``: the ``kubetask`` command."""

from kubetask.cli import main

main()
