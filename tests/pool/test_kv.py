"""The sharded kv app across a real pool: shard map, forwarding over the rings, shard
migration on scale changes (4 -> 2 -> 3) under a verifying stress, /dev/shm clean after."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pool.apps.kv import NSHARDS, owners_for, shard_of
from tools.stress.kv import KvStressConfig, format_kv_summary, run_kv_stress
from transport import shmname

from .support import ROOT, running_pool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_shard_map_is_deterministic_and_moves_little() -> None:
    assert shard_of("abc") == shard_of("abc")
    four = owners_for([0, 1, 2, 3])
    two = owners_for([0, 1])
    assert four is not None and two is not None and len(four) == NSHARDS
    assert four == owners_for([3, 2, 1, 0])
    # Rendezvous hashing: only shards whose owner left move.
    assert all(two[s] == four[s] for s in range(NSHARDS) if four[s] in (0, 1))
    assert owners_for([]) is None


def test_kv_scale_4_2_3_no_lost_write(tmp_path: Path) -> None:
    with running_pool(tmp_path, workers=4, app="kv") as pool:
        cfg = KvStressConfig(("127.0.0.1", pool.port), conns=6, keys=1500, rounds=4,
                             window=48, seed=4, timeout=60, admin=pool.admin,
                             scale_plan=[2, 3], scale_every=0.4)
        r = run_kv_stress(cfg)
        summary = format_kv_summary(r)
        assert r.ok, summary + "\n" + pool.log()[-3000:]
        assert r.scales == 2
        assert r.acked_writes + r.unacked_writes == 6000, summary
        print(summary)
        assert r.errors == 0 or r.unacked_writes, summary
        st = pool.wait_accepting(3)
        assert st["peer_map"]["slots"] == sorted(
            w["slot"] for w in st["workers"] if w["state"] == "ACCEPTING")
        sup = st["pid"]
    assert [s for s in shmname.list_segments() if shmname.owner_of(s) == sup] == []


def test_stress_cli_app_kv(tmp_path: Path) -> None:
    with running_pool(tmp_path, workers=2, app="kv") as pool:
        out = tmp_path / "kv.json"
        proc = subprocess.run(
            [sys.executable, "-m", "tools.cli", "stress", "--app", "kv", "--target",
             f"127.0.0.1:{pool.port}", "--messages", "1000", "--conns", "4", "--size-max", "64",
             "--seed", "1", "--timeout", "30", "--json", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        data = json.loads(out.read_text())
        for k in ("sent", "received", "lost", "duplicated", "reordered", "corrupted",
                  "msgs_per_s", "p50_us", "p99_us", "acked_writes", "stale_reads",
                  "missing_keys", "errors"):
            assert k in data, k
        assert data["ok"] and data["acked_writes"] == 500 and data["lost"] == 0
