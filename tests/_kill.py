"""Test helper: kill one Dask worker process at a given iteration of a fit (fit ``callback``)."""

from __future__ import annotations

import os
import signal


class KillWorkerAt:
    """``callback(iteration, shared)`` that SIGKILLs the first worker of ``client`` once, at ``iteration``;
    ``killed`` records the iterations at which it fired. Never stops the fit."""

    def __init__(self, client, iteration: int):
        self.pid = list(client.run(os.getpid).values())[0]
        self.iteration = iteration
        self.killed: list[int] = []

    def __call__(self, it, shared) -> bool:
        if it == self.iteration and not self.killed:
            os.kill(self.pid, signal.SIGKILL)
            self.killed.append(it)
        return False
