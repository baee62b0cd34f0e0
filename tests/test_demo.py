"""The README's first command runs examples/demo.py: it must keep working."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end_and_tells_its_story():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "ran in this order: priority 9, priority 5, priority 0" in text
    assert "add(40, 2) -> 42" in text
    assert "raised ZeroDivisionError" in text
    assert "resumed after order" in text and "1 interruption(s)" in text
    assert "every order of the account is backfilled" in text
