"""Serving: the continuous-batching engine (`engine`), the OpenAI-compatible HTTP app (`app`,
with `state`, `responses`, `api_errors`, `protocol` and `metrics`), running it (`server`) and the
built-in web chat page (`static/chat.html`)."""
