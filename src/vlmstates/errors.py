"""The one base class of the errors that the command line reports as a message, not a traceback."""


class VlmstatesError(Exception):
    """Bad input or a refused step; the message says what and where, so `vlmstates` prints it and exits 1.

    Each module derives its own error from this (most also from ValueError or RuntimeError, so that code
    catching those catches these too), and `cli` catches this one class. Retrying goes by the exit status,
    not by these bases: `vlmstates.workflow.retry_guard` takes exit 1 for a failure a retry would repeat and
    runs no further attempt; a `RestartJob` exits EXIT_RESTART, which it leaves to Snakemake to retry; other
    exceptions (the network, ...) reach it uncaught, and it sorts them with `repeats_on_retry`."""


#: The exit status of a command that ended for a fresh process to take over (`RestartJob`): EX_TEMPFAIL.
EXIT_RESTART = 75


class RestartJob(Exception):
    """The process cannot go on but a fresh one can (out of device memory, a CUDA error that poisoned the
    process); the step saved its progress. `vlmstates` prints the message and exits EXIT_RESTART, which
    `retry_guard` leaves to Snakemake to retry. Not a VlmstatesError: those are refusals, not retried."""


class OutOfDeviceMemory(RestartJob):
    """A batch did not fit in device memory (a lone sample: not even after freeing and retrying once)."""

    def __init__(self, batch_size: int, error: str):
        super().__init__(
            f"out of device memory in a batch of {batch_size} ({error}); the samples done so far are saved. "
            f"The workflow retries the job with half the batch size; elsewhere, lower the model's batch_size "
            f"and run again"
        )
        self.batch_size = batch_size


class DeviceFailed(RestartJob):
    """A CUDA error after which every CUDA call of the process fails (device-side assert, illegal memory
    access): a fresh process continues from the saved samples."""

    def __init__(self, error: str):
        super().__init__(f"the device failed ({error}); the samples done so far are saved for a fresh process")
