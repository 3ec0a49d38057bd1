"""The build backend: setuptools', asking for what compiling needs only when it compiles.

setup.py compiles the request path with mypyc where it can. mypyc type-checks
the modules it compiles and follows their imports, so the build environment
must hold the packages they import (and PyYAML's type stubs); pip builds in
an isolated environment that holds only what the backend asks for. This asks
for mypy (pinned: the generated C follows its version), the project's own
dependencies and types-PyYAML when the build will compile, and for nothing
more when it will not (``WXGW_COMPILE=0``, or no C compiler).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every hook not redefined here)

MYPY = "mypy==2.4.1"
STUBS = ["types-PyYAML"]


def will_compile() -> bool:
    """``WXGW_COMPILE``: ``auto`` (default: when a C compiler is found), ``1``
    (compile or fail), ``0`` (never)."""
    mode = os.environ.get("WXGW_COMPILE", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"WXGW_COMPILE must be auto, 0 or 1, not {mode!r}")
    if mode == "0":
        return False
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    if cc and shutil.which(cc[0]):
        return True
    if mode == "1":
        raise SystemExit("WXGW_COMPILE=1 but no C compiler was found")
    return False


def _for_compiling() -> list[str]:
    if not will_compile():
        return []
    project = tomllib.loads(Path(__file__).with_name("pyproject.toml").read_text())["project"]
    return [MYPY, *STUBS, *project["dependencies"]]


# setuptools runs setup.py to list its own requirements, before any of the
# above is installed: setup.py must not compile then.
PLANNING = "WXGW_BUILD_PLANNING"


def _planning(hook: Any, config_settings: dict[str, Any] | None) -> list[str]:
    os.environ[PLANNING] = "1"
    try:
        return [*hook(config_settings), *_for_compiling()]
    finally:
        del os.environ[PLANNING]


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    return _planning(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    return _planning(_setuptools.get_requires_for_build_editable, config_settings)
