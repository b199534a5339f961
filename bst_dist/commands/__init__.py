"""One module per `bst-dist` subcommand (see bst_dist/cli.py)."""
