"""The documentation site builds warning-free (`mkdocs build --strict`), with
every page of docs/ in its navigation, and the pages that mirror the code stay
complete: every error code has a troubleshooting entry, every framework guide
reads every identity header."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from gateway import errors
from tests.support import ROOT

DOCS = ROOT / "docs"


def nav_pages(nav: list[Any]) -> list[str]:
    pages: list[str] = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            pages += nav_pages(value)
        elif not re.match(r"^[a-z]+://", value):
            pages.append(value)
    return pages


def error_codes() -> set[str]:
    return {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.GatewayError) and "code" in vars(cls)
    }


def test_mkdocs_build_is_strict_and_warning_free(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    for page in (
        "index",
        "quickstart",
        "request-flow",
        "upstream-guides",
        "deployment",
        "troubleshooting",
    ):
        assert (site / page / "index.html").is_file() or page == "index", page
    assert (site / "index.html").is_file()
    # The OpenAPI document is published with the site, where the pages link to it.
    assert (site / "openapi.yaml").read_bytes() == (DOCS / "openapi.yaml").read_bytes()


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["strict"] is True
    assert config["theme"]["name"] == "mkdocs"
    pages = nav_pages(config["nav"])
    assert len(pages) == len(set(pages)), pages
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert set(pages) == on_disk


def test_troubleshooting_explains_every_error_code() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", text, re.S | re.M))
    codes = error_codes()
    assert len(codes) > 15
    assert set(sections) == codes
    for code in codes:
        status = next(
            cls.status
            for cls in vars(errors).values()
            if isinstance(cls, type)
            and issubclass(cls, errors.GatewayError)
            and vars(cls).get("code") == code
        )
        body = sections[code].strip()
        assert body.startswith(f"**{status}"), f"{code}: the section should open with its status"
        assert "What to do" in body or "what to do" in body, code
        assert f"| {status} | `{code}` | [{code}](#{code}) |" in text, code


def test_upstream_guides_read_every_identity_header_in_every_framework() -> None:
    text = (DOCS / "upstream-guides.md").read_text()
    sections = dict(re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, re.S | re.M))
    for framework in ("Spring Boot", "Express (Node.js)", "Flask", "FastAPI", "Go (net/http)"):
        code = "".join(re.findall(r"```\w+\n(.*?)```", sections[framework], re.S))
        # X-AppId with X-OpenId: an openid is unique only inside its app.
        for header in ("X-OpenId", "X-UnionId", "X-AppId", "X-Request-Id"):
            assert header in code, f"{framework} does not read {header}"
    why = sections["Why an upstream must be reachable only through the gateway"]
    for measure in ("loopback", "Firewall", "mutual TLS", "shared-secret header"):
        assert measure in why, measure


def test_quickstart_starts_with_the_readme_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = (DOCS / "quickstart.md").read_text()
    for command in ("./scripts/demo", "./scripts/test"):
        assert command in readme
        assert command in quickstart.split("## ", 1)[0], command
