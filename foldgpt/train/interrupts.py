"""Ctrl-C and SIGTERM during training: finish the step, write a checkpoint, then stop."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

DEFERRED_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


@contextmanager
def deferred_interrupt() -> Iterator[dict]:
    """Turn the first Ctrl-C (SIGINT) or SIGTERM into a flag checked between steps; a second one interrupts at once.

    SIGTERM is what a scheduler or ``kill`` sends (the CLI maps it to ``KeyboardInterrupt``), so it too finishes the
    step in progress and writes a checkpoint. A signal that is ignored (``SIG_IGN``) or handled outside Python stays
    as it is. The previous handlers are restored on exit (and before the second signal interrupts).
    """
    flag = {"interrupted": False}
    if not _in_main_thread():
        yield flag
        return
    previous = {signum: signal.getsignal(signum) for signum in DEFERRED_SIGNALS}
    deferred = [signum for signum, handler in previous.items() if handler not in (signal.SIG_IGN, None)]

    def restore() -> None:
        for signum in deferred:
            signal.signal(signum, previous[signum])

    def handler(signum, frame) -> None:
        if flag["interrupted"]:
            restore()
            raise KeyboardInterrupt
        flag["interrupted"] = True
        name = DEFERRED_SIGNALS.get(signum, "signal")
        print(f"\nfoldgpt: {name}: finishing the current step and writing a checkpoint (Ctrl-C or SIGTERM again to abort)",
              file=sys.stderr)

    for signum in deferred:
        signal.signal(signum, handler)
    try:
        yield flag
    finally:
        restore()


def _in_main_thread() -> bool:
    import threading  # noqa: PLC0415

    return threading.current_thread() is threading.main_thread()
