"""One module per subcommand of `vqlog`: a `<name>_command_parser(subparsers)` and a
`<name>_command(args)` each (see `vqlog.cli`)."""
