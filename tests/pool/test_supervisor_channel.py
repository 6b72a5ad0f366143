"""The control channel framing and the Processor's assignment, in one process."""

from __future__ import annotations

import os
import socket

import pytest

from pool.control.channel import CHUNK, Channel, Envelope, Kind
from pool.supervisor.processor import Processor
from transport import fdpass
from transport.event_center import EventCenter


@pytest.fixture
def center() -> EventCenter:
    c = EventCenter(name="chan-test")
    yield c
    c.close()


def pump(center: EventCenter, cond: object, rounds: int = 200) -> None:
    for _ in range(rounds):
        if cond():  # type: ignore[operator]
            return
        center.process_events(0.01)
    raise AssertionError("condition not reached")


def test_large_message_with_fd_is_chunked_and_reassembled(center: EventCenter) -> None:
    a, b = fdpass.seqpacket_pair(blocking=False)
    got: list[Envelope] = []
    closed: list[str] = []
    ca = Channel(center, a, lambda m: None, closed.append)
    cb = Channel(center, b, got.append, closed.append)
    payload = os.urandom(1024 * 1024 + 123)  # ~1 MiB of session state: > one datagram
    r, w = os.pipe()
    ca.send(Kind.HANDOFF, xid=77, arg=3, payload=payload, fds=[w])
    ca.send(Kind.DRAIN)
    os.close(w)  # our copy: the message carries its own
    pump(center, lambda: len(got) == 2)
    m = got[0]
    assert (m.kind, m.xid, m.arg, len(m.fds)) == (Kind.HANDOFF, 77, 3, 1)
    assert m.payload == payload and len(payload) > 30 * CHUNK
    os.write(m.fds[0], b"through the passed fd")
    os.close(m.fds[0])
    assert os.read(r, 100) == b"through the passed fd"
    os.close(r)
    assert got[1].kind is Kind.DRAIN
    ca.close()
    pump(center, lambda: closed == ["EOF"])
    cb.close()


def test_garbage_datagram_breaks_only_that_channel(center: EventCenter) -> None:
    a, b = fdpass.seqpacket_pair(blocking=False)
    closed: list[str] = []
    cb = Channel(center, b, lambda m: None, closed.append)
    a.send(b"\x01")  # shorter than a header
    pump(center, lambda: bool(closed))
    assert "short datagram" in closed[0] and cb.closed
    a.close()


def test_processor_prefers_least_loaded_and_retries_on_nak(center: EventCenter) -> None:
    load = {0: 5, 1: 2, 2: 2}
    sent: list[tuple[int, int]] = []
    results: dict[int, object] = {}

    def send(slot: int, fd: int, meta: bytes, cb: object) -> None:
        sent.append((slot, fd))
        results[slot] = cb

    p = Processor(lambda: dict(load), send, lambda m: None)
    s1, s2 = socket.socketpair()
    p.submit(s1.detach())
    assert sent[-1][0] == 1  # fewest (2), lowest slot on a tie
    assert p.inflight[1] == 1
    results[1](False)  # type: ignore[operator]  # NAK: next candidate
    assert sent[-1][0] == 2
    results[2](True)  # type: ignore[operator]
    assert p.assigned == 1 and p.naks == 1 and p.inflight == {1: 0, 2: 0}
    # With nobody accepting, the fd waits in the backlog and goes out on kick().
    load.clear()
    p.submit(s2.detach())
    assert len(p.backlog) == 1
    load[0] = 0
    p.kick()
    assert sent[-1][0] == 0 and not p.backlog
    results[0](True)  # type: ignore[operator]
    p.close()


def test_fds_dropped_at_rlimit_nofile_are_reported_for_a_nak(center: EventCenter) -> None:
    """At RLIMIT_NOFILE the kernel drops passed fds and sets MSG_CTRUNC (supervisors.md
    2.8); the channel still names the message (peeked header) so the owner can NAK it."""
    import resource

    a, b = fdpass.seqpacket_pair(blocking=False)
    got: list[Envelope] = []
    ca = Channel(center, a, lambda m: None, lambda r: None)
    cb = Channel(center, b, got.append, lambda r: None)
    r, w = os.pipe()
    ca.send(Kind.CONN, xid=9, payload=b"state", fds=[w])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.dup(0)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))  # no new fd can be installed
    try:
        pump(center, lambda: bool(got))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert got[0].xid == 9 and got[0].arg == Channel.TRUNCATED and got[0].fds == []
    assert cb.truncated == 1
    for fd in (r, w):
        os.close(fd)
    ca.close()
    cb.close()


def test_worker_exits_on_control_channel_eof() -> None:
    """The second way a worker notices its supervisor is gone (besides PDEATHSIG): EOF."""
    import multiprocess

    from pool.control.page import ControlPage
    from pool.control.channel import HEADER
    from pool.worker.process import WorkerSpec, worker_main

    from .support import RawEchoApp

    page = ControlPage.create(2)
    parent, child = fdpass.seqpacket_pair()
    spec = WorkerSpec(slot=1, generation=1, page_name=page.name, accept="processor",
                      factory=RawEchoApp, supervisor_pid=os.getpid())
    proc = multiprocess.get_context("fork").Process(target=worker_main, args=(spec, child))
    proc.start()
    child.close()
    try:
        parent.settimeout(10)
        data, fds = fdpass.recv_fds(parent, 65536, 4)
        assert Kind(HEADER.unpack_from(data)[0]) is Kind.READY and not fds
        assert page.slot(1).get("heartbeat_ns") > 0
        parent.close()  # the "supervisor" goes away without a word
        proc.join(5)
        assert proc.exitcode == 0
    finally:
        if proc.exitcode is None:
            proc.kill()
            proc.join(5)
        proc.close()
        parent.close()
        page.close()
        page.unlink()
