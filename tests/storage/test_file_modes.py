"""The SQLite file holds session keys: private whatever the umask (issue 14).

A gateway run by root (umask 022) used to create ``/var/lib/wx-gateway`` 0755
and ``gateway.db`` 0644, readable by every local account.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.storage.sqlite import SQLiteStorage
from tests.support.gateway import APPID, TOKEN_SECRET, free_port
from tests.support.procs import ROOT, GatewayProcess, wait_healthy, write_config

WECHAT_SECRET = "wechat-secret-for-file-modes"
WARNING = "is open to group or others"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def store_files(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


@pytest.fixture
def umask_022() -> Iterator[None]:
    # The common service umask, under which SQLite alone makes a 0644 file.
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.usefixtures("umask_022")
async def test_storage_makes_missing_directories_0700_and_its_files_0600(tmp_path: Path) -> None:
    db = tmp_path / "state" / "wx-gateway" / "gateway.db"
    storage = SQLiteStorage(db)
    await storage.open()
    try:
        await storage.upsert_login(APPID, "o-user", None, "session-key", 1.0)
        # WAL mode: the write went to -wal, and -shm indexes it; both exist now.
        assert {path: mode(path) for path in store_files(db)} == {
            path: 0o600 for path in store_files(db)
        }
    finally:
        await storage.close()
    assert mode(tmp_path / "state") == 0o700
    assert mode(tmp_path / "state" / "wx-gateway") == 0o700


@pytest.mark.usefixtures("umask_022")
async def test_storage_leaves_what_exists_as_it_is(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    db = shared / "gateway.db"
    db.touch()
    db.chmod(0o640)  # e.g. readable by a backup group, on purpose
    storage = SQLiteStorage(db)
    await storage.open()
    await storage.close()
    assert mode(shared) == 0o755
    assert mode(db) == 0o640


def _config(tmp_path: Path, db: Path, port: int, workers: int = 1) -> Path:
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "workers": workers, "drain_delay": 0},
        "wechat": {"appid": "wxfilemodes0000001", "secret": WECHAT_SECRET, "fake": True},
        "token": {"secret": TOKEN_SECRET},
        "storage": {"url": f"sqlite:///{db}"},
        "log": {"access": False},
    }
    return write_config(tmp_path / "config.yaml", raw)


def _login(url: str) -> None:
    request = urllib.request.Request(
        url + "/auth/login", data=json.dumps({"code": "file-modes"}).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200


def test_gateway_run_under_umask_022_keeps_the_store_private(tmp_path: Path) -> None:
    db = tmp_path / "var" / "lib" / "wx-gateway" / "gateway.db"
    port = free_port()
    config = _config(tmp_path, db, port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        umask=0o022,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        _login(url)  # a session key is now on disk, in the WAL
        modes = {path.name: mode(path) for path in store_files(db)}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert modes == {"gateway.db": 0o600, "gateway.db-wal": 0o600, "gateway.db-shm": 0o600}
    for directory in (db.parent, db.parent.parent, db.parent.parent.parent):
        assert mode(directory) == 0o700, directory
    assert WARNING not in err.decode()


def test_an_exposed_database_is_reported_once_without_a_secret(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    db.touch()
    db.chmod(0o644)
    port = free_port()
    # Two workers: the warning comes from the supervisor, not once per worker.
    gateway = GatewayProcess(["run", "-c", str(_config(tmp_path, db, port, workers=2))])
    try:
        wait_healthy(f"http://127.0.0.1:{port}", gateway.proc)
    finally:
        output = gateway.output()
    warnings = [line for line in output.splitlines() if WARNING in line]
    assert len(warnings) == 1, output
    assert f"{db} (-rw-r--r--)" in warnings[0]
    assert mode(db) == 0o644  # reported, not changed
    assert TOKEN_SECRET not in output and WECHAT_SECRET not in output
