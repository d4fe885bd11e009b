"""The queue and every table; only this package speaks SQL."""

from ..config import Config
from .base import MessageDetail, MessagePage, NewMessage, NewRecipient, Outgoing, Remembered, Store
from .sqlite import SQLiteStore


def store_for(config: Config) -> SQLiteStore:
    """The store [store] url names (the SQLite file in the data dir by default), as this node."""
    return SQLiteStore(config.store_url, node=config.node_name)


__all__ = ["MessageDetail", "MessagePage", "NewMessage", "NewRecipient", "Outgoing", "Remembered",
           "SQLiteStore", "Store", "store_for"]
