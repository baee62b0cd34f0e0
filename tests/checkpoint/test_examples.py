"""The examples stay runnable: each demo stops a worker mid-job and finishes on a second one."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.harness import REPO


@pytest.mark.parametrize("script, env_var, expected", [
    ("backfill.py", "BACKFILL_DIR", ["resumed after order", "1 interruption(s)", "every order of the account is backfilled"]),
    ("csv_import.py", "CSV_IMPORT_DIR", ["resumed at byte", "1 interruption(s)", "all 20000 rows imported, none twice"]),
])
def test_example_demo(tmp_path, script, env_var, expected):
    env = {**os.environ, env_var: str(tmp_path)}
    env.pop("CHECKPOINT_STOPFLAG", None)
    out = subprocess.run([sys.executable, script, "demo"], cwd=REPO / "examples", env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for line in expected:
        assert line in out.stdout, out.stdout
