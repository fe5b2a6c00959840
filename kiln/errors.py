"""kiln's own errors.

Each also derives from the builtin exception kiln raised before it had its own classes, so
`except ValueError` or `except MemoryError` keeps catching them. This module imports
nothing: every layer of kiln may raise these.
"""

from __future__ import annotations

__all__ = ["EngineDeadError", "KilnError", "ModelFileError", "OutOfMemory", "RequestError"]


class KilnError(Exception):
    """Base of kiln's own errors."""


class RequestError(KilnError, ValueError):
    """A bad request (options, prompt, lengths): the caller's fault, fixed by asking differently."""


class ModelFileError(KilnError, ValueError):
    """A model file that is missing pieces, truncated or corrupt (or disagrees with its config)."""


class OutOfMemory(KilnError, MemoryError):
    """Not enough memory for the weights or the KV cache; the message says how much was needed
    and what to lower."""


class EngineDeadError(KilnError, RuntimeError):
    """The engine's loop stopped on an error it could not contain: every request in it
    failed, and the engine takes no more. The message names the cause; start a new engine."""
