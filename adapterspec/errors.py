"""UserError: a problem with the user's input, reported as a message and a help line, never a traceback."""

from __future__ import annotations

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(Exception):
    def __init__(self, message: str, help: str | None = None, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.message = message
        self.help = help
        self.exit_code = exit_code
