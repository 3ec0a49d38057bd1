"""Several mini programs in the config (contract section 9): `wechat.apps`, a
route's `apps`, the identity headers that come with them, and `gateway check`.

Both forms of `wechat` stay valid: `appid`/`secret` is one app without a name,
`apps` is a list of `{appid, secret, name}`, the first being the default app.
A route's `apps` (names or appids) is resolved to appids at load. Every problem
is reported in one run, each under its path, and no secret ever shows in a
message, a repr or the output of `gateway check`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, build_config
from tests.support import ROOT
from tests.support.secrets import leaks

TOKEN_SECRET = "t" * 40
SHOP, CARD, MALL = "wxshop0000000001", "wxcard0000000002", "wxmall0000000003"
SHOP_SECRET, CARD_SECRET, MALL_SECRET = "shop-secret-6e1f", "card-secret-9a2b", "mall-secret-44c0"
SECRETS = {
    "shop secret": SHOP_SECRET,
    "card secret": CARD_SECRET,
    "mall secret": MALL_SECRET,
    "token secret": TOKEN_SECRET,
}
UP = "http://127.0.0.1:9001"


def app(appid: str, secret: str, name: str | None = None, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"appid": appid, "secret": secret, **extra}
    if name is not None:
        item["name"] = name
    return item


def two_apps() -> list[dict[str, Any]]:
    return [app(SHOP, SHOP_SECRET, "shop"), app(CARD, CARD_SECRET, "card")]


def raw_config(wechat: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    return {
        "wechat": {"apps": two_apps()} if wechat is None else wechat,
        "token": {"secret": TOKEN_SECRET},
        **sections,
    }


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        build_config(raw, env={})
    found = caught.value.problems
    # Whatever went wrong, no secret is echoed back (nor in the exception's text).
    assert leaks("\n".join(found) + str(caught.value), SECRETS) == [], found
    return found


def has(found: list[str], path: str, *fragments: str) -> bool:
    """Whether one problem line is under ``path`` and says each of ``fragments``."""
    return any(line.startswith(path + ":") and all(f in line for f in fragments) for line in found)


def route(prefix: str, **extra: Any) -> dict[str, Any]:
    return {"prefix": prefix, "upstream": UP, **extra}


# -- the two forms -------------------------------------------------------------------


def test_single_app_form_is_one_app_without_a_name() -> None:
    cfg = build_config(raw_config({"appid": SHOP, "secret": SHOP_SECRET}), env={})
    assert len(cfg.wechat.apps) == 1
    only = cfg.wechat.apps[0]
    assert (only.appid, only.name, only.secret.reveal()) == (SHOP, None, SHOP_SECRET)
    assert cfg.wechat.default_app is only
    # A route's `apps` still resolves against the one app (by its appid).
    cfg = build_config(
        raw_config({"appid": SHOP, "secret": SHOP_SECRET}, routes=[route("/a/", apps=[SHOP])]),
        env={},
    )
    assert cfg.routes[0].apps == frozenset({SHOP})


def test_apps_list_keeps_its_order_and_the_first_is_the_default() -> None:
    apps = [app(CARD, CARD_SECRET, "card"), app(SHOP, SHOP_SECRET), app(MALL, MALL_SECRET, "mall")]
    cfg = build_config(raw_config({"apps": apps}), env={})
    assert [(a.appid, a.name) for a in cfg.wechat.apps] == [
        (CARD, "card"),
        (SHOP, None),
        (MALL, "mall"),
    ]
    assert cfg.wechat.default_app.appid == CARD
    assert [a.secret.reveal() for a in cfg.wechat.apps] == [CARD_SECRET, SHOP_SECRET, MALL_SECRET]
    found = cfg.wechat.app(MALL)
    assert found is not None and found.name == "mall"
    assert cfg.wechat.app("wxnotconfigured") is None
    # An app is looked up by appid only: a name is not an appid.
    assert cfg.wechat.app("mall") is None


def test_apps_sit_beside_the_other_wechat_keys() -> None:
    wechat = {"apps": two_apps(), "api_base": "http://127.0.0.1:8081", "timeout": "3s"}
    cfg = build_config(raw_config(wechat), env={})
    assert cfg.wechat.api_base == "http://127.0.0.1:8081" and cfg.wechat.timeout == 3
    assert [a.appid for a in cfg.wechat.apps] == [SHOP, CARD]


# -- what is refused -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("wechat", "path", "fragments"),
    [
        pytest.param(
            {"apps": two_apps(), "appid": SHOP, "secret": SHOP_SECRET},
            "wechat.appid",
            ("either appid/secret or apps",),
            id="both-forms",
        ),
        pytest.param(
            {"apps": two_apps(), "secret": SHOP_SECRET},
            "wechat.secret",
            ("either appid/secret or apps",),
            id="apps-and-a-stray-secret",
        ),
        pytest.param({"apps": []}, "wechat.apps", ("non-empty list",), id="empty-list"),
        pytest.param({"apps": {"appid": SHOP}}, "wechat.apps", ("list",), id="not-a-list"),
        pytest.param({"apps": [app(SHOP, SHOP_SECRET), {"appid": CARD}]},
                     "wechat.apps[1].secret", ("required",), id="missing-secret"),
        pytest.param({"apps": [{"secret": SHOP_SECRET}]},
                     "wechat.apps[0].appid", ("required",), id="missing-appid"),
        pytest.param({"apps": [app(SHOP, "")]},
                     "wechat.apps[0].secret", ("empty",), id="empty-secret"),
        pytest.param({"apps": ["wxshop"]}, "wechat.apps[0]", ("mapping",), id="item-not-a-mapping"),
        pytest.param({"apps": [app("wx shop/1", SHOP_SECRET)]},
                     "wechat.apps[0].appid", ("not an appid",), id="appid-with-space-and-slash"),
        pytest.param({"apps": [app("wx\r\nX-Evil: 1", SHOP_SECRET)]},
                     "wechat.apps[0].appid", ("not an appid",), id="appid-with-crlf"),
        pytest.param({"apps": [app("wx" + "0" * 63, SHOP_SECRET)]},
                     "wechat.apps[0].appid", ("not an appid",), id="appid-65-chars"),
        pytest.param({"apps": [app(SHOP, SHOP_SECRET, "my shop")]},
                     "wechat.apps[0].name", ("not a name",), id="name-with-space"),
        pytest.param({"apps": [app(SHOP, SHOP_SECRET), app(SHOP, CARD_SECRET)]},
                     "wechat.apps[1]", (repr(SHOP), "wechat.apps[0]"), id="duplicate-appid"),
        pytest.param({"apps": [app(SHOP, SHOP_SECRET, "x"), app(CARD, CARD_SECRET, "x")]},
                     "wechat.apps[1]", ("'x'", "wechat.apps[0]"), id="duplicate-name"),
        pytest.param({"apps": [app(SHOP, SHOP_SECRET), app(CARD, CARD_SECRET, SHOP)]},
                     "wechat.apps[1]", (repr(SHOP), "wechat.apps[0]"), id="name-is-another-appid"),
        pytest.param({"apps": [app(SHOP, SHOP_SECRET, CARD), app(CARD, CARD_SECRET)]},
                     "wechat.apps[1]", (repr(CARD), "wechat.apps[0]"),
                     id="appid-is-an-earlier-name"),
        pytest.param({"apps": [app(SHOP, SHOP_SECRET, nmae="shop")]},
                     "wechat.apps[0].nmae", ("unknown key", "'name'"), id="unknown-key-typo"),
        pytest.param({"apps": [app(SHOP, SHOP_SECRET, api_base="http://x")]},
                     "wechat.apps[0].api_base", ("unknown key",), id="unknown-key-per-app"),
    ],
)  # fmt: skip
def test_bad_apps_are_refused_under_their_path(
    wechat: dict[str, Any], path: str, fragments: tuple[str, ...]
) -> None:
    found = problems(raw_config(wechat))
    assert has(found, path, *fragments), found


def test_an_app_may_be_named_as_its_own_appid() -> None:
    # Not a clash: the label names the same app either way.
    cfg = build_config(raw_config({"apps": [app(SHOP, SHOP_SECRET, SHOP)]}), env={})
    assert cfg.wechat.apps[0].name == SHOP


# -- a route's apps -------------------------------------------------------------------


def test_route_apps_resolve_names_and_appids_to_appids() -> None:
    apps = [*two_apps(), app(MALL, MALL_SECRET)]
    routes = [
        route("/shop/", apps=["shop"]),
        route("/both/", apps=["shop", CARD], auth="optional"),
        route("/mall/", apps=[MALL]),
        route("/all/"),
    ]
    cfg = build_config(raw_config({"apps": apps}, routes=routes), env={})
    by_prefix = {r.prefix: r.apps for r in cfg.routes}
    assert by_prefix == {
        "/shop/": frozenset({SHOP}),
        "/both/": frozenset({SHOP, CARD}),
        "/mall/": frozenset({MALL}),
        "/all/": None,  # every configured app
    }


def test_unknown_route_app_names_the_configured_apps() -> None:
    found = problems(raw_config(routes=[route("/a/"), route("/x/", apps=["shop", "mall"])]))
    assert has(found, "routes[1].apps", "'mall'", "not a configured app"), found
    # The operator sees what the choices are (by the labels a route may use).
    line = next(p for p in found if p.startswith("routes[1].apps:"))
    assert "shop" in line and "card" in line, line
    assert len(found) == 1, found  # "shop" is fine: only the unknown one is named


@pytest.mark.parametrize("apps", [["shop"], [CARD]])
def test_route_apps_on_a_public_route_is_an_error(apps: list[str]) -> None:
    found = problems(raw_config(routes=[route("/p/", auth="public", apps=apps)]))
    assert has(found, "routes[0].apps", "public"), found


@pytest.mark.parametrize(
    ("apps", "fragment"),
    [([], "non-empty list"), ("shop", "list"), ([""], "empty"), (["sh op"], "not a name")],
)
def test_route_apps_must_be_a_list_of_labels(apps: Any, fragment: str) -> None:
    found = problems(raw_config(routes=[route("/p/", apps=apps)]))
    assert any(p.startswith("routes[0].apps") and fragment in p for p in found), found


# -- identity headers ----------------------------------------------------------------


def test_identity_header_defaults() -> None:
    cfg = build_config(raw_config(), env={})
    assert cfg.identity.appid_header == "X-AppId"
    assert cfg.identity.phone_header is None  # personal data: off unless asked for
    assert cfg.identity.headers() == ("X-OpenId", "X-UnionId", "X-AppId")
    cfg = build_config(raw_config(identity={"phone_header": "X-Phone"}), env={})
    assert cfg.identity.headers() == ("X-OpenId", "X-UnionId", "X-AppId", "X-Phone")


@pytest.mark.parametrize(
    ("identity", "token_header", "path"),
    [
        ({"appid_header": "X-OpenId"}, None, "identity.appid_header"),
        ({"appid_header": "x-openid"}, None, "identity.appid_header"),
        ({"appid_header": "X_OpenId"}, None, "identity.appid_header"),
        ({"appid_header": "X-UnionId"}, None, "identity.appid_header"),
        ({"phone_header": "X-AppId"}, None, "identity.phone_header"),
        ({"phone_header": "x_appid"}, None, "identity.phone_header"),
        ({"appid_header": "X-App", "phone_header": "X_App"}, None, "identity.phone_header"),
        ({"phone_header": "X-OpenId"}, None, "identity.phone_header"),
        ({"phone_header": "X-Phone"}, "X-Phone", "token.header"),
        ({"phone_header": "X_Phone"}, "x-phone", "token.header"),
        ({"appid_header": "X-App"}, "X_App", "token.header"),
        ({}, "X_AppId", "token.header"),  # the default appid header counts too
    ],
)
def test_identity_headers_must_all_differ(
    identity: dict[str, str], token_header: str | None, path: str
) -> None:
    token = {"secret": TOKEN_SECRET} | ({"header": token_header} if token_header else {})
    found = problems({**raw_config(identity=identity), "token": token})
    assert has(found, path, "differ"), found


def test_renamed_identity_headers_that_differ_are_accepted() -> None:
    identity = {"appid_header": "X-Mini-App", "phone_header": "X-User-Phone"}
    cfg = build_config(raw_config(identity=identity), env={})
    assert (cfg.identity.appid_header, cfg.identity.phone_header) == ("X-Mini-App", "X-User-Phone")


@pytest.mark.parametrize("name", ["Host", "Cookie", "X-Forwarded-For", "X_Request_Id"])
def test_phone_header_cannot_be_a_header_the_gateway_or_http_owns(name: str) -> None:
    found = problems(raw_config(identity={"phone_header": name}))
    assert has(found, "identity.phone_header", "owns"), found


# -- every problem in one run, and no secret anywhere ----------------------------------


def test_every_apps_problem_in_one_run() -> None:
    wechat = {
        "apps": [
            app(SHOP, SHOP_SECRET, "shop"),
            {"appid": "bad appid!", "name": "card"},
            app(CARD, CARD_SECRET, "shop"),
            app(MALL, MALL_SECRET, colour="red"),
        ]
    }
    raw = raw_config(
        wechat,
        identity={"appid_header": "X_OpenId", "phone_header": "X-Phone"},
        routes=[route("/p/", auth="public", apps=["shop"]), route("/q/", apps=[])],
    )
    raw["token"] = {"secret": TOKEN_SECRET, "header": "x-phone"}
    found = problems(raw)
    expected = [
        ("wechat.apps[1].appid", "not an appid"),
        ("wechat.apps[1].secret", "required"),
        ("wechat.apps[2]", "'shop'"),
        ("wechat.apps[3].colour", "unknown key"),
        ("identity.appid_header", "differ"),
        ("token.header", "differ"),
        ("routes[0].apps", "public"),
        ("routes[1].apps", "non-empty"),
    ]
    missing = [(path, what) for path, what in expected if not has(found, path, what)]
    assert missing == [], found


def test_an_unrelated_wechat_problem_does_not_hide_an_unknown_route_app() -> None:
    # A bad timeout says nothing about which apps exist: the route's typo must be
    # reported in the same run, not after the timeout is fixed.
    wechat = {"apps": two_apps(), "timeout": "soon"}
    found = problems(raw_config(wechat, routes=[route("/x/", apps=["shpo"])]))
    assert has(found, "wechat.timeout", "duration"), found
    assert has(found, "routes[0].apps", "'shpo'", "not a configured app"), found


@pytest.mark.parametrize(
    "wechat",
    [{"appid": SHOP}, {"apps": []}, {"apps": [{"appid": SHOP}]}],
    ids=["single-app-without-secret", "empty-apps", "app-without-secret"],
)
def test_an_unreadable_app_list_adds_no_false_unknown_route_app(wechat: dict[str, Any]) -> None:
    # The route names the app rightly; only the app's own problem is reported.
    found = problems(raw_config(wechat, routes=[route("/x/", apps=[SHOP])]))
    assert not any(p.startswith("routes[") for p in found), found


def test_a_bad_key_in_one_app_does_not_hide_its_clash_with_another() -> None:
    # The typo in apps[0] leaves its appid and name readable: the duplicate name
    # of apps[1] is knowable in this run.
    wechat = {
        "apps": [app(SHOP, SHOP_SECRET, "shop", colour="red"), app(CARD, CARD_SECRET, "shop")]
    }
    found = problems(raw_config(wechat))
    assert has(found, "wechat.apps[0].colour", "unknown key"), found
    assert has(found, "wechat.apps[1]", "'shop'", "wechat.apps[0]"), found


def test_secrets_never_in_repr_or_str_of_the_config() -> None:
    apps = [*two_apps(), app(MALL, MALL_SECRET)]
    cfg = build_config(raw_config({"apps": apps}, routes=[route("/a/", apps=["card"])]), env={})
    for shown in (repr(cfg), str(cfg), repr(cfg.wechat), repr(cfg.wechat.apps)):
        assert leaks(shown, SECRETS) == [], shown
    for one in cfg.wechat.apps:
        assert leaks(repr(one) + str(one) + one.label, SECRETS) == []


def test_secrets_from_the_environment_never_in_messages() -> None:
    raw = raw_config(
        {
            "apps": [
                {"appid": "${SHOP_APPID}", "secret": "${SHOP_SECRET}", "name": "shop"},
                {"appid": "${SHOP_APPID}", "secret": "${CARD_SECRET}", "name": "${CARD_NAME}"},
            ]
        },
        routes=[route("/x/", apps=["nowhere"])],
    )
    env = {"SHOP_APPID": SHOP, "SHOP_SECRET": SHOP_SECRET, "CARD_SECRET": CARD_SECRET,
           "CARD_NAME": "card"}  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        build_config(raw, env=env)
    found = caught.value.problems
    assert has(found, "wechat.apps[1]", repr(SHOP)), found
    assert leaks("\n".join(found), SECRETS) == [], found


# -- gateway check ----------------------------------------------------------------------


def check(tmp_path: Path, raw: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(config)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_lists_the_apps_and_each_routes_apps_without_secrets(tmp_path: Path) -> None:
    raw = raw_config(
        {
            "apps": [
                {"appid": SHOP, "secret": "${SHOP_SECRET}", "name": "shop"},
                {"appid": CARD, "secret": "${CARD_SECRET}"},  # no name: shown by appid
            ]
        },
        routes=[
            route("/shop/", apps=["shop"]),
            route("/both/", apps=[CARD, "shop"], auth="optional"),
            route("/all/"),
        ],
    )
    result = check(tmp_path, raw, {"SHOP_SECRET": SHOP_SECRET, "CARD_SECRET": CARD_SECRET})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert leaks(out + result.stderr, SECRETS) == [], out
    lines = out.splitlines()
    app_lines = [line.split() for line in lines if line.strip().startswith("wx")]
    assert app_lines == [[SHOP, "name=shop"], [CARD]], out
    # The default app is listed first, and said to be the default.
    assert "default" in out.split(SHOP)[0], out
    routes = {line.split()[0]: line for line in lines if line.strip().startswith("/")}
    assert routes["/shop/"].split()[-1] == "apps=shop", out
    both = routes["/both/"].split()[-1]
    assert both.startswith("apps=") and set(both[5:].split(",")) == {CARD, "shop"}, out
    assert "apps=" not in routes["/all/"], out


def test_check_of_a_single_app_config_lists_its_app(tmp_path: Path) -> None:
    result = check(tmp_path, raw_config({"appid": SHOP, "secret": SHOP_SECRET}))
    assert result.returncode == 0, result.stderr
    assert [line.split() for line in result.stdout.splitlines() if "wx" in line] == [[SHOP]]
    assert leaks(result.stdout + result.stderr, SECRETS) == []


def test_check_of_a_bad_apps_config_exits_2_with_every_message(tmp_path: Path) -> None:
    apps = [
        app(SHOP, SHOP_SECRET, "shop"),
        app(CARD, CARD_SECRET, SHOP),
        app(MALL, MALL_SECRET, "mall", extra=1),
    ]
    raw = raw_config(
        {"apps": apps},
        routes=[route("/p/", auth="public", apps=["shop"])],
        identity={"phone_header": "x_appid"},
    )
    result = check(tmp_path, raw)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "OK" not in result.stdout
    err = result.stderr.splitlines()
    for path, what in [
        ("wechat.apps[1]", repr(SHOP)),
        ("wechat.apps[2].extra", "unknown key"),
        ("routes[0].apps", "public"),
        ("identity.phone_header", "differ"),
    ]:
        assert has(err, path, what), result.stderr
    assert leaks(result.stdout + result.stderr, SECRETS) == [], result.stderr
