"""`python -m rlhf_live` runs the `rlhf-live` command."""

import sys

from .cli import main

sys.exit(main())
