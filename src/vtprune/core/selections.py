"""`press.last_selection` per thread: one press may serve several threads (or models) at once.

The engine records each request's stages with `press.last_selection = [...]` in the thread that runs the
forward; `LastSelection` keeps that record per thread and per press, so a thread always reads the selection of
its own last request, never one another thread made in between.
"""

from __future__ import annotations

import threading
import weakref

_RECORDS = threading.local()


class LastSelection:
    """Mixin of `Press`: the `last_selection` property, kept per thread (see the module docstring)."""

    @property
    def last_selection(self) -> list:
        """The stages (`StageSelection`s) of the last request this press pruned in the calling thread ([] before
        the first)."""
        records = getattr(_RECORDS, "by_press", None)
        entry = None if records is None else records.get(id(self))
        if entry is None or entry[0]() is not self:
            return []
        return entry[1]

    @last_selection.setter
    def last_selection(self, value: list) -> None:
        records = _RECORDS.__dict__.setdefault("by_press", {})
        key = id(self)
        entry = records.get(key)
        if entry is None or entry[0]() is not self:  # forget the record when the press is garbage collected

            def forget(_: object) -> None:
                records.pop(key, None)

            reference = weakref.ref(self, forget)
        else:
            reference = entry[0]
        records[key] = (reference, value)


__all__ = ["LastSelection"]
