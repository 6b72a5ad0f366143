"""SPSC shared-memory ring: two real processes (os.fork), every byte checked.

Covers: random record sizes 1 B..ring/4 over hundreds of wraps (zero-copy and batched
paths), full-ring backpressure with the space doorbell, a sleeping consumer woken by the
producer (and never rung while awake), the sleep handshake under thousands of hand-offs,
the EventCenter poller, SIGKILL of a producer mid-write (no torn record visible), reset
epochs, segments (named, memfd, swept after SIGKILL) and the x86-64-only guard.

Synchronisation between the processes is only ever ring state, eventfd doorbells,
pipes and pidfds; waits are bounded by deadlines and a stuck child is SIGKILLed.
"""

from __future__ import annotations

import os
import random
import select
import signal
import struct
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Iterator

import pytest

from transport import shmname
from transport.errors import BrokenResourceError
from transport.event_center import EventCenter
from transport.shm import (
    Doorbell,
    Ring,
    RingConsumer,
    RingPoller,
    RingProducer,
    Segment,
)
from transport.shm import ring as ring_mod

DEADLINE_S = 30.0


# -- helpers --------------------------------------------------------------------------------


def _fork(child: Callable[[], None]) -> int:
    """Run ``child`` in a forked process that never returns into pytest."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            child()
        except BaseException:  # noqa: BLE001 - report anything, exit non-zero
            traceback.print_exc(file=sys.stderr)
            code = 1
        finally:
            os._exit(code)
    return pid


def _join(pid: int, timeout: float = DEADLINE_S) -> int:
    """Wait for ``pid`` with a bound (pidfd + poll, no sleeping); SIGKILL it on timeout."""
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {timeout}s")
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _pattern(seed: int = 1234) -> bytes:
    return random.Random(seed).randbytes(1 << 16)


def _expected(pattern: bytes, i: int, n: int) -> bytes:
    start = (i * 7919) % (len(pattern) - n)
    return pattern[start: start + n]


@pytest.fixture
def named_ring() -> Iterator[tuple[Segment, Ring]]:
    cap = 1 << 12
    seg = Segment.create("ringtest", Ring.required_size(cap))
    ring = Ring.create(seg.buf, cap)
    try:
        yield seg, ring
    finally:
        ring.close()
        seg.close()
        seg.unlink()


@pytest.fixture
def bells() -> Iterator[tuple[Doorbell, Doorbell]]:
    data, space = Doorbell(), Doorbell()
    try:
        yield data, space
    finally:
        data.close()
        space.close()


# -- single-process behaviour ----------------------------------------------------------------


def test_refuses_non_tso_architectures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    buf = memoryview(bytearray(Ring.required_size(256)))
    with pytest.raises(RuntimeError, match="x86-64.*TSO"):
        Ring.create(buf, 256)


def test_attach_validates_header() -> None:
    buf = memoryview(bytearray(Ring.required_size(1024)))
    with pytest.raises(ValueError, match="no ring here"):
        Ring.attach(buf)
    Ring.create(buf, 1024).close()
    ring = Ring.attach(buf)
    assert ring.capacity == 1024 and ring.max_record == 504
    ring.close()
    with pytest.raises(ValueError, match="needs"):
        Ring.attach(buf[: Ring.HEADER_SIZE + 512])
    with pytest.raises(ValueError, match="power of two"):
        Ring.required_size(1000)


def test_records_invisible_until_one_publish() -> None:
    buf = memoryview(bytearray(Ring.required_size(1024)))
    ring = Ring.create(buf, 1024)
    prod, cons = RingProducer(ring), RingConsumer(ring)
    for i in range(3):
        view = prod.try_reserve(10)
        assert view is not None
        view[:3] = b"abc"
        prod.commit(3 + i)
    assert cons.drain() == [] and not cons.pending()
    prod.publish()
    got = cons.drain()
    assert [len(v) for v in got] == [3, 4, 5] and bytes(got[0]) == b"abc"
    assert ring.used() > 0
    cons.release()
    assert ring.used() == 0
    with pytest.raises(ValueError):
        prod.send(bytes(ring.max_record + 1))
    assert prod.send(bytes(ring.max_record))  # the largest record fits at any offset
    del got, view
    ring.close()


def test_full_ring_refuses_then_calls_back(bells: tuple[Doorbell, Doorbell]) -> None:
    data_bell, space_bell = bells
    buf = memoryview(bytearray(Ring.required_size(1024)))
    ring = Ring.create(buf, 1024)
    prod = RingProducer(ring, data_bell, space_bell)
    cons = RingConsumer(ring, data_bell, space_bell)
    calls: list[int] = []
    prod.on_space(lambda: calls.append(prod.free_space()))
    sent = prod.send_many([bytes(100)] * 20)
    assert 0 < sent < 20  # as many as fit, nothing dropped, nothing blocked
    assert not prod.send(bytes(100)) and prod.try_reserve(100) is None
    assert not select.select([space_bell], [], [], 0)[0]  # no space yet: no wake-up
    assert len(cons.drain()) == sent
    cons.release()
    assert select.select([space_bell], [], [], DEADLINE_S)[0]  # the consumer rang us
    prod.handle_space_event()
    assert calls == [1024]
    assert prod.send_many([bytes(100)] * 3) == 3
    ring.close()


def test_reset_bumps_epoch_and_breaks_both_endpoints(bells: tuple[Doorbell, Doorbell]) -> None:
    data_bell, _ = bells
    buf = memoryview(bytearray(Ring.required_size(1024)))
    ring = Ring.create(buf, 1024)
    prod, cons = RingProducer(ring, data_bell), RingConsumer(ring, data_bell)
    assert prod.send(b"x")
    assert cons.prepare_sleep() is False  # a record is pending: do not block
    cons.drain()
    assert cons.prepare_sleep() is True
    assert ring.reset(data_bell) == 2
    assert select.select([data_bell], [], [], 0)[0]  # a sleeping peer learns of the reset
    cons.wake()
    with pytest.raises(BrokenResourceError, match="reset"):
        cons.release()
    assert prod.try_reserve(1) is not None
    prod.commit(1)
    with pytest.raises(BrokenResourceError):
        prod.publish()
    # Fresh endpoints on the new epoch work.
    prod, cons = RingProducer(ring, data_bell), RingConsumer(ring, data_bell)
    assert prod.send(b"after") and [bytes(v) for v in cons.drain()] == [b"after"]
    cons.release()
    # A reset of an empty ring is noticed too, by an idle consumer about to sleep...
    ring.reset()
    with pytest.raises(BrokenResourceError):
        cons.prepare_sleep()
    # ...and by one that merely polls.
    cons = RingConsumer(ring, data_bell)
    assert cons.drain() == []
    ring.reset()
    with pytest.raises(BrokenResourceError):
        cons.drain()
    ring.close()


def test_memfd_segment_is_shared_and_leaves_no_name() -> None:
    seg = Segment.create_memfd(Ring.required_size(4096))
    assert seg.name is None and seg.size == Ring.required_size(4096)
    ring = Ring.create(seg.buf, 4096)
    other = Segment.from_memfd(os.dup(seg.fd), seg.size)  # as if received over SCM_RIGHTS
    ring2 = Ring.attach(other.buf)
    RingProducer(ring).send(b"hello")
    cons = RingConsumer(ring2)
    assert [bytes(v) for v in cons.drain()] == [b"hello"]
    for r in (ring, ring2):
        r.close()
    for s in (seg, other):
        s.close()


def test_named_segment_of_killed_owner_is_swept() -> None:
    """SIGKILL skips unlink; the next supervisor's sweep_dead() removes the name."""
    r, w = os.pipe()

    def child() -> None:
        seg = Segment.create("orphan", 4096)
        os.write(w, seg.name.encode() if seg.name else b"")
        os.kill(os.getpid(), signal.SIGKILL)

    pid = _fork(child)
    os.close(w)
    try:
        assert select.select([r], [], [], DEADLINE_S)[0]
        name = os.read(r, 256).decode()
    finally:
        os.close(r)
    assert _join(pid) == -signal.SIGKILL
    assert name in shmname.list_segments()
    assert name in shmname.sweep_dead()
    assert name not in shmname.list_segments()


# -- two processes ---------------------------------------------------------------------------


def test_random_sizes_many_wraps_every_byte_checked(
    named_ring: tuple[Segment, Ring], bells: tuple[Doorbell, Doorbell]
) -> None:
    seg, ring = named_ring
    data_bell, space_bell = bells
    total = 6000
    pattern = _pattern()
    limit = ring.capacity // 4
    sizes = [random.Random(7).randint(1, limit) for _ in range(total)]
    name = seg.name
    assert name is not None

    def producer() -> None:
        child_seg = Segment.attach(name)
        prod = RingProducer(Ring.attach(child_seg.buf), data_bell, space_bell)
        rng = random.Random(11)
        deadline = time.monotonic() + DEADLINE_S
        i = 0
        while i < total:
            if time.monotonic() > deadline:
                raise TimeoutError("producer stuck")
            if rng.random() < 0.3:  # zero-copy path
                view = prod.try_reserve(sizes[i])
                if view is not None:
                    view[:] = _expected(pattern, i, sizes[i])
                    prod.commit(sizes[i])
                    i += 1
                    if rng.random() < 0.5:  # else: published with a later batch
                        prod.publish()
                    continue
            else:
                k = rng.randint(1, 16)
                batch = [_expected(pattern, j, sizes[j]) for j in range(i, min(total, i + k))]
                took = prod.send_many(batch)
                i += took
                if took == len(batch):
                    continue
            # Refused (full): block on the space doorbell as an EventCenter would. The
            # refusal flagged "space wanted", so the consumer's release must ring it.
            prod.publish()
            assert space_bell.wait(DEADLINE_S), "space doorbell never rung"
            prod.handle_space_event()
        prod.publish()

    pid = _fork(producer)
    cons = RingConsumer(ring, data_bell, space_bell)
    got = 0
    laps = 0
    deadline = time.monotonic() + DEADLINE_S
    while got < total:
        assert time.monotonic() < deadline, f"consumer stuck at {got}/{total}"
        for v in cons.drain(max_records=random.randint(1, 8)):
            assert len(v) == sizes[got], f"record {got}: length {len(v)} != {sizes[got]}"
            assert v == _expected(pattern, got, sizes[got]), f"record {got}: bytes differ"
            got += 1
        cons.release()
        laps = ring._hq[ring_mod._W_HEAD] // ring.capacity
        if not cons.pending():
            cons.wait(spins=200, timeout=1.0)
    assert _join(pid) == 0
    assert laps > 100  # really wrapped many times
    assert ring.used() == 0


def test_backpressure_producer_waits_for_space_two_processes(
    named_ring: tuple[Segment, Ring], bells: tuple[Doorbell, Doorbell]
) -> None:
    _, ring = named_ring
    data_bell, space_bell = bells
    rec = 200
    total = 3 * ring.capacity // (rec + 8)
    full_r, full_w = os.pipe()

    def producer() -> None:
        prod = RingProducer(ring, data_bell, space_bell)
        woken = []
        prod.on_space(lambda: woken.append(1))
        i = 0
        reported = False
        deadline = time.monotonic() + DEADLINE_S
        while i < total:
            if time.monotonic() > deadline:
                raise TimeoutError("producer stuck")
            if prod.send(struct.pack("<I", i) + bytes(rec - 4)):
                i += 1
                continue
            if not reported:  # tell the test the ring is full, then wait for space
                os.write(full_w, struct.pack("<I", i))
                reported = True
            if space_bell.wait(DEADLINE_S):
                prod.handle_space_event()
        assert woken, "on_space callback never ran"

    pid = _fork(producer)
    os.close(full_w)
    try:
        assert select.select([full_r], [], [], DEADLINE_S)[0]
        (sent_when_full,) = struct.unpack("<I", os.read(full_r, 4))
    finally:
        os.close(full_r)
    # The producer refused and is blocked: the ring holds exactly what it accepted.
    assert ring.capacity - ring.used() < rec + 16
    assert sent_when_full == ring.used() // (rec + 8)
    cons = RingConsumer(ring, data_bell, space_bell)
    got = 0
    deadline = time.monotonic() + DEADLINE_S
    while got < total:
        assert time.monotonic() < deadline
        for v in cons.drain():
            assert struct.unpack_from("<I", v)[0] == got and len(v) == rec
            got += 1
        cons.release()
        if got < total:
            cons.wait(spins=100, timeout=1.0)
    assert _join(pid) == 0


def test_sleeping_consumer_is_woken_and_awake_one_is_not_rung(
    named_ring: tuple[Segment, Ring], bells: tuple[Doorbell, Doorbell]
) -> None:
    _, ring = named_ring
    data_bell, _ = bells
    go_r, go_w = os.pipe()

    def producer() -> None:
        prod = RingProducer(ring, data_bell)
        assert prod.send(b"awake")  # consumer not sleeping: must not ring
        # Wait until the consumer says it is asleep, then send once.
        assert select.select([go_r], [], [], DEADLINE_S)[0]
        os.read(go_r, 1)
        assert prod.send(b"wake up")

    cons = RingConsumer(ring, data_bell)
    pid = _fork(producer)
    os.close(go_r)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not cons.poll_spin(1000):
            assert time.monotonic() < deadline
        assert [bytes(v) for v in cons.drain()] == [b"awake"]
        cons.release()
        assert data_bell.drain() == 0  # the producer did not ring an awake consumer
        assert cons.prepare_sleep() is True
        os.write(go_w, b"!")
        # Block exactly as an EventCenter would: on the eventfd, bounded.
        assert select.select([data_bell], [], [], DEADLINE_S)[0], "consumer never woken"
        cons.wake()
        assert [bytes(v) for v in cons.drain()] == [b"wake up"]
        cons.release()
    finally:
        os.close(go_w)
    assert _join(pid) == 0


def test_producer_killed_mid_write_exposes_no_torn_record() -> None:
    """SIGKILL the producer at random points while it writes checksummed records; the
    consumer must only ever see whole records, in sequence."""
    cap = 1 << 16
    rng = random.Random(3)
    pattern = _pattern(9)
    kills = 0
    seen_total = 0
    seg = Segment.create("killtest", Ring.required_size(cap))
    try:
        for round_ in range(12):
            ring = Ring.create(seg.buf, cap)
            progress_r, progress_w = os.pipe()

            def producer(ring: Ring = ring, round_: int = round_, progress_w: int = progress_w) -> None:
                prod = RingProducer(ring)
                prng = random.Random(round_)
                seq = 0
                os.write(progress_w, b"s")
                while True:
                    n = prng.randint(16, cap // 4)
                    view = prod.try_reserve(n)
                    if view is None:
                        continue  # consumer is behind: spin (it never stops draining)
                    body = _expected(pattern, seq, n - 8)
                    # Write the body in chunks so a kill can land in the middle of it,
                    # and the header (seq, crc) last.
                    for a in range(8, n, 1024):
                        view[a: min(n, a + 1024)] = body[a - 8: min(n, a + 1024) - 8]
                    struct.pack_into("<II", view, 0, seq, zlib.crc32(body))
                    prod.commit(n)
                    prod.publish()
                    seq += 1

            pid = _fork(producer)
            os.close(progress_w)
            cons = RingConsumer(ring)
            seq = 0
            try:
                assert select.select([progress_r], [], [], DEADLINE_S)[0]
                target = rng.randint(5, 200)  # kill after a random amount of traffic
                deadline = time.monotonic() + DEADLINE_S
                killed = False
                while True:
                    assert time.monotonic() < deadline
                    for v in cons.drain():
                        got_seq, crc = struct.unpack_from("<II", v)
                        assert got_seq == seq, f"round {round_}: seq {got_seq} != {seq}"
                        assert zlib.crc32(v[8:]) == crc, f"round {round_}: torn record {seq}"
                        seq += 1
                    cons.release()
                    if not killed and seq >= target:
                        os.kill(pid, signal.SIGKILL)
                        assert _join(pid) == -signal.SIGKILL
                        killed = True
                        kills += 1
                    elif killed and not cons.pending():
                        break  # the dead producer's last published record is consumed
            finally:
                os.close(progress_r)
                if not killed:
                    os.kill(pid, signal.SIGKILL)
                    _join(pid)
                ring.close()
            seen_total += seq
    finally:
        seg.close()
        seg.unlink()
    assert kills == 12 and seen_total > 12 * 5


def test_event_center_poller_spins_then_sleeps_and_is_woken(
    named_ring: tuple[Segment, Ring], bells: tuple[Doorbell, Doorbell]
) -> None:
    _, ring = named_ring
    data_bell, _ = bells
    go_r, go_w = os.pipe()
    total = 500

    def producer() -> None:
        prod = RingProducer(ring, data_bell)
        assert select.select([go_r], [], [], DEADLINE_S)[0]
        for i in range(0, total, 50):
            records = [struct.pack("<I", j) * 4 for j in range(i, i + 50)]
            sent = 0
            deadline = time.monotonic() + DEADLINE_S
            while sent < len(records):
                assert time.monotonic() < deadline
                sent += prod.send_many(records[sent:])

    got: list[int] = []
    center = EventCenter(name="ring-test")
    cons = RingConsumer(ring, data_bell)
    poller = RingPoller(center, cons, lambda views: got.extend(
        struct.unpack_from("<I", v)[0] for v in views), spins=8)
    pid = _fork(producer)
    os.close(go_r)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not poller.asleep:  # idle ring: the poller gives up spinning and sleeps
            assert time.monotonic() < deadline
            center.process_events(0.0)
        assert ring._hq[ring_mod._W_SLEEP] == 1
        os.write(go_w, b"!")
        while len(got) < total:
            assert time.monotonic() < deadline, f"stuck at {len(got)}"
            center.process_events(1.0)  # blocks in epoll: only the doorbell can wake it
        assert got == list(range(total))
    finally:
        os.close(go_w)
        poller.close()
        center.close()
    assert _join(pid) == 0


def _recv_one_sleeping(cons: RingConsumer, bell: Doorbell) -> bytes:
    """Block for one record via the sleep handshake only (no spinning); a lost wake-up
    shows up as a 10 s stall and fails the test."""
    while True:
        views = cons.drain()
        if views:
            data = bytes(views[0])
            assert len(views) == 1
            cons.release()
            return data
        # Drop rings left from earlier rounds (a producer that saw the flag of a
        # sleep we then cancelled): they would hide a lost wake-up from the assert.
        bell.drain()
        if cons.prepare_sleep():
            assert select.select([bell], [], [], 10.0)[0], "lost wake-up"
            cons.wake()


@pytest.mark.parametrize("echo_sleeps", [False, True])
def test_sleep_handshake_never_loses_a_wakeup_ping_pong(
    bells: tuple[Doorbell, Doorbell], echo_sleeps: bool
) -> None:
    """The main side always sleeps between messages ('set sleeping, membarrier,
    re-check' against the producer's 'store tail, load sleeping'). A spinning echo
    replies within a microsecond, so replies often land inside the sleeper's window
    between its last empty drain and its flag store: exactly the race the re-check closes."""
    cap = 4096
    seg = Segment.create_memfd(2 * Ring.required_size(cap))
    there = Ring.create(seg.buf[: Ring.required_size(cap)], cap)
    back = Ring.create(seg.buf[Ring.required_size(cap):], cap)
    bell_there, bell_back = bells
    rounds = 3000

    # Each side on its own CPU when there are two, so the spinning echo really replies
    # within a microsecond instead of waiting for a scheduler slice.
    cpus = sorted(os.sched_getaffinity(0))
    mine = set(cpus)

    def echo() -> None:
        if len(cpus) >= 2:
            os.sched_setaffinity(0, {cpus[1]})
        cons, prod = RingConsumer(there, bell_there), RingProducer(back, bell_back)
        deadline = time.monotonic() + DEADLINE_S
        for _ in range(rounds):
            if echo_sleeps:
                msg = _recv_one_sleeping(cons, bell_there)
            else:
                while not cons.poll_spin(10_000):
                    assert time.monotonic() < deadline
                (view,) = cons.drain()
                msg = bytes(view)
                del view
                cons.release()
            assert prod.send(msg)

    pid = _fork(echo)
    try:
        if len(cpus) >= 2:
            os.sched_setaffinity(0, {cpus[0]})
        cons, prod = RingConsumer(back, bell_back), RingProducer(there, bell_there)
        jitter = random.Random(5)
        for i in range(rounds):
            msg = struct.pack("<I", i)
            assert prod.send(msg)
            # Busy jitter (0 to a few µs, not a sleep): slides our drain/flag window
            # across the moment the reply lands.
            for _ in range(jitter.randrange(150)):
                pass
            assert _recv_one_sleeping(cons, bell_back) == msg
    finally:
        os.sched_setaffinity(0, mine)
        code = _join(pid)
        there.close()
        back.close()
        seg.close()
    assert code == 0
