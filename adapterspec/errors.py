"""UserError: a problem with the user's input, reported as a message and a help line, never a traceback; the exit codes."""

from __future__ import annotations

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# The extra that brings what the model-facing commands import (mlx, mlx-lm, numpy, rich).
MLX_EXTRA_MODULES = frozenset({"mlx", "mlx_lm", "numpy", "rich", "safetensors", "transformers"})


class UserError(Exception):
    def __init__(self, message: str, help: str | None = None, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.message = message
        self.help = help
        self.exit_code = exit_code


def missing_extra(error: ModuleNotFoundError) -> UserError | None:
    """The UserError for a package of the `mlx` extra that is not installed (the light install), else None."""
    name = (error.name or "").split(".")[0]
    if name not in MLX_EXTRA_MODULES:
        return None
    return UserError(
        f"this command needs {name}, which the light install does not include",
        help="install the MLX extra: pip install 'adapterspec[mlx]' (lint, fmt, tree, plan and explain work without it)",
    )
