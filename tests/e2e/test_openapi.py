"""docs/openapi.yaml is what a live gateway really answers.

A real `python -m gateway run` (in-process fake WeChat, a temporary SQLite) on
loopback is fuzzed by the `schemathesis run` CLI with every check, from a fixed
seed. Authenticated operations get a fresh token from `/auth/login` for every
generated case (so the logout operation cannot revoke the token other cases
use). The paths fuzzing cannot reach (a real legacy ciphertext, WeChat error
codes, the login rate limit, a revoked token) are then driven on purpose and
their responses validated against the same schema.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import yaml
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway import errors
from gateway.app import Gateway
from gateway.config import build_config
from gateway.wechat import crypto, fake
from tests.support import ROOT
from tests.support.gateway import free_port
from tests.support.procs import GatewayProcess, wait_healthy, write_config

SPEC = ROOT / "docs" / "openapi.yaml"
APPID = "wxopenapitest00001"
TOKEN_SECRET = "openapi-test-token-secret-0123456789abcdef"
USER_CODE = "openapi-user"
# Conformance to the document, without `not_a_server_error`: the WeChat-failure
# cases below expect their documented 502/504.
CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

# Loaded by the schemathesis CLI process: a fresh login per generated case.
HOOKS = r"""
import os

import requests
import schemathesis

URL = os.environ["WXGW_OPENAPI_URL"]
CALLS = os.environ["WXGW_OPENAPI_CALLS"]
SESSION = requests.Session()


@schemathesis.hook
def before_call(context, case, kwargs):
    # Which appids a gateway serves is its configuration, not the document's: a
    # generated appid becomes the live gateway's, so a schema-valid login stays
    # one this gateway must accept (unknown_app is driven by hand below).
    body = case.body
    if case.path == "/auth/login" and isinstance(body, dict) and isinstance(body.get("appid"), str):
        body["appid"] = os.environ["WXGW_OPENAPI_APPID"]


@schemathesis.hook
def after_call(context, case, response):
    with open(CALLS, "a") as calls:
        calls.write(f"{case.method.upper()} {case.path} {response.status_code}\n")


@schemathesis.auth(refresh_interval=None, retry_on=[]).apply_to(
    path_regex="^/auth/(logout|me|phone|decrypt|verify)$"
)
class FreshLogin:
    def get(self, case, ctx):
        response = SESSION.post(URL + "/auth/login", json={"code": "openapi-user"}, timeout=10)
        response.raise_for_status()
        return response.json()["token"]

    def set(self, case, data, ctx):
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"
"""

SCHEMATHESIS_TOML = """
seed = 20261123
workers = 1
request-timeout = 10

[generation]
max-examples = 25
deterministic = true
database = "none"

[cache]
enabled = false

# Every built-in check is on by default (as with `--checks all`, which would
# override the per-operation setting below).
#
# A ciphertext made for a test user's session_key cannot be generated from a
# schema: schema-valid legacy payloads are (correctly) refused with 400. Those
# cases are driven by hand in test_legacy_payloads_decrypt_and_match_the_schema.
[[operations]]
include-operation-id = ["decrypt", "phone"]
checks.positive_data_acceptance.enabled = false
"""


def gateway_config(tmp: Path, port: int, **rate_limits: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace": "1s"},
        "wechat": {
            "appid": APPID,
            "secret": "openapi-wechat-secret",
            "fake": True,
            "timeout": "2s",
        },
        "token": {"secret": TOKEN_SECRET},
        "storage": {"url": f"sqlite:///{tmp}/gateway.db"},
        "rate_limits": {"login_per_ip": 0, **rate_limits},
        "routes": [{"prefix": "/api/", "upstream": "http://127.0.0.1:9"}],
    }


class LiveGateway:
    def __init__(self, tmp: Path, **rate_limits: Any) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = write_config(tmp / "config.yaml", gateway_config(tmp, port, **rate_limits))
        self.process = GatewayProcess(["run", "-c", str(config)], port=port)
        self.url = self.process.url
        wait_healthy(self.url, self.process.proc)

    def stop(self) -> str:
        """Stop it: everything it wrote."""
        return self.process.output()

    def token(self, code: str = USER_CODE) -> str:
        response = requests.post(self.url + "/auth/login", json={"code": code}, timeout=10)
        assert response.status_code == 200, response.text
        return str(response.json()["token"])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    gateway = LiveGateway(tmp_path_factory.mktemp("openapi-gateway"))
    yield gateway
    output = gateway.stop()
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def schema() -> Any:
    return schemathesis.openapi.from_path(str(SPEC))


def send(
    schema: Any,
    live: LiveGateway,
    path: str,
    method: str,
    *,
    body: Any = None,
    token: str | None = None,
) -> Any:
    """Send one hand-made case and validate the answer against the document."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    operation = schema[path][method]
    case = (
        operation.Case(body=body, headers=headers)
        if body is not None
        else operation.Case(headers=headers)
    )
    response = case.call(base_url=live.url)
    case.validate_response(response, checks=CONFORMANCE)
    return response


def header(response: Any, name: str) -> str:
    """One response header of a schemathesis Response (lower-cased name -> values)."""
    values = response.headers[name.lower()]
    assert len(values) == 1, values
    return str(values[0])


# -- the fuzzer ------------------------------------------------------------------


def test_schemathesis_finds_nothing(live: LiveGateway, tmp_path: Path) -> None:
    (tmp_path / "wxgw_openapi_hooks.py").write_text(textwrap.dedent(HOOKS))
    (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_TOML)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "SCHEMATHESIS_HOOKS": "wxgw_openapi_hooks",
        "WXGW_OPENAPI_URL": live.url,
        "WXGW_OPENAPI_APPID": APPID,
        "WXGW_OPENAPI_CALLS": str(tmp_path / "calls.txt"),
        "NO_COLOR": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(tmp_path / "schemathesis.toml"),
            "run",
            str(SPEC),
            "--url",
            live.url,
            # Any answer slower than this is a finding: generous for a busy machine
            # (the slowest, a login, takes milliseconds at rest).
            "--max-response-time",
            "30",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Every operation of the document was exercised, and reached its success
    # answer: authenticated ones with a valid token, not only their 401s.
    assert "14 selected / 14 total" in output, output
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    succeeded = {line.rsplit(" ", 1)[0] for line in calls if line.endswith(" 200")}
    operations = {
        f"{method.upper()} {path}"
        for path, methods in yaml.safe_load(SPEC.read_text())["paths"].items()
        for method in methods
    }
    # (A decryptable payload cannot be generated: see SCHEMATHESIS_TOML.)
    assert succeeded == operations - {"POST /auth/decrypt"}, operations - succeeded
    assert len(calls) > 200, len(calls)


# -- what fuzzing cannot reach -------------------------------------------------------


def test_login_and_session_endpoints_match_the_schema(schema: Any, live: LiveGateway) -> None:
    login = send(schema, live, "/auth/login", "POST", body={"code": "union-openapi"})
    assert login.status_code == 200
    body = login.json()
    assert body["unionid"] == fake.unionid_for("union-openapi")
    token = body["token"]

    me = send(schema, live, "/auth/me", "GET", token=token)
    assert me.status_code == 200
    assert me.json()["openid"] == fake.openid_for("union-openapi")

    verify = send(schema, live, "/auth/verify", "GET", token=token)
    assert verify.status_code == 200
    assert header(verify, "X-OpenId") == body["openid"]
    assert header(verify, "X-UnionId") == body["unionid"]
    head = send(schema, live, "/auth/verify", "HEAD", token=token)
    assert head.status_code == 200
    assert header(head, "X-OpenId") == body["openid"]

    phone = send(
        schema, live, "/auth/phone", "POST", body={"code": "phone-intcc-8613900001111"}, token=token
    )
    assert phone.status_code == 200
    assert phone.json()["country_code"] == "86"

    logout = send(schema, live, "/auth/logout", "POST", token=token)
    assert logout.status_code == 200
    for path, method in [
        ("/auth/me", "GET"),
        ("/auth/verify", "GET"),
        ("/auth/logout", "POST"),
    ]:
        revoked = send(schema, live, path, method, token=token)
        assert revoked.status_code == 401
        assert revoked.json()["error"] == "token_revoked"
    revoked = send(schema, live, "/auth/phone", "POST", body={"code": "x"}, token=token)
    assert revoked.json()["error"] == "token_revoked"


def test_legacy_payloads_decrypt_and_match_the_schema(schema: Any, live: LiveGateway) -> None:
    code = "legacy-openapi-user"
    token = live.token(code)
    session_key = fake.session_key_for(code)
    iv = "r7BXXKkLb8qrSNn05n0qiA=="
    watermark = {"appid": APPID, "timestamp": 1_700_000_000}

    user_info = {"nickName": "Band", "gender": 1, "watermark": watermark}
    encrypted = crypto.encrypt_payload(session_key, user_info, iv)
    decrypted = send(
        schema,
        live,
        "/auth/decrypt",
        "POST",
        body={"encrypted_data": encrypted, "iv": iv},
        token=token,
    )
    assert decrypted.status_code == 200
    assert decrypted.json() == {"data": user_info}

    phone_data = {
        "phoneNumber": "+8613800138000",
        "purePhoneNumber": "13800138000",
        "countryCode": 86,
        "watermark": watermark,
    }
    encrypted = crypto.encrypt_payload(session_key, phone_data, iv)
    phone = send(
        schema,
        live,
        "/auth/phone",
        "POST",
        body={"encrypted_data": encrypted, "iv": iv},
        token=token,
    )
    assert phone.status_code == 200
    assert phone.json() == {
        "phone_number": "+8613800138000",
        "pure_phone_number": "13800138000",
        "country_code": "86",
    }
    me = send(schema, live, "/auth/me", "GET", token=token)
    assert me.json()["phone_number"] == "+8613800138000"

    # Made for another mini program: refused, in the documented shape.
    other = crypto.encrypt_payload(session_key, {"watermark": {"appid": "wxsomeoneelse00001"}}, iv)
    refused = send(
        schema, live, "/auth/decrypt", "POST", body={"encrypted_data": other, "iv": iv}, token=token
    )
    assert refused.status_code == 400
    assert refused.json()["error"] == "decrypt_failed"


@pytest.mark.parametrize(
    ("path", "code", "status", "error", "errcode"),
    [
        ("/auth/login", "invalid-x", 401, "invalid_code", 40029),
        ("/auth/login", "used-x", 401, "invalid_code", 40163),
        ("/auth/login", "blocked-x", 403, "wechat_user_blocked", 40226),
        ("/auth/login", "ratelimit-x", 429, "wechat_rate_limited", 45011),
        ("/auth/login", "busy-x", 502, "wechat_error", -1),
        ("/auth/login", "notjson-x", 502, "wechat_error", None),
        ("/auth/login", "slow-x", 504, "wechat_timeout", None),
        ("/auth/phone", "invalid-x", 401, "invalid_code", 40029),
        ("/auth/phone", "blocked-x", 403, "wechat_user_blocked", 40226),
        ("/auth/phone", "ratelimit-x", 429, "wechat_rate_limited", 45011),
        ("/auth/phone", "errcode-61010", 502, "wechat_error", 61010),
    ],
)
def test_wechat_errors_match_the_schema(
    schema: Any,
    live: LiveGateway,
    path: str,
    code: str,
    status: int,
    error: str,
    errcode: int | None,
) -> None:
    token = live.token() if path == "/auth/phone" else None
    response = send(schema, live, path, "POST", body={"code": code}, token=token)
    assert response.status_code == status, response.content
    body = response.json()
    assert body["error"] == error
    assert body.get("wechat_errcode") == errcode
    assert body["request_id"] == header(response, "X-Request-Id")


def test_limits_and_methods_match_the_schema(schema: Any, live: LiveGateway) -> None:
    big = send(schema, live, "/auth/login", "POST", body={"code": "x" * (70 * 1024)})
    assert big.status_code == 413
    assert big.json()["error"] == "body_too_large"

    # A method the document does not list: 405 with Allow, in the error shape.
    response = requests.delete(live.url + "/auth/login", timeout=10)
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.json()["error"] == "method_not_allowed"
    assert set(response.json()) == {"error", "message", "request_id"}

    # The client's request id comes back, in the header and in the error body.
    response = requests.get(
        live.url + "/auth/me", headers={"X-Request-Id": "trace-42.a:b"}, timeout=10
    )
    assert response.headers["X-Request-Id"] == "trace-42.a:b"
    assert response.json()["request_id"] == "trace-42.a:b"


def test_login_rate_limit_matches_the_schema(schema: Any, tmp_path: Path) -> None:
    gateway = LiveGateway(tmp_path / "limited", login_per_ip="1/m")
    try:
        first = send(schema, gateway, "/auth/login", "POST", body={"code": "a"})
        assert first.status_code == 200
        second = send(schema, gateway, "/auth/login", "POST", body={"code": "b"})
        assert second.status_code == 429
        assert second.json()["error"] == "rate_limited"
        assert int(header(second, "Retry-After")) >= 1
    finally:
        gateway.stop()


def test_operational_endpoints_match_the_schema(schema: Any, live: LiveGateway) -> None:
    assert send(schema, live, "/healthz", "GET").json() == {"status": "ok"}
    assert send(schema, live, "/readyz", "GET").json() == {"status": "ready"}
    metrics = send(schema, live, "/metrics", "GET")
    assert b"wxgateway_requests_total" in metrics.content
    # The document and the error codes the gateway defines agree.
    codes = {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.GatewayError) and "code" in vars(cls)
    }
    raw = schema.raw_schema
    assert set(raw["components"]["schemas"]["Error"]["properties"]["error"]["enum"]) == codes
    assert json.dumps(raw)  # plain data, loadable by any tool


def test_the_document_lists_exactly_the_gateways_own_endpoints(tmp_path: Path) -> None:
    gateway = Gateway(build_config(gateway_config(tmp_path, 8080), env={}))
    served = {path: {m.lower() for m in methods} for path, methods in gateway.endpoints.items()}
    documented = {
        path: set(methods) for path, methods in yaml.safe_load(SPEC.read_text())["paths"].items()
    }
    assert documented == served


def test_deeply_nested_json_is_a_bad_request(schema: Any, tmp_path: Path) -> None:
    # Its own gateway: were json.loads' RecursionError to escape, it would log a
    # traceback, which the shared gateway must not have.
    gateway = LiveGateway(tmp_path / "nested")
    try:
        token = gateway.token()
        for path in ("/auth/login", "/auth/phone", "/auth/decrypt"):
            response = requests.post(
                gateway.url + path,
                data="[" * 1000,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                timeout=10,
            )
            assert response.status_code == 400, (path, response.text)
            assert response.json()["error"] == "bad_request"
            case = schema[path]["POST"].Case(headers={"Authorization": f"Bearer {token}"})
            case.validate_response(response, checks=CONFORMANCE)
    finally:
        gateway.stop()


def test_login_appid_errors_match_the_schema(schema: Any, live: LiveGateway) -> None:
    ok = send(schema, live, "/auth/login", "POST", body={"code": "appid-ok", "appid": APPID})
    assert ok.status_code == 200
    body = {"code": "x", "appid": "wxnotserved0001"}
    unknown = send(schema, live, "/auth/login", "POST", body=body)
    assert unknown.status_code == 400
    assert unknown.json()["error"] == "unknown_app"
    verify = send(schema, live, "/auth/verify", "GET", token=ok.json()["token"])
    assert header(verify, "X-AppId") == APPID
