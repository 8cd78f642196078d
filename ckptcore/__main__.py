"""``python -m ckptcore``: the ``ckpt`` command line."""

import sys

from ckptcore.cli import main

sys.exit(main())
