"""`python -m vitkit ...`, which is also what `torchrun ... -m vitkit train ...` runs."""

import sys

from .cli import main

sys.exit(main())
