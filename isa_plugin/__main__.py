"""``python -m isa_plugin``: the ``isa`` command line."""

import sys

from .cli import main

sys.exit(main())
