"""The dashboard over plain HTTP (Starlette's TestClient), on every engine: pages, actions, safety."""
from __future__ import annotations

import re

import pytest
from sqlalchemy import func, select

from celery_sqlbackend import admin
from tests.web.conftest import csrf_of
from tests.web.data import add_job, add_process

MARKUP = "<script>alert('x')</script>"


def count(store, table) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_every_page_renders_the_store(web_store, client):
    pid = add_process(web_store, "alive@host", queues=("emails",))
    add_process(web_store, "gone@host", dead=True)
    add_job(web_store, "emails", "proj.send", [1, "hello"])
    held = add_job(web_store, "emails", "proj.send", [2], state="claimed", process_id=pid)
    add_job(web_store, "emails", "proj.send", [3], state="scheduled")
    failed = add_job(web_store, "reports", "proj.build", [4], state="failed", error_class="KeyError",
                     error="Traceback ...\nKeyError: 'month'")
    add_job(web_store, "reports", "proj.build", [5], state="finished")
    c = client(web_store)

    queues = c.get("/queues")
    assert queues.status_code == 200
    row = re.search(r'<tr data-queue="emails">(.*?)</tr>', queues.text, re.S).group(1)
    assert [int(n) for n in re.findall(r'class="n">(?:<a[^>]*>)?(\d+)', row)][:3] == [1, 1, 1]
    assert "proj.build" in c.get("/jobs").text
    job = c.get(f"/jobs/{failed}").text
    assert "KeyError" in job and "KeyError: &#39;month&#39;" in job and "(4,)" in job
    assert "alive@host" in c.get(f"/jobs/{held}").text           # the process holding it
    failed_page = c.get("/failed").text
    assert re.search(r"KeyError</a></td><td class=\"n\">1<", failed_page)
    procs = c.get("/processes").text
    assert "gone@host" in procs and "dead" in procs and f'<a href="/jobs/{held}">' in procs
    assert "proj.send" in c.get("/scheduled").text
    assert c.get("/").url.path == "/queues"


def test_stored_markup_is_escaped(web_store, client):
    job = add_job(web_store, MARKUP, MARKUP, [MARKUP], state="failed", error_class=MARKUP, error=MARKUP)
    c = client(web_store)
    for path in ("/queues", "/jobs", f"/jobs/{job}", "/failed", f"/failed?error_class={MARKUP}"):
        page = c.get(path).text
        assert "<script>" not in page, path
        assert "&lt;script&gt;" in page, path


def test_pause_and_resume_a_queue(web_store, client):
    add_job(web_store, "emails", "proj.send", [1])
    c = client(web_store)
    token = csrf_of(c.get("/queues").text)
    assert c.post("/queues/emails/pause", data={"csrf": token}).status_code == 200   # followed to /queues
    assert admin.paused(web_store) == ["emails"]
    assert "paused" in c.get("/queues").text
    c.post("/queues/emails/resume", data={"csrf": token})
    assert admin.paused(web_store) == []


def test_actions_need_the_csrf_token_of_this_browser(web_store, client):
    add_job(web_store, "emails", "proj.send", [1])
    c = client(web_store)
    c.get("/queues")
    assert c.post("/queues/emails/pause", data={}).status_code == 403
    assert c.post("/queues/emails/pause", data={"csrf": "forged"}).status_code == 403
    other = client(web_store)          # another browser's valid token does not fit this cookie
    stolen = csrf_of(other.get("/queues").text)
    assert c.post("/queues/emails/pause", data={"csrf": stolen}).status_code == 403
    assert admin.paused(web_store) == []


def test_read_only_offers_and_accepts_no_action(web_store, client):
    job = add_job(web_store, "emails", "proj.send", [1], state="failed")
    c = client(web_store, read_only=True)
    page = c.get("/failed").text
    assert "read-only" in page and "Retry" not in page
    token = csrf_of(page)    # the logout/login forms still carry one
    assert c.post("/failed/retry", data={"csrf": token, "job_id": str(job)}).status_code == 403
    assert c.post("/queues/emails/pause", data={"csrf": token}).status_code == 403
    assert count(web_store, web_store.t.failed) == 1 and admin.paused(web_store) == []


def test_token_login(web_store, client):
    c = client(web_store, token="s3cret")
    first = c.get("/queues", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"].endswith("/login")
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    token = csrf_of(c.get("/login").text)
    assert c.post("/login", data={"csrf": token, "token": "wrong"}).status_code == 403
    assert c.post("/login", data={"csrf": token, "token": "s3cret"}).url.path == "/queues"
    assert c.get("/queues").status_code == 200
    c.post("/logout", data={"csrf": token})
    assert c.get("/queues", follow_redirects=False).status_code == 303


def test_retry_and_discard_a_selection(web_store, client):
    ids = [add_job(web_store, "q", "proj.t", [i], state="failed") for i in range(4)]
    c = client(web_store)
    token = csrf_of(c.get("/failed").text)
    r = c.post("/failed/retry", data={"csrf": token, "job_id": [str(ids[0]), str(ids[1])]})
    assert "Done: retry 2" in r.text
    r = c.post("/failed/discard", data={"csrf": token, "job_id": [str(ids[2])]})
    assert "Done: discard 1" in r.text
    with web_store.engine.connect() as conn:
        assert sorted(conn.execute(select(web_store.t.ready.c.job_id)).scalars()) == ids[:2]
        assert list(conn.execute(select(web_store.t.failed.c.job_id)).scalars()) == [ids[3]]
        assert conn.execute(select(web_store.t.jobs.c.id).where(web_store.t.jobs.c.id == ids[2])).first() is None


def test_retry_everything_a_filter_matches_in_batches(web_store, client):
    for i in range(1203):
        add_job(web_store, "q", "proj.t", [i], state="failed", error_class="KeyError" if i % 3 else "OSError")
    c = client(web_store)
    token = csrf_of(c.get("/failed?error_class=KeyError").text)
    r = c.post("/failed/retry", data={"csrf": token, "scope": "all", "error_class": "KeyError"})
    assert re.search(r"/failed/runs/\d+$", str(r.url))
    from tests.harness import wait_until
    done = wait_until(lambda: "finished" in (p := c.get(r.url).text) and p, 30, message="the bulk run to finish")
    assert "802 of 802" in done and 'value="100"' in done
    assert count(web_store, web_store.t.failed) == 401 and count(web_store, web_store.t.ready) == 802


def test_jobs_filters(web_store, client):
    from datetime import timedelta

    from celery_sqlbackend.store import utcnow
    old = add_job(web_store, "billing", "proj.invoice", ["customer-17"], state="finished",
                  created_at=utcnow() - timedelta(days=3))
    new = add_job(web_store, "billing", "proj.invoice", ["customer-42"], state="finished")
    other = add_job(web_store, "emails", "proj.send", ["customer-42"])
    c = client(web_store)

    def ids(query):
        return [int(i) for i in re.findall(r'<a href="/jobs/(\d+)">', c.get(f"/jobs?{query}").text)]

    assert ids("text=customer-42") == [other, new]
    assert ids("text=customer-42&task=invoice") == [new]
    assert ids("queue=billing") == [new, old]
    assert ids("state=ready") == [other]
    since = (utcnow() - timedelta(days=1)).isoformat(timespec="minutes")
    assert ids(f"queue=billing&from={since}") == [new]
    assert ids(f"queue=billing&to={since}") == [old]
    assert c.get("/jobs?from=yesterday").status_code == 400
    assert c.get("/jobs?state=exploded").status_code == 400


def test_job_search_walks_windows_and_says_so(web_store, client):
    ids = [add_job(web_store, "q", "proj.t", [i], state="finished") for i in range(30)]
    c = client(web_store, search_window=10, page_size=5)
    page = c.get("/jobs?text=(3,)").text          # job 3 only, far below the newest window
    assert re.findall(r'<a href="/jobs/(\d+)">', page) == [str(ids[3])]
    plain = c.get("/jobs?state=finished").text
    assert len(re.findall(r'<a href="/jobs/(\d+)">', plain)) == 5 and "Older" in plain


def test_metrics(web_store, client):
    pid = add_process(web_store, "alive@host")
    add_process(web_store, "gone@host", dead=True)
    add_job(web_store, "emails", "proj.send", [1])
    add_job(web_store, "emails", "proj.send", [2], state="claimed", process_id=pid)
    add_job(web_store, "emails", "proj.send", [3], state="finished")
    add_job(web_store, "reports", "proj.build", [4], state="failed")
    admin.pause(web_store, "reports")
    r = client(web_store).get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for fam in text_string_to_metric_families(r.text) for s in fam.samples}
    assert values[("sqlq_queue_ready", (("queue", "emails"),))] == 1
    assert values[("sqlq_queue_claimed", (("queue", "emails"),))] == 1
    assert values[("sqlq_queue_finished_last_minute", (("queue", "emails"),))] == 1
    assert values[("sqlq_queue_failed", (("queue", "reports"),))] == 1
    assert values[("sqlq_queue_paused", (("queue", "reports"),))] == 1
    assert values[("sqlq_processes", (("state", "alive"),))] == 1
    assert values[("sqlq_processes", (("state", "dead"),))] == 1
    assert values[("sqlq_queue_oldest_ready_age_seconds", (("queue", "emails"),))] >= 0


def test_prune_a_dead_process(web_store, client):
    dead = add_process(web_store, "gone@host", dead=True)
    job = add_job(web_store, "q", "proj.t", [1], state="claimed", process_id=dead)
    c = client(web_store)
    page = c.get("/processes").text
    r = c.post("/processes/prune", data={"csrf": csrf_of(page)})
    assert "pruned 1 process" in r.text and "gone@host" not in r.text
    with web_store.engine.connect() as conn:     # never acked: back to ready
        assert list(conn.execute(select(web_store.t.ready.c.job_id)).scalars()) == [job]


def test_mounted_under_a_prefix(web_store):
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    from celery_sqlbackend.web import create_app
    add_job(web_store, "emails", "proj.send", [1])
    outer = Starlette(routes=[Mount("/ops/sqlq", app=create_app(web_store, token=""))])
    with TestClient(outer, base_url="http://127.0.0.1") as c:
        page = c.get("/ops/sqlq/queues")
        assert page.status_code == 200
        assert 'href="/ops/sqlq/static/style.css"' in page.text and 'action="/ops/sqlq/queues/emails/pause"' in page.text
        assert c.get("/ops/sqlq/static/style.css").status_code == 200
        r = c.post("/ops/sqlq/queues/emails/pause", data={"csrf": csrf_of(page.text)})
        assert r.url.path == "/ops/sqlq/queues" and admin.paused(web_store) == ["emails"]


def test_iterative_page_shows_checkpoints(web_store, client):
    from sqlalchemy import insert

    from celery_sqlbackend.store import utcnow
    if not hasattr(web_store.t, "checkpoints"):
        pytest.skip("this store has no checkpoints table")
    with web_store.engine.begin() as conn:
        conn.execute(insert(web_store.t.checkpoints).values(
            task_id="t-1", task_name="proj.backfill", state="running", cursor="41", iterations=42, total=100,
            counters='{"total_time": 2.0, "times_interrupted": 1}', updated_at=utcnow(), started_at=utcnow()))
    c = client(web_store)
    assert 'nav-iterative' in c.get("/queues").text
    row = re.search(r'<tr data-task="t-1">(.*?)</tr>', c.get("/iterative").text, re.S).group(1)
    assert "42 / 100" in row and "21.0/s" in row and "2.8 s" in row and "42.0%" in row
