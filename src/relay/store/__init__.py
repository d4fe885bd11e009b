"""The queue and every table; only this package speaks SQL."""

from .base import MessageDetail, MessagePage, NewMessage, NewRecipient, Outgoing, Remembered, Store
from .sqlite import SQLiteStore

__all__ = ["MessageDetail", "MessagePage", "NewMessage", "NewRecipient", "Outgoing", "Remembered",
           "SQLiteStore",
           "Store"]
