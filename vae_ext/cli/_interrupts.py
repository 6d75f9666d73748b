"""Signals that must not cut a file write short.

The CLI's SIGINT and SIGTERM handlers raise through :func:`raise_interrupt`. Inside :func:`deferred`
(``train.atomic_write``) they only note the signal, raised as soon as the block ends: an exception
raised in the middle of ``torch.save`` makes its zip writer fail on the way out with an error of its
own, over the interrupt, and the user gets a traceback instead of a clean stop.
"""
from __future__ import annotations

import contextlib

_state = {"depth": 0, "pending": None}


def raise_interrupt(exc: BaseException) -> None:
    """Raise ``exc`` now, or at the end of the ``deferred`` block in progress."""
    if _state["depth"]:
        _state["pending"] = _state["pending"] or exc
        return
    raise exc


@contextlib.contextmanager
def deferred():
    """Hold back what ``raise_interrupt`` raises until the block ends (then raise it)."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
    if _state["depth"] == 0 and _state["pending"] is not None:
        exc, _state["pending"] = _state["pending"], None
        raise exc
