"""``python -m llamarocm``: the same as the ``llamarocm`` command."""

import sys

from .cli import main

sys.exit(main())
