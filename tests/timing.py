"""Timed waits that are not synchronisation: the length of a fault or the pace of a load, the thing under test.

A test that waits for a result polls a condition with a deadline (``conftest.poll``). ``hold`` is for the
other waits, and names why the time itself matters, so that no bare sleep stands in the tests.
"""

from __future__ import annotations

import time


def hold(seconds: float, why: str) -> None:
    """Let ``seconds`` pass (nothing when not positive): ``why`` says which fault's length or load's pace."""
    del why  # documentation at the call site
    if seconds > 0:
        time.sleep(seconds)
