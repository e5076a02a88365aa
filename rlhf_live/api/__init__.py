"""HTTP APIs beside the page that are not Gradio's: the OpenAI-compatible /v1 routes (openai.py)."""
