"""Serving: the continuous-batching engine (`engine`), the OpenAI-compatible HTTP app (`app`,
`protocol`, `metrics`) and the built-in web chat page (`static/chat.html`)."""
