"""How often a job was handed to a worker: ``jobs.deliveries`` counts the deliveries that have *ended*.

A claim does not write the job's row: the delivery it makes is number
``deliveries + 1`` (what the worker's message says, and ``redelivered`` when
that is more than one), and the count moves when the claim ends.  A finish
counts it in the same UPDATE that sets ``finished_at`` (or deletes the row);
a claim that ends otherwise (released, failed, pruned) counts it here.

Why: every write to a ``jobs`` row leaves a version behind, and under a
snapshot held open elsewhere (a long report, an idle-in-transaction session)
no version can be vacuumed, so each one is a dead entry every later key
lookup steps over.  Counting at the end leaves a job two versions (insert,
finish) instead of three, and MariaDB's claim packet one statement fewer.
"""
from __future__ import annotations

from typing import Sequence

from sqlalchemy import Connection, case, update

from .schema import Tables


def number(t: Tables):
    """The number of the delivery a claim is making, as a column named ``deliveries``."""
    return (t.jobs.c.deliveries + 1).label("deliveries")


def counted(t: Tables) -> dict:
    """The column change that counts an ending delivery, for an UPDATE of ``jobs`` that ends it (a finish)."""
    return {"deliveries": t.jobs.c.deliveries + 1}


def ended(conn: Connection, t: Tables, job_ids: Sequence[int], *, released: Sequence[int] = ()) -> None:
    """Count the deliveries of ``job_ids`` whose claims just ended other than by a finish (one UPDATE).

    ``released``: those of them a pruner gave back, which also counts toward ``max_releases``.
    """
    if not job_ids:
        return
    j = t.jobs
    values = counted(t)
    if released:
        values["releases"] = j.c.releases + case((j.c.id.in_(list(released)), 1), else_=0)
    conn.execute(update(j).where(j.c.id.in_(sorted(job_ids))).values(**values))
