"""``celery_sqlbackend.urls``: one meaning for ``sqlq+…`` and ``sqlq://``, and no password in any message."""
import pytest

from celery_sqlbackend.errors import ConfigurationError
from celery_sqlbackend.urls import backend_database_url, broker_database_url, database_url, mask, validate


def test_the_prefix_is_stripped_and_plain_urls_are_kept():
    assert database_url("sqlq+sqlite:///jobs.sqlite3") == "sqlite:///jobs.sqlite3"
    assert database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


def test_the_backend_shorthand_means_the_brokers_database():
    conf = {"broker_url": "sqlq+postgresql+psycopg://u:pw@h/db"}
    for shorthand in ("sqlq://", "sqlq", None):
        assert backend_database_url(shorthand, conf) == "postgresql+psycopg://u:pw@h/db"
    assert backend_database_url("sqlq+sqlite:///r.sqlite3", conf) == "sqlite:///r.sqlite3"
    assert broker_database_url({"broker_url": ["sqlq+sqlite:///a.sqlite3", "x"]}) == "sqlite:///a.sqlite3"
    assert broker_database_url({"broker_url": "redis://h/0"}) is None


def test_a_shorthand_without_an_sqlq_broker_says_what_to_write_without_the_password():
    with pytest.raises(ConfigurationError) as info:
        backend_database_url("sqlq://", {"broker_url": "redis://:s3cret@h:6379/0"})
    assert "s3cret" not in str(info.value) and "result_backend='sqlq+<SQLAlchemy URL>'" in str(info.value)


def test_passwords_are_masked_in_urls_and_in_texts_that_carry_them():
    assert mask("sqlq+postgresql+psycopg://user:s3cret@db/app") == "sqlq+postgresql+psycopg://user:***@db/app"
    assert "s3cret" not in mask(RuntimeError("cannot reach postgresql://user:s3cret@db:5432/app: refused"))
    assert mask("sqlite:///jobs.sqlite3") == "sqlite:///jobs.sqlite3"


def test_validation_errors_name_the_url_without_its_password():
    with pytest.raises(ConfigurationError) as info:
        validate("postgresql+nosuchdriver://user:s3cret@db/app")
    assert "s3cret" not in str(info.value) and "user:***@db/app" in str(info.value)
    with pytest.raises(ConfigurationError, match="in-memory"):
        validate("sqlite://")
