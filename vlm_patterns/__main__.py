"""`python -m vlm_patterns ...` is `vlm-patterns ...` (e.g. under `accelerate launch -m vlm_patterns train ...`)."""

import sys

from .cli import main

sys.exit(main())
