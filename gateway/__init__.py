"""wx-gateway: a reverse-proxy auth gateway for WeChat mini programs."""

__version__ = "0.1.0"
