"""``python -m tsnet2.control ...`` (same as ``tsnet2 control ...``)."""

import sys

from tsnet2.control.cli import main

sys.exit(main())
