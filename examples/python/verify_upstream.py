"""An upstream that believes only what wx-gateway signed (contract section 11).

Every request the gateway forwards with an identity carries an ES256 JWT in
``X-Gateway-Assertion``. This server checks it against the gateway's public
keys (``/.well-known/jwks.json``) with PyJWT's ``PyJWKClient`` and answers 200
with the verified claims, or 401 with a reason. ``verify`` is the part to copy
into a Flask, FastAPI or Django app; the HTTP server around it is the standard
library's, so the example needs nothing but ``pip install 'pyjwt[crypto]'``.

    python verify_upstream.py --jwks-url http://127.0.0.1:8080/.well-known/jwks.json \\
        --audience /api/ --port 9000

Every option also reads an environment variable (``JWKS_URL``, ``AUDIENCE``,
``ISSUER``, ``HOST``, ``PORT``, ``LEEWAY``, ``ASSERTION_HEADER``); an argument
wins. ``--port 0`` picks a free port; the first line on stdout names it.
"""

from __future__ import annotations

import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt

# The gateway signs ES256 only. Naming the algorithm here, never taking it from
# the token, is what refuses `alg: none` and an HS256 token whose HMAC key is
# the (public) EC key.
ALGORITHMS = ["ES256"]
# Present and checked on every assertion; `unionid` is optional (only when known).
REQUIRED_CLAIMS = ["iss", "aud", "sub", "appid", "iat", "exp"]
# The gateway serves its JWKS with `Cache-Control: max-age=300`: caching longer
# would keep trusting a key the gateway has removed (after a leak, say).
JWKS_LIFESPAN = 300


class Refused(Exception):
    """The request carries no assertion this upstream accepts. ``reason`` is one
    word (the Node example answers the same ones): missing, malformed, unknown_key,
    algorithm, signature, expired, not_yet_valid, audience, issuer, claims,
    keys_unavailable."""

    def __init__(self, reason: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


# Most specific first: InvalidSignatureError is a DecodeError, and every one of
# these is an InvalidTokenError.
_REASONS: list[tuple[type[Exception], str]] = [
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "audience"),
    (jwt.InvalidIssuerError, "issuer"),
    (jwt.MissingRequiredClaimError, "claims"),
    (jwt.InvalidAlgorithmError, "algorithm"),
    (jwt.InvalidSignatureError, "signature"),
    (jwt.DecodeError, "malformed"),
    (jwt.InvalidTokenError, "claims"),
]


class Verifier:
    """Checks assertions meant for one route (``audience``: its prefix)."""

    def __init__(self, jwks_url: str, audience: str, issuer: str, leeway: float) -> None:
        # One client for the process: it caches the key set and refetches it
        # when a token names a kid it does not know (a key being rotated in).
        self._keys = jwt.PyJWKClient(jwks_url, lifespan=JWKS_LIFESPAN, timeout=5)
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway

    def verify(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token``, or :class:`Refused`."""
        try:
            # The kid in the token's header picks the key; it must be in the set.
            key = self._keys.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError as exc:
            raise Refused("keys_unavailable", f"cannot fetch the JWKS: {exc}", 503) from None
        except jwt.PyJWKClientError as exc:
            raise Refused("unknown_key", str(exc)) from None
        except jwt.DecodeError as exc:
            raise Refused("malformed", str(exc)) from None
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=ALGORITHMS,
                audience=self.audience,  # an assertion for another route is refused
                issuer=self.issuer,
                leeway=self.leeway,  # clock skew between the gateway and this host
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.InvalidTokenError as exc:
            raise Refused(_reason(exc), str(exc)) from None
        return claims


def _reason(exc: Exception) -> str:
    return next(reason for kind, reason in _REASONS if isinstance(exc, kind))


def make_handler(verifier: Verifier, header: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            # Two assertions are refused rather than one picked: a server
            # and a library might pick different ones.
            values = self.headers.get_all(header) or []
            try:
                if len(values) != 1:
                    raise Refused("missing", f"expected one {header} header, got {len(values)}")
                claims = verifier.verify(values[0])
            except Refused as exc:
                # The reason, never the token: it is a credential until it expires.
                self.log_message("refused %s: %s", self.path, exc.reason)
                self._answer(
                    exc.status,
                    {"error": "assertion_refused", "reason": exc.reason, "message": str(exc)},
                )
                return
            # The identity comes from the verified claims, not from X-OpenId.
            self._answer(200, {"claims": claims, "path": self.path})

        do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _options(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jwks-url", default=env("JWKS_URL"), help="the gateway's JWKS URL")
    parser.add_argument(
        "--audience", default=env("AUDIENCE"), help="this upstream's route prefix, e.g. /api/"
    )
    parser.add_argument("--issuer", default=env("ISSUER", "wx-gateway"), help="token.issuer")
    parser.add_argument("--host", default=env("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("PORT", "9000")))
    parser.add_argument("--leeway", type=float, default=float(env("LEEWAY", "5")))
    parser.add_argument("--header", default=env("ASSERTION_HEADER", "X-Gateway-Assertion"))
    args = parser.parse_args(argv)
    if not args.jwks_url or not args.audience:
        parser.error("--jwks-url (JWKS_URL) and --audience (AUDIENCE) are required")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _options(argv)
    verifier = Verifier(args.jwks_url, args.audience, args.issuer, args.leeway)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(verifier, args.header))
    url = f"http://{args.host}:{server.server_port}"
    print(f"listening on {url} for audience {args.audience}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
