"""The spec language: text → syntax tree → checked rules → `Spec`, diagnostics and their codes, `fmt`; imports neither mlx nor, on the lint path, pydantic."""
