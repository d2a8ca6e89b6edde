"""Errors a user can act on: each prints as one line and maps to an exit code."""

from __future__ import annotations


class GlmchatError(Exception):
    """A failure to report as one line (what, where, what to do), never as a traceback."""

    exit_code = 1


class UsageError(GlmchatError):
    """Bad input from the user: flags, config, prompt, model path. Exit code 2."""

    exit_code = 2


class WorkerCrashed(GlmchatError):
    """The worker process died (killed, out of memory, crashed). Exit code 1."""

    exit_code = 1
