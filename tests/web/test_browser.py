"""The dashboard driven in a real headless Chromium against a real `celery sqlq web` process and real workers.

Screenshots of the main pages go to tests/web/screenshots (``$SQLQ_WEB_SCREENSHOTS``).
"""
from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from sqlalchemy import func, select

from celery_sqlbackend import admin
from tests.harness import wait_until, write_app
from tests.web.conftest import wait_for
from tests.web.data import add_job, add_process, store_at

#: One xdist worker runs them all, on one Chromium (the module-scoped ``chromium`` fixture).
pytestmark = [pytest.mark.chromium, pytest.mark.xdist_group("web-browser")]

TASKS = '''
import time
from checkpoint import IterativeTask

@app.task(name="proj.send")
def send(*args):
    return len(args)

class Count(IterativeTask):
    name = "proj.count"
    checkpoint_every = 3
    checkpoint_interval = 0.2

    def build_enumerator(self, n, *, cursor=None):
        return self.enumerate.integers(0, n, cursor=cursor)

    def each_iteration(self, item, n):
        time.sleep(0.05)

count = app.register_task(Count())
'''
CONF = {"broker_transport_options": {"polling_interval": 0.05, "heartbeat_interval": 0.5, "alive_threshold": 3.0},
        "worker_prefetch_multiplier": 1, "task_ignore_result": True}


@pytest.fixture
def site(tmp_path, web_server):
    """A Celery app on a SQLite broker, its store, and the address of a dashboard serving it."""
    url = f"sqlite:///{tmp_path}/jobs.sqlite3"
    write_app(tmp_path, f"sqlq+{url}", extra_conf=CONF, tasks_source=TASKS)
    store = store_at(url)
    yield tmp_path, store, lambda: web_server(tmp_path)
    store.engine.dispose()


def count(store, table, *where) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def test_pause_and_resume_a_queue_while_a_worker_waits(site, browser, spawn_worker, shots):
    directory, store, serve = site
    ids = [add_job(store, "emails", "proj.send", [i, "hello"]) for i in range(3)]
    base = serve()
    browser.get(base + "queues")
    browser.find_element(By.CSS_SELECTOR, 'tr[data-queue="emails"] button.pause').click()
    wait_for(browser, lambda d: "paused" in d.find_element(By.CSS_SELECTOR, 'tr[data-queue="emails"]').text,
             what="the queue shown paused")
    assert admin.paused(store) == ["emails"]
    spawn_worker(directory, queues="emails")
    browser.get(base + "processes")
    wait_for(browser, lambda d: "emails" in d.find_element(By.ID, "processes").text, what="the worker listed")
    browser.save_screenshot(str(shots / "processes.png"))
    assert count(store, store.t.ready) == 3                        # the worker is up and claims nothing
    browser.get(base + "queues")
    browser.save_screenshot(str(shots / "queues-paused.png"))
    browser.find_element(By.CSS_SELECTOR, 'tr[data-queue="emails"] button.resume').click()
    wait_until(lambda: count(store, store.t.jobs, store.t.jobs.c.id.in_(ids),
                             store.t.jobs.c.finished_at.is_not(None)) == 3, 30, message="the jobs to run")
    browser.get(base + "queues?refresh=1")
    browser.save_screenshot(str(shots / "queues.png"))


def test_retry_and_discard_failed_jobs(site, browser, shots):
    directory, store, serve = site
    with store.engine.begin() as conn:   # (one commit)
        broken = [add_job(store, "reports", "proj.build", [i], state="failed", error_class="KeyError",
                          error="Traceback (most recent call last):\n  ...\nKeyError: 'month'", conn=conn)
                  for i in range(700)]
    pruned = [add_job(store, "emails", "proj.send", [i], state="failed", error_class="ProcessPrunedError",
                      error=f"ProcessPrunedError: process w1 was pruned (job {i})") for i in range(3)]
    base = serve()
    browser.get(base + "failed")
    browser.save_screenshot(str(shots / "failed.png"))
    browser.find_element(By.CSS_SELECTOR, f'tr[data-job="{pruned[0]}"] input[type=checkbox]').click()
    browser.find_element(By.ID, "retry-selected").click()
    wait_for(browser, lambda d: "retry 1" in d.find_element(By.ID, "done").text, what="the retry notice")
    browser.find_element(By.CSS_SELECTOR, f'tr[data-job="{pruned[1]}"] input[type=checkbox]').click()
    browser.find_element(By.ID, "discard-selected").click()
    wait_for(browser, lambda d: "discard 1" in d.find_element(By.ID, "done").text, what="the discard notice")
    with store.engine.connect() as conn:
        assert list(conn.execute(select(store.t.ready.c.job_id)).scalars()) == [pruned[0]]
    assert count(store, store.t.jobs, store.t.jobs.c.id == pruned[1]) == 0

    browser.find_element(By.CSS_SELECTOR, '#failed-filters input[name="error_class"]').send_keys("KeyError")
    browser.find_element(By.CSS_SELECTOR, "#failed-filters button").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "match-count").text == "700", what="700 KeyErrors matched")
    browser.find_element(By.ID, "discard-all").click()
    wait_for(browser, lambda d: "finished" in d.find_element(By.ID, "bulk-state").text, 60, "the bulk discard")
    assert browser.find_element(By.ID, "bulk-count").text == "700 of 700"
    browser.save_screenshot(str(shots / "bulk-discard.png"))
    assert count(store, store.t.failed) == 1 and count(store, store.t.jobs, store.t.jobs.c.id.in_(broken)) == 0


def test_filter_jobs_and_open_one(site, browser, shots):
    directory, store, serve = site
    with store.engine.begin() as conn:
        for i in range(40):
            add_job(store, "billing", "proj.invoice", [f"customer-{i}"], state="finished", conn=conn)
    wanted = add_job(store, "billing", "proj.invoice", ["customer-7", "<b>not bold</b>"], state="failed",
                     error_class="ValueError", error="ValueError: bad <b>amount</b>")
    add_process(store, "w1@host", queues=("billing",))
    base = serve()
    browser.get(base + "jobs")
    browser.find_element(By.CSS_SELECTOR, '#job-filters input[name="text"]').send_keys("customer-7'")
    browser.find_element(By.CSS_SELECTOR, "#job-filters button").click()
    wait_for(browser, lambda d: "text=customer-7" in d.current_url, what="the filtered page")
    links = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#jobs tbody td:first-child a")]
    assert links == [str(wanted), str(7 + 1)], links       # job ids: the failed one, then customer-7's finished job
    browser.save_screenshot(str(shots / "jobs.png"))
    browser.find_element(By.LINK_TEXT, str(wanted)).click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "job"), what="the job page")
    assert "<b>not bold</b>" in browser.find_element(By.ID, "job").text       # shown, not interpreted
    assert "ValueError: bad <b>amount</b>" in browser.page_source.replace("&lt;", "<").replace("&gt;", ">")
    assert not browser.find_elements(By.CSS_SELECTOR, "#job b")
    browser.save_screenshot(str(shots / "job.png"))


def test_watch_an_iterative_job_move(site, browser, spawn_worker, shots):
    directory, store, serve = site
    spawn_worker(directory, pool="solo")
    from celery import Celery
    producer = Celery("producer", broker=f"sqlq+{store.url}")
    result = producer.send_task("proj.count", args=[120])
    base = serve()
    browser.get(base + "iterative?refresh=1")

    def items_done(d):
        cells = d.find_elements(By.CSS_SELECTOR, f'tr[data-task="{result.id}"] td.items')
        return int(cells[0].text.split("/")[0].replace(",", "")) if cells else None

    first = wait_for(browser, items_done, 30, "the job on the iterative page")
    wait_for(browser, lambda d: (items_done(d) or 0) > first, 30, "its items done to grow")
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-task="{result.id}"]').text
    assert "/ 120" in row and "/s" in row
    browser.save_screenshot(str(shots / "iterative.png"))
    producer.close()
