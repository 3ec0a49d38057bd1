"""The configuration reference documents every key the loader accepts, and every
error code the gateway can send."""

from __future__ import annotations

import dataclasses
import re

from gateway import errors
from gateway.config import model
from tests.support import ROOT

DOC = (ROOT / "docs" / "configuration.md").read_text()
SECTIONS = {
    "server": model.ServerConfig,
    "wechat": model.WechatConfig,
    "token": model.TokenConfig,
    "storage": model.StorageConfig,
    "identity": model.IdentityConfig,
    "rate_limits": model.RateLimitsConfig,
    "routes": model.RouteConfig,
    "log": model.LogConfig,
    "upstream_tls": model.UpstreamTLSConfig,
}
YAML_NAMES = {"upstreams": "upstream"}


def section_text(name: str) -> str:
    match = re.search(rf"^## `{name}`\n(.*?)(?=^## )", DOC, re.S | re.M)
    assert match, f"docs/configuration.md has no section for {name}"
    return match.group(1)


def test_every_config_key_is_documented_in_its_section() -> None:
    assert {f.name for f in dataclasses.fields(model.Config)} == set(SECTIONS)
    for section, cls in SECTIONS.items():
        text = section_text(section)
        for field in dataclasses.fields(cls):
            if not field.repr:
                continue  # built at load (an SSL context), not a YAML key
            key = YAML_NAMES.get(field.name, field.name)
            assert f"| `{key}` |" in text, f"{section}.{key} is not documented"


def test_every_error_code_is_documented() -> None:
    codes = {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.GatewayError) and "code" in vars(cls)
    }
    assert len(codes) > 15
    for code in codes:
        assert f"| `{code}` |" in DOC, f"error code {code} is not documented"
