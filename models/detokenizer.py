"""Incremental detokenization for streaming.

Decoding token by token breaks on byte-level BPE: one character (an emoji, a
CJK glyph) can span several tokens, and decoding a prefix yields U+FFFD.
``IncrementalDetokenizer`` decodes a short window of recent tokens and only
emits text once it no longer ends in a partial character, so the deltas
always concatenate to ``tokenizer.decode(all_ids)``.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5     # tokens kept before the unread ones when nothing visible was produced


class IncrementalDetokenizer:
    """``add(token) -> new text``; ``flush() -> whatever was held back``.

    Keeps ``prefix_offset`` (start of the context window) and ``read_offset``
    (tokens already emitted): the delta is decode(window + new) minus
    decode(window), which is robust to tokenizers that strip or merge spaces
    at the start of a decode. Tokens that add no visible text (skipped
    special tokens) still advance the window, so each ``add`` decodes a few
    tokens, never the whole output.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        return self.add_many((token,))

    def add_many(self, tokens) -> str:
        """Add several tokens, decoding the window once (the multi-step decode path)."""
        self.ids.extend(int(t) for t in tokens)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if full.endswith(REPLACEMENT):
            return ""                        # incomplete character: wait for its remaining bytes
        if full == prefix:                   # nothing visible (e.g. skipped special tokens): move on,
            self.read_offset = len(self.ids)  # keeping only a short context, so the window stays short
            self.prefix_offset = max(self.prefix_offset, self.read_offset - CONTEXT_TOKENS)
            return ""
        if len(full) < len(prefix):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta

    def flush(self) -> str:
        """Text of tokens not yet emitted (e.g. a dangling partial character)."""
        if self.read_offset >= len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.read_offset = len(self.ids)
        self.prefix_offset = self.read_offset
        return full[len(prefix):] if full.startswith(prefix) else full
