"""A group's messages built from Celery's first one (``message_templates``) are the messages Celery builds.

Each case publishes one group twice: through the template, and through
Celery's own per-task path (a ``before_task_publish`` receiver is connected,
which the template never follows).  The stored messages must be the same but
for the ids Celery mints per message.
"""
from __future__ import annotations

import base64
import json

import pytest
from celery import group, signals

import celery_sqlbackend as sqlq
from celery_sqlbackend.publishing import CHUNK_ROWS, STAGED_CHUNK_ROWS
from tests.harness import rows


def _store_ready(app) -> None:
    app.add.delay(0, 0)    # (connection, tables and the default queue exist before the groups)


class Publishes:
    """How many messages went through Celery's own ``send_task_message``."""

    def __init__(self, app):
        self.amqp, self.count = app.app.amqp, 0

    def __enter__(self):
        original = self.original = self.amqp.send_task_message

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        self.amqp.send_task_message = counted
        return self

    def __exit__(self, *exc):
        self.amqp.send_task_message = self.original


def _normalised(db_url: str, after_id: int) -> list[dict]:
    """The stored messages after job ``after_id``, with every per-message id replaced by its place."""
    out = []
    for (payload,) in rows(db_url, f"select payload from sqlq_jobs where id > {after_id} order by id"):
        message = json.loads(payload)
        headers, properties = message["headers"], message["properties"]
        task_id = headers["id"]
        for mapping in (headers, properties):
            for key, value in list(mapping.items()):
                if value == task_id:
                    mapping[key] = "<task id>"
        headers["group"] = "<group id>"
        properties.pop("delivery_tag")
        headers.pop("origin", None)
        message["body"] = json.loads(base64.b64decode(message["body"]))
        out.append(message)
    return out


def _last_id(db_url: str) -> int:
    return rows(db_url, "select max(id) from sqlq_jobs")[0][0]


def _publish_both_ways(app, db_url, make_group):
    """The group's stored messages from the template, and from Celery's path; and the publish counts."""
    first = _last_id(db_url)
    with Publishes(app) as fast:
        fast_result = make_group().apply_async()
    second = _last_id(db_url)

    def receiver(**kwargs):
        pass

    signals.before_task_publish.connect(receiver, weak=False)
    try:
        with Publishes(app) as slow:
            make_group().apply_async()
    finally:
        signals.before_task_publish.disconnect(receiver)
    return _normalised(db_url, first)[: second - first], _normalised(db_url, second), fast, slow, fast_result


CASES = {
    "integers": lambda m: group(m.add.s(i, i) for i in range(40)),
    "awkward strings and keywords": lambda m: group(
        m.record.s(label=f"it's {i} é \\ \" \n \x00 {'ü' * i}") for i in range(12)),
    "nested arguments (saferepr's own path)": lambda m: group(m.total.s([i, [i, {"k": (i,)}]]) for i in range(10)),
    "long arguments cut by argsrepr": lambda m: group(m.record.s("x" * 3000 + str(i)) for i in range(5)),
    "options: queue, priority, headers, a callback": lambda m: group(
        m.add.s(i, 1).set(queue="elsewhere", priority=7, headers={"tenant": "acme"}, link=m.record.si("cb"))
        for i in range(8)),
    "results ignored": lambda m: group(m.add.s(i, 2).set(ignore_result=True) for i in range(6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_group_stores_the_messages_celery_would_build(app_dir, db_url, case):
    _, app, _ = app_dir
    _store_ready(app)
    fast, slow, fast_count, slow_count, result = _publish_both_ways(app, db_url, lambda: CASES[case](app))
    assert fast_count.count == 1, "the group did not take the template"
    assert slow_count.count == len(slow), "the receiver did not send the group through Celery's path"
    assert len(fast) == len(slow) > 1
    assert fast == slow
    stored_ids = [task_id for (task_id,) in rows(db_url, "select task_id from sqlq_jobs order by id")]
    assert [r.id for r in result.results] == stored_ids[-2 * len(fast):-len(fast)]   # (each result is its job)
    assert len(set(stored_ids)) == len(stored_ids)


def _mixed_runs(m):
    """Runs of like signatures, and things between them that no template follows."""
    yield from (m.add.s(i, i) for i in range(5))
    yield from (m.record.s(f"r'{i}") for i in range(3))
    yield m.unique_running.s("key-1")
    yield from (m.add.s(i, 0).set(priority=3) for i in range(4))
    yield m.add.s(1, 1).set(countdown=30)
    yield from (m.total.s([i, i]) for i in range(3))


def test_enqueue_many_builds_each_run_from_celerys_first_message(app_dir, db_url):
    _, app, _ = app_dir
    _store_ready(app)
    first = _last_id(db_url)
    with Publishes(app) as fast:
        fast_results = sqlq.enqueue_many(_mixed_runs(app))
    second = _last_id(db_url)

    def receiver(**kwargs):
        pass

    rows(db_url, "delete from sqlq_unique_keys")
    signals.before_task_publish.connect(receiver, weak=False)
    try:
        with Publishes(app) as slow:
            sqlq.enqueue_many(_mixed_runs(app))
    finally:
        signals.before_task_publish.disconnect(receiver)
    fast_messages, slow_messages = _normalised(db_url, first)[: second - first], _normalised(db_url, second)
    assert slow.count == len(slow_messages) == 17
    # Celery's path: the first of each run (add, record, add with a priority, total), the unique task
    # and the countdown; the template: the other eleven.
    assert fast.count == 6
    for message in fast_messages + slow_messages:       # (a countdown's ETA is a time of its own)
        message["headers"]["eta"] = message["headers"]["eta"] and "<eta>"
    assert fast_messages == slow_messages
    stored = [task_id for (task_id,) in rows(db_url, f"select task_id from sqlq_jobs where id > {first} "
                                                     f"and id <= {second} order by id")]
    assert [r.id for r in fast_results] == stored
    assert all(r.ignored is False for r in fast_results)


def test_what_the_template_cannot_follow_goes_through_celery(app_dir, db_url):
    _, app, _ = app_dir
    _store_ready(app)
    cases = {
        "two tasks": group(app.add.s(1, 1), app.total.s([1])),
        "a countdown on one": group(app.add.s(1, 1), app.add.s(2, 2).set(countdown=60)),
        "a countdown for all": group(app.add.s(i, i) for i in range(3)).set(countdown=60),
        "a unique task": group(app.unique_running.s(f"k{i}") for i in range(3)),
        "a nested group": group(app.add.s(1, 1), group(app.add.s(2, 2), app.add.s(3, 3))),
        "arguments from apply_async": group(app.add.s(i) for i in range(3)),
    }
    for name, g in cases.items():
        size = 3 if name != "two tasks" and name != "a countdown on one" else 2
        with Publishes(app) as seen:
            if name == "arguments from apply_async":
                g.apply_async(args=(10,))
            else:
                g.apply_async()
        assert seen.count == size, name


def test_a_bad_argument_list_fails_the_group_before_anything_is_stored(app_dir, db_url):
    """Celery checks every task's arguments against its signature before it publishes; so does the
    template, for every task of the group, and the batch leaves nothing."""
    _, app, _ = app_dir
    _store_ready(app)
    before = rows(db_url, "select count(*) from sqlq_jobs")
    with pytest.raises(TypeError):
        group([app.add.s(1, 1)] * (STAGED_CHUNK_ROWS + 100) + [app.add.s(1, 2, 3)]).apply_async()
    assert rows(db_url, "select count(*) from sqlq_jobs") == before


def test_a_chunk_the_database_refuses_rolls_the_whole_batch_back(app_dir, db_url):
    """The database refuses one job in the second chunk of a batch (a constraint made for the test):
    the error reaches the caller and no job of the batch stays, on PostgreSQL too, where chunks are sent
    without waiting for each other's result."""
    _, app, _ = app_dir
    _store_ready(app)
    if db_url.startswith("sqlite"):
        rows(db_url, "CREATE TRIGGER refuse_poison BEFORE INSERT ON sqlq_jobs WHEN NEW.task_id = 'poison' "
                     "BEGIN SELECT RAISE(ABORT, 'poison refused'); END")
    else:
        rows(db_url, "ALTER TABLE sqlq_jobs ADD CONSTRAINT refuse_poison CHECK (task_id <> 'poison')")
    chunk = STAGED_CHUNK_ROWS if db_url.startswith("sqlite") else CHUNK_ROWS
    signatures = [app.add.s(i, 1) for i in range(2 * chunk + 300)]
    signatures[chunk + 200] = app.add.s(0, 1).set(task_id="poison")
    with pytest.raises(Exception) as failure:
        sqlq.enqueue_many(signatures)
    assert "poison" in str(failure.value)
    assert rows(db_url, "select count(*) from sqlq_jobs") == [(1,)]
    assert rows(db_url, "select count(*) from sqlq_ready_executions") == [(1,)]
