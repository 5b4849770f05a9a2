"""``python -m dyninfer``: the same command line as the ``dyninfer`` script."""

import sys

from dyninfer.cli import main

if __name__ == "__main__":
    sys.exit(main())
