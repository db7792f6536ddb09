"""``python -m llamarocm.cli``: the same as the ``llamarocm`` command."""

import sys

from .parser import main

sys.exit(main())
