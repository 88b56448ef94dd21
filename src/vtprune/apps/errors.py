"""The error every command raises for a mistake in its command line (`vtprune ...` and `vtprune testbed ...`)."""

from __future__ import annotations


class UsageError(Exception):
    """A mistake in the command line or in a file it names: one line on stderr, exit code 2."""


__all__ = ["UsageError"]
