"""`python -m segevol_fast.cli`, the same as `python -m segevol_fast` and `segevol-fast`."""

import sys

from . import main

sys.exit(main())
