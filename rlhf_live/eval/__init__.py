"""Evaluation: simulated raters, a version against the base on held-out prompts, and the live loop driven by a rater;
it sits above serving and learning and drives both."""
