"""The one exception type that reaches users as a single clear line."""


class RetrievalError(Exception):
    """A problem with the user's input or files: the CLI prints it as one line, without a traceback."""
