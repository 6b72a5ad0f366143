"""Moving a READY connection's stream to another process (scale-down migration)."""

from __future__ import annotations

from typing import Any, Self

from .config import Config
from .control import EntityAddr
from .errors import LocalProtocolError
from .exchange import Exchange
from .session import Session
from .transitions import Local, Role, State

__all__ = ["Handoff"]


class Handoff(Exchange):
    """export_ready / import_ready / restore_ready (the session is exported by its owner)."""

    def export_ready(self) -> dict[str, Any]:
        """Stream state of a READY connection (the session itself is exported by the
        owner); the connection must not be used afterwards."""
        if self.state is not State.READY:
            raise LocalProtocolError("only a READY connection can be migrated")
        self._fire(Local.EXPORT_READY)
        return self._export_stream()

    @classmethod
    def import_ready(cls, role: Role, config: Config, session: Session, peer_type: int,
                     peer_addrs: tuple[EntityAddr, ...], stream: dict[str, Any]) -> Self:
        """A READY connection continuing a migrated session on a handed-off socket."""
        conn = cls(role, config, session if role is Role.CLIENT else None, send_banner=False)
        conn.adopt_ready(session, peer_type, peer_addrs, stream)
        return conn

    def adopt_ready(self, session: Session, peer_type: int,
                    peer_addrs: tuple[EntityAddr, ...], stream: dict[str, Any]) -> None:
        """A fresh connection continues a migrated session (import_ready)."""
        self.session = session
        self.peer_type = peer_type
        self.peer_addrs = peer_addrs
        self._fire(Local.IMPORT_READY)
        self._import_stream(stream)

    def restore_ready(self, stream: dict[str, Any]) -> None:
        """Undo export_ready (the handoff was refused): keep serving this socket."""
        self._fire(Local.RESTORE_READY)
        self._import_stream(stream)
