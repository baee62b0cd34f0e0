from __future__ import annotations

import pytest

from .workers import Worker


@pytest.fixture
def workers(tmp_path):
    """Start workers with ``workers.start(pool=...)``; every one is killed (with its group) at the end."""
    started: list[Worker] = []

    class Factory:
        directory = tmp_path

        def start(self, pool: str = "prefork", **kwargs) -> Worker:
            worker = Worker(tmp_path, pool=pool, **kwargs)
            started.append(worker)
            return worker.wait_ready()

    yield Factory()
    for worker in started:
        worker.kill_group()
