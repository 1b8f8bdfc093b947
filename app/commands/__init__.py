"""One module per `joulegate` subcommand: argument parsing and assembly, no logic of their own."""
