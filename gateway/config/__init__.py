"""Configuration: the frozen model, its units, and the strict loader."""

from gateway.config.loader import ConfigError, build_config, load_config
from gateway.config.model import (
    Config,
    IdentityConfig,
    RateLimitsConfig,
    RouteConfig,
    Secret,
    ServerConfig,
    StorageConfig,
    TokenConfig,
    WechatConfig,
)
from gateway.config.units import Rate

__all__ = [
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
    "WechatConfig",
    "build_config",
    "load_config",
]
