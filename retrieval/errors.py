"""The one exception type that reaches users as a single clear line."""


class RetrievalError(Exception):
    """A problem with the user's input or files: the CLI prints it as one line, without a traceback."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
