"""Build the optional compiled per-message path (protocol/_accel*.c).

Everything else is in pyproject.toml. The extension is ``optional``: where it cannot be
built (no compiler, no Python headers, a big-endian host) the install still succeeds
and protocol.accel falls back to the pure-Python path, saying so.
"""

import sys

from setuptools import Extension, setup

ext = []
if sys.byteorder == "little":  # the C frame code reads little-endian words directly
    ext.append(Extension("protocol._accel", ["protocol/_accel.c", "protocol/_accel_receive.c",
                                             "protocol/_accel_send.c"],
                         depends=["protocol/_accel.h"], optional=True,
                         extra_compile_args=["-O2"]))

setup(ext_modules=ext)
