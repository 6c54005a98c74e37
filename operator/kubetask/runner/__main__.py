"""``python -m kubetask.runner``: run one attempt and exit with its code."""

import contextlib
import os
import sys

from kubetask.runner.main import main

code = main()
for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):  # a broken stream must not change the exit code
        stream.flush()
# os._exit, not sys.exit: the outcome is reported, so threads the task left running
# (non-daemon ones would keep the interpreter alive) must not keep the pod alive.
os._exit(code)
