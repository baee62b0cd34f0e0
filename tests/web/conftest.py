"""Fixtures for the dashboard: a store with known rows, an HTTP client, a real server, a headless Chromium.

    web_store     a Store on ``db_url`` (every engine) with its tables
    client        factory: client(store, **create_app options) -> Starlette TestClient
    web_server    factory: web_server(directory, *args) -> address of a real `celery sqlq web` process
    browser       a headless Chromium (selenium + chromedriver), cleared for each test; skipped without them,
                  failed under CI (one Chromium per module: ``chromium``)
    shots         the directory screenshots go to (tests/web/screenshots, or $SQLQ_WEB_SCREENSHOTS)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness import REPO, wait_until
from tests.support.zygote import forking_enabled, zygote

pytest.importorskip("starlette", reason="the dashboard tests need the web extra: pip install -e '.[test]'")

from tests.web.data import store_at  # noqa: E402

ADDRESS = re.compile(r"sqlq dashboard on (http://\S+/)")


@pytest.fixture
def web_store(db_url):
    store = store_at(db_url)
    yield store
    store.engine.dispose()


@pytest.fixture
def client():
    from starlette.testclient import TestClient

    from celery_sqlbackend.web import create_app
    made = []

    def make(store, **options):
        options.setdefault("token", "")
        c = TestClient(create_app(store, **options), base_url="http://127.0.0.1")
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def csrf_of(html: str) -> str:
    """The CSRF token a page's forms carry."""
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "the page has no form with a CSRF token"
    return m.group(1)


@pytest.fixture
def web_server():
    """Start `celery -A <app> sqlq web --port 0` in ``directory``; returns the address it prints.

    Forked from the preloaded zygote (tests/support/zygote.py) like the other ``celery`` commands, unless
    ``SQLQ_TEST_EXEC=1`` or the test passes an ``env`` of its own."""
    procs: list = []

    def start(directory: Path, *args: str, app: str = "testapp", env: dict | None = None) -> str:
        directory = Path(directory)
        out, log = directory / f"web-{len(procs)}.out", directory / f"web-{len(procs)}.log"
        argv = ["-A", app, "sqlq", "web", "--port", "0", *args]
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(directory), str(REPO)]), "PYTHONUNBUFFERED": "1",
                   **(env or {})}
        if forking_enabled() and not env:
            proc = zygote().spawn(argv, directory, environ, out, log)
        else:
            with open(out, "wb") as stdout, open(log, "wb") as stderr:
                proc = subprocess.Popen([sys.executable, "-m", "celery", *argv], cwd=directory, stdout=stdout,
                                        stderr=stderr, start_new_session=True, env=environ)
        procs.append(proc)

        def text(path: Path) -> str:   # (a forked server opens its files an instant after the fork)
            return path.read_text(errors="replace") if path.exists() else ""

        def address():
            m = ADDRESS.search(text(out))
            if m:
                return m.group(1)
            if proc.poll() is not None:
                raise AssertionError(f"`sqlq web` exited {proc.poll()} before printing its address\n"
                                     f"{text(out)}\n{text(log)[-3000:]}")
            return None
        try:
            return wait_until(address, 60, 0.05, "`sqlq web` to print its address")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{text(log)[-3000:]}") from None

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")


def _missing_browser(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"headless Chromium is required under CI: {reason}", pytrace=False)
    pytest.skip(f"headless Chromium unavailable (apt-get install chromium chromium-driver): {reason}")


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for a module's browser tests: starting one costs seconds of CPU (tens of seconds
    when several start at once on a loaded machine), and every test gets it in a clean state (``browser``)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        _missing_browser(f"selenium is not installed ({exc})")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        _missing_browser("no chromium or chromedriver on PATH")
    profile = tempfile.mkdtemp(prefix="sqlq-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser(chromium):
    """The module's Chromium on a blank page with no cookies (each test's dashboard is a server of its own,
    but cookies are per host, not per port)."""
    chromium.get("about:blank")
    chromium.delete_all_cookies()
    yield chromium
    chromium.get("about:blank")
    chromium.delete_all_cookies()


@pytest.fixture(scope="session")
def shots() -> Path:
    path = Path(os.environ.get("SQLQ_WEB_SCREENSHOTS") or Path(__file__).parent / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_for(driver, predicate, timeout: float = 20.0, what: str = "the page"):
    """Poll the browser until ``predicate(driver)`` is truthy (no fixed sleeps).

    The pages swap parts of themselves as they refresh: an element found an instant before a
    swap is stale (or briefly gone) by the time it is read, which means "look again", not a failure."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def check():
        try:
            return predicate(driver)
        except (StaleElementReferenceException, NoSuchElementException):
            return None

    return wait_until(check, timeout, 0.1, what)
