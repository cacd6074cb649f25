"""``python -m llamaproxy``: the same command line as the ``llamaproxy`` console script."""

import sys

from llamaproxy.cli import main

if __name__ == "__main__":
    sys.exit(main())
