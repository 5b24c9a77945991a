"""The engine cache: the architecture key and the store."""
