"""The Recurring page: listed with next/last run; pause, resume and run now act on the rows schedulers read."""
from __future__ import annotations

from celery_sqlbackend import recurring
from celery_sqlbackend.slots import parse_cron
from tests.harness import rows
from tests.web.conftest import csrf_of


def test_recurring_page_lists_pauses_resumes_and_runs_now(web_store, client, db_url):
    web_store.create_all()
    recurring.add(web_store, "nightly <b>", "reports.nightly", parse_cron("0 2 * * *", "Europe/Berlin"))
    c = client(web_store)
    page = c.get("/recurring")
    assert page.status_code == 200 and 'href="/recurring"' in page.text
    assert "nightly &lt;b&gt;" in page.text and "cron 0 2 * * * (Europe/Berlin)" in page.text   # literal, escaped
    token = csrf_of(page.text)
    assert c.post("/recurring/nightly%20%3Cb%3E/pause", data={"csrf": token}).status_code == 200
    assert recurring.tasks(web_store)[0].paused and "paused" in c.get("/recurring").text
    assert c.post("/recurring/nightly%20%3Cb%3E/resume", data={"csrf": token}).status_code == 200
    assert not recurring.tasks(web_store)[0].paused
    assert c.post("/recurring/nightly%20%3Cb%3E/run", data={"csrf": token}).status_code == 200
    (task_id,) = [r[0] for r in rows(db_url, "SELECT task_id FROM sqlq_recurring_executions WHERE manual = :t",
                                     {"t": True})]
    assert rows(db_url, "SELECT task_name FROM sqlq_jobs WHERE task_id = :i", {"i": task_id}) == [("reports.nightly",)]
    assert recurring.tasks(web_store)[0].last_task_id == task_id
    assert c.post("/recurring/nope/pause", data={"csrf": token}).status_code == 404
    assert c.post("/recurring/nightly%20%3Cb%3E/pause", data={"csrf": "forged"}).status_code == 403
