"""Configuration: strict loading, interpolation, units, every problem at once."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, Rate, build_config, load_config
from gateway.config.units import parse_duration, parse_rate, parse_size
from tests.support import ROOT

SECRET = "s" * 32


def minimal(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "wechat": {"appid": "wxapp", "secret": "wechat-secret"},
        "token": {"secret": SECRET},
    }
    raw.update(extra)
    return raw


def problems(raw: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_config(raw, env=env or {})
    return info.value.problems


def test_minimal_config_gets_documented_defaults() -> None:
    cfg = build_config(minimal(), env={})
    assert (cfg.server.host, cfg.server.port, cfg.server.workers) == ("0.0.0.0", 8080, 1)
    assert cfg.server.max_body == 10 * 1024 * 1024
    assert cfg.server.shutdown_grace == 10
    assert cfg.server.upstream_idle_timeout == 4
    assert cfg.server.drain_delay == 1
    assert cfg.wechat.api_base == "https://api.weixin.qq.com"
    assert cfg.wechat.timeout == 5 and cfg.wechat.fake is False
    assert cfg.token.ttl == 7200 and cfg.token.header == "Authorization"
    assert cfg.token.issuer == "wx-gateway" and cfg.token.leeway == 0
    assert cfg.storage.url == "sqlite:///./gateway.db"
    assert cfg.identity.openid_header == "X-OpenId"
    assert cfg.rate_limits.login_per_ip == Rate(20, 1.0)
    assert cfg.routes == ()


def test_config_tree_is_frozen() -> None:
    cfg = build_config(minimal(), env={})
    with pytest.raises(AttributeError):
        cfg.server.port = 1  # type: ignore[misc]


def test_every_contract_key_is_accepted() -> None:
    raw = {
        "server": {
            "host": "127.0.0.1",
            "port": 9090,
            "workers": 2,
            "max_body": "10MiB",
            "trusted_proxies": ["10.0.0.0/8", "::1"],
            "shutdown_grace": "10s",
        },
        "wechat": {
            "appid": "wxapp",
            "secret": "x",
            "api_base": "https://api.weixin.qq.com",
            "timeout": "5s",
            "fake": False,
        },
        "token": {
            "secret": SECRET,
            "previous_secrets": ["p" * 40],
            "ttl": "2h",
            "header": "Authorization",
            "issuer": "wx-gateway",
            "leeway": "0s",
        },
        "storage": {"url": "sqlite:///./gateway.db"},
        "identity": {"openid_header": "X-OpenId", "unionid_header": "X-UnionId"},
        "rate_limits": {"login_per_ip": "20/s"},
        "routes": [
            {
                "prefix": "/api/",
                "upstream": ["http://127.0.0.1:9000", "http://127.0.0.1:9001"],
                "auth": "required",
                "strip_prefix": False,
                "timeout": "30s",
                "max_body": "50MiB",
                "websocket": True,
                "rate_limit": "100/s",
            }
        ],
    }
    cfg = build_config(raw, env={})
    route = cfg.routes[0]
    assert route.upstreams == ("http://127.0.0.1:9000", "http://127.0.0.1:9001")
    assert route.max_body == 50 * 1024**2 and route.rate_limit == Rate(100, 1.0)
    assert cfg.token.previous_secrets[0].reveal() == "p" * 40
    assert len(cfg.server.trusted_proxies) == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (5, 5.0),
        (1.5, 1.5),
        ("500ms", 0.5),
        ("5s", 5.0),
        ("2m", 120.0),
        ("2h", 7200.0),
        ("30d", 2592000.0),
        ("7", 7.0),
    ],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "abc", True, -1, "", None, [1]])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1024, 1024),
        ("512KiB", 512 * 1024),
        ("10MiB", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("100", 100),
    ],
)
def test_sizes(text: Any, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["10 parsecs", "MiB", True, 1.5, -5])
def test_bad_sizes(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_rates() -> None:
    assert parse_rate("20/s") == Rate(20, 1.0)
    assert parse_rate("100/m") == Rate(100, 60.0)
    assert parse_rate(0) is None and parse_rate("0/s") is None
    with pytest.raises(ValueError):
        parse_rate("fast")


def test_interpolation_with_defaults_and_escapes() -> None:
    raw = minimal(server={"host": "${HOST}", "port": "${PORT:-8181}"})
    raw["wechat"]["appid"] = "pre-${APPID}-post"
    raw["wechat"]["api_base"] = "http://127.0.0.1:${WXPORT:-1}"
    raw["token"]["issuer"] = "$${NOT_A_VAR}"
    cfg = build_config(raw, env={"HOST": "127.0.0.2", "APPID": "wxabc", "WXPORT": "7"})
    assert cfg.server.host == "127.0.0.2"
    assert cfg.server.port == 8181
    assert cfg.wechat.default_app.appid == "pre-wxabc-post"
    assert cfg.wechat.api_base == "http://127.0.0.1:7"
    assert cfg.token.issuer == "${NOT_A_VAR}"


def test_unset_variable_is_an_error_naming_it() -> None:
    raw = minimal()
    raw["token"]["secret"] = "${GATEWAY_TOKEN_SECRET}"
    assert problems(raw) == [
        "token.secret: environment variable GATEWAY_TOKEN_SECRET is not set (and has no :-default)"
    ]


def test_all_problems_reported_at_once_with_paths() -> None:
    raw = minimal(
        server={"port": "eighty", "workerz": 2},
        routes=[
            {"prefix": "/ok/", "upstream": "http://127.0.0.1:1"},
            {"prefix": "api", "upstream": "http://127.0.0.1:1", "auth": "sometimes"},
            {"prefix": "/x/", "upstream": "not a url", "timeout": "soon"},
        ],
    )
    raw["token"]["ttl"] = "forever"
    found = problems(raw)
    assert "server.port: must be an integer" in found
    assert any(p.startswith("server.workerz: unknown key") and "'workers'" in p for p in found)
    assert "routes[1].prefix: 'api' must start with /" in found
    assert "routes[1].auth: 'sometimes' is not one of required, optional, public" in found
    assert any(p.startswith("routes[2].upstream: ") and "not a URL" in p for p in found)
    assert any(p.startswith("routes[2].timeout: ") for p in found)
    assert any(p.startswith("token.ttl: ") for p in found)
    assert len(found) == 7


def test_each_bad_list_item_is_its_own_line_under_its_own_path() -> None:
    raw = minimal(
        server={"trusted_proxies": ["10.0.0.0/8", "nope", "10.0.0.0/33"]},
        routes=[{"prefix": "/a/", "upstream": ["http://h:1", "ftp://x", "http://h:2", "y"]}],
    )
    found = problems(raw)
    assert found == [
        "server.trusted_proxies[1]: 'nope' is not an IP address or CIDR",
        "server.trusted_proxies[2]: '10.0.0.0/33' is not an IP address or CIDR",
        "routes[0].upstream[1]: 'ftp://x' is not a URL (want http:// or https:// with a host)",
        "routes[0].upstream[3]: 'y' is not a URL (want http:// or https:// with a host)",
    ], found


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r.update(extra={}), "extra: unknown key"),
        (lambda r: r["token"].update(secret="short"), "token.secret: must be at least 32 bytes"),
        (
            lambda r: r["token"].update(previous_secrets=["short"]),
            "token.previous_secrets[0]: must be at least 32 bytes",
        ),
        (
            lambda r: r["token"].update(header="Bad Header"),
            "token.header: 'Bad Header' is not a valid HTTP header name",
        ),
        (lambda r: r["wechat"].pop("appid"), "wechat.appid: required"),
        (lambda r: r["wechat"].update(fake="maybe"), "wechat.fake: must be true or false"),
        (
            lambda r: r.update(server={"trusted_proxies": ["10.0.0.0/33"]}),
            "server.trusted_proxies[0]: '10.0.0.0/33' is not an IP address or CIDR",
        ),
        (lambda r: r.update(server={"workers": 0}), "server.workers: must be between 1 and 256"),
        (
            lambda r: r.update(server={"upstream_idle_timeout": 0}),
            "server.upstream_idle_timeout: must be greater than 0",
        ),
        (
            lambda r: r.update(storage={"url": "postgres://x"}),
            "storage.url: 'postgres://x': the URL must start with sqlite://, redis://",
        ),
        (
            lambda r: r.update(rate_limits={"login_per_ip": "lots"}),
            "rate_limits.login_per_ip: not a rate",
        ),
        (
            lambda r: r.update(routes=[{"prefix": "/a/../b/", "upstream": "http://h"}]),
            "routes[0].prefix: '/a/../b/' is not a normalised path",
        ),
        (
            lambda r: r.update(routes=[{"prefix": "/a/", "upstream": []}]),
            "routes[0].upstream: must name at least one URL",
        ),
        (
            lambda r: r.update(routes=[{"prefix": "/a/", "upstream": "ftp://h"}]),
            "routes[0].upstream: 'ftp://h' is not a URL",
        ),
        (
            lambda r: r.update(
                routes=[{"prefix": "/a/", "upstream": "http://h", "rate_limit": "x"}]
            ),
            "routes[0].rate_limit: not a rate",
        ),
        (
            lambda r: r.update(
                routes=[
                    {"prefix": "/a/", "upstream": "http://h"},
                    {"prefix": "/a/", "upstream": "http://h"},
                ]
            ),
            "routes[1].prefix: '/a/' already used by routes[0]",
        ),
        (
            lambda r: r.update(routes=[{"prefix": "/auth/", "upstream": "http://h"}]),
            "routes[0].prefix: '/auth/' is served by the gateway itself",
        ),
        (lambda r: r.update(routes={"prefix": "/"}), "routes: must be a list"),
        (lambda r: r.update(server=[1]), "server: must be a mapping"),
    ],
)
def test_each_problem_has_a_clear_line(mutate: Any, expected: str) -> None:
    raw = minimal()
    mutate(raw)
    found = problems(raw)
    assert any(p.startswith(expected) for p in found), found


def test_secrets_never_in_messages_or_repr() -> None:
    wechat_secret = "wechat-very-secret-value"
    raw = minimal()
    raw["wechat"]["secret"] = wechat_secret
    raw["token"]["secret"] = SECRET
    cfg = build_config(raw, env={})
    assert wechat_secret not in repr(cfg) and SECRET not in repr(cfg)
    assert wechat_secret not in str(cfg.wechat.default_app.secret)
    raw["token"]["secret"] = "tooshort-secret"
    raw["token"]["previous_secrets"] = ["also-short-secret"]
    found = "\n".join(problems(raw))
    assert "tooshort-secret" not in found and "also-short-secret" not in found
    assert "token.secret" in found


def test_upstream_credentials_are_masked() -> None:
    raw = minimal(routes=[{"prefix": "/a/", "upstream": "http://user:hunter2@h:9"}])
    found = "\n".join(problems(raw))
    assert "hunter2" not in found and "credentials" in found


def test_yaml_duplicate_keys_and_syntax_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  port: 1\n  port: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "duplicate key 'port'" in info.value.problems[0]
    path.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "invalid YAML" in info.value.problems[0] and "line" in info.value.problems[0]
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "missing.yaml"))
    assert "cannot read" in info.value.problems[0]


def test_shipped_config_is_valid_without_any_environment() -> None:
    cfg = load_config(str(ROOT / "config.yaml"), env={})
    assert cfg.wechat.fake is True
    assert cfg.routes and all(r.upstreams for r in cfg.routes)


@pytest.mark.parametrize(("value", "expected"), [(64, 64), ("/56", 56), ("128", 128), (1, 1)])
def test_ipv6_prefix(value: object, expected: int) -> None:
    cfg = build_config(minimal(rate_limits={"ipv6_prefix": value}), env={})
    assert cfg.rate_limits.ipv6_prefix == expected
    assert build_config(minimal(), env={}).rate_limits.ipv6_prefix == 64


@pytest.mark.parametrize("value", [0, 129, "x", True, 1.5, -64])
def test_ipv6_prefix_refused(value: object) -> None:
    assert problems(minimal(rate_limits={"ipv6_prefix": value})) == [
        "rate_limits.ipv6_prefix: must be a prefix length from 1 to 128"
    ]


def test_websocket_keys_have_documented_defaults_and_parse() -> None:
    cfg = build_config(minimal(), env={})
    assert cfg.server.websocket_idle_timeout == 300
    assert cfg.server.websocket_max_message == 1024 * 1024
    cfg = build_config(
        minimal(server={"websocket_idle_timeout": "90s", "websocket_max_message": "64KiB"}), env={}
    )
    assert cfg.server.websocket_idle_timeout == 90
    assert cfg.server.websocket_max_message == 64 * 1024


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ({"websocket_idle_timeout": 0}, "server.websocket_idle_timeout: must be greater than 0"),
        ({"websocket_idle_timeout": "soon"}, "server.websocket_idle_timeout: "),
        ({"websocket_max_message": 0}, "server.websocket_max_message: must be greater than 0"),
        ({"websocket_max_message": "1 lot"}, "server.websocket_max_message: "),
        ({"websocket_max_msg": "1MiB"}, "server.websocket_max_msg: unknown key"),
    ],
)
def test_websocket_keys_are_validated(server: dict[str, Any], expected: str) -> None:
    found = problems(minimal(server=server))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_references_inside_a_flow_mapping_load_as_the_contract_writes_them(
    tmp_path: Path,
) -> None:
    # Contract section 9 writes `- {appid: ${SHOP_APPID}, ...}`: in a YAML flow
    # mapping `{` is syntax, so the references are shielded while parsing and
    # still resolved as values afterwards (a value never becomes YAML).
    path = tmp_path / "apps.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            wechat:
              apps:
                - {appid: ${SHOP_APPID}, secret: ${SHOP_SECRET}, name: shop}
                - {appid: ${CARD_APPID:-wxcard}, secret: "${CARD_SECRET}", name: card}
            token: {secret: "$${not-a-reference}-0123456789abcdef0123456789abcdef"}
            routes:
              - {prefix: /shop/, upstream: "http://127.0.0.1:9001", apps: [shop]}
            """
        )
    )
    env = {"SHOP_APPID": "wxshop", "SHOP_SECRET": "a, b: {c}", "CARD_SECRET": "s2"}
    cfg = load_config(str(path), env=env)
    assert [(a.appid, a.name) for a in cfg.wechat.apps] == [("wxshop", "shop"), ("wxcard", "card")]
    assert cfg.wechat.apps[0].secret.reveal() == "a, b: {c}"  # a value, not YAML
    assert cfg.token.secret.reveal().startswith("${not-a-reference}")
    assert cfg.routes[0].apps == frozenset({"wxshop"})
    with pytest.raises(ConfigError) as err:
        load_config(str(path), env={"SHOP_APPID": "wxshop", "CARD_SECRET": "s2"})
    assert err.value.problems == [
        "wechat.apps[0].secret: environment variable SHOP_SECRET is not set (and has no :-default)"
    ]
