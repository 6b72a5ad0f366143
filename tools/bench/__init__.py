"""``msgr bench``: one module per measurement (:mod:`.cli` registers them), sharing
:mod:`.common`'s process plumbing. Imports pool's and transport's public names and
tools.common; never tools.stress except to drive a workload."""
