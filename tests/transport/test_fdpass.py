"""fd passing over SOCK_SEQPACKET: round trips, close-on-exec, EOF, and real MSG_CTRUNC /
MSG_TRUNC truncation (a too-small control buffer, and RLIMIT_NOFILE in a child process),
with no descriptor left open in either case (the autouse ``no_leaks`` fixture checks)."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from transport.errors import FdPassError
from transport.fdpass import MAX_FDS, recv_fds, send_fds, seqpacket_pair

ROOT = Path(__file__).resolve().parents[2]
SockPair = tuple[socket.socket, socket.socket]
Pipes = list[tuple[int, int]]


@pytest.fixture
def pair() -> Iterator[SockPair]:
    a, b = seqpacket_pair()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def pipes() -> Iterator[Pipes]:
    made = [os.pipe() for _ in range(MAX_FDS)]
    yield made
    for r, w in made:
        os.close(r)
        os.close(w)


def test_round_trip_fds_are_usable_and_cloexec(pair: SockPair, pipes: Pipes) -> None:
    a, b = pair
    send_fds(a, b"three", [w for _, w in pipes[:3]])
    data, fds = recv_fds(b)
    try:
        assert data == b"three" and len(fds) == 3
        for fd, (r, w) in zip(fds, pipes[:3], strict=True):
            assert fd != w
            assert not os.get_inheritable(fd)  # MSG_CMSG_CLOEXEC
            assert os.fstat(fd).st_ino == os.fstat(w).st_ino
            os.write(fd, b"via copy")
            assert os.read(r, 100) == b"via copy"
    finally:
        for fd in fds:
            os.close(fd)


def test_max_fds_in_one_message(pair: SockPair, pipes: Pipes) -> None:
    a, b = pair
    send_fds(a, b"x", [r for r, _ in pipes])
    _, fds = recv_fds(b)
    assert len(fds) == MAX_FDS
    for fd in fds:
        os.close(fd)


def test_message_boundaries_and_no_fds(pair: SockPair) -> None:
    a, b = pair
    send_fds(a, b"first")
    send_fds(a, b"second")
    assert recv_fds(b) == (b"first", [])
    assert recv_fds(b, maxfds=0) == (b"second", [])


def test_eof(pair: SockPair) -> None:
    a, b = pair
    a.close()
    assert recv_fds(b) == (b"", [])


def test_nonblocking_recv_raises_blocking() -> None:
    a, b = seqpacket_pair(blocking=False)
    try:
        assert not a.getblocking() and not a.get_inheritable()
        with pytest.raises(BlockingIOError):
            recv_fds(b)
    finally:
        a.close()
        b.close()


def test_send_argument_checks(pair: SockPair, pipes: Pipes) -> None:
    a, _ = pair
    with pytest.raises(ValueError):
        send_fds(a, b"", [pipes[0][0]])
    with pytest.raises(ValueError):
        send_fds(a, b"x", [pipes[0][0]] * (MAX_FDS + 1))


def test_ctrunc_too_small_control_buffer_closes_what_arrived(pair: SockPair, pipes: Pipes) -> None:
    """3 fds to a receiver that expects 1: the kernel truncates and sets MSG_CTRUNC."""
    a, b = pair
    send_fds(a, b"hdr", [r for r, _ in pipes[:3]])
    with pytest.raises(FdPassError) as info:
        recv_fds(b, maxfds=1)
    assert info.value.errno == errno.EMSGSIZE
    assert "MSG_CTRUNC" in str(info.value)
    # The channel is still usable for the next message.
    send_fds(a, b"next")
    assert recv_fds(b, maxfds=1) == (b"next", [])


def test_more_fds_than_expected_within_padding(pair: SockPair, pipes: Pipes) -> None:
    """CMSG_SPACE(4) has room for 2 ints: 2 fds fit without MSG_CTRUNC but exceed maxfds."""
    a, b = pair
    send_fds(a, b"hdr", [r for r, _ in pipes[:2]])
    with pytest.raises(FdPassError) as info:
        recv_fds(b, maxfds=1)
    assert info.value.errno == errno.EMSGSIZE


def test_data_truncation_closes_fds(pair: SockPair, pipes: Pipes) -> None:
    a, b = pair
    send_fds(a, b"y" * 100, [pipes[0][0]])
    with pytest.raises(FdPassError) as info:
        recv_fds(b, bufsize=10)
    assert info.value.errno == errno.EMSGSIZE


_RLIMIT_CHILD = textwrap.dedent("""
    import json, os, resource, sys
    sys.path.insert(0, sys.argv[1])
    from transport.errors import FdPassError
    from transport.fdpass import recv_fds, send_fds, seqpacket_pair

    a, b = seqpacket_pair()
    pipes = [os.pipe() for _ in range(3)]
    send_fds(a, b"hdr", [r for r, _ in pipes])

    def lowest_free():
        fd = os.dup(a.fileno())
        os.close(fd)
        return fd

    free = lowest_free()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Only fd numbers below the soft limit can be allocated: leave room for exactly one.
    resource.setrlimit(resource.RLIMIT_NOFILE, (free + 1, hard))
    try:
        recv_fds(b)
        out = {"raised": False}
    except FdPassError as exc:
        out = {"raised": True, "errno": exc.errno, "msg": str(exc)}
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    out["free_before"] = free
    out["free_after"] = lowest_free()
    print(json.dumps(out))
""")


def test_ctrunc_at_rlimit_nofile_in_child() -> None:
    """At RLIMIT_NOFILE the kernel installs what fits, drops the rest, sets MSG_CTRUNC
    (supervisors.md §2.8): recv_fds reports EMFILE and closes the one fd that arrived."""
    proc = subprocess.run([sys.executable, "-c", _RLIMIT_CHILD, str(ROOT)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["raised"], out
    assert out["errno"] == errno.EMFILE, out
    assert out["free_after"] == out["free_before"], "the fd that arrived was not closed"
