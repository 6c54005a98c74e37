"""kubetask's benchmarks: ``python -m bench.<name> --help``. See docs/benchmarks.md.

Each benchmark measures kubetask against a baseline taken in the same run on the same
machine and prints both and their ratio; none of them asserts anything."""
