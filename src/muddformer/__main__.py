"""`python -m muddformer COMMAND` (and `torchrun -m muddformer train ...`): the `mudd` command."""

import sys

from muddformer.cli import main

sys.exit(main())
