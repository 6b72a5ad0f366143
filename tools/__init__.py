"""Command line: ``msgr serve/status/scale/stop/stress/bench``."""
