"""The invocation queue: one interface (``base``), Redis Streams behind it, an in-memory
backend for unit tests."""

from shared.queue.base import Delivery, InvocationQueue

__all__ = ["Delivery", "InvocationQueue"]
