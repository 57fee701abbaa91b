"""Exceptions shared by the genius library.

Servers map `InvalidInputError` to INVALID_ARGUMENT and batch jobs count and skip the
record it names, so it carries the record's position and a human-readable reason.
"""
from __future__ import annotations


class GeniusError(Exception):
    """Base class of every error raised on purpose by the genius library."""


class InvalidInputError(GeniusError, ValueError):
    """A caller-supplied record (text, image, pair) cannot be used.

    `index` is the record's position in the list the caller passed (None when the
    fault is not one record's, e.g. two lists of different lengths); `reason` says why.
    """

    def __init__(self, index: int | None, reason: str) -> None:
        self.index = index
        self.reason = reason
        where = f"record {index}" if index is not None else "input"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # keep (index, reason) when pickled across processes
        return (type(self), (self.index, self.reason))
