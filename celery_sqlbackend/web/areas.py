"""The navigation: one area (a page and its actions) per feature, shown when the feature exists.

Why areas: recurring tasks, concurrency limits and unique jobs land later,
each in its own page module.  Such a module defines ``AREA`` (with an
``available`` check, e.g. "the recurring tasks table exists") and ``routes``,
and is listed in ``PAGE_MODULES`` of :mod:`.app`, whose order is the nav's;
the nav shows an area only where ``available`` says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .context import Dashboard


def always(_: "Dashboard") -> bool:
    return True


@dataclass(frozen=True)
class Area:
    key: str                  # stable id, also the CSS hook of the nav link
    title: str
    path: str                 # below the app's root
    available: Callable[["Dashboard"], bool] = always


def nav(dashboard: "Dashboard") -> list[Area]:
    """The areas to link to on this dashboard, in ``PAGE_MODULES`` order."""
    return [a for a in dashboard.areas if a.available is always or dashboard.available(a.key, a.available)]
