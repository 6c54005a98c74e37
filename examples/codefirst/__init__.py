"""codefirst: tasks deployed from code with ``kubetask deploy examples/`` (README.md)."""
