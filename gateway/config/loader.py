"""YAML -> :class:`Config`, strictly.

Every problem is collected in one pass and reported together, each line
prefixed with its key path (``routes[2].upstream: not a URL``), because a
person fixing a config wants the whole list, not one error per restart.
Unknown keys are errors: a typo such as ``auht: public`` must not silently fall
back to a default. Values of secret keys are never echoed in a message.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import secrets
import ssl
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import yaml

from gateway.config import model as m
from gateway.config.reserved import shadows_reserved
from gateway.config.units import Rate, parse_duration, parse_rate, parse_size

T = TypeVar("T")
_REQUIRED: Any = object()
# Stands for a value whose ${VAR} was unset: already reported, not validated again.
_UNSET: Any = object()
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# -- YAML ----------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# -- ${VAR} interpolation ------------------------------------------------------
def _interpolate(value: Any, path: str, env: Mapping[str, str], errors: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, _join(path, str(k)), env, errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", env, errors) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    missing = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal missing
        if match.group(0) == "$$":  # `$$` is a literal dollar sign
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        errors.append(f"{path}: environment variable {name} is not set (and has no :-default)")
        missing = True
        return ""

    result = _VAR.sub(substitute, value)
    return _UNSET if missing else result


def _shield_references(text: str) -> tuple[str, dict[str, str]]:
    """``text`` with each ``${...}`` replaced by a plain placeholder, and the map
    back. The contract writes ``- {appid: ${SHOP_APPID}, ...}``, and in a YAML flow
    mapping ``{`` and ``,`` are syntax: unshielded, that line is not YAML. The
    references are still resolved after parsing (:func:`_interpolate`), as values,
    so a variable's content never becomes YAML."""
    nonce = secrets.token_hex(4)
    refs: dict[str, str] = {}

    def shield(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$$"
        placeholder = f"wxgwref{len(refs)}x{nonce}"
        refs[placeholder] = match.group(0)
        return placeholder

    return _VAR.sub(shield, text), refs


def _unshield(value: Any, refs: Mapping[str, str]) -> Any:
    if not refs:
        return value
    if isinstance(value, dict):
        return {_unshield(k, refs): _unshield(v, refs) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshield(v, refs) for v in value]
    if isinstance(value, str) and "wxgwref" in value:
        for placeholder, reference in refs.items():
            value = value.replace(placeholder, reference)
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# -- section reader ------------------------------------------------------------
class _Section:
    """Reads one mapping: typed getters that record errors instead of raising, and
    a final check that flags every key nobody asked for."""

    def __init__(self, raw: Any, path: str, errors: list[str]) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            errors.append(f"{path}: must be a mapping")
            raw = {}
        self.raw: dict[Any, Any] = raw
        self.path = path
        self.errors = errors
        self.known: list[str] = []

    def get(self, key: str, parse: Callable[[Any], T], default: T = _REQUIRED) -> T:
        self.known.append(key)
        value = self.raw.get(key)
        if value is _UNSET:
            return default if default is not _REQUIRED else cast(T, None)
        if value is None:
            if default is _REQUIRED:
                self.errors.append(f"{self.key(key)}: required")
            return default if default is not _REQUIRED else cast(T, None)
        try:
            return parse(value)
        except _ItemProblems as exc:
            self.errors.extend(f"{self.key(key)}[{i}]: {message}" for i, message in exc.problems)
        except (ValueError, TypeError) as exc:
            self.errors.append(f"{self.key(key)}: {exc}")
        return default if default is not _REQUIRED else cast(T, None)

    def key(self, key: str) -> str:
        return _join(self.path, key)

    def finish(self) -> None:
        for key in self.raw:
            if key not in self.known:
                hint = difflib.get_close_matches(str(key), self.known, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                self.errors.append(f"{self.key(str(key))}: unknown key{suggestion}")


# -- scalar parsers (messages are for humans; never include a secret) ----------
def _str(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("must be a string")
    return str(value)


def _nonempty(value: Any) -> str:
    text = _str(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("must be an integer")
        try:
            number = int(value) if isinstance(value, int) else int(str(value).strip())
        except ValueError:
            raise ValueError("must be an integer") from None
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}")
        return number

    return parse


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "yes", "on", "1"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"false", "no", "off", "0"}:
        return False
    raise ValueError("must be true or false")


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than 0")
    return seconds


def _positive_size(value: Any) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError("must be greater than 0")
    return size


def _ipv6_prefix(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be a prefix length from 1 to 128")
    try:
        length = int(str(value).strip().lstrip("/"))
    except ValueError:
        raise ValueError("must be a prefix length from 1 to 128") from None
    if not 1 <= length <= 128:
        raise ValueError("must be a prefix length from 1 to 128")
    return length


def _header_name(value: Any) -> str:
    name = _nonempty(value)
    if not _HEADER_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid HTTP header name")
    return name


def _http_url(value: Any) -> str:
    text = _nonempty(value).strip()
    shown = _mask_userinfo(text)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"{shown!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{shown!r} is not a URL (want http:// or https:// with a host)")
    if parts.query or parts.fragment:
        raise ValueError(f"{shown!r}: a query or fragment is not allowed here")
    if parts.username or parts.password:
        raise ValueError(f"{shown!r}: credentials in the URL are not allowed")
    return text.rstrip("/")


def _mask_userinfo(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url)[:200]


def _secret(value: Any) -> m.Secret:
    text = _str(value)
    if not text:
        raise ValueError("must not be empty")
    return m.Secret(text)


def _token_secret(value: Any) -> m.Secret:
    secret = _secret(value)
    size = len(secret.reveal().encode())
    if size < m.MIN_TOKEN_SECRET_BYTES:
        raise ValueError(
            f"must be at least {m.MIN_TOKEN_SECRET_BYTES} bytes (got {size}); "
            "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    return secret


class _ItemProblems(ValueError):
    """Bad items of a list: one (index, message) each, reported one line each
    under the item's own key path (``routes[3].upstream[1]: ...``)."""

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        super().__init__("; ".join(f"[{i}] {message}" for i, message in problems))
        self.problems = problems


def _list_of(parse: Callable[[Any], T]) -> Callable[[Any], tuple[T, ...]]:
    def parse_list(value: Any) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise ValueError("must be a list")
        items, problems = [], []
        for i, item in enumerate(value):
            if item is _UNSET:
                continue
            try:
                items.append(parse(item))
            except (ValueError, TypeError) as exc:
                problems.append((i, str(exc)))
        if problems:
            raise _ItemProblems(problems)
        return tuple(items)

    return parse_list


def _cidr(value: Any) -> m.IPNetwork:
    text = _nonempty(value).strip()
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR") from None


def _auth(value: Any) -> m.AuthPolicy:
    if value not in ("required", "optional", "public"):
        raise ValueError(f"{value!r} is not one of required, optional, public")
    return cast(m.AuthPolicy, value)


def _one_of(*choices: str) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _log(raw: Any, errors: list[str]) -> m.LogConfig:
    s = _Section(raw, "log", errors)
    cfg = m.LogConfig(
        level=s.get("level", _one_of("debug", "info", "warning", "error"), "info"),
        format=s.get("format", _one_of("text", "json"), "text"),
        access=s.get("access", _bool, True),
        openid=s.get("openid", _one_of("hash", "clear", "omit"), "hash"),
    )
    s.finish()
    return cfg


# The stores a URL may name (contract section 10): the embedded SQLite file, or
# Redis shared by several instances.
_STORAGE_SCHEMES = ("sqlite", "redis", "rediss", "redis+sentinel")


def _storage_url(value: Any) -> str:
    text = _nonempty(value).strip()
    scheme = text.partition("://")[0] if "://" in text else ""
    if scheme not in _STORAGE_SCHEMES:
        raise ValueError(
            f"{_mask_userinfo(text)!r}: the URL must start with sqlite://, redis://, "
            "rediss:// or redis+sentinel:// (e.g. sqlite:///./gateway.db)"
        )
    return text


def _storage_prefix(value: Any) -> str:
    text = _nonempty(value)
    if len(text) > 64 or not text.isprintable() or any(c.isspace() for c in text):
        raise ValueError(f"{text!r} must be up to 64 printable characters, no spaces")
    return text


def _duration_between(low: float, high: float | None) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds < low or (high is not None and seconds > high):
            upper = f" and at most {high:g}s" if high is not None else ""
            raise ValueError(f"must be at least {low:g}s{upper}")
        return seconds

    return parse


def _storage(raw: Any, errors: list[str]) -> m.StorageConfig:
    s = _Section(raw, "storage", errors)
    storage = m.StorageConfig(
        url=s.get("url", _storage_url, m.DEFAULT_STORAGE_URL),
        prefix=s.get("prefix", _storage_prefix, m.DEFAULT_STORAGE_PREFIX),
        wait_replicas=s.get("wait_replicas", _int_range(0, 64), 0),
        wait_timeout=s.get(
            "wait_timeout",
            _duration_between(0.001, m.MAX_STORAGE_WAIT_TIMEOUT),
            m.DEFAULT_STORAGE_WAIT_TIMEOUT,
        ),
        max_staleness=s.get(
            "max_staleness", _duration_between(m.MIN_MAX_STALENESS, None), m.DEFAULT_MAX_STALENESS
        ),
    )
    if storage.wait_replicas and not storage.shared:
        errors.append(
            "storage.wait_replicas: only for a Redis store (SQLite has no replicas); remove it"
        )
    s.finish()
    return storage


def _route_prefix(value: Any) -> str:
    from gateway.proxy.paths import BadPath, normalise  # local: paths is a leaf module

    text = _nonempty(value)
    if not text.startswith("/"):
        raise ValueError(f"{text!r} must start with /")
    try:
        canonical = normalise(text).match
    except BadPath as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    if "?" in text or "#" in text or "%" in text or canonical != text:
        raise ValueError(f"{text!r} is not a normalised path (did you mean {canonical!r}?)")
    # Checked here, with the prefix, not after the whole file: a route's every
    # problem is reported in the same run as its neighbours' (issue 14).
    if shadows_reserved(text):
        raise ValueError(f"{text!r} is served by the gateway itself")
    return text


def _upstreams(value: Any) -> tuple[str, ...]:
    if isinstance(value, list):
        if not value:
            raise ValueError("must name at least one URL")
        return _list_of(_http_url)(value)
    return (_http_url(value),)


# -- sections ------------------------------------------------------------------
def _server(raw: Any, errors: list[str]) -> m.ServerConfig:
    s = _Section(raw, "server", errors)
    cfg = m.ServerConfig(
        host=s.get("host", _nonempty, m.DEFAULT_HOST),
        port=s.get("port", _int_range(0, 65535), m.DEFAULT_PORT),
        workers=s.get("workers", _int_range(1, 256), m.DEFAULT_WORKERS),
        max_body=s.get("max_body", parse_size, m.DEFAULT_MAX_BODY),
        trusted_proxies=s.get("trusted_proxies", _list_of(_cidr), ()),
        shutdown_grace=s.get("shutdown_grace", parse_duration, m.DEFAULT_SHUTDOWN_GRACE),
        drain_delay=s.get("drain_delay", parse_duration, m.DEFAULT_DRAIN_DELAY),
        max_connections=s.get(
            "max_connections", _int_range(1, 1_000_000), m.DEFAULT_MAX_CONNECTIONS
        ),
        header_timeout=s.get("header_timeout", _positive_duration, m.DEFAULT_HEADER_TIMEOUT),
        body_timeout=s.get("body_timeout", _positive_duration, m.DEFAULT_BODY_TIMEOUT),
        idle_timeout=s.get("idle_timeout", _positive_duration, m.DEFAULT_IDLE_TIMEOUT),
        upstream_idle_timeout=s.get(
            "upstream_idle_timeout", _positive_duration, m.DEFAULT_UPSTREAM_IDLE_TIMEOUT
        ),
        websocket_idle_timeout=s.get(
            "websocket_idle_timeout", _positive_duration, m.DEFAULT_WEBSOCKET_IDLE_TIMEOUT
        ),
        websocket_max_message=s.get(
            "websocket_max_message", _positive_size, m.DEFAULT_WEBSOCKET_MAX_MESSAGE
        ),
    )
    s.finish()
    return cfg


# An appid is sent upstream in a header and names a row in storage, and a name
# is written in routes[].apps: both letters, digits and a few separators
# (WeChat's appids are "wx" and 16 hex digits).
_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _label(what: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _nonempty(value).strip()
        if not _LABEL.fullmatch(text):
            raise ValueError(f"{text!r} is not {what} (letters, digits, '_', '.', '-')")
        return text

    return parse


_appid = _label("an appid")
_app_name = _label("a name")


def _app(raw: Any, path: str, errors: list[str]) -> tuple[m.AppConfig, bool]:
    s = _Section(raw, path, errors)
    before = len(errors)
    app = m.AppConfig(
        appid=s.get("appid", _appid),
        secret=s.get("secret", _secret),
        name=s.get("name", _app_name, None),
    )
    s.finish()
    return app, len(errors) == before


def _apps(raw: Any, errors: list[str]) -> tuple[m.AppConfig, ...]:
    if not isinstance(raw, list) or not raw:
        errors.append("wechat.apps: must be a non-empty list of {appid, secret, name}")
        return ()
    read = [_app(item, f"wechat.apps[{i}]", errors) for i, item in enumerate(raw)]
    # An appid or a name may appear once across both: a route's `apps` entry must
    # name exactly one app. Labels of an item with another bad key still count.
    seen: dict[str, int] = {}
    for i, (app, _) in enumerate(read):
        for label in dict.fromkeys((app.appid, app.name)):
            if label is None:
                continue
            if label in seen and seen[label] != i:
                first = seen[label]
                errors.append(f"wechat.apps[{i}]: {label!r} already names wechat.apps[{first}]")
            seen.setdefault(label, i)
    return tuple(app for app, ok in read if ok)


def _wechat(raw: Any, errors: list[str]) -> m.WechatConfig:
    s = _Section(raw, "wechat", errors)
    if "apps" in s.raw:
        apps = _apps(s.raw["apps"], errors)
        s.known.append("apps")
        for key in ("appid", "secret"):
            if key in s.raw:
                s.known.append(key)
                errors.append(f"wechat.{key}: give either appid/secret or apps, not both")
    else:
        # The single-app form: one app, without a name.
        appid, secret = s.get("appid", _appid), s.get("secret", _secret)
        apps = (m.AppConfig(appid, secret),) if appid and secret else ()
    cfg = m.WechatConfig(
        apps=apps or (m.AppConfig("", m.Secret("")),),  # only seen if errors are raised
        api_base=s.get("api_base", _http_url, m.DEFAULT_WECHAT_API_BASE),
        timeout=s.get("timeout", _positive_duration, m.DEFAULT_WECHAT_TIMEOUT),
        fake=s.get("fake", _bool, False),
    )
    s.finish()
    return cfg


def _token(raw: Any, errors: list[str]) -> m.TokenConfig:
    s = _Section(raw, "token", errors)
    cfg = m.TokenConfig(
        secret=s.get("secret", _token_secret),
        previous_secrets=s.get("previous_secrets", _list_of(_token_secret), ()),
        ttl=s.get("ttl", _positive_duration, m.DEFAULT_TOKEN_TTL),
        header=s.get("header", _header_name, m.DEFAULT_TOKEN_HEADER),
        issuer=s.get("issuer", _nonempty, m.DEFAULT_TOKEN_ISSUER),
        leeway=s.get("leeway", parse_duration, 0.0),
    )
    s.finish()
    return cfg


def _identity(raw: Any, errors: list[str]) -> m.IdentityConfig:
    s = _Section(raw, "identity", errors)
    cfg = m.IdentityConfig(
        openid_header=s.get("openid_header", _header_name, m.DEFAULT_OPENID_HEADER),
        unionid_header=s.get("unionid_header", _header_name, m.DEFAULT_UNIONID_HEADER),
        appid_header=s.get("appid_header", _header_name, m.DEFAULT_APPID_HEADER),
        phone_header=s.get("phone_header", _header_name, None),
        assertion=s.get("assertion", lambda v: _assertion(v, errors), None),
    )
    s.finish()
    return cfg


def _assertion(raw: Any, errors: list[str]) -> m.AssertionConfig | None:
    s = _Section(raw, "identity.assertion", errors)
    keys = s.get("keys", _list_of(_assertion_key))
    cfg = m.AssertionConfig(
        keys=keys or (),
        header=s.get("header", _header_name, m.DEFAULT_ASSERTION_HEADER),
        ttl=s.get("ttl", _positive_duration, m.DEFAULT_ASSERTION_TTL),
    )
    s.finish()
    if keys == ():
        errors.append("identity.assertion.keys: must name at least one key file")
    return cfg if cfg.keys else None


def _assertion_key(value: Any) -> m.AssertionKey:
    """An EC P-256 private key in PEM (``gateway keys generate`` writes one)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = _nonempty(value)
    try:
        with open(path, "rb") as fh:
            pem = fh.read()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        # Never the file's content: it is a private key.
        raise ValueError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{path}: not an EC P-256 key (ES256 needs one)")
    return m.AssertionKey(path, key)


def _upstream_tls(raw: Any, path: str, errors: list[str]) -> m.UpstreamTLSConfig | None:
    s = _Section(raw, path, errors)
    before = len(errors)
    ca = s.get("ca", _readable_file, None)
    cert = s.get("cert", _readable_file, None)
    key = s.get("key", _readable_file, None)
    server_name = s.get("server_name", _nonempty, None)
    s.finish()
    if (cert is None) != (key is None):
        errors.append(f"{path}: cert and key go together (a client certificate and its key)")
    if len(errors) > before:
        return None
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        errors.append(f"{path}: the certificates cannot be used ({reason})")
        return None
    return m.UpstreamTLSConfig(ca, cert, key, server_name, context)


def _readable_file(value: Any) -> str:
    path = _nonempty(value)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"{path}: not a readable file")
    return path


def _route(raw: Any, path: str, default_max_body: int, errors: list[str]) -> m.RouteConfig:
    s = _Section(raw, path, errors)
    cfg = m.RouteConfig(
        prefix=s.get("prefix", _route_prefix),
        upstreams=s.get("upstream", _upstreams),
        auth=s.get("auth", _auth, "required"),
        strip_prefix=s.get("strip_prefix", _bool, False),
        timeout=s.get("timeout", _positive_duration, m.DEFAULT_ROUTE_TIMEOUT),
        max_body=s.get("max_body", parse_size, None),
        websocket=s.get("websocket", _bool, False),
        rate_limit=s.get("rate_limit", parse_rate, None),
        apps=s.get("apps", _app_labels, None),
        tls=s.get("tls", lambda v: _upstream_tls(v, f"{path}.tls", errors), None),
    )
    s.finish()
    if (
        cfg.tls is not None
        and cfg.upstreams
        and not any(urlsplit(u).scheme == "https" for u in cfg.upstreams)
    ):
        errors.append(f"{path}.tls: the route has no https:// upstream to use it")
    return cfg


def _app_labels(value: Any) -> frozenset[str]:
    """A route's ``apps`` as written (names or appids); resolved to appids by
    :func:`_resolve_route_apps` once the apps are known."""
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of app names or appids")
    return frozenset(_list_of(_app_name)(value))


def _routes(raw: Any, default_max_body: int, errors: list[str]) -> tuple[m.RouteConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        errors.append("routes: must be a list")
        return ()
    routes = tuple(_route(r, f"routes[{i}]", default_max_body, errors) for i, r in enumerate(raw))
    first_index: dict[str, int] = {}
    for i, route in enumerate(routes):
        if route.prefix is None:
            continue
        if route.prefix in first_index:
            first = first_index[route.prefix]
            errors.append(f"routes[{i}].prefix: {route.prefix!r} already used by routes[{first}]")
        first_index.setdefault(route.prefix, i)
    return routes


def _cross_checks(cfg: m.Config, errors: list[str]) -> None:
    """Rules that involve more than one key.

    Run whatever else is wrong, so one run reports everything; a rule is
    skipped only when one of its keys is already reported, since that key then
    holds its default, not what the file says.
    """
    token_ok = not _reported(errors, "token.header")
    reserved = {"connection", "host", "content-length", "transfer-encoding", "upgrade", "cookie"}
    if token_ok and cfg.token.header.lower() in reserved:
        errors.append(f"token.header: {cfg.token.header!r} cannot carry the token")
    if any(e.startswith("identity.") for e in errors):
        return
    # Folded as the header rules fold them: `X_AppId` is `x-appid` to many backends.
    seen: dict[str, str] = {}
    named = {
        key: getattr(cfg.identity, key)
        for key in ("openid_header", "unionid_header", "appid_header", "phone_header")
    }
    if cfg.identity.assertion is not None:
        named["assertion.header"] = cfg.identity.assertion.header
    for key, name in named.items():
        if name is None:
            continue
        folded = name.lower().replace("_", "-")
        if folded in seen:
            errors.append(f"identity.{key}: must differ from identity.{seen[folded]}")
        seen.setdefault(folded, key)
        if folded in reserved or folded in ("x-forwarded-for", "x-request-id", "forwarded"):
            errors.append(f"identity.{key}: {name!r} is a header the gateway or HTTP owns")
    if token_ok and cfg.token.header.lower().replace("_", "-") in seen:
        errors.append("token.header: must differ from the identity headers")


def _resolve_route_apps(
    routes: tuple[m.RouteConfig, ...], wechat: m.WechatConfig, errors: list[str]
) -> tuple[m.RouteConfig, ...]:
    """Each route's ``apps`` (names or appids) as appids; an unknown one is an error."""
    by_label = {label: app.appid for app in wechat.apps for label in (app.appid, app.name) if label}
    resolved = []
    for i, route in enumerate(routes):
        if route.apps is None:
            resolved.append(route)
            continue
        unknown = sorted(label for label in route.apps if label not in by_label)
        # Judged unless the apps themselves are unreadable (a bad timeout says
        # nothing about which apps exist).
        unreadable = any(_reported(errors, f"wechat.{k}") for k in ("apps", "appid", "secret"))
        if unknown and not unreadable:
            known = ", ".join(app.label for app in wechat.apps)
            errors.append(
                f"routes[{i}].apps: {', '.join(map(repr, unknown))} is not a configured app"
                f" (apps: {known})"
            )
        if route.auth == "public":
            errors.append(
                f"routes[{i}].apps: a public route never reads the token; "
                "use auth: required or optional"
            )
        appids = frozenset(by_label[label] for label in route.apps if label in by_label)
        resolved.append(dataclasses.replace(route, apps=appids))
    return tuple(resolved)


def _reported(errors: list[str], key: str) -> bool:
    """Whether a problem of ``key`` (or of one of its items) is already listed."""
    return any(e.startswith((f"{key}:", f"{key}[")) for e in errors)


def build_config(raw: Any, env: Mapping[str, str] | None = None) -> m.Config:
    """Validate a parsed YAML document into a :class:`Config` or raise ConfigError."""
    errors: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): must be a mapping of sections"])
    raw = _interpolate(raw, "", os.environ if env is None else env, errors)
    top = _Section(raw, "", errors)
    server = top.get("server", lambda v: _server(v, errors), m.ServerConfig())
    wechat = _wechat(raw.get("wechat"), errors)
    token = _token(raw.get("token"), errors)
    top.known += ["wechat", "token"]
    storage = _storage(raw.get("storage"), errors)
    limits_section = _Section(raw.get("rate_limits"), "rate_limits", errors)
    limits = m.RateLimitsConfig(
        login_per_ip=limits_section.get(
            "login_per_ip", parse_rate, cast(Rate | None, m.DEFAULT_LOGIN_RATE)
        ),
        ipv6_prefix=limits_section.get("ipv6_prefix", _ipv6_prefix, m.DEFAULT_IPV6_PREFIX),
    )
    limits_section.finish()
    identity = _identity(raw.get("identity"), errors)
    log = _log(raw.get("log"), errors)
    top.known += ["storage", "rate_limits", "identity", "log"]
    upstream_tls = top.get("upstream_tls", lambda v: _upstream_tls(v, "upstream_tls", errors), None)
    no_routes: tuple[m.RouteConfig, ...] = ()
    routes = top.get("routes", lambda v: _routes(v, server.max_body, errors), no_routes)
    top.finish()
    routes = _resolve_route_apps(routes, wechat, errors)
    cfg = m.Config(server, wechat, token, storage, identity, limits, routes, log, upstream_tls)
    _cross_checks(cfg, errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def load_config(path: str, env: Mapping[str, str] | None = None) -> m.Config:
    """Read and validate ``path``; every problem is in the raised ConfigError."""
    try:
        with open(path, encoding="utf-8") as fh:
            text, refs = _shield_references(fh.read())
        raw = _unshield(yaml.load(text, Loader=_StrictLoader), refs)  # noqa: S506 - SafeLoader
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{path}:{where}: invalid YAML: {problem}"]) from None
    return build_config(raw, env)


__all__ = ["ConfigError", "Rate", "build_config", "load_config"]
