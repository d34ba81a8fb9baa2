"""benchmarks/arbitration_replay.py reproduces the decoder: the same verifier passes per request.

A change to the decoder's draft-source choices (common/decoding/speculative.py `_draft`,
`_arbitrate`) that the replay does not follow fails here.
"""

import pytest

from common.core.config import DecodeConfig
from common.core.traffic_draft import TrafficIndex
from common.decoding.speculative import SpeculativeDecoder
from tests.helpers import load_benchmark
from tests.tiny_models import stories_split

replay_module = load_benchmark("arbitration_replay")

TEXTS = ("Once upon a time", "Tom and Sue went to the park. Tom and Sue", "The cat sat. The cat",
         "Lily had a red ball. She", "One day, a little dog", "Ben and his mom went to the store.",
         "The sun was hot. The sun", "Mia liked to play. Mia")
COSTS = (0.15, 0.05, 0.05)  # cheap enough that the head drafts, is probed and sometimes wins a context block


@pytest.fixture(scope="module")
def recorded():
    split = stories_split(exit_layer=2)
    split.costs = lambda length: COSTS  # the decoder and the replay price blocks alike
    reference = SpeculativeDecoder(split)
    rows = []
    for text in TEXTS:
        ids = split.tokenizer(text)["input_ids"]
        output = reference.generate(ids, DecodeConfig(gamma=0, max_new_tokens=48, traffic_drafting=False)).token_ids
        top1, confidence = replay_module.head_predictions(split, ids, output)
        rows.append({"part": "held", "category": "t", "prompt": ids, "output": output,
                     "head_top1": top1, "head_confidence": confidence})
    return split, rows


@pytest.mark.parametrize("policy,threshold", [("context", 0.5), ("dvi", 0.5), ("dvi", 0.2)])
def test_the_replay_takes_the_decoders_verifier_passes(recorded, policy, threshold):
    split, rows = recorded
    config = DecodeConfig(gamma=0 if policy == "context" else 5, max_new_tokens=48, confidence_threshold=threshold)
    decoder = SpeculativeDecoder(split, traffic=TrafficIndex())  # learns from each request, as the replay's index
    results = [decoder.generate(row["prompt"], config) for row in rows]
    assert [r.token_ids for r in results] == [row["output"] for row in rows]
    replayed = replay_module.replay([], rows, policy, replay_module.Costs({"0": list(COSTS)}), config=config)
    assert replayed.blocks_per_request == [r.verifier_passes for r in results]
    drafted = sum(r.drafted for r in results)
    if policy == "dvi":
        assert drafted > 20 and replayed.probes > 0  # the head's and the probe's paths ran
        # only a rejected draft's tail may differ: its confidences are read along the output
        assert abs(replayed.head_drafted - drafted) <= 2
        assert replayed.head_accepted == sum(r.accepted for r in results)
    else:
        assert drafted == replayed.head_drafted == 0
