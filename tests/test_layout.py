"""The package's layout rules, read from its source (``ast``: nothing is imported).

1. aiohttp's internal modules (anything but ``aiohttp``, ``aiohttp.web`` and
   the documented ``aiohttp.abc``) are imported only in ``gateway/server/`` and ``gateway/proxy/pool.py``: the
   ``<3.15`` pin guards them, and a bump is checked in those two places only.
2. Each package imports from the rest of ``gateway`` only what its
   ``__init__.py`` docstring allows: the names given as Sphinx roles
   (``:mod:`gateway.errors```, ``:class:`~gateway.auth.identity.Identity```)
   from "May import" to the end of that paragraph or a sentence starting "Never".
   The docstring is the rule; this test keeps it true. Imports under
   ``TYPE_CHECKING`` count: a type is a dependency too.
3. The layering the issue names (issue 14) holds whatever the docstrings say.
4. Every package's docstring says what it owns and what it may import.

Each check also runs on a copy of the tree with one violation planted, and
must report it.
"""

from __future__ import annotations

import ast
import pkgutil
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[1]
# aiohttp's public modules: the package, the server API, and the abstract base
# classes an application subclasses (documented public API:
# https://docs.aiohttp.org/en/v3.14.1/abc.html, ``.. module:: aiohttp.abc``).
PUBLIC_AIOHTTP = frozenset({"aiohttp", "aiohttp.web", "aiohttp.abc"})
AIOHTTP_MODULES = frozenset(f"aiohttp.{m.name}" for m in pkgutil.iter_modules(aiohttp.__path__))
# Where aiohttp's internal modules may be imported (paths relative to the root).
INTERNALS_ALLOWED = ("gateway/server/", "gateway/proxy/pool.py")
# Never imported, whatever a docstring says (issue 14): the server knows nothing
# of the request path above it, observability only reads what it is handed, and
# the proxy is wired by the runtime, not the reverse.
NEVER = {
    "gateway.server": (
        "gateway.app",
        "gateway.proxy",
        "gateway.auth",
        "gateway.runtime",
        "gateway.observability",
    ),
    "gateway.observability": (
        "gateway.server",
        "gateway.proxy",
        "gateway.auth",
        "gateway.runtime",
        "gateway.app",
    ),
    "gateway.proxy": ("gateway.runtime", "gateway.app"),
}
_ROLE = re.compile(r":(?:mod|class|func|data|meth):`~?(gateway(?:\.\w+)*)`")


@dataclass(frozen=True)
class Import:
    path: str  # the importing file, relative to the root
    line: int
    target: str  # ``import X``: X; ``from X import n``: X.n (a module or a name in one)
    module: str  # the module the statement names (X)


def sources(root: Path) -> Iterator[Path]:
    yield from sorted((root / "gateway").rglob("*.py"))


def module_of(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(root: Path, path: Path) -> Iterator[Import]:
    rel = path.relative_to(root).as_posix()
    for node in ast.walk(ast.parse(path.read_text(), rel)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(rel, node.lineno, alias.name, alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                # Relative: resolved against the importing module's package.
                here = module_of(root, path).split(".")
                if path.name != "__init__.py":
                    here.pop()
                base = here[: len(here) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            for alias in node.names:
                yield Import(rel, node.lineno, f"{module}.{alias.name}", module)


def packages(root: Path) -> list[str]:
    """The sub-packages (``gateway`` itself is the whole: its rules are theirs)."""
    return sorted(module_of(root, init) for init in (root / "gateway").glob("*/__init__.py"))


def package_of(root: Path, module: str) -> str | None:
    return next((p for p in packages(root) if within(module, p)), None)


def within(target: str, allowed: str) -> bool:
    return target == allowed or target.startswith(allowed + ".")


# -- the checks: each returns its violations as readable lines -----------------------------
def aiohttp_internals(root: Path) -> list[str]:
    found = []
    for path in sources(root):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(INTERNALS_ALLOWED):
            continue
        for imp in imports(root, path):
            # ``from aiohttp import web`` names a module; ``from aiohttp import
            # ClientSession`` a name in one.
            named = imp.target if imp.target in AIOHTTP_MODULES else imp.module
            if within(named, "aiohttp") and named not in PUBLIC_AIOHTTP:
                found.append(f"{rel}:{imp.line} imports {named}")
    return found


def docstring(root: Path, package: str) -> str:
    init = root / Path(*package.split(".")) / "__init__.py"
    return ast.get_docstring(ast.parse(init.read_text())) or ""


def may_import(doc: str) -> list[str] | None:
    """The modules a package docstring allows, or None when it states no rule."""
    for paragraph in re.split(r"\n\s*\n", doc):
        _, found, rule = paragraph.partition("May import")
        if found:
            allowed = re.split(r"(?:^|[.:;]\s+)Never\b", rule, maxsplit=1)[0]
            return _ROLE.findall(allowed)
    return None


def stated_rules(root: Path) -> list[str]:
    found = []
    for package in packages(root):
        allowed = [package, *(may_import(docstring(root, package)) or ())]
        for path in sources(root):
            if package_of(root, module_of(root, path)) != package:
                continue
            for imp in imports(root, path):
                if within(imp.target, "gateway") and not any(
                    within(imp.target, name) for name in allowed
                ):
                    line = f"{imp.path}:{imp.line} imports from {imp.module}, which the "
                    found.append(line + f"docstring of {package} does not allow")
    return list(dict.fromkeys(found))  # one line per statement


def layering(root: Path) -> list[str]:
    found = []
    for path in sources(root):
        package = package_of(root, module_of(root, path))
        for imp in imports(root, path):
            for banned in NEVER.get(package or "", ()):
                if within(imp.target, banned):
                    found.append(f"{imp.path}:{imp.line} imports {imp.target} ({package})")
    return found


def undocumented(root: Path) -> list[str]:
    found = []
    for package in packages(root):
        doc = docstring(root, package)
        summary = doc.split("\n\n", 1)[0].strip()
        if not summary or summary.startswith("May import"):
            found.append(f"{package}: no docstring saying what it owns")
        if may_import(doc) is None:
            found.append(f"{package}: no 'May import' paragraph")
    return found


CHECKS = {
    "aiohttp internals": aiohttp_internals,
    "stated rules": stated_rules,
    "layering": layering,
    "docstrings": undocumented,
}


# -- the real tree ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CHECKS))
def test_the_package_keeps_its_layout(name: str) -> None:
    assert CHECKS[name](ROOT) == []


def test_every_package_is_checked() -> None:
    # A check that silently found no package would pass on anything.
    assert {"gateway.server", "gateway.proxy", "gateway.auth", "gateway.runtime"} <= set(
        packages(ROOT)
    )
    assert may_import(docstring(ROOT, "gateway.server")) == ["gateway.errors"]


# -- each check catches a planted violation --------------------------------------------------
def _plant(root: Path, file: str, line: str) -> None:
    path = root / file
    text = path.read_text()
    # After the module docstring and ``from __future__``: a plain top-level import.
    head, sep, rest = text.partition("from __future__ import annotations\n")
    path.write_text(head + sep + line + "\n" + rest if sep else line + "\n" + text)


PLANTS = [
    (
        "aiohttp internals",
        "gateway/proxy/forward.py",
        "from aiohttp.http_parser import RawResponseMessage",
        "gateway/proxy/forward.py:",
    ),
    (
        "aiohttp internals",
        "gateway/app.py",
        "from aiohttp import web_protocol",
        "imports aiohttp.web_protocol",
    ),
    (
        "stated rules",
        "gateway/auth/tokens.py",
        "from gateway.proxy.forward import forward",
        "from gateway.proxy.forward, which the docstring of gateway.auth",
    ),
    (
        "stated rules",
        "gateway/proxy/routing.py",
        "from gateway.auth.identity import Identity, IdentityResolver",
        "from gateway.auth.identity, which the docstring of gateway.proxy",
    ),
    ("layering", "gateway/server/request.py", "from gateway.app import Gateway", "gateway.app"),
    (
        "layering",
        "gateway/observability/metrics.py",
        "import gateway.server.request",
        "(gateway.observability)",
    ),
    (
        "layering",
        "gateway/proxy/paths.py",
        "from gateway.runtime import worker",
        "gateway.runtime.worker",
    ),
]


@pytest.mark.parametrize(("check", "file", "line", "reported"), PLANTS)
def test_a_planted_violation_is_reported(
    tmp_path: Path, check: str, file: str, line: str, reported: str
) -> None:
    shutil.copytree(ROOT / "gateway", tmp_path / "gateway")
    before = CHECKS[check](tmp_path)
    _plant(tmp_path, file, line)
    after = CHECKS[check](tmp_path)
    # Compared without line numbers: the planted line moves the ones below it.
    new = [v for v in after if _unnumbered(v) not in {_unnumbered(b) for b in before}]
    assert len(new) == 1 and reported in new[0], new


def _unnumbered(violation: str) -> str:
    return re.sub(r":\d+ ", " ", violation)


@pytest.mark.parametrize(
    ("package", "mangle"),
    [
        ("proxy", lambda doc: re.sub(r"May import", "Imports", doc)),
        ("auth", lambda doc: '"""\nMay import: nothing.\n"""\n'),
        ("server", lambda doc: ""),
    ],
)
def test_a_package_docstring_without_its_rules_is_reported(
    tmp_path: Path, package: str, mangle: object
) -> None:
    shutil.copytree(ROOT / "gateway", tmp_path / "gateway")
    init = tmp_path / "gateway" / package / "__init__.py"
    assert callable(mangle)
    init.write_text(mangle(init.read_text()))
    assert any(v.startswith(f"gateway.{package}:") for v in undocumented(tmp_path))


def test_a_wider_stated_rule_allows_the_import(tmp_path: Path) -> None:
    """The docstring is the rule: allowing a module there makes its import pass."""
    shutil.copytree(ROOT / "gateway", tmp_path / "gateway")
    init = tmp_path / "gateway" / "storage" / "__init__.py"
    code = init.read_text().split('"""', 2)[2]  # what follows the docstring

    def state(rule: str) -> None:
        init.write_text(f'"""Persistent state.\n\nMay import: {rule}\n"""{code}')

    _plant(tmp_path, "gateway/storage/base.py", "from gateway.errors import GatewayError")
    state("the standard library and aiosqlite; nothing of the package.")
    assert any("gateway/storage/base.py" in v for v in stated_rules(tmp_path))
    state(":mod:`gateway.errors`. Never :mod:`gateway.app`.")
    assert not any("gateway/storage/base.py" in v for v in stated_rules(tmp_path))
    state("nothing of the package. Never :mod:`gateway.errors`.")
    assert any("gateway/storage/base.py" in v for v in stated_rules(tmp_path))
