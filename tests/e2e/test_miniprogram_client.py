"""The mini-program client library (clients/miniprogram): its own Node test suite,
run against a real gateway that the suite starts with this interpreter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "miniprogram"


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=CLIENT,
        env={**os.environ, "GATEWAY_PYTHON": sys.executable, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _text(output: object) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output if isinstance(output, str) else ""


def test_miniprogram_client_suite() -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed to test clients/miniprogram (Node 20 or newer)")
    install = ["ci"] if (CLIENT / "package-lock.json").exists() else ["install"]
    for args, timeout in (([npm, *install, "--no-audit", "--no-fund"], 120), ([npm, "test"], 90)):
        try:
            done = _run(args, timeout)
        except subprocess.TimeoutExpired as exc:
            partial = [_text(exc.stdout), _text(exc.stderr)]
            pytest.fail(
                f"npm {' '.join(args[1:])} timed out after {timeout} s:\n{''.join(partial)}"
            )
        if done.returncode != 0:
            print(done.stdout)
            print(done.stderr, file=sys.stderr)
            pytest.fail(
                f"npm {' '.join(args[1:])} exited with {done.returncode}:\n"
                f"{done.stdout[-20000:]}\n{done.stderr[-5000:]}"
            )
