"""Header names as the gateway compares the ones it owns, and lookup in a list
of header lines kept as they arrived (order, case and repeats intact)."""

from __future__ import annotations

from typing import overload


@overload
def fold(name: str) -> str: ...
@overload
def fold(name: bytes) -> bytes: ...
def fold(name: str | bytes) -> str | bytes:
    """Any case, `_` read as `-`: how the gateway matches identity, token and
    forwarding headers, so a spoof in another spelling is still caught."""
    if isinstance(name, bytes):
        return name.lower().replace(b"_", b"-")
    return name.lower().replace("_", "-")


class HeaderLines:
    """A mixin for records with ``headers: list[tuple[str, str]]``."""

    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        """The first value of ``name`` (any case), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_values(self, *names: str) -> list[tuple[str, str]]:
        """Every line whose name folds to one of ``names`` (case, `_` -> `-`)."""
        folded = {fold(n) for n in names}
        return [(k, v) for k, v in self.headers if fold(k) in folded]
