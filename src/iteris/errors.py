"""One exception type for every problem a user can fix, so the CLI can print it without a traceback."""


class IterisError(ValueError):
    """Bad input or configuration: the message says what is wrong and how to fix it."""
