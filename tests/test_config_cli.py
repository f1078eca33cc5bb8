"""Configuration validation and the command line's answers to bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mibi_node.config import load_config
from mibi_node.errors import ConfigError
from mibi_node.storage.filestore import FileStore

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mibi_node.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_shipped_config_is_valid_and_matches_defaults() -> None:
    shipped = load_config(REPO / "config" / "mibi-node.toml")
    defaults = load_config(None)
    assert shipped == defaults
    assert shipped.node.ae_title == "MIBI_NODE" and shipped.node.port == 11112


def test_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nport = 70000\nae_titel = "X"\n[reception]\nmax_associations = 0\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    message = str(info.value)
    assert "node.port" in message
    assert "node.ae_titel: unknown key" in message
    assert "reception.max_associations" in message
    assert str(bad) in message


def test_ae_title_rules(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nae_title = "THIS_TITLE_IS_TOO_LONG"\n')
    with pytest.raises(ConfigError, match="node.ae_title"):
        load_config(bad)


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    config = load_config(
        REPO / "config" / "mibi-node.toml", {"node": {"port": 4242, "ae_title": None}}
    )
    assert config.node.port == 4242 and config.node.ae_title == "MIBI_NODE"


def test_check_config_prints_resolved_config_with_secrets_masked(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        '[database]\nurl = "postgresql+psycopg://mibi:s3cret@db/mibi"\n[node]\nport = 104\n'
    )
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["node"]["port"] == 104
    assert resolved["database"]["url"] == "********"
    assert "s3cret" not in result.stdout


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[node\n", "not valid TOML"),
        ("[node]\nport = 'abc'\n", "node.port"),
    ],
)
def test_check_config_bad_file_is_one_clear_message(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(content)
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_named() -> None:
    result = run_cli("serve", "--config", "/nonexistent/mibi.toml")
    assert result.returncode == 2
    assert "/nonexistent/mibi.toml: no such configuration file" in result.stderr


def test_status_without_database_says_so(tmp_path: Path) -> None:
    result = run_cli("status", "--data-dir", str(tmp_path / "empty"))
    assert result.returncode == 1
    assert "no mibi-node database" in result.stderr


def test_echo_bad_peer_and_unreachable_peer(tmp_path: Path) -> None:
    bad = run_cli("echo", "not-a-peer")
    assert bad.returncode == 2 and "AE@HOST:PORT" in bad.stderr
    from ports import free_port

    down = run_cli("echo", f"NOBODY@127.0.0.1:{free_port()}", "--timeout", "2")
    assert down.returncode == 1 and "refused or peer unreachable" in down.stderr


def test_echo_reaches_a_running_node(node_factory) -> None:
    node = node_factory()
    result = run_cli("echo", f"MIBI_NODE@127.0.0.1:{node.port}")
    assert result.returncode == 0, result.stderr
    assert "C-ECHO success" in result.stdout


def test_file_store_paths_are_hashed_and_confined(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    relative = store.relative_path("1.2.3", "../../etc/passwd")
    assert ".." not in relative and "passwd" not in relative
    assert store.absolute(relative).is_relative_to(store.root)
    with pytest.raises(ValueError, match="outside the store"):
        store.absolute("../../escape.dcm")
    # The same UIDs always map to the same place; different ones never collide here.
    assert relative == store.relative_path("1.2.3", "../../etc/passwd")
    assert relative != store.relative_path("1.2.3", "../../etc/shadow")


def test_file_store_place_is_atomic_and_cleans_incoming(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    partial = store.incoming / "tmp123.dcm"
    partial.write_bytes(b"first")
    target = store.place(partial, store.relative_path("1", "2"))
    assert target.read_bytes() == b"first" and not partial.exists()
    (store.incoming / "left-by-crash.dcm").write_bytes(b"half")
    assert store.clean_incoming() == 1
    assert list(store.incoming.iterdir()) == []


_OVERRUNNING_SWEEP = """
import sys, time
from apscheduler.schedulers.background import BackgroundScheduler
from mibi_node.logs import configure_logging
configure_logging(sys.argv[1])
scheduler = BackgroundScheduler()
scheduler.add_job(lambda: time.sleep(0.5), "interval", seconds=0.1, max_instances=1, coalesce=True)
scheduler.start()
time.sleep(1.2)
scheduler.shutdown()
"""


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_a_sweep_overrunning_its_interval_is_not_a_warning(level: str) -> None:
    """apscheduler warns each time a sweep still running skips its next turn; that is how the
    sweeps are meant to run (one at a time), so the log shows it only at DEBUG."""
    run = subprocess.run(
        [sys.executable, "-c", _OVERRUNNING_SWEEP, level],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    skipped = "maximum number of running instances reached" in run.stderr
    assert skipped == (level == "DEBUG"), run.stderr
