"""The KV cache kept across chat turns: turn 2 prefills only what is new.

Each turn's prompt is the whole conversation rendered again, so it usually starts with the
previous turn's prompt and reply. We keep the previous generation's cache and the token ids it
holds; the next prompt reuses the longest common prefix (cropping the cache back to it when the
conversation was edited or the reply re-tokenizes differently) and prefills only the rest. On
an offloaded model this is the difference between streaming the weights once per new token and
once per token of the whole conversation. Behind `glmchat serve` several conversations take
turns on one worker, so it keeps one cache per conversation (up to ``slots``).
"""

from __future__ import annotations

import copy
import os
from typing import Any

from transformers import DynamicCache


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


CONVERSATIONS_ENV = "GLMCHAT_KV_CONVERSATIONS"  # `glmchat serve --kv-conversations N` sets it


def conversation_slots() -> int:
    """How many conversations keep their KV cache: 1 for a front end's own worker (one
    conversation), more behind `glmchat serve`, where clients take turns on one worker."""
    try:
        return max(1, int(os.environ.get(CONVERSATIONS_ENV, "1")))
    except ValueError:
        return 1


class ConversationCache:
    """The KV caches of the last ``slots`` generations and the tokens in each, for the next
    turn of any of those conversations to reuse (the one sharing the longest prefix wins; the
    least recently used is dropped)."""

    def __init__(self, slots: int | None = None) -> None:
        self.slots = conversation_slots() if slots is None else max(1, slots)
        self.entries: list[tuple[DynamicCache, list[int]]] = []  # most recent first

    @property
    def cache(self) -> DynamicCache | None:
        return self.entries[0][0] if self.entries else None

    @property
    def token_ids(self) -> list[int]:
        return self.entries[0][1] if self.entries else []

    def take(self, model: Any, prompt: list[int]) -> tuple[DynamicCache, int]:
        """A cache already holding ``prompt[:reused]``, and ``reused``. At least the last prompt
        token is always left to prefill: its logits choose the first new token."""
        best, reused = -1, 0
        for i, (_, held) in enumerate(self.entries):
            shared = min(common_prefix(held, prompt), len(prompt) - 1)
            if shared > reused:
                best, reused = i, shared
        if best < 0:
            return DynamicCache(config=model.config), 0
        cache, held = self.entries[best]
        if not getattr(cache, "is_croppable", True):
            return DynamicCache(config=model.config), 0
        if self.slots > 1 and reused < len(held) - 1:
            # Another conversation sharing only a beginning (the system prompt): copy that
            # part rather than crop the other conversation's cache away.
            cache = copy.deepcopy(cache)
        else:
            # taken: an exception mid-generation must not leave a half-updated cache behind
            del self.entries[best]
        extra = cache.get_seq_length() - reused
        if extra > 0:
            cache.crop(-extra)
        return cache, reused

    def keep(self, cache: DynamicCache, token_ids: list[int]) -> None:
        """Remember ``cache``, which holds the first ``get_seq_length()`` of ``token_ids``."""
        self.entries.insert(0, (cache, list(token_ids[:cache.get_seq_length()])))
        del self.entries[self.slots:]

    def clear(self) -> None:
        self.entries.clear()
