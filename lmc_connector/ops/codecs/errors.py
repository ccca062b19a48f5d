"""The codec error types."""

from __future__ import annotations


class CodecError(ValueError):
    """A blob is malformed, truncated, corrupted or does not match what was asked of it."""


class UnknownCodecError(ValueError):
    """No codec is registered under the requested name."""
