"""Composition root: `python app.py` serves rlhf-live (also what a Hugging Face Space runs)."""

import sys

from rlhf_live.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
