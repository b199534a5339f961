"""One module per `bst-dist` subcommand (dispatch: bst_dist/commands/main.py); argument parsing only."""
