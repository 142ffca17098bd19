"""``python -m gpt2fast``: the same command line as ``gpt2fast``."""

import sys

from gpt2fast.cli import main

sys.exit(main())
