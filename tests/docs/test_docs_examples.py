"""What the pages show a reader is true of the code: the config examples load,
the OpenAPI document lists every error code, every test a page cites exists, and
the `gateway users` section covers the command's options and exit codes."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from typing import Any

import yaml

from gateway import errors
from gateway.config import Config, build_config
from tests.support import ROOT

DOCS = ROOT / "docs"


def error_codes() -> set[str]:
    return {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.GatewayError) and "code" in vars(cls)
    }


def section(page: str, heading: str) -> str:
    """The text under a `## heading` of a page, up to the next `## `."""
    text = (DOCS / page).read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/{page} has no section {heading!r}"
    return match.group(1)


def env_for(text: str) -> dict[str, str]:
    """A value for every ${VAR} of an example: an appid-shaped one for *APPID,
    a long enough secret for the rest (a token key needs 32 bytes)."""
    env = {}
    for name in set(re.findall(r"\$\{(\w+)", text)):
        digest = hashlib.sha256(name.encode()).hexdigest()
        env[name] = "wx" + digest[:16] if name.endswith("APPID") else digest
    return env


def load(text: str) -> Config:
    return build_config(yaml.safe_load(text), env_for(text))


def test_every_configuration_example_is_a_valid_config() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", (DOCS / "configuration.md").read_text(), re.S)
    whole = [b for b in blocks if re.search(r"^wechat:", b, re.M)]
    assert len(whole) >= 2, "the production and the two-app examples"
    for block in whole:
        load(block)  # raises ConfigError, naming every problem


def test_the_two_app_example_is_what_its_prose_says() -> None:
    text = section("configuration.md", "Two mini programs")
    config = load(re.findall(r"```yaml\n(.*?)```", text, re.S)[0])
    names = [app.name for app in config.wechat.apps]
    assert names == ["shop", "card"]  # the app that was there before stays first
    by_prefix = {route.prefix: route.apps for route in config.routes}
    shop, card = (app.appid for app in config.wechat.apps)
    assert by_prefix["/shop/"] == frozenset({shop})
    assert by_prefix["/card/"] == frozenset({card})
    assert by_prefix["/api/"] is None  # every app
    assert config.identity.phone_header is None  # off, as the page recommends


def test_the_quickstart_two_app_config_is_valid() -> None:
    text = section("quickstart.md", "Several mini programs")
    match = re.search(r"<<'YAML'\n(.*?)^YAML$", text, re.S | re.M)
    assert match, "the quickstart writes its config with a heredoc"
    config = load(match.group(1))
    appids = [app.appid for app in config.wechat.apps]
    assert appids == ["wxshop0000000001", "wxcard0000000002"]
    assert config.wechat.fake
    # Every appid the curl lines log in with is configured; "shop" (a name) is
    # shown as the unknown_app example.
    sent = set(re.findall(r'"appid": "(\w+)"', text))
    assert sent - set(appids) == {"shop"}


def test_openapi_lists_every_error_code() -> None:
    spec: dict[str, Any] = yaml.safe_load((DOCS / "openapi.yaml").read_text())
    documented = set(spec["components"]["schemas"]["Error"]["properties"]["error"]["enum"])
    assert documented == error_codes()


def test_openapi_login_takes_an_appid_and_verify_returns_x_appid() -> None:
    spec: dict[str, Any] = yaml.safe_load((DOCS / "openapi.yaml").read_text())
    login = spec["components"]["schemas"]["LoginRequest"]
    assert login["required"] == ["code"]  # appid is optional with one app
    assert "appid" in login["properties"]
    verified = spec["components"]["responses"]["Verified"]["headers"]
    assert "X-AppId" in verified


def test_every_test_a_page_cites_exists() -> None:
    cited = 0
    for page in sorted(DOCS.glob("*.md")):
        for path, name in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", page.read_text()):
            cited += 1
            source = ROOT / path
            assert source.is_file(), f"docs/{page.name} cites {path}, which does not exist"
            pattern = rf"^(async )?def {name}\b"
            assert re.search(pattern, source.read_text(), re.M), (
                f"docs/{page.name} cites {path}::{name}, which does not exist"
            )
    assert cited > 50


def test_gateway_users_options_and_exit_codes_are_documented() -> None:
    text = section("deployment.md", "`gateway users`: show and revoke")
    for command in ("show", "revoke"):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "users", command, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", result.stdout)) - {"--help"}
        assert {"--config", "--appid", "--openid", "--unionid"} <= options, result.stdout
        for option in options - {"--config"}:  # -c is written short on the page
            assert f"`{option}" in text or f"{option} " in text, f"{command} {option}"
        assert f"gateway users {command}" in text
    exits = dict(re.findall(r"^\| (\d) \| (.+?) \|$", text, re.M))
    assert set(exits) == {"0", "1", "2"}
    assert "no such user" in exits["1"]
    assert "session_key" in text  # the page says it is never printed
