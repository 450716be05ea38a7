"""``python -m tracin``."""

import sys

from tracin._cli import main

sys.exit(main())
