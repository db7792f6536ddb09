"""``python -m llamarocm.bench``: the same as ``llamarocm bench``."""

import sys

from .command import main

sys.exit(main())
