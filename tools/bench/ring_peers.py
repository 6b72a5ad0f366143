"""The peers of ``msgr bench ring`` (:mod:`tools.bench.ring`): the asyncmsgr ring and
each IPC library it is measured against, behind one Tx/Rx interface.

A peer that is not installed reports why (``missing()``); the harness then skips it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Sequence
from typing import Any, Protocol

from transport.shm import Doorbell, Ring, RingConsumer, RingProducer, Segment

__all__ = ["PEERS", "Peer", "Rx", "Tx"]

SIZES = (64, 4096)
STOP = b"\x01"  # a 1-byte message ends a throughput run or a ping-pong
RING = "asyncmsgr-ring-spin"
RING_BLOCK = "asyncmsgr-ring-block"
RING_SLEEP = "asyncmsgr-ring-sleep"  # spins=0: every empty wait blocks on the eventfd
PEERS = (RING, RING_BLOCK, RING_SLEEP, "multiprocessing.Queue", "faster-fifo", "pyzmq-ipc", "os.pipe",
         "iceoryx2")

Msg = Any  # bytes-like as each peer delivers it


class Tx(Protocol):
    def send_batch(self, msgs: Sequence[bytes | memoryview]) -> None: ...


class Rx(Protocol):
    def recv_batch(self) -> Sequence[Msg]: ...
    def done(self) -> None: ...


class Peer:
    """One IPC mechanism. The parent calls ``setup`` before forking (for mechanisms
    inherited across fork) and ``close`` after; children call ``tx``/``rx`` on channel
    0 (producer → consumer) or 1 (the way back, for ping-pong)."""

    name = "?"
    #: Fork the sending side first (iceoryx2: a subscriber must first receive() after
    #: the publisher exists, or early samples are dropped — ipc-facts.md).
    sender_first = False

    def missing(self) -> str | None:
        return None

    def setup(self, size: int, capacity: int) -> None:
        pass

    def tx(self, chan: int) -> Tx:
        raise NotImplementedError

    def rx(self, chan: int) -> Rx:
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- asyncmsgr ring -------------------------------------------------------------------------


class _RingTx:
    def __init__(self, prod: RingProducer, space: Doorbell | None) -> None:
        self.prod, self.space = prod, space

    def send_batch(self, msgs: Sequence[bytes | memoryview]) -> None:
        prod = self.prod
        while True:
            k = prod.send_many(msgs)
            if k == len(msgs):
                return
            msgs = msgs[k:]
            if self.space is not None:  # spin-then-block: sleep until the consumer frees space
                if self.space.wait(1.0):
                    prod.handle_space_event()
            else:
                while prod.free_space() < 4 * 4096:
                    pass


class _RingRx:
    def __init__(self, cons: RingConsumer, spins: int | None) -> None:
        self.cons, self.spins = cons, spins

    def recv_batch(self) -> Sequence[Msg]:
        cons = self.cons
        while True:
            views = cons.drain()
            if views:
                return views
            if self.spins is None:
                cons.poll_spin(1 << 20)
            else:
                cons.wait(self.spins, timeout=1.0)

    def done(self) -> None:
        self.cons.release()


class RingPeer(Peer):
    def __init__(self, block: bool, spins: int, name: str) -> None:
        self.name = name
        self.block, self.spins = block, spins
        self.segs: list[Segment] = []
        self.rings: list[Ring] = []
        self.bells: list[tuple[Doorbell, Doorbell]] = []

    def setup(self, size: int, capacity: int) -> None:
        for _ in range(2):
            seg = Segment.create_memfd(Ring.required_size(capacity))
            self.segs.append(seg)
            self.rings.append(Ring.create(seg.buf, capacity))
            self.bells.append((Doorbell(), Doorbell()))

    def tx(self, chan: int) -> Tx:
        data, space = self.bells[chan] if self.block else (None, None)
        return _RingTx(RingProducer(self.rings[chan], data, space), space)

    def rx(self, chan: int) -> Rx:
        data, space = self.bells[chan] if self.block else (None, None)
        return _RingRx(RingConsumer(self.rings[chan], data, space),
                       self.spins if self.block else None)

    def close(self) -> None:
        for r in self.rings:
            r.close()
        for s in self.segs:
            s.close()
        for a, b in self.bells:
            a.close()
            b.close()
        self.segs, self.rings, self.bells = [], [], []


# -- multiprocessing.Queue -------------------------------------------------------------------


class _QueueTx:
    def __init__(self, q: Any) -> None:
        self.put = q.put

    def send_batch(self, msgs: Sequence[bytes | memoryview]) -> None:
        put = self.put
        for m in msgs:
            put(m)


class _QueueRx:
    def __init__(self, q: Any) -> None:
        self.get = q.get

    def recv_batch(self) -> Sequence[Msg]:
        return (self.get(),)

    def done(self) -> None:
        pass


class MPQueuePeer(Peer):
    name = "multiprocessing.Queue"

    def setup(self, size: int, capacity: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self.qs = [ctx.Queue(), ctx.Queue()]

    def tx(self, chan: int) -> Tx:
        return _QueueTx(self.qs[chan])

    def rx(self, chan: int) -> Rx:
        return _QueueRx(self.qs[chan])

    def close(self) -> None:
        for q in self.qs:
            q.close()
            q.join_thread()


# -- faster-fifo ------------------------------------------------------------------------------


class _FFTx:
    def __init__(self, q: Any) -> None:
        self.q = q

    def send_batch(self, msgs: Sequence[bytes | memoryview]) -> None:
        if len(msgs) == 1:
            self.q.put(msgs[0], block=True, timeout=60.0)
        else:
            self.q.put_many(list(msgs), block=True, timeout=60.0)


class _FFRx:
    def __init__(self, q: Any) -> None:
        self.q = q

    def recv_batch(self) -> Sequence[Msg]:
        return self.q.get_many(block=True, timeout=60.0)  # type: ignore[no-any-return]

    def done(self) -> None:
        pass


class FasterFifoPeer(Peer):
    name = "faster-fifo"

    def missing(self) -> str | None:
        try:
            import faster_fifo  # noqa: F401
        except ImportError as e:
            return f"faster-fifo not installed ({e})"
        return None

    def setup(self, size: int, capacity: int) -> None:
        import faster_fifo

        self.qs = [faster_fifo.Queue(max_size_bytes=capacity) for _ in range(2)]

    def tx(self, chan: int) -> Tx:
        return _FFTx(self.qs[chan])

    def rx(self, chan: int) -> Rx:
        return _FFRx(self.qs[chan])

    def close(self) -> None:
        for q in self.qs:
            q.close()


# -- pyzmq ---------------------------------------------------------------------------------


class _ZmqTx:
    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def send_batch(self, msgs: Sequence[bytes | memoryview]) -> None:
        send = self.sock.send
        for m in msgs:
            send(m, copy=True)


class _ZmqRx:
    def __init__(self, sock: Any, zmq: Any) -> None:
        self.sock, self.again, self.nb = sock, zmq.Again, zmq.NOBLOCK

    def recv_batch(self) -> Sequence[Msg]:
        recv = self.sock.recv
        out = [recv()]  # blocking for the first, then whatever is already queued
        try:
            while len(out) < 1024:
                out.append(recv(self.nb))
        except self.again:
            pass
        return out

    def done(self) -> None:
        pass


class ZmqPeer(Peer):
    """PUSH/PULL over ipc:// for throughput, PAIR for ping-pong (as in ipc-facts.md)."""

    name = "pyzmq-ipc"

    def missing(self) -> str | None:
        try:
            import zmq  # noqa: F401
        except ImportError as e:
            return f"pyzmq not installed ({e})"
        return None

    def setup(self, size: int, capacity: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="amsgr-zmq-")
        # Same buffering as the others: high-water marks count messages, so size them
        # to hold ``capacity`` bytes (never below zmq's default of 1000).
        self.hwm = max(1000, capacity // size)
        self.socks: list[Any] = []
        self.ctx: Any = None

    def _ctx(self) -> Any:
        import zmq

        if self.ctx is None:  # created in the child: a zmq context is not fork-safe
            self.ctx = zmq.Context()
        return self.ctx

    def tx(self, chan: int) -> Tx:
        import zmq

        s = self._ctx().socket(zmq.PUSH)
        s.setsockopt(zmq.SNDHWM, self.hwm)
        s.connect(f"ipc://{self.dir}/{chan}")
        self.socks.append(s)
        return _ZmqTx(s)

    def rx(self, chan: int) -> Rx:
        import zmq

        s = self._ctx().socket(zmq.PULL)
        s.setsockopt(zmq.RCVHWM, self.hwm)
        s.bind(f"ipc://{self.dir}/{chan}")
        self.socks.append(s)
        return _ZmqRx(s, zmq)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# -- os.pipe --------------------------------------------------------------------------------


class _PipeTx:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send_batch(self, msgs: Sequence[bytes | memoryview]) -> None:
        # One write per message (length prefix + payload), as a naive framed stream does.
        fd, writev, pack = self.fd, os.writev, struct.Struct("<I").pack
        for m in msgs:
            writev(fd, (pack(len(m)), m))


class _PipeRx:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def recv_batch(self) -> Sequence[Msg]:
        out: list[bytes] = []
        unpack = struct.Struct("<I").unpack_from
        while not out:
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                raise EOFError("pipe closed")
            buf = self.buf + chunk if self.buf else chunk
            pos, end = 0, len(buf)
            while end - pos >= 4:
                (n,) = unpack(buf, pos)
                if end - pos - 4 < n:
                    break
                out.append(buf[pos + 4: pos + 4 + n])
                pos += 4 + n
            self.buf = buf[pos:]
        return out

    def done(self) -> None:
        pass


class PipePeer(Peer):
    name = "os.pipe"

    def setup(self, size: int, capacity: int) -> None:
        self.pipes = [os.pipe(), os.pipe()]
        for r, w in self.pipes:
            with contextlib.suppress(OSError):
                import fcntl

                fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ: 1 MiB, like the rings

    def tx(self, chan: int) -> Tx:
        return _PipeTx(self.pipes[chan][1])

    def rx(self, chan: int) -> Rx:
        return _PipeRx(self.pipes[chan][0])

    def close(self) -> None:
        for r, w in self.pipes:
            os.close(r)
            os.close(w)


# -- iceoryx2 -------------------------------------------------------------------------------


class _IoxTx:
    def __init__(self, pub: Any, typ: Any) -> None:
        self.pub, self.typ = pub, typ

    def send_batch(self, msgs: Sequence[bytes | memoryview]) -> None:
        send, conv, size = self.pub.send_copy, self.typ.from_buffer_copy, ctypes.sizeof(self.typ)
        for m in msgs:
            if len(m) != size:  # the stop message: fixed-size samples, flag in byte 0
                m = bytes(m) + bytes(size - len(m))
            send(conv(m))


class _IoxRx:
    def __init__(self, sub: Any, size: int) -> None:
        self.sub, self.size = sub, size

    def recv_batch(self) -> Sequence[Msg]:
        receive, string_at, size = self.sub.receive, ctypes.string_at, self.size
        out: list[bytes] = []
        while not out:
            while len(out) < 1024:
                s = receive()  # busy-poll: iceoryx2's subscriber has no blocking receive
                if s is None:
                    break
                b = string_at(s.payload_ptr, size)
                s.delete()
                if b[0] == 1 and not any(b[1:8]):
                    b = STOP
                out.append(b)
        return out

    def done(self) -> None:
        pass


class IceoryxPeer(Peer):
    """publish/subscribe with RetryUntilDelivered (no overflow), busy-polling receive.

    iceoryx2 drops what a publisher sends before the subscriber's first ``receive()``
    (ipc-facts.md): the consumer calls ``receive()`` once before it reports ready.
    """

    name = "iceoryx2"
    sender_first = True

    def missing(self) -> str | None:
        try:
            import iceoryx2  # noqa: F401
        except ImportError as e:
            return f"iceoryx2 not installed ({e})"
        return None

    def setup(self, size: int, capacity: int) -> None:
        self.size = size
        self.base = f"amsgr_bench_{os.getpid()}_{time.monotonic_ns()}"
        self.keep: list[Any] = []

        class Payload(ctypes.Structure):
            _fields_ = [("data", ctypes.c_uint8 * size)]

        Payload.__name__ = f"AmsgrPayload{size}"
        self.typ = Payload

    def _service(self, chan: int) -> Any:
        import iceoryx2 as iox

        iox.set_log_level(iox.LogLevel.Error)
        node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
        svc = (node.service_builder(iox.ServiceName.new(f"{self.base}/{chan}"))
               .publish_subscribe(self.typ).enable_safe_overflow(False)
               .subscriber_max_buffer_size(256).open_or_create())
        self.keep += [node, svc]
        return svc

    def tx(self, chan: int) -> Tx:
        import iceoryx2 as iox

        pub = (self._service(chan).publisher_builder()
               .backpressure_strategy(iox.BackpressureStrategy.RetryUntilDelivered).create())
        self.keep.append(pub)
        return _IoxTx(pub, self.typ)

    def rx(self, chan: int) -> Rx:
        sub = self._service(chan).subscriber_builder().create()
        self.keep.append(sub)
        s = sub.receive()  # see class docstring: avoids start-up drops
        if s is not None:
            s.delete()
        return _IoxRx(sub, self.size)

    def release_children(self) -> None:
        """Drop ports, services and nodes in reverse order so iceoryx2 removes its
        files (os._exit skips Rust destructors)."""
        while self.keep:
            obj = self.keep.pop()
            with contextlib.suppress(Exception):
                obj.delete()
            del obj
        gc.collect()
