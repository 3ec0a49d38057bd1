"""The identity assertion (contract section 11): an ES256 JWT per forwarded request
with an identity, its keys at /.well-known/jwks.json, and `gateway keys generate`.

Every assertion here is verified the way an upstream would: with the public key
taken from the gateway's own JWKS, never with the private key file.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.auth.assertion import Asserter, public_jwk
from gateway.auth.tokens import Claims
from gateway.config import AssertionConfig, AssertionKey, ConfigError, build_config
from tests.support import ROOT
from tests.support.client import send
from tests.support.gateway import APPID, StartGateway, base_config
from tests.support.upstream import Recorder

HEADER = "X-Gateway-Assertion"


def write_key(path: Path, key: Any = None) -> Path:
    key = key or ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def assertion_section(*keys: Path, **extra: Any) -> dict[str, Any]:
    return {"assertion": {"keys": [str(k) for k in keys], **extra}}


async def jwks_of(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    reply = await send(http, "GET", url + "/.well-known/jwks.json")
    assert reply.status == 200
    return dict(reply.body)


def verify(assertion: str, jwks: dict[str, Any], audience: str) -> dict[str, Any]:
    """As an upstream does: the key named by kid, ES256 only, aud and iss checked."""
    kid = jwt.get_unverified_header(assertion)["kid"]
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == kid]
    key = jwt.PyJWK(jwk).key
    return dict(
        jwt.decode(
            assertion,
            key,
            algorithms=["ES256"],
            audience=audience,
            issuer="wx-gateway",
            options={"require": ["iss", "aud", "sub", "iat", "exp"]},
        )
    )


# -- end to end ------------------------------------------------------------------------
async def test_a_forwarded_request_carries_an_assertion_the_jwks_verifies(
    tmp_path: Path, start_gateway: StartGateway, seen: Recorder, http: aiohttp.ClientSession
) -> None:
    key = write_key(tmp_path / "k1.pem")
    gw = await start_gateway(identity=assertion_section(key, ttl="10m"))
    token = gw.token("o-asserted", "u-asserted")
    reply = await send(http, "GET", gw.url + "/api/x", headers={"Authorization": f"Bearer {token}"})
    assert reply.status == 200
    assertion = seen.last.header(HEADER)
    assert assertion is not None
    claims = verify(assertion, await jwks_of(http, gw.url), "/api/")
    expires_at = gw.codec.verify(token, claims["iat"]).expires_at
    assert claims["sub"] == "o-asserted"
    assert claims["appid"] == APPID
    assert claims["unionid"] == "u-asserted"
    assert claims["exp"] == min(claims["iat"] + 600, expires_at)
    assert jwt.get_unverified_header(assertion)["alg"] == "ES256"
    # Meant for /api/ only: another route's upstream refuses it.
    with pytest.raises(jwt.InvalidAudienceError):
        verify(assertion, await jwks_of(http, gw.url), "/opt/")


async def test_no_identity_no_assertion_and_a_client_never_sends_one(
    tmp_path: Path, start_gateway: StartGateway, seen: Recorder, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(identity=assertion_section(write_key(tmp_path / "k.pem")))
    forged = {HEADER: "forged", "X_Gateway_Assertion": "forged"}
    for path in ("/public/x", "/opt/x"):
        reply = await send(http, "GET", gw.url + path, headers=forged)
        assert reply.status == 200
        assert seen.last.header_values(HEADER, "X_Gateway_Assertion") == []
    # With a token the gateway's own replaces the client's.
    reply = await send(http, "GET", gw.url + "/api/x", headers={**forged, **gw.auth()})
    assert reply.status == 200
    values = seen.last.header_values(HEADER, "X_Gateway_Assertion")
    assert len(values) == 1 and values[0][1] != "forged"


async def test_assertions_are_signed_once_per_session_and_route(
    tmp_path: Path, start_gateway: StartGateway, seen: Recorder, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(identity=assertion_section(write_key(tmp_path / "k.pem")))
    asserter = gw.listener.gateway.asserter
    assert asserter is not None
    alice, bob = gw.auth("o-alice"), gw.auth("o-bob")
    got = []
    for headers, path in [(alice, "/api/a"), (alice, "/api/b"), (alice, "/opt/c"), (bob, "/api/d")]:
        assert (await send(http, "GET", gw.url + path, headers=headers)).status == 200
        got.append(seen.last.header(HEADER))
    assert got[0] == got[1]  # same session, same route: the cached assertion
    assert len({got[0], got[2], got[3]}) == 3
    assert asserter.signed == 3


async def test_without_assertion_the_jwks_is_empty_and_no_header_is_sent(
    start_gateway: StartGateway, seen: Recorder, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway()
    reply = await send(http, "GET", gw.url + "/.well-known/jwks.json")
    assert reply.status == 200 and reply.body == {"keys": []}
    assert (await send(http, "GET", gw.url + "/api/x", headers=gw.auth())).status == 200
    assert seen.last.header(HEADER) is None


async def test_jwks_publishes_every_key_and_is_cacheable(
    tmp_path: Path, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    one, two = write_key(tmp_path / "one.pem"), write_key(tmp_path / "two.pem")
    gw = await start_gateway(identity=assertion_section(one, two))
    reply = await send(http, "GET", gw.url + "/.well-known/jwks.json")
    assert reply.headers["Cache-Control"] == "public, max-age=300"
    assert reply.headers["Content-Type"].startswith("application/json")
    keys = reply.body["keys"]
    assert [k["kid"] for k in keys] == [
        public_jwk(AssertionKey(str(p), load(p)).key)["kid"] for p in (one, two)
    ]
    for jwk in keys:
        assert set(jwk) == {"kty", "crv", "x", "y", "kid", "use", "alg"}  # no "d": public only
    head = await send(http, "HEAD", gw.url + "/.well-known/jwks.json")
    assert head.status == 200 and head.raw == b""
    post = await send(http, "POST", gw.url + "/.well-known/jwks.json")
    assert post.status == 405


def load(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


async def test_a_rotation_never_leaves_an_upstream_without_the_signing_key(
    tmp_path: Path, start_gateway: StartGateway, seen: Recorder, http: aiohttp.ClientSession
) -> None:
    """docs/security.md (rotating the assertion keys): add the new key second,
    wait a JWKS cache period, make it first, remove the old one after the ttl.
    At each stage an upstream holding the JWKS of the stage before still
    verifies what is signed."""
    old, new = write_key(tmp_path / "old.pem"), write_key(tmp_path / "new.pem")
    stages = [(old,), (old, new), (new, old), (new,)]
    cached: dict[str, Any] | None = None  # what an upstream fetched one stage ago
    signers = []
    for keys in stages:
        gw = await start_gateway(identity=assertion_section(*keys))
        jwks = await jwks_of(http, gw.url)
        assert (await send(http, "GET", gw.url + "/api/x", headers=gw.auth())).status == 200
        assertion = seen.last.header(HEADER)
        assert assertion is not None
        signers.append(jwt.get_unverified_header(assertion)["kid"])
        assert verify(assertion, jwks, "/api/")["sub"] == "o-test-user"
        if cached is not None and keys != (new,):
            # The stage's signer was already published one stage earlier.
            assert verify(assertion, cached, "/api/")["sub"] == "o-test-user"
        cached = jwks
        await gw.listener.stop()
    old_kid, new_kid = (public_jwk(load(p))["kid"] for p in (old, new))
    assert signers == [old_kid, old_kid, new_kid, new_kid]


async def test_verify_returns_an_assertion_for_the_route_the_proxy_names(
    tmp_path: Path, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        identity=assertion_section(write_key(tmp_path / "k.pem")),
        server={"trusted_proxies": ["127.0.0.1/32"]},
    )
    jwks = await jwks_of(http, gw.url)
    named = await send(
        http,
        "GET",
        gw.url + "/auth/verify",
        headers={**gw.auth(), "X-Forwarded-Uri": "/opt/page"},
    )
    assert named.status == 200
    assert verify(named.headers[HEADER], jwks, "/opt/")["sub"] == "o-test-user"
    unnamed = await send(http, "GET", gw.url + "/auth/verify", headers=gw.auth())
    assert verify(unnamed.headers[HEADER], jwks, "/")["sub"] == "o-test-user"
    with pytest.raises(jwt.InvalidAudienceError):
        verify(unnamed.headers[HEADER], jwks, "/api/")


# -- the cache, alone, on a clock of our own --------------------------------------------
class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def claims(session: str = "s-1", expires_at: int = 2_000_000_000) -> Claims:
    return Claims("o-1", None, session, 1_000_000_000, expires_at, APPID)


def asserter(tmp_path: Path, clock: Clock, ttl: float = 300.0, **kw: Any) -> Asserter:
    key = AssertionKey("k", ec.generate_private_key(ec.SECP256R1()))
    return Asserter(AssertionConfig((key,), ttl=ttl), "wx-gateway", clock, **kw)


def test_an_assertion_is_signed_again_shortly_before_it_expires(tmp_path: Path) -> None:
    clock = Clock(1_700_000_000.0)
    signer = asserter(tmp_path, clock, ttl=300)
    first = signer.assertion(claims(), "/api/")
    clock.now += 239  # 61 s left: still served from the cache
    assert signer.assertion(claims(), "/api/") == first
    clock.now += 1  # 60 s left (REFRESH_BEFORE): a fresh one, a full ttl ahead
    second = signer.assertion(claims(), "/api/")
    assert second != first
    exp = jwt.decode(second, options={"verify_signature": False})["exp"]
    assert exp == int(clock.now) + 300
    assert signer.signed == 2


def test_a_short_ttl_refreshes_at_a_fifth_of_its_life(tmp_path: Path) -> None:
    clock = Clock(1_700_000_000.0)
    signer = asserter(tmp_path, clock, ttl=10)
    first = signer.assertion(claims(), "/api/")
    clock.now += 7.9
    assert signer.assertion(claims(), "/api/") == first
    clock.now += 0.2  # 8.1 s: within 2 s of exp
    assert signer.assertion(claims(), "/api/") != first


def test_an_assertion_never_outlives_its_session(tmp_path: Path) -> None:
    clock = Clock(1_700_000_000.0)
    signer = asserter(tmp_path, clock, ttl=300)
    token = signer.assertion(claims(expires_at=1_700_000_100), "/api/")
    assert jwt.decode(token, options={"verify_signature": False})["exp"] == 1_700_000_100


def test_the_cache_is_bounded(tmp_path: Path) -> None:
    signer = asserter(tmp_path, Clock(1_700_000_000.0), max_entries=20)
    for i in range(50):
        signer.assertion(claims(session=f"s-{i}"), "/api/")
    assert len(signer._cache) <= 20


# -- configuration -------------------------------------------------------------------
def problems(tmp_path: Path, assertion: Any) -> list[str]:
    raw = base_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    raw["identity"] = {"assertion": assertion}
    with pytest.raises(ConfigError) as err:
        build_config(raw, env={})
    return err.value.problems


def test_keys_that_cannot_sign_es256_are_refused_at_load(tmp_path: Path) -> None:
    rsa_key = write_key(tmp_path / "rsa.pem", rsa.generate_private_key(65537, 2048))
    p384 = write_key(tmp_path / "p384.pem", ec.generate_private_key(ec.SECP384R1()))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    missing = tmp_path / "missing.pem"
    found = problems(tmp_path, {"keys": [str(p) for p in (rsa_key, p384, garbage, missing)]})
    assert found == [
        f"identity.assertion.keys[0]: {rsa_key}: not an EC P-256 key (ES256 needs one)",
        f"identity.assertion.keys[1]: {p384}: not an EC P-256 key (ES256 needs one)",
        f"identity.assertion.keys[2]: {garbage}: not an unencrypted PEM private key",
        f"identity.assertion.keys[3]: {missing}: cannot read (No such file or directory)",
    ]
    assert problems(tmp_path, {"keys": []}) == [
        "identity.assertion.keys: must name at least one key file"
    ]
    assert problems(tmp_path, {"header": HEADER}) == ["identity.assertion.keys: required"]


def test_the_assertion_header_must_differ_from_the_identity_headers(tmp_path: Path) -> None:
    key = write_key(tmp_path / "k.pem")
    found = problems(tmp_path, {"keys": [str(key)], "header": "x_openid"})
    assert found == ["identity.assertion.header: must differ from identity.openid_header"]


def test_a_private_key_never_shows_in_the_config_repr(tmp_path: Path) -> None:
    key = write_key(tmp_path / "k.pem")
    raw = base_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    raw["identity"] = assertion_section(key)
    cfg = build_config(raw, env={})
    pem_body = key.read_text().splitlines()[1]
    assert pem_body not in repr(cfg)
    assert "EllipticCurvePrivateKey" not in repr(cfg)


# -- gateway keys generate ----------------------------------------------------------
def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_keys_generate_writes_a_private_p256_key_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "new.pem"
    path.parent.mkdir()
    made = gateway("keys", "generate", str(path))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = load(path)
    assert key.curve.name == "secp256r1"
    assert made.stdout.strip() == f"{path}: new EC P-256 key, kid {public_jwk(key)['kid']}"
    before = path.read_bytes()
    again = gateway("keys", "generate", str(path))
    assert again.returncode == 1
    assert "not overwritten" in again.stderr
    assert path.read_bytes() == before
    nowhere = gateway("keys", "generate", str(tmp_path / "no-such-dir" / "k.pem"))
    assert nowhere.returncode == 1 and "cannot write" in nowhere.stderr


async def test_a_websocket_handshake_carries_the_assertion(
    tmp_path: Path, start_gateway: StartGateway, seen: Recorder, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(identity=assertion_section(write_key(tmp_path / "k.pem")))
    headers = {**gw.auth("o-ws"), HEADER: "forged"}
    async with http.ws_connect(gw.url + "/api/ws", headers=headers) as ws:
        await ws.send_str("whoami")
        assert (await ws.receive_str()) == "o-ws"
    assert seen.last.method == "WS"
    (assertion,) = [v for k, v in seen.last.headers if k.lower() == HEADER.lower()]
    assert verify(assertion, await jwks_of(http, gw.url), "/api/")["sub"] == "o-ws"


def test_check_names_the_signing_key_and_the_published_ones(tmp_path: Path) -> None:
    one, two = write_key(tmp_path / "one.pem"), write_key(tmp_path / "two.pem")
    raw = base_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    raw["identity"] = assertion_section(one, two, ttl="2m")
    config = tmp_path / "gw.yaml"
    config.write_text(json.dumps(raw))  # JSON is YAML
    checked = gateway("check", "-c", str(config))
    assert checked.returncode == 0, checked.stderr
    kid_one, kid_two = (public_jwk(load(p))["kid"] for p in (one, two))
    assert (
        f"identity assertion: header {HEADER}, ttl 120s, signing kid {kid_one},"
        f" also published {kid_two}"
    ) in checked.stdout
    assert one.read_text().splitlines()[1] not in checked.stdout + checked.stderr
