from __future__ import annotations

import subprocess
import sys


def test_operator_is_still_the_standard_library_module() -> None:
    # The source root is operator/; it must never shadow the stdlib's `operator`.
    out = subprocess.run(
        [sys.executable, "-c", "import operator, kubetask; print(operator.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "site-packages" not in out.stdout and "/operator/" not in out.stdout.replace("\\", "/")
    assert out.stdout.strip().endswith("operator.py")
