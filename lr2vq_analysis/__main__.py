"""``python -m lr2vq_analysis`` runs the ``lr2vq`` command line."""

import sys

from .cli import main

sys.exit(main())
