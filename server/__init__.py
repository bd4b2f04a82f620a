"""The HTTP side: an OpenAI-compatible Starlette app over the engine, and the `pagedjax` CLI."""
