"""Tornado request handlers: HTTP in, frames out. They import the core, never the reverse."""

from .base import NotFoundHandler
from .chat import ChatCompletionsHandler
from .models import ModelsHandler
from .ops import MetricsHandler, UsageHandler
from .pages import HealthHandler, IndexHandler
from .push import EventsHandler
from .responses import ResponseCancelHandler, ResponseHandler, ResponsesHandler
from .session import SessionHandler
from .streams import StreamHandler, StreamsHandler

__all__ = [
    "ChatCompletionsHandler",
    "EventsHandler",
    "HealthHandler",
    "IndexHandler",
    "MetricsHandler",
    "ModelsHandler",
    "NotFoundHandler",
    "ResponseCancelHandler",
    "ResponseHandler",
    "ResponsesHandler",
    "SessionHandler",
    "StreamHandler",
    "StreamsHandler",
    "UsageHandler",
]
