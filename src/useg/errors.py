"""The one exception type for problems a user can fix."""

from __future__ import annotations


class UsegError(ValueError):
    """A problem caused by the user's input, with a message that names the file and the fix.

    The CLI prints the message as one sentence and exits with status 2; the Python API lets it
    propagate. It subclasses ``ValueError`` so callers validating inputs can catch either.
    """
