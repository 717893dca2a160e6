"""Errors of the machine, not of the input, that a command still refuses cleanly: a full disk.

A write that runs out of space (ENOSPC, or EDQUOT for a quota) raises OSError from Python
and a ValueError carrying "No space left on device" from tensorstore (Orbax). Every command
that writes removes what it was writing when an error stops it (checkpoint.save and
save_streaming, export-hf, data prepare), so the refusal can say that the output is as it was.
"""

from __future__ import annotations

import errno

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")


def disk_full(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from, says the disk (or the quota) is full."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
        if any(text in str(err) for text in _NO_SPACE_TEXT):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def disk_full_message(err: BaseException, output: object) -> str:
    """The one line a command prints for a full disk while writing `output`."""
    where = f" ({err.filename})" if isinstance(err, OSError) and err.filename else ""
    return (f"no space left on the disk while writing {output}{where}; nothing was written "
            f"there (what was being written is removed, a previous {output} is kept). Free "
            "space, or write elsewhere, and run the command again")


def exit_code_of(command: str, output: object, work) -> int:
    """Runs `work()`; an input error (ValueError, a missing or existing file) or a full disk is
    one line on stderr naming the command and exit code 2, anything else is raised."""
    import sys

    try:
        work()
    except (ValueError, OSError) as e:  # FileNotFoundError and FileExistsError are OSErrors
        if disk_full(e):
            e = disk_full_message(e, output)
        elif not isinstance(e, (ValueError, FileNotFoundError, FileExistsError)):
            raise
        print(f"moesaic {command}: error: {e}", file=sys.stderr)
        return 2
    return 0
