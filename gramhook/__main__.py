"""``python -m gramhook``: the same command line as the ``gramhook`` script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
