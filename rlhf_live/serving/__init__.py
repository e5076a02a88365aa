"""Serving: the Policy that answers (torch or llama.cpp), the Service that checks and records each request, the
dashboard's figures; it never imports learning (a new version arrives as a published folder and a swap)."""
