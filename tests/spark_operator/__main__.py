from __future__ import annotations

import sys

from .controller import main

sys.exit(main())
