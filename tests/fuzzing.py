"""Hypothesis profiles: one fixed exploration for `make test`, a wide one for `make fuzz`.

`make test` (and so CI) loads ``ci``: derandomized and with no example database, so a
fresh clone, a second run and a working tree with a stale ``.hypothesis/`` directory all
run exactly the same examples. ``make fuzz`` loads ``fuzz``: random seeds, many more
examples (each test's own count times ``FUZZ_FACTOR``), and an example database so a
failure it found is replayed first the next time ``make fuzz`` runs. A failure found
there is kept by adding it to the test as an ``@example``.
"""

from __future__ import annotations

import os

from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ_FACTOR = 20

settings.register_profile("ci", derandomize=True, database=None, print_blob=True,
                          deadline=None)
settings.register_profile("fuzz", derandomize=False, print_blob=True, deadline=None,
                          database=DirectoryBasedExampleDatabase(".hypothesis/fuzz"))
if PROFILE not in ("ci", "fuzz"):
    raise SystemExit(f"HYPOTHESIS_PROFILE={PROFILE!r}: use 'ci' (make test) or 'fuzz' (make fuzz)")
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """A test's example count under the loaded profile."""
    return n * FUZZ_FACTOR if PROFILE == "fuzz" else n
