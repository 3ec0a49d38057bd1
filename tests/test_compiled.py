"""The request path compiled with mypyc (setup.py), and its pure-Python fallback.

scripts/test runs the whole suite on whatever the install built, then the
request path's own tests again with ``GATEWAY_PURE_PYTHON=1``: both forms are
tested. These check the switch itself, and that CI (which has a C compiler)
really tests the compiled form.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from build_backend import will_compile
from gateway._compiled import check_compiled

ROOT = Path(__file__).resolve().parent.parent
COMPILED = [line.strip().strip('",') for line in (ROOT / "setup.py").read_text().splitlines()]
COMPILED = [name for name in COMPILED if name.startswith("gateway/") and name.endswith(".py")]


def _module_files(env: dict[str, str]) -> dict[str, str]:
    """Where each compiled-list module is loaded from, in a fresh interpreter."""
    modules = [name[:-3].replace("/", ".") for name in COMPILED]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    print(name, importlib.import_module(name).__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_the_list_names_the_request_path() -> None:
    assert "gateway/server/protocol.py" in COMPILED
    assert "gateway/proxy/pool.py" in COMPILED
    assert all((ROOT / name).is_file() for name in COMPILED)


def test_pure_python_runs_the_sources() -> None:
    env = {**os.environ, "GATEWAY_PURE_PYTHON": "1"}
    files = _module_files(env)
    assert len(files) == len(COMPILED)
    assert all(path.endswith(".py") for path in files.values()), files


def test_the_install_compiled_what_it_could() -> None:
    """Where the build would compile (a C compiler, WXGW_COMPILE not 0: CI has
    gcc), every listed module loads compiled, not a mix nobody ships; where it
    would not, every one runs from source."""
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_PURE_PYTHON"}
    files = _module_files(env)
    built = [path for path in files.values() if not path.endswith(".py")]
    if will_compile():
        assert len(built) == len(COMPILED), (
            "a C compiler is here but the install did not compile every module: "
            f"run `pip install -e .` again ({files})"
        )
    else:
        assert built == [], files


def test_a_stale_compiled_module_is_refused(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    source = package / "mod.py"
    shim = package / "mod.cpython-311-x86_64-linux-gnu.so"
    library = tmp_path / "_native__mypyc.cpython-311-x86_64-linux-gnu.so"
    source.write_text("x = 1\n")
    shim.write_bytes(b"")
    past = time.time() - 60
    os.utime(source, (past, past))
    os.utime(shim, (past - 60, past - 60))  # a rebuild may leave a module's shim as it was
    check_compiled(str(tmp_path))  # no library: nothing compiled to compare
    library.write_bytes(b"")
    os.utime(library, (past + 30, past + 30))
    check_compiled(str(tmp_path))  # the library was built after the source: fine
    os.utime(source, (past + 45, past + 45))  # the source edited since
    with pytest.raises(ImportError, match=r"mod\.py changed after it was compiled"):
        check_compiled(str(tmp_path))
