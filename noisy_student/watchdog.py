"""Stop a helper process once the process that started it is gone, however it went.

A process killed with SIGKILL (`kill -9`, the kernel's out-of-memory killer) runs no exit
handler, so a server it started stays behind. `python -m noisy_student.watchdog PARENT
CHILD`, started by PARENT, waits for PARENT to exit, then stops CHILD: SIGTERM, and
SIGKILL if it is still there after `grace` seconds. It exits at once if CHILD goes first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time


def alive(pid: int) -> bool:
    """Running: not gone, and not a zombie waiting for its parent to collect it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): kill(pid, 0) is all there is


def watch(parent: int, child: int, poll: float = 0.5, grace: float = 10.0) -> None:
    # The watchdog is PARENT's own child, so PARENT is gone once this process has another
    # parent; checking PARENT's pid instead would take a killed PARENT that nobody has
    # collected yet (a zombie) for alive.
    while os.getppid() == parent and alive(child):
        time.sleep(poll)
    if not alive(child):
        return
    with contextlib.suppress(ProcessLookupError):  # it may go by itself meanwhile
        os.kill(child, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(child):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def start(child: int) -> subprocess.Popen[bytes]:
    """A watchdog that stops `child` when this process is gone."""
    return subprocess.Popen(
        [sys.executable, "-m", "noisy_student.watchdog", str(os.getpid()), str(child)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C in the terminal is for the pipeline, not for it
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
