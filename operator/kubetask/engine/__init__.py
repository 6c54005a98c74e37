"""The run state machine and its arithmetic: plain functions, no I/O."""
