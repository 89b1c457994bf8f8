"""`python -m gforward`: the same program as the `gforward` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
