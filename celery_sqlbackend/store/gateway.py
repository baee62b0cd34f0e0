"""The base of the store's per-table gateways (``store.jobs``, ``store.claims``, …).

Each table family has a module of plain statement functions taking an open
connection (``fn(conn, t, [d,] *, …)``), for composing several in one
transaction, and a gateway class whose typed methods run one of them in the
store's bounded, retried transaction.  A gateway method is the one way the
rest of the package calls a statement: ``store.claims.claim(queues=…, …)``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Store
    from .dialects import Dialect
    from .schema import Tables


class Gateway:
    """Statements of one table family, run through ``store`` (see the module doc)."""

    __slots__ = ("store",)

    def __init__(self, store: Store):
        self.store = store

    @property
    def t(self) -> Tables:
        return self.store.t

    @property
    def d(self) -> Dialect:
        return self.store.dialect
