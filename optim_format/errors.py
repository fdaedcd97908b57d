"""The format's one error: bytes or values that the format cannot carry or read."""

from __future__ import annotations


class FormatError(ValueError):
    """A file, header or value that does not follow the format; the message names what is wrong."""
