"""The run's last word on engines: how many tests ran on SQLite, PostgreSQL and MariaDB, and loudly
which engine did not run at all (no server, or not selected).

Each test is tagged with its engine at collection (``tag_engine``, a user property, which pytest-xdist
carries from its workers to the controlling process with every report); the counts are taken from the
reports the terminal reporter holds.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable, Optional

__all__ = ["ENGINE_PROPERTY", "UNAVAILABLE", "tag_engine", "engine_of_report", "write_engine_summary"]

ENGINE_PROPERTY = "sqlq_engine"
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
LABELS = {"sqlite": "SQLite", "postgres": "PostgreSQL", "mysql": "MariaDB/MySQL"}


def tag_engine(item, engine: str) -> None:
    item.user_properties.append((ENGINE_PROPERTY, engine))


def engine_of_report(report) -> Optional[str]:
    for prop in getattr(report, "user_properties", ()) or ():
        if len(prop) == 2 and prop[0] == ENGINE_PROPERTY:
            return prop[1]
    return None


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, (tuple, list)) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _outcomes(stats: dict) -> tuple[dict[str, Counter], dict[str, set]]:
    """engine -> Counter(outcome -> tests), engine -> skip reasons (a test counts once, by its worst phase)."""
    worst: dict[tuple[str, str], str] = {}
    reasons: dict[str, set] = defaultdict(set)
    for outcome in OUTCOMES:
        for report in stats.get(outcome, ()):
            engine = engine_of_report(report)
            if engine is None or not hasattr(report, "nodeid"):
                continue
            key = (engine, report.nodeid)
            if outcome == "skipped":
                reasons[engine].add(_skip_reason(report))
            if key not in worst or OUTCOMES.index(outcome) in (1, 2):   # a failure or error wins
                worst[key] = outcome
    counts: dict[str, Counter] = defaultdict(Counter)
    for (engine, _), outcome in worst.items():
        counts[engine][outcome] += 1
    return counts, reasons


UNAVAILABLE = "unavailable"   # the skip reason of a test whose engine's server could not be had


def write_engine_summary(tr, selected: Iterable[str], all_engines: Iterable[str]) -> None:
    """Write one line per engine, and a red banner for every engine whose tests did not run."""
    counts, reasons = _outcomes(tr.stats)
    selected = tuple(selected)
    tr.write_sep("=", "tests per engine", bold=True)
    for engine in all_engines:
        label = LABELS[engine]
        if engine not in selected:
            tr.write_line(f"{label:>14}: NOT SELECTED (set SQLQ_TEST_ENGINES to include {engine!r})",
                          yellow=True, bold=True)
            continue
        c = counts.get(engine, Counter())
        ran = c["passed"] + c["failed"] + c["error"] + c["xfailed"] + c["xpassed"]
        parts = ", ".join(f"{c[o]} {o}" for o in OUTCOMES if c[o]) or "no tests collected"
        bad = c["failed"] or c["error"]
        tr.write_line(f"{label:>14}: {parts}", red=bool(bad), green=not bad and ran > 0)
        missing = sorted(r for r in reasons.get(engine, ()) if UNAVAILABLE in r)
        if missing or (ran == 0 and c["skipped"]):
            tr.write_sep("!", f"{label} tests did NOT run", red=True, bold=True)
            for reason in (missing or sorted(reasons.get(engine, ())))[:5]:
                tr.write_line(f"  {reason}", red=True)
