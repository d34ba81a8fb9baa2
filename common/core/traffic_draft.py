"""Drafting from traffic: what followed the current suffix in the requests served before.

Context drafting (common/core/context_draft.py) looks only at the request's own tokens. A
`TrafficIndex` learns from every request a decoder serves, with no gradient step: for every
n-gram (n = min_ngram..max_ngram) of their prompts and outputs, how often each token followed it.
Where the request's own context matches its last token at most, the block drafts the index's most
frequent continuation of the longest suffix it knows, token by token while that continuation
holds at least `share` of its n-gram's count and was seen at least `min_count` times. It is
llama.cpp's dynamic lookup cache and REST's datastore in their simplest form, kept in memory.

Memory is bounded: after a request is added, while the index holds more than `capacity` n-grams,
every count is halved and the counts that reach 0 dropped (an n-gram seen once is forgotten at
the first decay, one seen often survives many). So the index keeps what traffic repeats and follows
its drift. Between decays it may exceed `capacity` by the n-grams of one request.

The index only proposes: the verifier decides, so decoding stays lossless whatever it holds.
"""

from __future__ import annotations

from common.core.config import TrafficConfig


class TrafficIndex:
    """Next-token counts of the n-grams of every sequence added, bounded by `config.capacity`.

    Not thread-safe: one decoder (which serves one request at a time) owns one index.
    """

    def __init__(self, config: TrafficConfig = TrafficConfig()):
        self.config = config
        # gram -> [its most frequent next token, that token's count, the gram's count, {token: count}
        # once a second token has followed it (None before: most n-grams only ever see one)]
        self._following: dict[tuple[int, ...], list] = {}
        self.decays = 0
        """How many times the counts were halved to stay within `capacity`."""

    def __len__(self) -> int:
        """The number of n-grams held."""
        return len(self._following)

    def add(self, tokens: list[int]) -> None:
        """Count, for every n-gram of `tokens`, the token that followed it; then decay to capacity."""
        tokens = [int(t) for t in tokens]
        lo, hi, following = self.config.min_ngram, self.config.max_ngram, self._following
        for p in range(lo, len(tokens)):
            token = tokens[p]
            for n in range(lo, min(hi, p) + 1):
                gram = tuple(tokens[p - n : p])
                entry = following.get(gram)
                if entry is None:
                    following[gram] = [token, 1, 1, None]
                    continue
                entry[2] += 1
                counts = entry[3]
                if counts is None:
                    if token == entry[0]:
                        entry[1] += 1
                        continue
                    counts = entry[3] = {entry[0]: entry[1]}
                count = counts[token] = counts.get(token, 0) + 1
                if count > entry[1]:  # ties keep the token that reached the count first
                    entry[0], entry[1] = token, count
        while len(self._following) > self.config.capacity:
            self._decay()

    def _decay(self) -> None:
        """Halve every count, dropping the tokens and n-grams that reach 0."""
        kept: dict[tuple[int, ...], list] = {}
        for gram, (token, count, _, counts) in self._following.items():
            halved = {t: c // 2 for t, c in (counts or {token: count}).items() if c >= 2}
            if halved:
                best = max(halved.items(), key=lambda item: item[1])
                kept[gram] = [best[0], best[1], sum(halved.values()), halved if len(halved) > 1 else None]
        self._following = kept
        self.decays += 1

    def next_token(self, context: list[int]) -> tuple[int | None, int]:
        """(the token most often after the longest known suffix of `context`, or None when it is
        below the share or count bar; that suffix's length, 0 when none is known)."""
        for n in range(min(self.config.max_ngram, len(context)), self.config.min_ngram - 1, -1):
            entry = self._following.get(tuple(context[len(context) - n :]))
            if entry is not None:
                token, count, total = entry[0], entry[1], entry[2]
                confident = count >= self.config.min_count and count >= self.config.share * total
                return (token if confident else None), n
        return None, 0

    def propose(self, tokens: list[int], max_tokens: int) -> tuple[list[int], int]:
        """(up to `max_tokens` tokens to follow `tokens`, each the confident `next_token` of what
        precedes it; the first one's matched n-gram length, 0 when no suffix is known)."""
        draft: list[int] = []
        context = list(tokens[len(tokens) - self.config.max_ngram :])
        first = 0
        for i in range(max_tokens):
            token, n = self.next_token(context)
            if i == 0:
                first = n
            if token is None:
                break
            draft.append(token)
            context = (context + [token])[-self.config.max_ngram :]
        return draft, first
