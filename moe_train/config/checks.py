"""What every config check is made of: `ConfigError`, whose message names the key and what is
allowed, and the helpers that raise it. `train.py` turns a ConfigError into one line on stderr
and exit code 2."""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A user-facing configuration mistake: the message names the key and what is allowed."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (or its type's name): how a library's error is quoted
    in our one-line messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """`key`'s value must be one of `allowed`; the message lists them."""
    check(value in allowed, f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def is_finite(value: float) -> bool:
    """Neither NaN nor an infinity (an int always is, however large: math.isfinite would overflow)."""
    return isinstance(value, int) or math.isfinite(value)


def in_range(
    key: str,
    value: float,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    note: str = "",
) -> None:
    """`key`'s value must be a finite number from low to high, each bound included unless open.
    NaN and the infinities always fail: every comparison with NaN is false, so a bare `x <= 1`
    would let NaN through, and `x > 0` would let inf through. The message states the range, then
    `note` in parentheses (e.g. what null or 0 means instead)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if is_finite(value) and above and below:
        return
    if math.isinf(high):  # "x=inf must be > 0" would read wrong: say finite where that failed
        allowed = f"{'>' if low_open else '>='} {low}"
        allowed = allowed if is_finite(value) else f"a finite number {allowed}"
    else:
        allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ConfigError(f"{key}={value} must be {allowed}" + (f" ({note})" if note else ""))


def positive(key: str, value: float, note: str = "") -> None:
    """`key`'s value must be a finite number > 0."""
    in_range(key, value, 0, low_open=True, note=note)


def at_least(key: str, value: float, low: float, note: str = "") -> None:
    """`key`'s value must be a finite number >= low."""
    in_range(key, value, low, note=note)
