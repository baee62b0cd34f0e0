"""PyMySQL connections share one preferred-mode TLS context per process (celery_sqlbackend.store.pymysql_tls).

What could break: a shared context that no longer negotiates TLS with a server that offers it
(preferred mode must still encrypt), or one built per connection again (the CPU the module saves).
Both are checked on real servers: the run's MariaDB, and a private one started with a certificate.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from celery_sqlbackend.store import pymysql_tls
from celery_sqlbackend.store.engine import get_engine
from tests.support.servers import ServerUnavailable


def _cipher_and_context(engine):
    with engine.connect() as conn:
        cipher = conn.exec_driver_sql("SHOW SESSION STATUS LIKE 'Ssl_cipher'").one()[1]
        raw = conn.connection.dbapi_connection
        return cipher, getattr(raw, "ctx", None), type(raw)


def test_the_store_engines_connections_share_one_context(mysql_db_url):
    engine = get_engine(mysql_db_url)
    with engine.connect() as first, engine.connect() as second:   # two connections at once: two connects
        a, b = first.connection.dbapi_connection, second.connection.dbapi_connection
        assert a is not b
        assert type(a) is pymysql_tls.connection_class()
        assert a.ctx is not None and a.ctx is b.ctx
    # Another engine of this process (a NullPool engine connects per use) gets the same one.
    other = pymysql_tls.install(create_engine(mysql_db_url, poolclass=NullPool))
    assert _cipher_and_context(other)[1] is a.ctx


def test_explicit_tls_settings_take_pymysqls_own_path(mysql_db_url):
    engine = pymysql_tls.install(create_engine(mysql_db_url + "?ssl_disabled=true", poolclass=NullPool))
    cipher, ctx, _ = _cipher_and_context(engine)
    assert cipher == "" and ctx is None


@pytest.fixture
def tls_mariadb(mysql_url, tmp_path):
    """A private MariaDB that offers TLS (a self-signed certificate), or a skip (a failure under CI)."""
    from tests.support.mariadb import PrivateMariaDB

    if not shutil.which("openssl"):
        _unavailable("openssl not found")
    try:
        server = PrivateMariaDB()
    except ServerUnavailable as exc:
        _unavailable(str(exc))
    try:
        cert, key = server.base / "cert.pem", server.base / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, timeout=60)
        if server.as_root:
            for path in (cert, key):
                shutil.chown(path, user=server.user)
        server.settings.update({"ssl-cert": str(cert), "ssl-key": str(key)})
        server.start()
        yield server
    finally:
        server.destroy()


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"a private MariaDB with TLS is required under CI: {reason}", pytrace=False)
    pytest.skip(f"no private MariaDB with TLS: {reason}")


def test_preferred_mode_still_encrypts_when_the_server_offers_tls(tls_mariadb):
    engine = get_engine(tls_mariadb.url())
    first_cipher, first_ctx, cls = _cipher_and_context(engine)
    engine.dispose()   # the next connection is a new one, on the shared context
    second_cipher, second_ctx, _ = _cipher_and_context(engine)
    assert cls is pymysql_tls.connection_class()
    assert first_cipher and second_cipher, "preferred mode must negotiate TLS with a server that offers it"
    assert first_ctx is second_ctx
