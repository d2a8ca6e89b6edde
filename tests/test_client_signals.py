"""Ctrl+C and SIGTERM against the worker pipe: a signal never splits a message in two.

CI once lost a SIGTERMed one-shot's partial reply: the handler raised KeyboardInterrupt between
a message's length header and its body, and the cancel's Finished never came back readable."""

from __future__ import annotations

import os
import signal
import time

from glmchat.client import deferred, signals_held


def test_a_deferred_ctrl_c_waits_for_the_end_of_the_block() -> None:
    previous = signal.signal(signal.SIGINT, deferred(signal.default_int_handler))
    reached = []
    try:
        try:
            with signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # it would be raised here if it were not held
                reached.append("end of block")
        except KeyboardInterrupt:
            reached.append("interrupted")
        try:  # outside a block it is raised at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached.append("not raised")
        except KeyboardInterrupt:
            reached.append("raised at once")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert reached == ["end of block", "interrupted", "raised at once"]
