"""Failpoints for the crash tests' worker apps: the first host to reach an effect SIGKILLs itself.

``BIDE_TEST_CRASH_MARK`` names a file: the first host about to carry out the effect while the
file does not exist creates it and crashes; hosts started later find the file and go on.
``BIDE_TEST_CRASH_AT``, when set, names the one effect that crashes.
"""

from __future__ import annotations

import os
import signal


def first_to_crash(effect: str) -> bool:
    """Whether this host is the first to reach ``effect`` (it then leaves the mark for the others)."""
    mark = os.environ.get("BIDE_TEST_CRASH_MARK")
    at = os.environ.get("BIDE_TEST_CRASH_AT")
    if not mark or (at is not None and at != effect):
        return False
    try:
        with open(mark, "x") as f:
            f.write(str(os.getpid()))
    except FileExistsError:
        return False
    return True


def crash_if_first(effect: str) -> None:
    """SIGKILL this process if it is the first to reach ``effect``."""
    if first_to_crash(effect):
        os.kill(os.getpid(), signal.SIGKILL)
