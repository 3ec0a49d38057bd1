"""wx-gateway: a reverse-proxy auth gateway for WeChat mini programs."""

# The one place the version is written: pyproject.toml reads it from here
# (``[tool.setuptools.dynamic]``), and ``gateway --version`` prints it.
__version__ = "0.1.0"
