"""`python -m bst_dist ...` is the `bst-dist` command (for environments without the console script)."""

import sys

from bst_dist.commands.main import main

sys.exit(main())
