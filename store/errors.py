"""The one exception type that means "the user's input is wrong", so the CLI can print it as one line.

Anything else escaping a command is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's files or options, explained in one line."""
