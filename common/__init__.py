"""What the actors, the learner and the CLI share; imports neither `actors/`, `learner/` nor `dvi/`.

Subpackages, each allowed to import only the ones listed (tests/unit/test_architecture.py checks):

- `common.core`: pure types, configs, errors, acceptance and sampling math, draft policies
  (context drafting, adaptive gamma, arbitration), the wire codec, prompt handling.
  Imports: nothing else of `common`.
- `common.model`: model loading, the drafter/verifier split, the exit head's adapter and draft
  vocabulary, warm starts; `common.model.engine` is the fast CPU forward and its kernels.
  Imports: `core`.
- `common.decoding`: the speculative decoding loop, trajectory recording, held-out agreement.
  Imports: `core`, `model`.
- `common.transport`: the protocols actors and the learner are typed against, an in-process
  implementation (`memory`) and the Redis one (`redis`: streams, weight store, telemetry, client
  helpers). Imports: `core`. No module outside `common.transport.redis` touches a Redis client.
- `common.observe`: metrics and drift guards. Imports: `core`.
- `common.runtime`: the composition root of a service process (model + transport + observers).
  Imports: anything in `common`.
"""
