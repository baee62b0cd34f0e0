"""What the test suite stands on, one job per module.

    servers    free ports, OS users, and the watchdog that stops a throwaway server whose owner died
    postgres   PrivatePostgres: a throwaway PostgreSQL cluster (initdb/pg_ctl)
    mariadb    PrivateMariaDB: a throwaway MariaDB server (mariadb-install-db/mariadbd)
    engines    the engine parameter: which engines run, their session servers (one per test run,
               shared by pytest-xdist workers) and a fresh database per test
    summary    the per-engine counts printed at the end of the run
    cluster    workers, a producer and the job-state tables, for the worker lifecycle tests

The everyday helpers (``wait_until``, ``rows``, ``write_app``, ``CeleryWorker``) are in ``tests.harness``.
"""
