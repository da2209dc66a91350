"""``python -m lr2vq_analysis`` runs the ``lr2vq`` command line."""

import sys

from .cli import main

if __name__ == "__main__":  # importing this module (doctest collection, tools) must not run the program
    sys.exit(main())
