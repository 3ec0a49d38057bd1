"""The upstream examples (examples/python, examples/node) against a live gateway.

One `gateway run` with `identity.assertion` on routes /py/ and /node/ to the two
examples, each a real subprocess that fetches the gateway's JWKS itself. Through
the gateway a request is accepted and the example reads the caller from the
verified claims; sent to an example directly, every assertion the gateway did
not make for that route, recently, is refused, for the reason the example names.
Each refusal has a control: the same token made right is accepted, so a refusal
means the one defect was seen, not that the example refuses everything.

The Node example needs node and npm (CI has both): without them the Node tests
fail, they do not skip.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.auth.keys import generate_key
from tests.support import ROOT
from tests.support.gateway import APPID, base_config, free_port
from tests.support.procs import GatewayProcess, poll_healthy, write_config
from tests.support.waiting import until_sync

EXAMPLES = ROOT / "examples"
NODE_DIR = EXAMPLES / "node"
HEADER = "X-Gateway-Assertion"
ISSUER = "wx-gateway"  # token.issuer's default
TTL = 300  # identity.assertion.ttl, 5m
PREFIX = {"python": "/py/", "node": "/node/"}
OTHER = {"python": "node", "node": "python"}


@dataclass
class Stack:
    gateway: GatewayProcess
    key: ec.EllipticCurvePrivateKey  # the gateway's signing key, read from its file
    kid: str  # as the gateway's JWKS names it
    ports: dict[str, int]  # each example's port, already in the gateway's routes

    @property
    def url(self) -> str:
        return self.gateway.url


@dataclass
class Example:
    name: str
    url: str
    prefix: str


# -- the processes ------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`gateway run` with the assertion on, its key made by `gateway keys generate`'s
    code, the fake WeChat in-process, and a route to each example's (future) port."""
    tmp = tmp_path_factory.mktemp("upstream-examples")
    key_path = tmp / "assertion.pem"
    generate_key(str(key_path))
    ports = {name: free_port() for name in PREFIX}
    routes = [
        {"prefix": PREFIX[name], "upstream": f"http://127.0.0.1:{port}", "auth": "required"}
        for name, port in ports.items()
    ]
    raw = base_config(
        tmp,
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        wechat={"fake": True},
        # Loopback is the forward-auth proxy here: /auth/verify then signs for the
        # route X-Forwarded-Uri names (test_an_assertion_for_another_route...).
        server={"port": free_port(), "trusted_proxies": ["127.0.0.1/32"]},
        identity={"assertion": {"header": HEADER, "keys": [str(key_path)], "ttl": f"{TTL}s"}},
        routes=routes,
    )
    config = write_config(tmp / "gateway.yaml", raw)
    gateway = GatewayProcess(["run", "-c", str(config)], port=raw["server"]["port"])
    try:
        if not poll_healthy(gateway.url, gateway.proc, 60.0):
            raise AssertionError(f"gateway exited: {gateway.output()}")
        with urllib.request.urlopen(gateway.url + "/.well-known/jwks.json") as resp:
            jwks = json.load(resp)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        (published,) = jwks["keys"]
        yield Stack(gateway, key, published["kid"], ports)
    finally:
        gateway.stop()


class ExampleProcess:
    """An example server; its output goes to files (read on failure)."""

    def __init__(self, args: list[str], cwd: Path, port: int) -> None:
        # Closed by stop(), once the process has ended.
        self._out: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(args, cwd=cwd, stdout=self._out, stderr=self._err)
        self.port = port

    def output(self) -> str:
        text = []
        for file in (self._out, self._err):
            file.seek(0)
            text.append(file.read().decode(errors="replace"))
        return "".join(text)

    def wait_listening(self) -> None:
        def listening() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"example exited with {self.proc.returncode}: {self.output()}")
            return f"listening on http://127.0.0.1:{self.port}" in self.output()

        until_sync(listening, f"the example on port {self.port} listening", timeout=60.0)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        self._err.close()


def _options(stack: Stack, name: str) -> list[str]:
    return [
        f"--jwks-url={stack.url}/.well-known/jwks.json",
        f"--audience={PREFIX[name]}",
        f"--issuer={ISSUER}",
        f"--port={stack.ports[name]}",
        "--host=127.0.0.1",
    ]


def _served(process: ExampleProcess, name: str) -> Iterator[Example]:
    try:
        process.wait_listening()
        yield Example(name, f"http://127.0.0.1:{process.port}", PREFIX[name])
    finally:
        process.stop()


@pytest.fixture(scope="module")
def python_example(stack: Stack) -> Iterator[Example]:
    script = EXAMPLES / "python" / "verify_upstream.py"
    args = [sys.executable, str(script), *_options(stack, "python")]
    yield from _served(ExampleProcess(args, EXAMPLES / "python", stack.ports["python"]), "python")


def _npm_ci() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed to test examples/node (Node 20 or newer)")
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            env={**os.environ, "NO_COLOR": "1"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("npm ci in examples/node timed out after 120 s")
    if done.returncode != 0:
        pytest.fail(f"npm ci in examples/node exited with {done.returncode}:\n{done.stderr}")
    return node


@pytest.fixture(scope="module")
def node_example(stack: Stack) -> Iterator[Example]:
    node = _npm_ci()
    args = [node, "verify-upstream.mjs", *_options(stack, "node")]
    yield from _served(ExampleProcess(args, NODE_DIR, stack.ports["node"]), "node")


@pytest.fixture(params=["python", "node"])
def example(request: pytest.FixtureRequest) -> Example:
    value: Example = request.getfixturevalue(f"{request.param}_example")
    return value


# -- tokens the gateway did not make ------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def _claims(**changes: Any) -> dict[str, Any]:
    """What the gateway signs for /py/ (``changes``: None removes a claim)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": PREFIX["python"],
        "sub": "o-forged-user",
        "appid": APPID,
        "iat": now,
        "exp": now + TTL,
    }
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


def _es256(key: ec.EllipticCurvePrivateKey, kid: str, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


def _public_pem(stack: Stack) -> bytes:
    return stack.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _hs256_with_public_key(stack: Stack, claims: dict[str, Any]) -> str:
    """The algorithm-confusion attack: HMAC keyed with the public key, which anyone
    can read from the JWKS. (PyJWT refuses to make one, so it is built by hand.)"""
    signing_input = (
        f"{_segment({'alg': 'HS256', 'kid': stack.kid, 'typ': 'JWT'})}.{_segment(claims)}"
    )
    mac = hmac.new(_public_pem(stack), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def _unsigned(stack: Stack, claims: dict[str, Any]) -> str:
    return f"{_segment({'alg': 'none', 'kid': stack.kid, 'typ': 'JWT'})}.{_segment(claims)}."


def _tampered(stack: Stack, claims: dict[str, Any]) -> str:
    """The gateway's signature over one user, carrying another user's claims."""
    head, _, signature = _es256(stack.key, stack.kid, claims).split(".")
    return f"{head}.{_segment({**claims, 'sub': 'o-someone-else'})}.{signature}"


def _other_key(kid: str | None) -> Callable[[Stack, dict[str, Any]], str]:
    def sign(stack: Stack, claims: dict[str, Any]) -> str:
        key = ec.generate_private_key(ec.SECP256R1())
        return _es256(key, kid or stack.kid, claims)

    return sign


def _gateway_key(stack: Stack, claims: dict[str, Any]) -> str:
    return _es256(stack.key, stack.kid, claims)


Maker = Callable[[Stack, dict[str, Any]], str]
# Made two ttls before this module was loaded: expired a ttl ago, and more so later.
MADE = int(time.time()) - 2 * TTL

# (case, how the token is made, claims changed, the reason the example gives)
REFUSED: list[tuple[str, Maker, dict[str, Any], str]] = [
    ("another key, the gateway's kid", _other_key(None), {}, "signature"),
    ("another key, its own kid", _other_key("attacker-key"), {}, "unknown_key"),
    ("alg none", _unsigned, {}, "algorithm"),
    ("HS256 keyed with the public key", _hs256_with_public_key, {}, "algorithm"),
    ("claims changed under the signature", _tampered, {}, "signature"),
    ("for another route", _gateway_key, {"aud": "/other/"}, "audience"),
    ("expired", _gateway_key, {"iat": MADE, "exp": MADE + TTL}, "expired"),
    ("another issuer", _gateway_key, {"iss": "not-the-gateway"}, "issuer"),
    ("no appid", _gateway_key, {"appid": None}, "claims"),
    ("no exp", _gateway_key, {"exp": None}, "claims"),
]


async def _direct(
    http: aiohttp.ClientSession, example: Example, *assertions: str
) -> tuple[int, dict[str, Any]]:
    """A request sent to the example itself, as anyone on its network could."""
    headers = [(HEADER, value) for value in assertions]
    async with http.get(f"{example.url}{example.prefix}orders", headers=headers) as resp:
        return resp.status, await resp.json()


async def _login(http: aiohttp.ClientSession, stack: Stack) -> dict[str, Any]:
    # A code starting with "union" gets a unionid from the fake WeChat.
    async with http.post(f"{stack.url}/auth/login", json={"code": "union-examples"}) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


# -- the tests ----------------------------------------------------------------


async def test_a_request_through_the_gateway_is_accepted(
    stack: Stack, example: Example, http: aiohttp.ClientSession
) -> None:
    user = await _login(http, stack)
    headers = {"Authorization": f"Bearer {user['token']}"}
    url = f"{stack.url}{example.prefix}orders?page=2"
    async with http.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    claims = body["claims"]
    assert claims["sub"] == user["openid"]
    assert claims["appid"] == APPID
    assert user["unionid"] is not None
    assert claims["unionid"] == user["unionid"]
    assert claims["aud"] == example.prefix
    assert claims["iss"] == ISSUER
    assert 0 < claims["exp"] - claims["iat"] <= TTL
    assert body["path"] == f"{example.prefix}orders?page=2"


async def test_without_an_assertion_the_example_refuses(
    example: Example, http: aiohttp.ClientSession
) -> None:
    status, body = await _direct(http, example)
    assert (status, body.get("reason")) == (401, "missing")


async def test_an_assertion_made_right_is_accepted_directly(
    stack: Stack, example: Example, http: aiohttp.ClientSession
) -> None:
    """The control for the refusals below: the gateway's key, the right claims."""
    claims = _claims(aud=example.prefix)
    status, body = await _direct(http, example, _gateway_key(stack, claims))
    assert status == 200, body
    assert body["claims"]["sub"] == "o-forged-user"


@pytest.mark.parametrize(
    ("make", "changes", "reason"),
    [pytest.param(make, changes, reason, id=case) for case, make, changes, reason in REFUSED],
)
async def test_an_assertion_the_gateway_did_not_make_is_refused(
    stack: Stack,
    example: Example,
    http: aiohttp.ClientSession,
    make: Maker,
    changes: dict[str, Any],
    reason: str,
) -> None:
    token = make(stack, _claims(**{"aud": example.prefix, **changes}))
    status, body = await _direct(http, example, token)
    assert (status, body.get("reason")) == (401, reason), body


async def test_two_assertions_are_refused_even_if_one_is_good(
    stack: Stack, example: Example, http: aiohttp.ClientSession
) -> None:
    good = _gateway_key(stack, _claims(aud=example.prefix))
    forged = _other_key(None)(stack, _claims(aud=example.prefix, sub="o-victim"))
    status, body = await _direct(http, example, good, forged)
    assert (status, body.get("reason")) == (401, "missing")


async def test_a_gateway_assertion_for_another_route_is_refused(
    stack: Stack, example: Example, http: aiohttp.ClientSession
) -> None:
    """A real assertion, made by the gateway (at /auth/verify, as for a forward-auth
    proxy) for the other example's route, replayed to this one: refused; the same
    call for this example's route gives one it accepts."""
    user = await _login(http, stack)

    async def made_for(prefix: str) -> str:
        headers = {"Authorization": f"Bearer {user['token']}", "X-Forwarded-Uri": f"{prefix}x"}
        async with http.get(f"{stack.url}/auth/verify", headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            return resp.headers[HEADER]

    other = await made_for(PREFIX[OTHER[example.name]])
    status, body = await _direct(http, example, other)
    assert (status, body.get("reason")) == (401, "audience")
    status, body = await _direct(http, example, await made_for(example.prefix))
    assert (status, body["claims"]["sub"]) == (200, user["openid"])
