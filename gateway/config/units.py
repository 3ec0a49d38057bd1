"""Durations, sizes and rates as the contract writes them (section 3).

Each parser takes the raw YAML value and returns the number or raises
``ValueError`` with a message meant for the person editing the file; the loader
prefixes it with the key path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    # Decimal units are accepted because people write them; they mean powers of ten.
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def _number(value: object) -> float | None:
    # bool is an int subclass; `timeout: true` is a typo, not one second.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def parse_duration(value: object) -> float:
    """Seconds from ``5``, ``1.5``, ``"500ms"``, ``"5s"``, ``"2m"``, ``"2h"``, ``"30d"``."""
    number = _number(value)
    if number is not None:
        seconds = number
    elif isinstance(value, str) and (m := _NUMBER_UNIT.match(value)):
        unit = m.group(2).lower() or "s"
        if unit not in _DURATION_UNITS:
            raise ValueError(f"unknown duration unit {m.group(2)!r}; use ms, s, m, h or d")
        seconds = float(m.group(1)) * _DURATION_UNITS[unit]
    else:
        raise ValueError("not a duration; write seconds or a string like 500ms, 5s, 2m, 2h, 30d")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``1024``, ``"512KiB"``, ``"10MiB"``, ``"1GiB"``."""
    number = _number(value)
    if number is not None and number == int(number):
        size = int(number)
    elif isinstance(value, str) and (m := _NUMBER_UNIT.match(value)):
        unit = m.group(2).lower()
        if unit not in _SIZE_UNITS:
            raise ValueError(f"unknown size unit {m.group(2)!r}; use B, KiB, MiB or GiB")
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ValueError("not a size; write bytes or a string like 512KiB, 10MiB, 1GiB")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


@dataclass(frozen=True, slots=True)
class Rate:
    """A token-bucket rate: ``per_second`` refill, bursts up to ``burst`` requests."""

    count: int
    period: float  # seconds

    @property
    def per_second(self) -> float:
        return self.count / self.period

    @property
    def burst(self) -> int:
        return max(1, self.count)

    def __str__(self) -> str:
        return f"{self.count}/{'s' if self.period == 1 else 'm'}"


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m|sec|second|min|minute)\s*$")


def parse_rate(value: object) -> Rate | None:
    """``"20/s"`` or ``"100/m"``; ``0`` (or ``"0/s"``) turns the limit off and gives None."""
    if _number(value) == 0:
        return None
    if not isinstance(value, str) or not (m := _RATE.match(value)):
        raise ValueError("not a rate; write N/s or N/m (0 turns it off)")
    count = int(m.group(1))
    if count == 0:
        return None
    return Rate(count, 1.0 if m.group(2).startswith("s") else 60.0)
