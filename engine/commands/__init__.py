"""Commands: one module per subcommand; each exposes `register(subparsers)` and `run(args)`."""
