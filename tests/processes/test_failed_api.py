"""celery_sqlbackend.failed: listing, retrying and discarding failed jobs."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from celery_sqlbackend import failed
from celery_sqlbackend.options import Options
from celery_sqlbackend.store import Store, utcnow

from tests.support.cluster import job_states


@pytest.fixture
def store(db_url):
    s = Store(db_url, Options.from_mapping({"create_tables": True}))
    s.create_all()
    yield s
    s.engine.dispose()


def make_failed(store, n, *, queue="q", task="t.a", error_class="ProcessPrunedError", age=0.0):
    proc = store.processes.register(kind="worker", name="w", hostname="h", pid=1, pool=None,
                   concurrency=1, queues="[]", now=utcnow())
    ids = []
    for i in range(n):
        job = store.jobs.enqueue(queue=queue, payload="{}", task_name=task, task_id=f"{task}-{queue}-{i}",
                      priority=0, now=utcnow(), eta=None, expires_at=None)
        [claimed] = store.claims.claim(queues=[queue], limit=1, process_id=proc, now=utcnow())
        assert claimed.job_id == job
        assert store.claims.fail(job_id=job, process_id=proc, error_class=error_class,
                       error=f"{error_class}: job {job} went wrong", now=utcnow() - timedelta(seconds=age))
        ids.append(job)
    store.processes.delete(process_id=proc)
    return ids


def test_list_failed_shows_each_job_with_its_error_and_filters(store):
    a = make_failed(store, 2, queue="qa", task="t.a")
    b = make_failed(store, 1, queue="qb", task="t.b", error_class="MaxReleasesExceeded", age=3600)

    jobs = failed.list_failed(store)
    assert [j.job_id for j in jobs] == a + b
    first = jobs[0]
    assert (first.task_id, first.task_name, first.queue, first.error_class) == ("t.a-qa-0", "t.a", "qa",
                                                                                 "ProcessPrunedError")
    assert first.error == f"ProcessPrunedError: job {a[0]} went wrong" and first.deliveries == 1

    assert [j.job_id for j in failed.list_failed(store, queue="qb")] == b
    assert [j.job_id for j in failed.list_failed(store, task_name="t.a")] == a
    assert [j.job_id for j in failed.list_failed(store, error_class="MaxReleasesExceeded")] == b
    assert [j.job_id for j in failed.list_failed(store, older_than=timedelta(minutes=30))] == b
    assert [j.job_id for j in failed.list_failed(store, older_than=1800)] == b
    assert [j.job_id for j in failed.list_failed(store, queue="qa", limit=1)] == a[:1]
    assert failed.list_failed(store, queue="qa", task_name="t.b") == []


def test_retry_puts_the_same_job_back_to_ready_with_its_task_id(store):
    [job] = make_failed(store, 1)
    j = store.t.jobs
    store.run(lambda c: c.execute(update(j).where(j.c.id == job).values(releases=3)))

    assert failed.retry(store, [job, job, 999999]) == 1
    assert job_states(store) == {job: "ready"}
    assert store.read(lambda c: c.execute(select(j.c.task_id, j.c.releases).where(j.c.id == job)).one()) \
        == ("t.a-q-0", 0)
    assert failed.retry(store, [job]) == 0          # not failed any more: ignored
    assert failed.list_failed(store) == []


def test_discard_deletes_failed_jobs_only(store):
    gone, kept = make_failed(store, 2)
    ready = store.jobs.enqueue(queue="q", payload="{}", task_name="t", task_id="r", priority=0,
                    now=utcnow(), eta=None, expires_at=None)
    assert failed.discard(store, [gone, ready]) == 1
    assert job_states(store) == {kept: "failed", ready: "ready"}


def test_retry_all_and_discard_all_work_in_batches_with_filters(store):
    a = make_failed(store, 5, queue="qa")
    b = make_failed(store, 3, queue="qb")
    assert failed.retry_all(store, {"queue": "qa"}, batch_size=2) == 5
    assert {job_states(store)[i] for i in a} == {"ready"}
    assert failed.discard_all(store, {}, batch_size=2) == 3
    assert set(job_states(store)) == set(a)
    assert all(i not in job_states(store) for i in b)
    with pytest.raises(ValueError, match="unknown failed-job filter"):
        failed.retry_all(store, {"queeu": "qa"})


def test_iter_failed_pages_through_everything(store):
    ids = make_failed(store, 7)
    assert [j.job_id for j in failed.iter_failed(store, batch_size=3)] == ids
