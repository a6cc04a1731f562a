"""The one base class of the errors that the command line reports as a message, not a traceback."""


class VlmstatesError(Exception):
    """Bad input or a refused step; the message says what and where, so `vlmstates` prints it and exits 1.

    Each module derives its own error from this (most also from ValueError or RuntimeError, which
    `retry_guard` tells apart), so that `cli` catches this one class."""
