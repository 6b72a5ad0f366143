"""The real ``ceph`` CLI (librados inside, ceph-common 16.2.15) as a client of an
asyncmsgr Messenger server.

The CLI believes it talks to a mon: it completes banner, HELLO, AUTH_REQUEST (none),
AUTH_SIGNATURE, CLIENT_IDENT, SERVER_IDENT with us, then sends its first messages. We
decode them (every crc checked by the frame decoder) and dispatch them by type. We are
not a monitor, so the CLI then gives up; the test stops it by its pid once it has what
it needs. The CLI's own ``debug_ms`` log is the transcript of the handshake as Ceph saw
it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from pool.api import AsyncConnection, Dispatcher, Messenger, MessengerConfig
from protocol.ceph.messages import MMonSubscribe, message_name
from protocol.features import ASYNCMSGR, EntityType
from protocol.message import Message
from protocol.policy import Policy
from tests.ceph.mon import require_ceph
from transport.event_center import EventCenter

CEPH = shutil.which("ceph")


class _Mon(Dispatcher):
    def __init__(self) -> None:
        self.accepted: list[AsyncConnection] = []
        self.messages: list[tuple[AsyncConnection, Message]] = []

    def ms_handle_accept(self, conn: AsyncConnection) -> None:
        self.accepted.append(conn)

    def ms_dispatch(self, conn: AsyncConnection, msg: Message) -> None:
        self.messages.append((conn, msg))


def test_ceph_cli_handshakes_with_our_server(tmp_path: Path) -> None:
    require_ceph()  # ceph-mon brings ceph-common, which has the ceph CLI
    assert CEPH is not None, "ceph CLI not installed (apt-get install ceph-common)"
    center = EventCenter()
    # A mon's address has nonce 0, and a Ceph client insists that SERVER_IDENT names
    # exactly the address it dialled: so does this server.
    msgr = Messenger(center, MessengerConfig(nonce=0), entity_type=EntityType.MON,
                     policy=Policy.stateless_server())
    mon = _Mon()
    msgr.add_dispatcher(mon)
    log = tmp_path / "ceph-cli.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        host, port = msgr.bind(("127.0.0.1", 0))  # type: ignore[misc]
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [CEPH, "-m", f"v2:{host}:{port}", "--connect-timeout", "5", "-c", "/dev/null",
                 "--no-mon-config", "--auth-client-required", "none", "--debug-ms", "5",
                 "--log-to-stderr", "-s"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 20
        while len(mon.messages) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "the ceph CLI sent no message in 20 s"
            center.process_events(0.05)
        # The CLI writes its log from a thread of its own, behind what it sends: wait
        # for the last line asserted below before stopping it, or a loaded machine
        # loses the lines still in its log queue.
        while "handle_server_ident" not in log.read_text(errors="replace") \
                and proc.poll() is None and time.monotonic() < deadline:
            center.process_events(0.05)
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(10)
        msgr.shutdown()
        center.process_events(0)
        center.close()
    transcript = log.read_text(errors="replace")
    # The handshake completed, as the CLI saw it ...
    assert "handle_hello received hello: peer_type=1" in transcript
    assert "send_client_ident sending identification" in transcript
    assert "handle_server_ident received server identification" in transcript
    assert "does not include" not in transcript  # our SERVER_IDENT named its target
    # ... and as we saw it: a Ceph client (no asyncmsgr banner bit) that sent messages.
    (conn,) = mon.accepted
    assert conn.peer_type == EntityType.CLIENT
    assert msgr.stats["protocol_errors"] == 0
    # the server recognised them by name
    assert msgr.stats["ceph_msgs_MMonGetMap"] == 1 and msgr.stats["ceph_msgs_MMonSubscribe"] >= 1
    (first_conn, first), (_, second) = mon.messages[:2]
    assert first_conn is conn and first.raw
    # MonClient asks for the monmap first (MMonGetMap), then subscribes.
    assert (first.type, message_name(first.type)) == (5, "MMonGetMap")
    assert first.seq == 1 and second.seq == 2
    assert message_name(second.type) == "MMonSubscribe"
    sub = MMonSubscribe.decode(second.front, second.middle, second.data, second.version)
    assert "monmap" in sub.what
    # our banner as the CLI parsed it: REVISION_1 and asyncmsgr's private bit, ignored
    assert f"supported={ASYNCMSGR | 1:x}" in transcript
