"""`msgr serve --stack dpdk|rdma` serves verified lossless traffic through a real pool.

dpdk is asyncmsgr's memif implementation; rdma runs on the softverbs provider here
(EMULATION: no RDMA device exists on these machines)."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from tests.pool.test_pool_sessions import Pool
from tools.stress.echo import StressConfig, run_stress

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stack,memif_mode", [("dpdk", "interrupt"), ("dpdk", "poll"),
                                              ("rdma", "interrupt")])
def test_pool_serves_stack_with_injected_failures(tmp_path: Path, stack: str, memif_mode: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if stack == "rdma":
        monkeypatch.setenv("ASYNCMSGR_RDMA_PROVIDER", "softverbs")
    base = str(tmp_path / "ep")
    pool = Pool(tmp_path, 2, "processor", "--stack", stack, "--stack-path", base,
                "--inject-socket-failures", "100",
                *(["--memif-mode", memif_mode] if stack == "dpdk" else []))
    try:
        assert sorted(glob.glob(base + ".*")) == [base + ".0", base + ".1"]
        r = run_stress(StressConfig(target=base, stack=stack, conns=4, messages=2000,
                                    inject_socket_failures=100, seed=11, memif_mode=memif_mode))
        assert r.ok and r.received == 2000, r
        assert r.session_resets == 0, r
        st = pool.status()
        assert sum(w["msgs_in"] for w in st["workers"]) >= 2000
        assert all(w["connections"] >= 1 for w in st["workers"] if w["state"] == "ACCEPTING")
    finally:
        pool.stop()
