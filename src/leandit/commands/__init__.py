"""One module per `leandit` command: `add_parser(subparsers)` registers it, `run(args)` runs it."""
