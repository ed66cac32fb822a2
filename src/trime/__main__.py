"""`python -m trime` (also what torchrun runs: `torchrun --nproc-per-node N -m trime train ...`)."""

import sys

from trime.cli import main

sys.exit(main())
