"""`python -m adapterspec` runs the command line."""

from .cli import entry

entry()
