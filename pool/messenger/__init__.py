"""The messenger library: what a client program imports (DESIGN.md, pool/).

One Ceph class per module: :mod:`.messenger` (AsyncMessenger: sessions, policies,
dispatch), :mod:`.connection` (AsyncConnection: a session glued to a socket),
:mod:`.states` (its state table), :mod:`.dispatcher` (the callbacks an application
implements), :mod:`.throttle` (receive throttles), :mod:`.auth` (keyrings and auth
settings), :mod:`.iovec` (shaping sendmsg buffers), :mod:`.monclient` (a client of a real
ceph-mon). Applications import the public names from :mod:`pool.api`.

May import protocol/ and transport/; nothing of process management (supervisor, worker,
apps) and nothing that imports it.
"""
