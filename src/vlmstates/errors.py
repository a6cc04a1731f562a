"""The one base class of the errors that the command line reports as a message, not a traceback."""


class VlmstatesError(Exception):
    """Bad input or a refused step; the message says what and where, so `vlmstates` prints it and exits 1.

    Each module derives its own error from this (most also from ValueError or RuntimeError, so that code
    catching those catches these too), and `cli` catches this one class. Retrying goes by the exit status,
    not by these bases: `vlmstates.workflow.retry_guard` takes exit 1 for a failure a retry would repeat and
    runs no further attempt; other exceptions (out of memory, the network, ...) reach it uncaught, and it
    sorts them with `repeats_on_retry`."""
