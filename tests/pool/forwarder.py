"""A plain TCP port forwarder, run as its own process: the shape of ``docker -p``, a
Kubernetes Service, HAProxy in TCP mode or an SSH tunnel, for tests of servers reached
through one.

    python -m tests.pool.forwarder        # prints "LISTEN <port>", then reads
                                          # "<target port>\\n" from stdin and forwards
                                          # 127.0.0.1:<port> -> 127.0.0.1:<target port>

The listening port comes first so a test can start the server with ``--advertise``
naming it. It stops when stdin closes (the test ends) or on SIGTERM.
"""

from __future__ import annotations

import selectors
import socket
import sys


def _serve(listener: socket.socket, target: tuple[str, int]) -> None:
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    peers: dict[socket.socket, socket.socket] = {}

    def close(s: socket.socket) -> None:
        other = peers.pop(s, None)
        for x in (s, other):
            if x is None:
                continue
            peers.pop(x, None)
            try:
                sel.unregister(x)
            except (KeyError, ValueError):
                pass
            x.close()

    while True:
        for key, _ in sel.select():
            if key.data == "stdin":
                if not sys.stdin.readline():
                    return
                continue
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if s is listener:
                client, _ = listener.accept()
                try:
                    upstream = socket.create_connection(target, timeout=5)
                except OSError:
                    client.close()
                    continue
                for a, b in ((client, upstream), (upstream, client)):
                    a.setblocking(True)  # small test volumes: blocking sendall is fine
                    peers[a] = b
                    sel.register(a, selectors.EVENT_READ, "peer")
                continue
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                close(s)
                continue
            try:
                peers[s].sendall(data)
            except (OSError, KeyError):
                close(s)


def main() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(f"LISTEN {listener.getsockname()[1]}", flush=True)
    line = sys.stdin.readline()
    if not line.strip().isdigit():
        return
    _serve(listener, ("127.0.0.1", int(line)))


if __name__ == "__main__":
    main()
