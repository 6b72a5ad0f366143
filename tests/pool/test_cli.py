"""The ``msgr`` command line: subcommand registration and the admin contracts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tools import cli

from .support import msgr, running_pool


def test_builtin_subcommands_are_registered() -> None:
    parser = cli.build_parser()
    for argv in (["serve"], ["status", "--json"], ["scale", "3"], ["stop"], ["perf"]):
        assert callable(parser.parse_args(argv).func)


def test_a_missing_or_broken_subcommand_module_fails_loudly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No subcommand silently disappears: a missing module, or one whose own import
    fails, is raised by the parser builder."""
    (tmp_path / "msgr_broken_cmd.py").write_text("import msgr_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "MODULES", ["tools.serve", "tools.msgr_not_written"])
    with pytest.raises(ModuleNotFoundError, match="tools.msgr_not_written"):
        cli.build_parser()
    monkeypatch.setattr(cli, "MODULES", ["tools.serve", "msgr_broken_cmd"])
    with pytest.raises(ModuleNotFoundError, match="msgr_no_such_dependency"):
        cli.build_parser()
    sys.modules.pop("msgr_broken_cmd", None)


def test_status_json_and_table_contract(tmp_path: Path) -> None:
    with running_pool(tmp_path, 2) as pool:
        r = msgr("status", "--admin", pool.admin, "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)  # exactly one JSON object
        assert len(st["workers"]) == 2
        for w in st["workers"]:
            assert {"slot", "pid", "state", "connections", "restarts"} <= set(w)
            assert w["state"] == "ACCEPTING"
        r = msgr("status", "--admin", pool.admin)
        assert r.returncode == 0
        header = r.stdout.splitlines()[1].split()
        assert header == ["slot", "pid", "state", "conns", "msgs_in", "msgs_out", "restarts", "hb_age"]
        r = msgr("perf", "--admin", pool.admin)
        assert json.loads(r.stdout)["processor"]["accepted"] == 0
        assert json.loads(r.stdout)["per_message_path"].startswith(("compiled", "python"))


def test_version_says_which_per_message_path_runs() -> None:
    r = msgr("--version")
    assert r.returncode == 0 and r.stdout.startswith("asyncmsgr ")
    assert "per-message path: compiled" in r.stdout or "per-message path: python" in r.stdout


def test_errors_are_explained(tmp_path: Path) -> None:
    gone = str(tmp_path / "nobody.sock")
    for argv in (["status"], ["scale", "2"], ["stop"]):
        r = msgr(*argv, "--admin", gone)
        assert r.returncode == 1 and "no pool is serving at" in r.stderr, r.stderr
    r = msgr("serve", "--app", "no_such_module_xyz:App", "--admin", gone)
    assert r.returncode == 2 and "cannot import 'no_such_module_xyz'" in r.stderr
    r = msgr("serve", "--bind", "localhost", "--admin", gone)
    assert r.returncode == 2 and "HOST:PORT" in r.stderr
    r = msgr("serve", "--accept", "bogus")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = msgr("serve", "--memif-mode", "poll", "--admin", gone)
    assert r.returncode == 2 and "--memif-mode applies to --stack dpdk only" in r.stderr


def test_memif_mode_reaches_the_stack() -> None:
    from transport.stacks import make_stack
    from transport.event_center import EventCenter

    with EventCenter() as center:
        assert make_stack("dpdk").config.memif.interrupt is True
        poll = make_stack("dpdk", memif_mode="poll")
        poll.bind_center(center)  # as the Messenger does
        assert poll.config.memif.interrupt is False
        assert poll._poll_center() is center  # each connection adds its poller here
        with pytest.raises(ValueError, match="choose interrupt or poll"):
            make_stack("dpdk", memif_mode="busy")


def test_serve_refuses_a_busy_port_and_a_live_admin_socket(tmp_path: Path) -> None:
    with running_pool(tmp_path, 1) as pool:
        r = msgr("serve", "--bind", f"127.0.0.1:{pool.port}", "--admin", str(tmp_path / "b.sock"),
                 "--app", "tests.pool.support:RawEchoApp")
        assert r.returncode == 1 and "address already in use" in r.stderr, r.stderr
        r = msgr("serve", "--bind", "127.0.0.1:0", "--admin", pool.admin, "--app", "tests.pool.support:RawEchoApp")
        assert r.returncode == 1 and "another pool is already serving" in r.stderr, r.stderr
        assert pool.status()["accepting"] == 1  # the running pool is untouched
