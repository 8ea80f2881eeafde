"""The SSE gateway's core: everything except Tornado request handlers.

Handlers import from here, never the other way round (DESIGN.md §2).
"""
