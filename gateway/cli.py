"""The ``gateway`` command: run, check, fake-wechat (contract section 2), users, storage."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.observability import logs  # stdlib logging only: cheap before SIGHUP is held

# Nothing heavy is imported at module level: ``gateway run`` holds SIGHUP back
# (``_hold_hangups``) before its first slow step, and importing the config
# package alone takes ~100 ms.
if TYPE_CHECKING:
    from gateway.config import Config

DEV_TOKEN_SECRET_MARK = "dev-only"  # noqa: S105 - a marker, not a secret


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="WeChat mini-program auth gateway")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve")
    run.add_argument(
        "-c", "--config", default="config.yaml", help="config file (default ./config.yaml)"
    )
    run.add_argument("--workers", type=int, help="override server.workers")
    # Set by the supervisor for its workers: bind with SO_REUSEPORT, watch the parent.
    run.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)
    check = commands.add_parser("check", help="validate the config and print the routes")
    check.add_argument("-c", "--config", default="config.yaml")
    fake = commands.add_parser("fake-wechat", help="run a fake WeChat API server (development aid)")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8081)
    fake.add_argument(
        "--app",
        action="append",
        type=_fake_app,
        metavar="APPID[:SECRET]",
        help="serve this mini program, checking its secret if given; repeat for more apps"
        " (default: any appid and secret)",
    )
    users = commands.add_parser(
        "users", help="show a user's records, or revoke every session of a user"
    )
    users_commands = users.add_subparsers(dest="users_command", required=True)
    for name, text in (
        ("show", "print the user's records (one JSON object per app; no session_key)"),
        ("revoke", "revoke every session of the user; every worker refuses them within 1 s"),
    ):
        sub = users_commands.add_parser(name, help=text)
        sub.add_argument("-c", "--config", default="config.yaml")
        sub.add_argument("--appid", help="the user's app (with --openid; or narrows --unionid)")
        sub.add_argument("--openid", help="the user's openid in --appid")
        sub.add_argument("--unionid", help="the person's unionid: their records in every app")
    storage = commands.add_parser("storage", help="copy a store into another (SQLite, Redis)")
    storage_commands = storage.add_subparsers(dest="storage_command", required=True)
    migrate = storage_commands.add_parser(
        "migrate",
        help="copy users (every app) and live revocations and bans from one store to another;"
        " idempotent",
    )
    migrate.add_argument("--from", dest="source", required=True, metavar="URL")
    migrate.add_argument("--to", dest="target", required=True, metavar="URL")
    migrate.add_argument(
        "-c", "--config", help="take the default appid and storage.prefix from this config"
    )
    migrate.add_argument(
        "--default-appid", help="the app owning a single-app SQLite file's users (or use -c)"
    )
    migrate.add_argument("--from-prefix", help="key prefix of a Redis source (default wxgw:)")
    migrate.add_argument("--to-prefix", help="key prefix of a Redis target (default wxgw:)")
    keys = commands.add_parser("keys", help="make keys for identity.assertion")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_commands.add_parser(
        "generate", help="write a new EC P-256 private key (PEM, mode 0600) to PATH"
    )
    generate.add_argument("path", metavar="PATH")
    demo = commands.add_parser("demo-upstream", help="run an upstream that echoes what it receives")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=9000)
    return parser


def _fake_app(value: str) -> tuple[str, str | None]:
    """``APPID[:SECRET]`` of ``fake-wechat --app``: an appid has no colon, a secret may."""
    appid, colon, secret = value.partition(":")
    if not appid or (colon and not secret):
        # Not echoed: the value may hold a secret.
        raise argparse.ArgumentTypeError("expected APPID or APPID:SECRET, neither part empty")
    return appid, secret or None


def _load(path: str) -> Config | None:
    from gateway.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _describe(config: Config) -> str:
    from gateway.proxy.routing import Router

    names = {app.appid: app.label for app in config.wechat.apps}
    # Appids and names only: never a secret.
    lines = ["apps (the first is the default: logins without appid, older data):"]
    for app in config.wechat.apps:
        lines.append(f"  {app.appid}" + (f"  name={app.name}" if app.name else ""))
    assertion = config.identity.assertion
    if assertion is not None:
        from gateway.auth.assertion import public_jwk

        kids = [public_jwk(k.key)["kid"] for k in assertion.keys]
        also = f", also published {', '.join(kids[1:])}" if kids[1:] else ""
        lines.append(
            f"identity assertion: header {assertion.header}, ttl {assertion.ttl:g}s,"
            f" signing kid {kids[0]}{also}"
        )
    lines.append("routes (longest prefix first):")
    for route in Router(config.routes, config.server.max_body).routes:
        cfg = route.config
        lines.append(
            f"  {cfg.prefix:<20} -> {', '.join(cfg.upstreams)}  auth={cfg.auth}"
            f" strip_prefix={'yes' if cfg.strip_prefix else 'no'} timeout={cfg.timeout:g}s"
            f" max_body={route.max_body} websocket={'yes' if cfg.websocket else 'no'}"
            + (f" rate_limit={cfg.rate_limit}" if cfg.rate_limit else "")
            + (f" apps={','.join(sorted(names[a] for a in cfg.apps))}" if cfg.apps else "")
        )
    if not config.routes:
        lines.append("  (none: every proxied request is 404 no_route)")
    return "\n".join(lines)


def _users(args: argparse.Namespace) -> int:
    """``gateway users show|revoke``: exit 0 done, 1 no such user or storage
    failure, 2 bad arguments or config."""
    import asyncio
    import time

    from gateway.auth import users
    from gateway.runtime.services import open_storage
    from gateway.storage import StorageError

    if (args.unionid is None) == (args.openid is None) or (
        args.openid is not None and args.appid is None
    ):
        print("give --appid with --openid, or --unionid (optionally with --appid)", file=sys.stderr)
        return 2
    config = _load(args.config)
    if config is None:
        return 2
    appid = args.appid
    if appid is not None:
        # A name works as in routes[].apps; the records are keyed by appid.
        by_label = {label: a.appid for a in config.wechat.apps for label in (a.appid, a.name)}
        if appid not in by_label:
            print(f"--appid: {appid!r} is not configured in {args.config}", file=sys.stderr)
            return 2
        appid = by_label[appid]
    who = {"appid": appid, "openid": args.openid, "unionid": args.unionid}
    missing = _missing_store(config.storage.url)
    if missing is not None:
        # Opening would create an empty store, then report "no such user": a
        # command run from the wrong directory must say it looks at nothing.
        print(
            f"no database at {missing}: is this the config the gateway runs with?",
            file=sys.stderr,
        )
        return 2

    async def act() -> None:
        storage = open_storage(config.storage, config.wechat.default_app.appid)
        await storage.open()
        try:
            if args.users_command == "show":
                await users.show(storage, sys.stdout, **who)
            else:
                await users.revoke(storage, config, time.time, sys.stdout, **who)
        finally:
            await storage.close()

    try:
        asyncio.run(act())
    except users.NoSuchUser:
        print("no such user", file=sys.stderr)
        return 1
    except StorageError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


def _storage(args: argparse.Namespace) -> int:
    """``gateway storage migrate``: exit 0 copied, 1 storage failure, 2 bad
    arguments or config."""
    import asyncio
    import time

    from gateway.storage import StorageError
    from gateway.storage.migrate import copy_store
    from gateway.storage.redis_url import masked
    from gateway.storage.urls import store_for

    config = _load(args.config) if args.config else None
    if args.config and config is None:
        return 2
    appid = args.default_appid or (config.wechat.default_app.appid if config else None)
    prefix = config.storage.prefix if config else "wxgw:"
    ends = ((args.source, args.from_prefix or prefix), (args.target, args.to_prefix or prefix))
    if ends[0] == ends[1]:
        print("--from and --to name the same store: nothing to do", file=sys.stderr)
        return 2
    missing = _missing_store(args.source)
    if missing is not None:
        print(f"--from: no database at {missing}", file=sys.stderr)
        return 2
    try:
        source, target = (store_for(u, default_appid=appid, prefix=p) for u, p in ends)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2

    async def act() -> str:
        # The target first: opening a SQLite source of an older schema upgrades
        # it, which should not happen for a target that turns out unreachable.
        await target.open()
        try:
            await source.open()
            try:
                return str(await copy_store(source, target, time.time()))
            finally:
                await source.close()
        finally:
            await target.close()

    try:
        copied = asyncio.run(act())
    except StorageError as exc:
        print(str(exc), file=sys.stderr)
        if appid is None and "appid" in str(exc):
            print("give --default-appid APPID, or -c CONFIG (its first app)", file=sys.stderr)
        return 1
    print(f"copied {copied}")
    print(f"  from {masked(args.source)}  to {masked(args.target)}")
    return 0


def _missing_store(url: str) -> str | None:
    """The path of a SQLite store that does not exist yet, else None."""
    import os

    from gateway.storage.sqlite import MEMORY, sqlite_path_from_url

    try:
        path = sqlite_path_from_url(url)
    except ValueError:
        return None  # opening reports it
    return None if path == MEMORY or os.path.exists(path) else path


def _warn_insecure(config: Config) -> None:
    """Once per ``gateway run``: in the supervisor, or the one process, not per worker."""
    log = logging.getLogger("gateway")
    if DEV_TOKEN_SECRET_MARK in config.token.secret.reveal():
        log.warning(
            "token.secret is the development default: anyone can mint tokens. "
            "Set GATEWAY_TOKEN_SECRET before exposing this gateway."
        )
    _warn_exposed_storage(config, log)


def _warn_exposed_storage(config: Config, log: logging.Logger) -> None:
    # Only warned, not changed: the file is the operator's, and may be shared
    # on purpose (a backup group). A file the gateway creates is 0600.
    from gateway.storage.files import exposed
    from gateway.storage.sqlite import MEMORY, sqlite_path_from_url

    try:
        path = sqlite_path_from_url(config.storage.url)
    except ValueError:
        return  # opening the store reports it, with the fix
    loose = [] if path == MEMORY else exposed(path)
    if loose:
        log.warning(
            "storage: %s is open to group or others, and it holds session keys: "
            "chmod 600 the files and 700 their directory",
            ", ".join(loose),
        )


def _hold_hangups() -> None:
    """Keep SIGHUP pending, not fatal, until the gateway can reload.

    Its default action ends the process, and the handler that reloads exists
    only once the gateway serves (about a second of imports and start-up). So
    SIGHUP is blocked here, first thing; :func:`gateway.runtime.worker.serve` unblocks
    it once its handler is in place, and a hangup that came in between is then
    delivered: a reload, once ready. A hangup from before this point is
    dropped: the config file is read after it. Workers are spawned with SIGHUP
    already blocked (the mask is inherited), so not even their interpreter's
    start-up can be cut short by one.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    if signal.sigtimedwait({signal.SIGHUP}, 0) is not None:
        logging.getLogger("gateway").info("SIGHUP before the config was read: nothing to reload")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup()
    if args.command == "check":
        config = _load(args.config)
        if config is None:
            return 2
        print(f"{args.config}: OK")
        print(_describe(config))
        return 0
    if args.command == "run":
        _hold_hangups()
        config = _load(args.config)
        if config is None:
            return 2
        logs.set_level(config.log.level)  # the gateway's loggers; libraries stay >= INFO
        logs.set_format(config.log.format)  # here, so supervisor and workers alike
        from gateway.runtime import supervisor, worker

        workers = args.workers or config.server.workers
        if args.worker_of is not None:
            return worker.run_worker(
                config, reuse_port=True, parent_pid=args.worker_of, config_path=args.config
            )
        _warn_insecure(config)
        if workers <= 1:
            return worker.run_worker(config, config_path=args.config)
        return supervisor.Supervisor(
            supervisor.worker_argv(args.config),
            workers,
            config.server.drain_delay + config.server.shutdown_grace,
        ).run()
    if args.command == "fake-wechat":
        from gateway.wechat import fake

        fake.run(args.host, args.port, apps=dict(args.app) if args.app else None)
        return 0
    if args.command == "users":
        return _users(args)
    if args.command == "storage":
        return _storage(args)
    if args.command == "keys":
        from gateway.auth.keys import KeyFileExists, generate_key

        try:
            kid = generate_key(args.path)
        except KeyFileExists:
            print(f"{args.path} exists: not overwritten (it may be in use)", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"{args.path}: cannot write ({exc.strerror})", file=sys.stderr)
            return 1
        print(f"{args.path}: new EC P-256 key, kid {kid}")
        return 0
    if args.command == "demo-upstream":
        from gateway import demo

        demo.run(args.host, args.port)
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands
