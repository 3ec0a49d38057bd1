"""Configuration: the frozen model, its units, the strict loader, and the one
list of the paths the gateway serves itself (``reserved``).

The loader reports every problem of a file in one run, each prefixed with its
key path. May import: the standard library, PyYAML, cryptography (assertion
keys are read and checked at load), and :mod:`gateway.proxy.paths` (a leaf
module: a route prefix must be a path in the form the router compares).
Nothing here runs per request.
"""

from gateway.config.loader import ConfigError, build_config, load_config
from gateway.config.model import (
    AppConfig,
    AssertionConfig,
    AssertionKey,
    Config,
    IdentityConfig,
    RateLimitsConfig,
    RouteConfig,
    Secret,
    ServerConfig,
    StorageConfig,
    TokenConfig,
    UpstreamTLSConfig,
    WechatConfig,
)
from gateway.config.units import Rate

__all__ = [
    "AppConfig",
    "AssertionConfig",
    "AssertionKey",
    "Config",
    "ConfigError",
    "IdentityConfig",
    "Rate",
    "RateLimitsConfig",
    "RouteConfig",
    "Secret",
    "ServerConfig",
    "StorageConfig",
    "TokenConfig",
    "UpstreamTLSConfig",
    "WechatConfig",
    "build_config",
    "load_config",
]
