"""Named fault points, for the kill-and-resume tests: what a crash at any moment must survive.

`fault_point(name)` does nothing unless the environment asks:
- ZOO_FAULT_KILL_AT=<name>: the process kills itself with SIGKILL there (nothing cleaned up, as in a crash);
- ZOO_FAULT_TRACE=<file>: each point reached is appended to the file, one name a line, so a test can
  list the points of a run and pick where to kill the next one.

Names: `<stage>:<step>` after a training step, `write:<label>` when an atomic folder is written but not
yet in place, `swap:<label>` between the two renames of an atomic folder
write, `progress:<key>` after a result is recorded, `summary` after summary.json is written.
"""

from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    trace = os.environ.get("ZOO_FAULT_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(name + "\n")
    if os.environ.get("ZOO_FAULT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
