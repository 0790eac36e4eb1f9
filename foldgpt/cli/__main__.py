"""``python -m foldgpt.cli``: the same as the ``foldgpt`` command."""

import sys

from foldgpt.cli.main import main

sys.exit(main())
