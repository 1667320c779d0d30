from __future__ import annotations

import sys

from slidestream.cli import main

sys.exit(main())
