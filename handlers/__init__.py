"""Tornado request handlers: HTTP in, frames out. They import the core, never the reverse."""

from .base import NotFoundHandler
from .chat import ChatCompletionsHandler
from .models import ModelsHandler
from .pages import HealthHandler, IndexHandler

__all__ = ["ChatCompletionsHandler", "HealthHandler", "IndexHandler", "ModelsHandler", "NotFoundHandler"]
