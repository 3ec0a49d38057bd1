"""A real ``redis-server`` (Debian's package) on a free loopback port, in a tmp dir.

No mock: the Redis store is tested against the server it runs against in
production. Missing binary = a loud failure naming the package, never a skip
(CI installs it: .ci/run). ``stop()`` and ``start()`` again on the same port
and directory are how tests take Redis away and bring it back; with ``aof=True``
(append-only file, as docs/deployment.md tells production to run it) what it held
before is there again after such a restart.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway import free_port
from tests.support.waiting import PROMPT

PACKAGE = "redis-server"


def redis_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        pytest.fail(
            f"redis-server not found: install Debian's {PACKAGE} package "
            f"(apt-get install {PACKAGE}; .ci/run does)"
        )
    return found


class RedisServer:
    """``tls=True``: TLS only, with a self-signed certificate for 127.0.0.1 that
    ``url`` names as the CA to trust."""

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        tls: bool = False,
        aof: bool = False,
    ) -> None:
        self.directory = directory
        self.password = password
        self.tls = tls
        self.aof = aof
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.directory}/cert.pem"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.aof else "no",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            cert, key = _self_signed(self.directory)
            args[2] = "0"  # no plain-text port
            args += ["--tls-port", str(self.port), "--tls-cert-file", cert]
            args += ["--tls-key-file", key, "--tls-auth-clients", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + PROMPT
        while not self._answers():
            assert self.process is not None
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"redis-server exited ({self.process.returncode}): {log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server on port {self.port}: not ready in {PROMPT} s")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=1)
            if self.tls:
                context = ssl.create_default_context(cafile=str(self.directory / "cert.pem"))
                sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
            with sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        # With requirepass, an unauthenticated PING is -NOAUTH: up all the same.
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=PROMPT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def all_keys(self) -> list[str]:
        """Every key in db 0 (a sync client: tests look from outside the store)."""
        import redis

        client = redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, decode_responses=True
        )
        try:
            return sorted(client.scan_iter(count=1000))
        finally:
            client.close()


def _self_signed(directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, written as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def unique_prefix() -> str:
    """A key prefix of its own, so tests sharing one server never see each other."""
    return f"t-{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; each test takes a ``unique_prefix``."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may stop and start."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
