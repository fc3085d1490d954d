"""One exception type for every problem a user can fix, so the CLI can print it without a traceback."""


class IterisError(ValueError):
    """Bad input or configuration: the message says what is wrong and how to fix it."""


class Terminated(BaseException):
    """SIGTERM (kill, timeout, a scheduler ending the job), raised where the process is, so that the same
    clean-up as for Ctrl-C runs: temporaries removed, nothing half-written left."""
