"""The error users see as one line: bad input, named with its fix."""


class UsageError(ValueError):
    """Bad input from the user; the message names the bad value and the fix."""
