"""Drafting from the context: continue the current suffix where it occurred before.

Prompt lookup decoding (A. Saxena, 2023; HF's `prompt_lookup_num_tokens`) proposes the tokens
that followed the most recent earlier occurrence of the sequence's last n tokens. It costs no
model call, and on the copy-heavy Spec-Bench tasks (summarisation and RAG quote their documents,
translation repeats names, small models repeat themselves) it covers many positions. In dvi it
complements the learned exit head: a block drafts from the context when the suffix matches and
from the exit head otherwise. The verifier checks both the same way, so decoding stays lossless
(at temperature > 0 a context draft is a proposal q that puts all its mass on one token, and
rejection sampling stays exact).

`ContextIndex` keeps, for every n-gram of the sequence (n = 1..max_ngram), the position right
after its most recent occurrence whose continuation is known, so a lookup is a dictionary hit
and committing a token indexes max_ngram n-grams. Given a `TrafficIndex` (what followed n-grams
in the requests served before, common/core/traffic_draft.py), it drafts from that where its own
match is one token at most, and reports the traffic's match length negated, so that a decoder
keeps the two sources' acceptance apart.
"""

from __future__ import annotations

from common.core.traffic_draft import TrafficIndex


class ContextIndex:
    """N-gram index over one sequence (prompt + committed tokens) for context drafting.

    tokens: the sequence so far; max_ngram: the longest suffix tried (the lookup falls back to
    shorter ones, down to `min_ngram`); traffic: the index of earlier requests to fall back to
    (None: the sequence alone). The traffic index is read, never written, here.
    """

    def __init__(self, tokens: list[int], max_ngram: int = 3, min_ngram: int = 1, traffic: TrafficIndex | None = None):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.traffic = traffic
        self.tokens: list[int] = []
        # _after[n][gram] = p: tokens[p - n : p] == gram, the latest such p with tokens[p] known
        self._after: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]
        self.extend(tokens)

    def extend(self, new_tokens: list[int]) -> None:
        """Append committed tokens and index the n-grams whose continuation they reveal."""
        for token in new_tokens:
            p = len(self.tokens)  # token lands at p: it continues every n-gram ending at p - 1
            self.tokens.append(int(token))
            for n in range(1, min(self.max_ngram, p) + 1):
                self._after[n][tuple(self.tokens[p - n : p])] = p

    def propose(self, max_tokens: int) -> tuple[list[int], int]:
        """(up to `max_tokens` tokens that followed the longest matching suffix, its length n);
        ([], 0) when no suffix of length >= min_ngram occurred before. With a traffic index, where
        n <= 1 and the traffic has a confident continuation: (that draft, -its match length)."""
        if max_tokens <= 0:
            return [], 0
        own, n = self._own(max_tokens)
        if n <= 1 and self.traffic is not None:
            pooled, pooled_n = self.traffic.propose(self.tokens, max_tokens)
            if pooled:
                return pooled, -pooled_n
        return own, n

    def _own(self, max_tokens: int) -> tuple[list[int], int]:
        size = len(self.tokens)
        for n in range(min(self.max_ngram, size), self.min_ngram - 1, -1):
            p = self._after[n].get(tuple(self.tokens[size - n :]))
            if p is not None:
                return self.tokens[p : p + max_tokens], n
        return [], 0
