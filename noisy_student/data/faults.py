"""Fault injection for the resume tests and the resume measurement (benchmarks/resume.py).

`NOISY_STUDENT_KILL_AT=<point>` makes the process kill itself with SIGKILL, exactly as
`kill -9` would, when it reaches that point: no handler runs, nothing is flushed. Points:
`pseudo-labels:shard=<i>` (as shard i starts), `<run>:step=<n>` (after training step n)
and `<run>:epoch=<e>` (after epoch e's training state is saved), where <run> is
`teacher` or `student-<k>`; `append:commit` / `write:commit` (a dataset append or a new
dataset, once its shards are written and before its manifest is); `labels:land` (`ingest
labels`, between its claim on the unlabelled pool and the landing in labelled/). Unset,
this costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

KILL_AT = "NOISY_STUDENT_KILL_AT"


def kill_point(name: str) -> None:
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)
