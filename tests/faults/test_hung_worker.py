"""A worker that stops answering (a forward that never returns): Stop and quit still work.

GLMCHAT_DEBUG_STALL=hang:N makes the worker's decode step N hang for good, deaf to Cancel and
Shutdown, as a forward stuck in a kernel would."""

from __future__ import annotations

import signal
import time

from tests.faults.cases import fault
from tests.faults.harness import Screen

HANG = {"GLMCHAT_DEBUG_STALL": "hang:3"}  # the third decode step never ends
HUNG_BY_S = 3.0
QUIT_WITHIN_S = 1.0  # the screen back after Ctrl+Q (< 0.3 s on a quiet machine)


@fault("TUI: the worker hangs mid-reply; Esc, then Ctrl+Q",
       "after 5 s Esc gives up on the reply (`The worker did not stop …: restarting it`); "
       "Ctrl+Q gives the terminal back at once, the stuck worker is terminated, exit 0",
       "the conversation, with the partial reply")
def test_tui_stop_and_quit_with_a_hung_worker() -> None:
    screen = Screen("--no-save", "--max-new-tokens", "50", env=HANG)
    screen.wait_for("loaded in")
    screen.send("Tell me about the sea.\r")
    screen.wait_for("generating")
    time.sleep(HUNG_BY_S)  # the forward is stuck by now
    since = len(screen.output)
    screen.send("\x1b")  # Esc: stop
    screen.wait_for("did not stop", timeout=30, since=since)
    since = len(screen.output)
    pressed = time.perf_counter()
    screen.send("\x11")  # Ctrl+Q
    restored = screen.wait_for(Screen.ALT_SCREEN_OFF, timeout=10, since=since)
    assert restored - pressed < QUIT_WITHIN_S, f"quit took {restored - pressed:.2f} s"
    assert screen.finish() == 0


@fault("TUI: Ctrl+Q while a reply streams", "the terminal is back at once; the worker is "
       "told to shut down and reaped; exit 0", "the conversation, in the session store")
def test_tui_quit_mid_reply_is_immediate() -> None:
    screen = Screen("--max-new-tokens", "200", env={"GLMCHAT_DEBUG_STALL": "slow:0.2"})
    screen.wait_for("loaded in")
    screen.send("Tell me about the sea.\r")
    screen.wait_for("generating")
    since = len(screen.output)
    pressed = time.perf_counter()
    screen.send("\x11")
    restored = screen.wait_for(Screen.ALT_SCREEN_OFF, timeout=10, since=since)
    assert restored - pressed < QUIT_WITHIN_S, f"quit took {restored - pressed:.2f} s"
    assert screen.finish() == 0


@fault("plain REPL: the worker hangs mid-reply; Ctrl+C, then /quit",
       "after 5 s: `(the worker did not stop the reply; the next prompt restarts it)`; "
       "/quit leaves, the stuck worker is terminated, exit 0", "the conversation")
def test_plain_stop_and_quit_with_a_hung_worker() -> None:
    screen = Screen("--plain", "--no-save", "--max-new-tokens", "50", env=HANG)
    screen.wait_for("Ctrl+D leaves", timeout=60)
    time.sleep(0.5)  # the prompt is up
    screen.send("Tell me about the sea.")
    time.sleep(0.3)
    screen.send("\r")  # waits for the model, then replies
    screen.wait_for("loaded in", timeout=180)
    time.sleep(HUNG_BY_S)  # the reply began, and is stuck by now
    # Ctrl+C: what the terminal sends the foreground process (this pty is not the child's
    # controlling terminal, so the test sends the signal itself).
    screen.proc.send_signal(signal.SIGINT)
    screen.wait_for("did not stop", timeout=30)
    time.sleep(0.5)  # the prompt is back
    screen.send("/quit")
    time.sleep(0.3)  # typed, not pasted (a paste keeps its newline)
    screen.send("\r")
    assert screen.finish() == 0
