"""One job per workdir: a lock file that names its holder's host and pid.

Two jobs started on one `--workdir` (the same party twice, or two parties by mistake) used to
run side by side: one died inside Orbax, and the survivor's metrics.jsonl and TensorBoard logs
held both jobs' steps. Now the second refuses. A lock whose holder is gone (a job killed with
SIGKILL, on this host) is reclaimed with a message; one held from another host cannot be
checked from here, so the refusal says how to remove it once that job is known to be gone.
Only process 0 of a multi-process job takes the lock: the others share its workdir.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time

import jax

LOCK = ".moesaic-lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


class WorkdirLock:
    """`acquire()` before the job writes to its workdir, `release()` when it ends (a no-op
    when it was never acquired)."""

    def __init__(self, workdir: str | os.PathLike, log=print):
        self.path = pathlib.Path(workdir) / LOCK
        self.log = log
        self.held = False

    def acquire(self) -> None:
        if jax.process_index() != 0 or self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # a second try after reclaiming a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_reclaim()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            return
        raise RuntimeError(f"{self.path}: could not take the workdir lock")

    def _refuse_or_reclaim(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            host, pid, since = holder["host"], int(holder["pid"]), holder.get("since", "?")
        except (OSError, ValueError, KeyError, TypeError):
            host, pid, since = None, None, "?"
        workdir = self.path.parent
        if host == socket.gethostname() and pid is not None and not _alive(pid):
            self.log(f"{workdir}: reclaiming the lock of job pid {pid} (started {since}), "
                     "which is gone")
            self.path.unlink(missing_ok=True)
            return
        if host is None:
            raise ValueError(f"{workdir} is locked by {self.path}, which cannot be read; if "
                             "no job runs on this workdir, delete that file")
        where = "this host" if host == socket.gethostname() else f"host {host}"
        raise ValueError(f"{workdir} is in use by another job (pid {pid} on {where}, since "
                         f"{since}): two jobs on one workdir would mix their checkpoints and "
                         "logs. Wait for it, or use another --workdir"
                         + ("" if host == socket.gethostname() else
                            f"; if that job is gone, delete {self.path}"))

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
