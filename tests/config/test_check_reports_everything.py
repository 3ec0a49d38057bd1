"""`gateway check` reports every problem of every route in one run (issue 14).

Rules that span keys (a prefix the gateway serves itself, the token header
against the identity headers) used to run only once everything else was
valid, so a route with a bad upstream hid its reserved prefix until the next
run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, build_config
from tests.support.procs import ROOT

TOKEN_SECRET = "t" * 40


def problems(**sections: Any) -> list[str]:
    raw: dict[str, Any] = {
        "wechat": {"appid": "wx1", "secret": "wechat-secret-value"},
        "token": {"secret": TOKEN_SECRET},
        **sections,
    }
    with pytest.raises(ConfigError) as caught:
        build_config(raw, env={})
    return caught.value.problems


def test_the_newcomers_file_shows_both_problems_of_the_route(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "wechat: {appid: wx1, secret: wechat-secret-value}\n"
        f"token: {{secret: {TOKEN_SECRET}}}\n"
        "routes:\n  - prefix: /auth/x\n    upstream: ftp://nope\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(config)],
        cwd=ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "routes[0].prefix: '/auth/x' is served by the gateway itself",
        "routes[0].upstream: 'ftp://nope' is not a URL (want http:// or https:// with a host)",
    ]


def test_every_route_and_every_key_in_one_run() -> None:
    found = problems(
        server={"port": "http"},
        routes=[
            {"prefix": "/metrics", "upstream": "ftp://a", "auth": "sometimes", "timeout": 0},
            {"prefix": "/ok/", "upstream": "http://b", "strip_prefx": True},
            {"prefix": "/auth/", "upstream": ["http://c", "gopher://d"]},
        ],
    )
    assert found == [
        "server.port: must be an integer",
        "routes[0].prefix: '/metrics' is served by the gateway itself",
        "routes[0].upstream: 'ftp://a' is not a URL (want http:// or https:// with a host)",
        "routes[0].auth: 'sometimes' is not one of required, optional, public",
        "routes[0].timeout: must be greater than 0",
        "routes[1].strip_prefx: unknown key; did you mean 'strip_prefix'?",
        "routes[2].prefix: '/auth/' is served by the gateway itself",
        "routes[2].upstream[1]: 'gopher://d' is not a URL (want http:// or https:// with a host)",
    ]


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"token": {"secret": TOKEN_SECRET, "header": "Host"}},
            "token.header: 'Host' cannot carry the token",
        ),
        (
            {"identity": {"openid_header": "X-Who", "unionid_header": "x-who"}},
            "identity.unionid_header: must differ from identity.openid_header",
        ),
        (
            {"token": {"secret": TOKEN_SECRET, "header": "X_OpenId"}},
            "token.header: must differ from the identity headers",
        ),
    ],
)
def test_rules_across_keys_run_beside_other_problems(
    sections: dict[str, Any], expected: str
) -> None:
    found = problems(routes=[{"prefix": "/api/", "upstream": "nope"}], **sections)
    assert found == [
        "routes[0].upstream: 'nope' is not a URL (want http:// or https:// with a host)",
        expected,
    ]


def test_a_key_already_reported_is_not_reported_again_by_a_rule() -> None:
    # An invalid header name falls back to the default while loading; a rule
    # comparing that default with the identity headers would report a
    # problem the file does not have.
    found = problems(
        token={"secret": TOKEN_SECRET, "header": "bad header"},
        identity={"openid_header": "Authorization"},
    )
    assert found == ["token.header: 'bad header' is not a valid HTTP header name"]
