"""The project's user errors, and the argument checks that raise them.

A ConfigError names the argument (the key of a config's `init_args`), its value and what would work; the `dmd`
command prints it as one line `error: ...` and exits with code 2. Checks run in constructors, so that a wrong
setting fails before any data or weights are loaded, never after hours of training on it.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A setting that cannot work (or would silently train something else than asked)."""


class CheckpointError(ConfigError):
    """A checkpoint path that is missing, not a checkpoint, or a checkpoint of another model."""


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN/inf and the module was told to stop."""


class ShapeMismatchError(ConfigError):
    """The data's sample shape does not fit the teacher."""


class DataNotFoundError(FileNotFoundError):
    """A data set's files are not where the config says."""


def check(ok: bool, key: str, value: Any, need: str) -> None:
    """ConfigError `key=value: need` unless ok."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {need}")


def check_int(key: str, value: Any, low: int = 1, allow_none: bool = False) -> None:
    """An integer >= low (booleans are not counts)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    check(ok, key, value, f"must be an integer >= {low}" + (" or null" if allow_none else ""))


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    """A finite real number in [low, high] ((low, high] with low_open)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    bounds = f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    check(ok, key, value, f"must be a finite number in {bounds}")


def check_fraction_range(key: str, value: Any) -> None:
    """(low, high) with 0 <= low < high <= 1: a part of the noise schedule, as fractions of T."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ok = ok and 0 <= value[0] < value[1] <= 1
    check(ok, key, value, "must be [low, high] with 0 <= low < high <= 1 (fractions of the schedule's T)")


def check_choice(key: str, value: Any, choices: tuple) -> None:
    check(value in choices, key, value, f"must be one of {', '.join(map(repr, choices))}")
