"""The project's one vocabulary: every module, metric, JSON field and document uses these words.

drafter          layers [0, k) of the model plus the trainable exit head (exit layer + LM-head
                 LoRA); its distribution is q.
verifier         the whole frozen model; its distribution is p. It checks a block of drafted
                 tokens in one pass, reusing the drafter's layer-k states.
exit-head draft  tokens the drafter proposes (`DecodeConfig.gamma` at most per block).
context draft    tokens copied from the prompt and output so far where their last n-gram recurs
                 (prompt lookup decoding; `DecodeConfig.context_tokens`, common/core/context_draft.py).
                 The arbitration (common/core/arbitration.py) picks one of the two per block.
block            one draft plus the verifier pass that checks it; commits accepted + 1 tokens.
accepted         drafted tokens the verifier keeps: a prefix of the draft (reward r = 1).
rejected         the first drafted token of a block the verifier disagrees with (r = 0); the
                 drafted tokens after it carry no signal and are never recorded.
recovered        at temperature > 0, the token sampled from max(0, p - q) at the first rejection.
bonus            the verifier's own next token when every drafted token was accepted.
tau              tokens committed per verifier pass (1.0 for autoregressive decoding); JSON and
                 metrics call it `tau` (speed.json rows also carry `mean_accepted`, its old
                 name, for one release).
acceptance       accepted / drafted tokens.
agreement        held-out top-1 agreement of the exit head with the verifier at every position
                 of a greedy continuation, ungated (common/decoding/agreement.py).
weight version   the integer, strictly increasing, of each drafter-weight broadcast (exit layer,
                 LoRA and draft vocabulary); 0 is the starting drafter. The metric is
                 `dvi_actor_weight_version` (it was `dvi_actor_adapter_version`).
trajectory       one request's learning record (common/core/types.py).
"""

EXIT_HEAD_DRAFT = "exit_head"
CONTEXT_DRAFT = "context"
DRAFT_SOURCES = (EXIT_HEAD_DRAFT, CONTEXT_DRAFT)
"""The two kinds of draft a block can carry, as code, metrics and JSON name them."""
