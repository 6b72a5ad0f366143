"""``msgr serve --loop epoll|asyncio|uvloop``: what each worker's EventCenter runs on."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pool.worker.app import WorkerContext

from .support import RawEchoApp, connect, echo, msgr, running_pool, wait_for


class LoopProbeApp(RawEchoApp):
    """RawEchoApp that writes, from inside its running loop, which loop that is."""

    def start(self, ctx: WorkerContext) -> None:
        super().start(ctx)
        ctx.center.create_time_event(0.0, self._probe)

    def _probe(self) -> None:
        try:
            kind = type(asyncio.get_running_loop()).__module__
        except RuntimeError:
            kind = "no running asyncio loop"
        path = Path(self.ctx.config["probe_dir"]) / f"loop-{os.getpid()}"
        path.write_text(kind)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_pool_serves_echo_on_an_asyncio_loop(tmp_path: Path, loop: str) -> None:
    # The Messenger echo app under a real client workload, verified end to end.
    with running_pool(tmp_path, 2, app="echo", extra=("--loop", loop)) as pool:
        out = tmp_path / "stress.json"
        r = msgr("stress", "--target", f"127.0.0.1:{pool.port}", "--conns", "4",
                 "--messages", "400", "--json", str(out), timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        res = json.loads(out.read_text())
        assert res["sent"] == res["received"] == 400
        assert res["lost"] == res["duplicated"] == res["reordered"] == res["corrupted"] == 0
        assert all(w["restarts"] == 0 for w in pool.status()["workers"])
    # Each worker's center really runs inside that loop, and raw echoes pass through it.
    probes = tmp_path / "probes"
    probes.mkdir()
    with running_pool(tmp_path, 2, app="tests.pool.test_serve_loop:LoopProbeApp",
                      extra=("--loop", loop, "--app-config",
                             json.dumps({"probe_dir": str(probes)}))) as pool:
        pids = pool.worker_pids()
        for i in range(20):
            with connect(pool.port) as s:
                echo(s, b"loop %d " % i * 50)
        files = wait_for(lambda: sorted(probes.iterdir()) if len(list(probes.iterdir())) == 2
                         else None, 10, "both workers' loop probes")
        assert {f.name for f in files} == {f"loop-{p}" for p in pids}
        want = "uvloop" if loop == "uvloop" else "asyncio.unix_events"
        assert {f.read_text() for f in files} == {want}


def test_loop_choice_is_checked_at_startup(tmp_path: Path) -> None:
    r = msgr("serve", "--loop", "trio", "--admin", str(tmp_path / "a.sock"))
    assert r.returncode == 2 and "invalid choice" in r.stderr
    # uvloop absent: a shadow package whose import fails as a missing one does.
    shadow = tmp_path / "shadow" / "uvloop"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'uvloop'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), *sys.path])}
    r = subprocess.run([sys.executable, "-m", "tools.cli", "serve", "--loop", "uvloop",
                        "--bind", "127.0.0.1:0", "--admin", str(tmp_path / "b.sock")],
                       capture_output=True, text=True, timeout=60, env=env, check=False,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2, r.stderr
    assert "--loop uvloop needs the uvloop package: pip install uvloop" in r.stderr
    assert not (tmp_path / "b.sock").exists()  # refused before any worker started
