"""The control page: layout, ownership of names, redirects, and torn-read-free words."""

from __future__ import annotations

import os
import time

import multiprocess
import posix_ipc
import pytest

from pool.control.page import FIELDS, MAX_SLOTS, ControlPage
from transport import shmname

A = 0xAAAAAAAAAAAAAAAA
B = 0x5555555555555555


@pytest.fixture
def page() -> ControlPage:
    p = ControlPage.create(8)
    yield p
    p.close()
    p.unlink()


def test_create_names_segment_after_owner_and_unlink_removes_it() -> None:
    p = ControlPage.create(4)
    try:
        assert shmname.owner_of(p.name) == os.getpid()
        assert p.name in shmname.list_segments()
        assert p.owner_pid == os.getpid() and p.nslots == 4
        with pytest.raises(posix_ipc.ExistentialError):
            ControlPage.create(4)  # O_EXCL: one page per supervisor
    finally:
        p.close()
        p.unlink()
    assert p.name not in shmname.list_segments()
    p.unlink()  # idempotent


def test_attach_sees_the_same_words(page: ControlPage) -> None:
    other = ControlPage.attach(page.name)
    try:
        page.slot(3).set("pid", 1234)
        other.slot(3).set("heartbeat_ns", 99)
        assert other.slot(3).get("pid") == 1234
        assert page.slot(3).snapshot()["heartbeat_ns"] == 99
        assert set(page.slot(0).snapshot()) == set(FIELDS)
        page.slot(3).clear()
        assert other.slot(3).get("pid") == 0
    finally:
        other.close()


def test_attach_refuses_a_foreign_segment() -> None:
    name = shmname.segment_name("foreign")
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096)
    shm.close_fd()
    try:
        with pytest.raises(ValueError, match="not an asyncmsgr control page"):
            ControlPage.attach(name)
    finally:
        shm.unlink()


def test_bounds_and_use_after_close() -> None:
    with pytest.raises(ValueError):
        ControlPage.create(MAX_SLOTS + 1)
    p = ControlPage.create(2)
    p.unlink()
    with pytest.raises(IndexError):
        p.slot(2)
    p.close()
    p.close()
    with pytest.raises(ValueError, match="closed"):
        p.slot(0)


def test_redirect_table(page: ControlPage) -> None:
    assert page.redirect(5) is None and page.resolve(5) == 5
    page.set_redirect(5, 0)
    page.set_redirect(6, 5)
    assert page.redirect(5) == 0 and page.resolve(6) == 0
    page.set_redirect(0, 6)  # a cycle written by mistake cannot hang the resolver
    assert page.resolve(6) in (0, 5, 6)
    page.set_redirect(5, None)
    assert page.redirect(5) is None


def _writer(name: str, iterations: int) -> None:
    p = ControlPage.attach(name)
    s = p.slot(1)
    for i in range(iterations):
        s.set("msgs_in", A if i & 1 else B)
    s.set("pid", 1)  # done flag
    p.close()


def test_words_are_never_torn_across_processes(page: ControlPage) -> None:
    """A reader polling a word while another process rewrites it sees only whole
    values (notes/ipc-facts.md: struct.pack_into would expose a transient 0)."""
    s = page.slot(1)
    s.set("msgs_in", A)
    proc = multiprocess.get_context("fork").Process(target=_writer, args=(page.name, 300_000))
    proc.start()
    try:
        seen = {A: 0, B: 0}
        bad = []
        deadline = time.monotonic() + 30
        while s.get("pid") == 0 and time.monotonic() < deadline:
            v = s.get("msgs_in")
            if v in seen:
                seen[v] += 1
            else:
                bad.append(v)
        assert not bad, f"torn reads: {[hex(v) for v in bad[:5]]}"
        assert s.get("pid") == 1, "writer did not finish"
        assert seen[A] and seen[B], "the reader never overlapped the writer"
    finally:
        proc.join(10)
        proc.close()
