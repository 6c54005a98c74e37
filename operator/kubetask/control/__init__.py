"""The controller, split by role (see each module's docstring)."""
