"""Token ids → streamed text: incremental detokenization and stop strings.

Byte-level BPE tokens can split a UTF-8 character, so a delta is only released once it decodes
cleanly. Text that might be the start of a stop string is held back until it is known not to
be one, so a stop string never reaches the screen.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence

Decode = Callable[[Sequence[int]], str]


class IncrementalDecoder:
    """Decodes a growing token list into text deltas (the prefix/read offset method)."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self.token_ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            return new_text[len(prefix_text):]
        return ""


def stop_index(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class TextStream:
    """Accumulates the reply; ``push`` returns what may be shown now, and whether a stop string
    ended the reply. ``text`` is the reply so far, cut before any stop string."""

    def __init__(self, decode: Decode, stops: Sequence[str] = ()) -> None:
        self._decoder = IncrementalDecoder(decode)
        self._stops = [s for s in stops if s]
        self._full = ""
        self._shown = 0
        self.stopped = False

    @property
    def token_ids(self) -> list[int]:
        return self._decoder.token_ids

    @property
    def text(self) -> str:
        return self._full

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._full += self._decoder.add(token_id)
        if self._stops:
            cut = stop_index(self._full, self._stops)
            if cut is not None:
                self._full = self._full[:cut]
                self.stopped = True
                return self._release(len(self._full))
            return self._release(len(self._full) - held_back(self._full, self._stops))
        return self._release(len(self._full))

    def flush(self) -> str:
        """The rest of the text at the end of the reply (held-back text was no stop)."""
        return self._release(len(self._full))

    def _release(self, upto: int) -> str:
        if upto <= self._shown:
            return ""
        delta = self._full[self._shown:upto]
        self._shown = upto
        return delta


def drain(steps: Iterator[int], stream: TextStream, eos_token_ids: Collection[int],
          on_delta: Callable[[str, int], None], on_step: Callable[[], None],
          keep_eos: bool = False) -> str:
    """Feed decoded tokens through ``stream`` until EOS, a stop string or the end of ``steps``.
    ``on_delta`` gets each token's releasable text (maybe empty), ``on_step`` runs after it.
    Returns the finish reason: "eos", "stop" or "length". Closing ``steps`` and catching a
    cancellation are the caller's."""
    for token_id in steps:
        if token_id in eos_token_ids:
            if keep_eos:
                stream.token_ids.append(token_id)
            return "eos"
        on_delta(stream.push(token_id), token_id)
        on_step()
        if stream.stopped:
            return "stop"
    return "length"
