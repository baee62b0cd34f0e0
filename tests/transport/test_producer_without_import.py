"""A producer needs no ``import celery_sqlbackend`` (issue #13, item 13).

kombu loads ``kombu.serializers`` entry points on import; ours registers the ``sqlq`` transport alias
(``sqlq_kombu_alias``).  A producer process whose app module never imports the package publishes, and a
real worker runs the task.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.harness import REPO, wait_until

APP = '''
from celery import Celery

app = Celery("plainapp", broker={broker!r})
app.conf.update(broker_transport_options={{"create_tables": True, "polling_interval": 0.05}},
                task_ignore_result=True)

@app.task(name="t.write")
def write(path, text):
    with open(path, "w") as f:
        f.write(text)
'''


def test_a_producer_that_never_imports_the_package_publishes(tmp_path, db_url, spawn_worker):
    (tmp_path / "plainapp.py").write_text(textwrap.dedent(APP.format(broker=f"sqlq+{db_url}")))
    out = tmp_path / "out.txt"
    code = ("import sys\nfrom plainapp import write\n"
            f"write.delay({str(out)!r}, 'delivered')\n")
    produced = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"})
    assert produced.returncode == 0, produced.stderr[-3000:]
    assert "import celery_sqlbackend" not in (tmp_path / "plainapp.py").read_text()
    spawn_worker(tmp_path, app="plainapp")
    wait_until(lambda: out.exists() and out.read_text() == "delivered", 30, message="the task ran")
