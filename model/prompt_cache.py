"""The KV cache kept across chat turns: turn 2 prefills only what is new.

Each turn's prompt is the whole conversation rendered again, so it usually starts with the
previous turn's prompt and reply. We keep the previous generation's cache and the token ids it
holds; the next prompt reuses the longest common prefix (cropping the cache back to it when the
conversation was edited or the reply re-tokenizes differently) and prefills only the rest. On
an offloaded model this is the difference between streaming the weights once per new token and
once per token of the whole conversation.
"""

from __future__ import annotations

from typing import Any

from transformers import DynamicCache


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ConversationCache:
    """The last generation's KV cache and the tokens in it, for the next turn to reuse."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.token_ids: list[int] = []

    def take(self, model: Any, prompt: list[int]) -> tuple[DynamicCache, int]:
        """A cache already holding ``prompt[:reused]``, and ``reused``. At least the last prompt
        token is always left to prefill: its logits choose the first new token."""
        cache, held = self.cache, self.token_ids
        self.clear()  # taken: an exception mid-generation must not leave a half-updated cache
        reused = min(common_prefix(held, prompt), len(prompt) - 1)
        if cache is None or reused <= 0 or not getattr(cache, "is_croppable", True):
            return DynamicCache(config=model.config), 0
        extra = cache.get_seq_length() - reused
        if extra > 0:
            cache.crop(-extra)
        return cache, reused

    def keep(self, cache: DynamicCache, token_ids: list[int]) -> None:
        """Remember ``cache``, which holds the first ``get_seq_length()`` of ``token_ids``."""
        self.cache = cache
        self.token_ids = list(token_ids[:cache.get_seq_length()])

    def clear(self) -> None:
        self.cache = None
        self.token_ids = []
