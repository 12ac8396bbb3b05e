"""The one exception type for mistakes a user can fix. The CLI prints its message without a traceback."""


class DisbackError(Exception):
    """A user-facing error: bad input, bad configuration, a file that does not match what it should be."""
