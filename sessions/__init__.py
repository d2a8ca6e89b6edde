"""Sessions: every conversation saved as it happens, resumable, exportable, replayable exactly.

| module      | what                                                                   |
|-------------|------------------------------------------------------------------------|
| domain.py   | Session, turns and events as dataclasses; the active branch            |
| records.py  | the JSON Lines format and converters to and from domain.py             |
| store.py    | SessionStore: create, append (locked, fsynced), load, list, resolve    |
| recorder.py | SessionRecorder: what the front ends call as a conversation happens    |
| export.py   | Markdown and JSON transcripts, `sessions show`                         |
| replay.py   | regenerate every reply and compare token ids                           |
| cli.py      | `glmchat sessions …` and `glmchat replay …`                            |
"""

from .domain import Session
from .recorder import SessionRecorder, open_recorder
from .records import FORMAT_VERSION, SessionFileError
from .store import SessionStore

__all__ = ["FORMAT_VERSION", "Session", "SessionFileError", "SessionRecorder", "SessionStore",
           "open_recorder"]
