"""A stopped service ends its process with its exit handlers run and without the interpreter's
teardown (``services/run.py``: ``exit_now``), which took a stopped worker seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import atexit, pathlib, sys
from dlora.services.run import exit_now

class Torn:
    def __init__(self, path):
        self.path, self.open = path, open  # (the teardown takes the builtins away before it)

    def __del__(self):
        self.open(self.path, "w").close()

kept = Torn(sys.argv[1] + "/torn")  # freed by the teardown only
atexit.register(pathlib.Path(sys.argv[1], "handled").write_text, "")
print("said", end="")  # still in stdout's buffer
exit_now(3)
"""


def test_exit_now_runs_the_exit_handlers_flushes_and_skips_the_teardown(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and done.stdout == "said", done
    assert (tmp_path / "handled").exists()
    assert not (tmp_path / "torn").exists()  # the teardown never ran
