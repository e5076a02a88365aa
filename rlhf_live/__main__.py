"""`python -m rlhf_live` runs the `rlhf-live` command."""

import sys

from rlhf_live.cli import main

sys.exit(main())
