"""``python -m pnc_surgery.cli``."""

import sys

from . import main

sys.exit(main())
