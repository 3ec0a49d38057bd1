"""Compiled or pure: which form of the request path modules a process runs.

setup.py compiles the request path with mypyc when it can, and the extension
modules sit beside their ``.py`` sources; Python's import system prefers the
extension. Two things follow, handled here at package import:

- the pure-Python fallback must stay tested where compiled modules exist, so
  ``GATEWAY_PURE_PYTHON=1`` puts a finder first that loads ``gateway.*`` from
  source only (scripts/test runs the request path's tests that way);
- in a development checkout (an editable install builds the extensions in the
  tree), editing a compiled module's source would leave the old compiled code
  running: such a module is refused with the command that rebuilds it.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType


class _SourceOnly(MetaPathFinder):
    """Finds ``gateway`` submodules among ``.py`` files only."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if not fullname.startswith("gateway.") or not path:
            return None
        for entry in path:
            finder = importlib.machinery.FileFinder(
                entry,
                (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
            )
            spec = finder.find_spec(fullname, target)
            if spec is not None:
                return spec
        return None


def use_pure_python() -> None:
    if not any(isinstance(finder, _SourceOnly) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourceOnly())


def compiled() -> bool:
    """Whether this process runs the compiled request path."""
    from gateway.server import protocol

    return not protocol.__file__.endswith(".py") if protocol.__file__ else False


def check_compiled(package_dir: str) -> None:
    # The compiled code of every module is in one library (setup.py's group,
    # ``_native__mypyc``); each module's own extension is a small shim into
    # it, which a rebuild may leave untouched. So sources are compared with
    # the library.
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    shims: list[str] = []
    built = 0.0
    for root, _, files in os.walk(package_dir):
        for name in files:
            if not name.endswith(suffixes):
                continue
            path = os.path.join(root, name)
            if name.split(".", 1)[0].endswith("__mypyc"):
                built = max(built, os.stat(path).st_mtime)
            else:
                shims.append(path)
    if not built:
        return
    for shim in shims:
        source = shim.split(".", 1)[0] + ".py"
        try:
            stale = os.stat(source).st_mtime > built
        except OSError:
            continue
        if stale:
            raise ImportError(
                f"{source} changed after it was compiled: run `pip install -e .` again "
                "(or `WXGW_COMPILE=0 pip install -e .` for pure Python), or set "
                "GATEWAY_PURE_PYTHON=1"
            )
