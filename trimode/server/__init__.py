"""OpenAI-compatible HTTP server over the engine (a leaf: nothing in the engine imports it)."""
