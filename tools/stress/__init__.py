"""``msgr stress``: the echo workload (:mod:`.echo`) and the kv workload (:mod:`.kv`),
which share :mod:`.common` (chaos, quantiles) and one command line (:mod:`.cli`).
Imports pool's public names and tools.common."""
