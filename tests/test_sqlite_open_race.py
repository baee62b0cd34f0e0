"""Processes that start together on a new SQLite file all open it (``store.engine._journal_mode_wal``).

Eight processes wait at one barrier, then each opens the same new file through the store's engine
(``PRAGMA journal_mode=WAL`` first) and writes a row.  Without the retry, two runs in three of
thirty rounds had a process fail at once with "database is locked": SQLite answers the pragma so,
without waiting on its busy handler, while another connection is switching the file to WAL.  (Found
by a CI run: a checkpoint test's result backend and its workers opening one new file.)
"""
from __future__ import annotations

import multiprocessing

from sqlalchemy import text

from celery_sqlbackend.store.engine import get_engine

ROUNDS = 60
PROCESSES = 8


def _open_and_write(url: str, start, ready, answers) -> None:
    engine = get_engine(url, busy_timeout=10)
    ready.put(True)
    start.wait()
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS opened (pid INTEGER)"))
            conn.execute(text("INSERT INTO opened VALUES (1)"))
        answers.put("ok")
    except Exception as exc:     # (reported to the test, which names it)
        answers.put(repr(exc))


def test_processes_starting_together_on_a_new_file_all_open_it(tmp_path):
    context = multiprocessing.get_context("fork")
    failures = []
    for round_ in range(ROUNDS):
        url = f"sqlite:///{tmp_path}/race{round_}.sqlite3"
        start, ready, answers = context.Event(), context.Queue(), context.Queue()
        processes = [context.Process(target=_open_and_write, args=(url, start, ready, answers))
                     for _ in range(PROCESSES)]
        for process in processes:
            process.start()
        for _ in processes:       # (every process is at the barrier before it opens)
            ready.get(timeout=60)
        start.set()
        failures += [answer for answer in (answers.get(timeout=60) for _ in processes) if answer != "ok"]
        for process in processes:
            process.join(timeout=60)
    assert failures == []
