"""Serving: inference engines behind one interface, the OpenAI-compatible API over them, hot swap."""
