"""The supervisor's configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pool.control.page import MAX_SLOTS

from .lifecycle import Backoff

__all__ = ["ACCEPT_MODES", "START_METHODS", "PoolConfig"]

ACCEPT_MODES = ("processor", "reuseport")
START_METHODS = ("fork", "spawn")


@dataclass(frozen=True)
class PoolConfig:
    bind: tuple[str, int] = ("127.0.0.1", 6800)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    accept: str = "processor"
    app: str = "echo"
    admin_path: str = ""
    start_method: str = "fork"
    app_config: dict[str, Any] = field(default_factory=dict)
    #: the worker's idle loop wakes this often, so an idle worker still heartbeats
    heartbeat_interval: float = 0.25
    #: steady-state deadline after the last heartbeat (supervisors.md 2.4)
    heartbeat_timeout: float = 5.0
    #: deadline from spawn to the first heartbeat: imports and app start-up may be slow
    boot_timeout: float = 30.0
    #: between the SIGABRT (faulthandler dump) and the SIGKILL
    kill_grace: float = 1.0
    #: a retiring worker gets this long to migrate its connections, then SIGKILL
    drain_timeout: float = 10.0
    #: pool stop: SIGTERM, then SIGKILL after this
    graceful_timeout: float = 5.0
    backoff: Backoff = field(default_factory=Backoff)
    flap_window: float = 10.0
    flap_max: int = 3
    max_slots: int = MAX_SLOTS
    #: reuseport: set net.ipv4.tcp_migrate_req=1 when root (logged); handover is used anyway
    set_migrate_req: bool = False
    #: listening fds inherited from systemd (socket activation); they replace ``bind``
    listen_fds: tuple[int, ...] = ()
    #: ``msgr serve --metrics HOST:PORT``: serve Prometheus metrics there
    metrics: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        if self.accept not in ACCEPT_MODES:
            raise ValueError(f"--accept must be one of {', '.join(ACCEPT_MODES)}, not {self.accept!r}")
        if self.start_method not in START_METHODS:
            raise ValueError(f"--start-method must be fork or spawn, not {self.start_method!r}")
        if not 1 <= self.workers <= self.max_slots:
            raise ValueError(f"--workers must be 1..{self.max_slots}, got {self.workers}")
        for name in ("heartbeat_interval", "heartbeat_timeout", "boot_timeout", "kill_grace",
                     "drain_timeout", "graceful_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.heartbeat_timeout <= 2 * self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must exceed twice heartbeat_interval, or idle "
                             "workers would be killed")
