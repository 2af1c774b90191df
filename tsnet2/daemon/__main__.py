"""`python -m tsnet2.daemon` runs tsnet2d."""

import sys

from tsnet2.daemon.cli import main

sys.exit(main())
