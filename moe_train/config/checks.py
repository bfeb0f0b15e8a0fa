"""What every config check is made of: `ConfigError`, whose message names the key and what is
allowed, and the two helpers that raise it. `train.py` turns a ConfigError into one line on stderr
and exit code 2."""

from __future__ import annotations


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
