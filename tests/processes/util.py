"""Reading job states and checking the registry invariants, for the process tests."""
from __future__ import annotations

from tests import harness

from typing import Any, Callable

from sqlalchemy import select


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """The shared poll-with-deadline, with this suite's longer default timeout."""
    return harness.wait_until(predicate, timeout=timeout, interval=interval, message=message)


def _snapshot(conn, t) -> dict[str, Any]:
    return {
        "jobs": {r.id: r for r in conn.execute(select(t.jobs.c.id, t.jobs.c.task_id, t.jobs.c.finished_at,
                                                      t.jobs.c.releases, t.jobs.c.deliveries))},
        "ready": set(conn.execute(select(t.ready.c.job_id)).scalars()),
        "scheduled": set(conn.execute(select(t.scheduled.c.job_id)).scalars()),
        "claimed": {r.job_id: r for r in conn.execute(select(t.claimed))},
        "failed": {r.job_id: r for r in conn.execute(select(t.failed))},
        "processes": {r.id: r for r in conn.execute(select(t.processes))},
    }


def snapshot(store) -> dict[str, Any]:
    """Every table that defines a job's state, read in one transaction."""
    return store.read(_snapshot, store.t)


def states_of(snap) -> dict[int, str]:
    """job id -> "ready" | "scheduled" | "claimed" | "failed" | "finished" | "lost" | "a+b" (broken)."""
    out = {}
    for job_id, job in snap["jobs"].items():
        found = [name for name in ("ready", "scheduled", "claimed", "failed") if job_id in snap[name]]
        if job.finished_at is not None:
            found.append("finished")
        out[job_id] = "+".join(found) if found else "lost"
    return out


def job_states(store) -> dict[int, str]:
    return states_of(snapshot(store))


def invariant_violations(snap) -> list[str]:
    """The invariants of the issue, as a list of what is wrong (empty: all hold)."""
    problems = []
    for job_id, state in states_of(snap).items():
        if "+" in state or state == "lost":
            problems.append(f"job {job_id} is {state}")
    for job_id, claim in snap["claimed"].items():
        if claim.process_id not in snap["processes"]:
            problems.append(f"job {job_id} is claimed by process {claim.process_id}, which is not registered")
    return problems
