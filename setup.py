"""Build: the request path compiled with mypyc where a C compiler is at hand.

Everything else about the package is in pyproject.toml; this file only adds
the compiled modules. Why compile: the proxy path is CPU-bound Python, and
mypyc turns these modules (mypy-strict clean already) into C extensions that
run the same source with fewer instructions per request (docs/performance.md,
"Compiling the request path"). The ``.py`` files stay in the package: where
nothing was compiled (no compiler, ``WXGW_COMPILE=0``) they are what runs, and
``GATEWAY_PURE_PYTHON=1`` makes an installed tree run them even beside the
compiled ones (gateway/__init__.py).

``WXGW_COMPILE``: ``auto`` (default: compile when a C compiler is found),
``1`` (compile or fail), ``0`` (never compile); build_backend.py decides, and
asks pip for what compiling needs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

# pip imports the backend from backend-path, but runs this file with the
# project directory off sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_backend import PLANNING, will_compile

# The modules a proxied request runs through, in the order it meets them.
COMPILED = [
    "gateway/server/flow.py",
    "gateway/server/protocol.py",
    "gateway/server/request.py",
    "gateway/server/batching.py",
    "gateway/server/framing.py",
    "gateway/app.py",
    "gateway/proxy/paths.py",
    "gateway/config/reserved.py",
    "gateway/proxy/routing.py",
    "gateway/auth/tokens.py",
    "gateway/auth/revocations.py",
    "gateway/auth/identity.py",
    "gateway/proxy/websocket.py",
    "gateway/proxy/headers.py",
    "gateway/proxy/forward.py",
    "gateway/proxy/pool.py",
    "gateway/observability/metrics.py",
    "gateway/observability/accesslog.py",
]


def _ext_modules() -> list[object]:
    if os.environ.get(PLANNING) or not will_compile():
        return []
    from mypyc.build import mypycify  # build_backend.py asked for mypy

    # group_name: mypyc's shared runtime library becomes gateway._native__mypyc,
    # inside the package, rather than a top-level module named after a hash,
    # which an editable install would not put on the path. debug_level 0: no
    # debug info, which would embed the build directory's path and make two
    # builds of one source differ.
    return list(
        mypycify(COMPILED, opt_level="3", debug_level="0", group_name="gateway._native")
    )


setup(ext_modules=_ext_modules())
