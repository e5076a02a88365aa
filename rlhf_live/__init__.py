"""rlhf-live: a chat app that gets better from its users while it serves them."""

__version__ = "0.1.0"
