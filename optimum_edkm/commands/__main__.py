"""``python -m optimum_edkm.commands``: the ``optimum-edkm`` command line."""

import sys

from .cli import main

sys.exit(main())
