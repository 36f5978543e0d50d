"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""

from __future__ import annotations

import difflib
from typing import Iterable


class ArchbenchError(Exception):
    """Something the user can fix. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(ArchbenchError):
    """Bad input on the command line or in a config: an unknown name, a bad value."""

    exit_code = 2


def close_names(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    # Prefix matches catch truncated names that difflib scores low ("resid" -> "residual").
    found += [c for c in choices if c.startswith(name) and c not in found]
    return found[:n]


def unknown(what: str, name: str, choices: Iterable[str]) -> UsageError:
    """An error for an unknown name that suggests the closest valid ones."""
    choices = sorted(choices)
    close = close_names(name, choices)
    if close:
        hint = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        hint = "valid: " + ", ".join(choices) if choices else "none are registered"
    return UsageError(f"unknown {what} {name!r}; {hint}")
