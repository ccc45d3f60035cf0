"""User-facing errors.

Anything the user can fix (a bad config value, a missing file, a model that does not match a mask file)
raises :class:`DlpError`; entry scripts print its one-line message and exit with status 2 instead of a
traceback. Programming errors stay ordinary exceptions so they keep their tracebacks.
"""


class DlpError(ValueError):
    """A problem with the user's input, reported as one line and exit code 2."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`DlpError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise DlpError(message)


class ResultCheckFailed(DlpError):
    """A result contradicts what the run was asked for (e.g. the measured sparsity misses its target): reported as
    one line like a user error, but with exit code 1, since the input was valid and dlp is what fell short."""
