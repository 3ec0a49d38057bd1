"""wx-gateway: a reverse-proxy auth gateway for WeChat mini programs."""

from __future__ import annotations

import os

from gateway._compiled import check_compiled, use_pure_python

# The one place the version is written: pyproject.toml reads it from here
# (``[tool.setuptools.dynamic]``), and ``gateway --version`` prints it.
__version__ = "0.1.0"

# The request path may be compiled (setup.py): GATEWAY_PURE_PYTHON=1 runs the
# .py sources instead, and compiled modules older than their source refuse to
# load rather than run code that is no longer in the tree.
if os.environ.get("GATEWAY_PURE_PYTHON") == "1":
    use_pure_python()
else:
    check_compiled(os.path.dirname(__file__))
