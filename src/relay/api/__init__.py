"""The HTTP API: the native /v1 routes (and later the dialects), on aiohttp."""
