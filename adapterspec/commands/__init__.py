"""One module per `adapterspec` subcommand; each has `add_arguments(parser)` and `run(args) -> int`."""
