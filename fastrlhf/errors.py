"""The error type for bad input: what the user gave (a flag, a config file, a data line, a path, a model
directory, a reward function) is wrong, and the message says where and why.

The CLI reports an ``InputError`` in one line with exit code 2. Any other exception is a bug or a fault
of the machine and keeps its traceback, so a ``ValueError`` raised inside an op is never mistaken for
the user's mistake. ``InputError`` is a ``ValueError``, so library callers that catch ``ValueError``
keep working.
"""


class InputError(ValueError):
    """Bad input from the user, with what and where in the message."""
