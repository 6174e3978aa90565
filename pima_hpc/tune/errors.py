"""The tune file's error type and its did-you-mean hints."""

from __future__ import annotations

import difflib

from pima_hpc.errors import ConfigError


class TuneError(ConfigError):
    """A tune file, sweep directory or Ray cluster problem the user can fix (one line, exit 2)."""


def did_you_mean(word: str, choices) -> str:
    word, choices = str(word), [str(c) for c in choices]
    guess = difflib.get_close_matches(word, choices, n=1, cutoff=0.6) or [
        c for c in choices if len(word) >= 3 and c.startswith(word)][:1]
    return f"; did you mean {guess[0]!r}?" if guess else ""
