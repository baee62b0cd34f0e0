"""Fixtures of the declared-support tests: the ``stackapp`` app on a fresh database, producer side."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture
def stack(db_url, tmp_path, monkeypatch):
    """(app module, runs file, env for the worker): ``tests/compat/stackapp.py`` imported on ``db_url``."""
    yield from import_stackapp(db_url, tmp_path, monkeypatch)


def import_stackapp(url, tmp_path, monkeypatch, prefix="sqlq_", **more):
    """Import ``stackapp`` on ``url`` in this process (the producer); yields (module, runs file, env)."""
    env = {"STACK_DB": url, "STACK_RUNS": str(tmp_path / "runs.txt"), "STACK_PREFIX": prefix,
           "STACK_BEAT_FILE": str(tmp_path / "celerybeat-schedule"), **more}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(HERE))
    sys.modules.pop("stackapp", None)
    module = importlib.import_module("stackapp")
    module.app.set_current()
    try:
        yield module, Path(env["STACK_RUNS"]), env
    finally:
        sys.modules.pop("stackapp", None)


@pytest.fixture
def prefixed_stack(db_url, tmp_path, monkeypatch):
    """``stack`` with the table prefix ``pfx_`` given only as the ``sqlq_table_prefix`` setting."""
    yield from import_stackapp(db_url, tmp_path, monkeypatch, prefix="pfx_")


def runs(path: Path) -> list[str]:
    """The labels the tasks recorded, in order."""
    try:
        return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []
