"""One copy of each helper the tests share; fixtures live in tests/conftest.py.

- gateway: test secrets, ``free_port``, ``url_of``, ``base_config``/``config_for``,
  ``route`` and the in-process ``Running`` gateway that ``start_gateway`` returns.
- procs: ``gateway run`` as a real subprocess (``spawn``, ``GatewayProcess``), its
  workers and its memory, seen from /proc.
- client: calls through aiohttp answered as plain values (``send``, ``login``).
- rawhttp: exact bytes over a raw socket (``request``, ``exchange``, ``Conn``) and
  the one response parser.
- errors: the contract's JSON error, checked alike whichever client read it.
- headers: ``fold``, how the gateway compares the header names it owns.
- upstream: the reflecting upstream, and ``served`` for any app a test needs;
  rawupstream: a TCP upstream for exact bytes and exact faults.
- sockets: which process holds a connection, and whether it still does;
  pinning: one keep-alive connection held by each worker (``pinned``, ``ask``).
- users: two apps behind ``gateway run --workers 2``, ``gateway users``, rounds
  of probes timed from one moment.
- redis, cluster, certs: a real redis-server; three instances behind HAProxy;
  certificates made in the test.
- waiting: poll for a condition with a generous deadline; "not accepted".
- metrics, secrets, nginx: /metrics parsed, secrets found in text, a real nginx.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
