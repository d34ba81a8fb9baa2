"""Service benchmark: trajectory throughput, weight-broadcast latency, serving with vs without learning.

    python benchmarks/service_bench.py [--redis-url URL] [--model PATH] [--exit-layer K]
                                       [--trajectories N] [--publishes N] [--prompts N]

Runs on a local Ray (CPUs: `--num-cpus`) and a real Redis (the local one, else an embedded one).

1. Trajectory throughput, actors -> Redis -> learner side: `--producers` Ray actors publish
   synthetic trajectories of two sizes (a stories260K-sized record and a SmolLM2-135M-sized one:
   hidden states of the whole context in float16 dominate) as fast as they can; one consumer actor
   runs the learner loop's I/O path (XREADGROUP, decode + validate, XACK). Reported: trajectories/s
   and MB/s from the first publish to the last ack, and the encoded record size.
2. Weight broadcast latency: `--actors` idle generation actors (the real `GeneratorService`, weight
   watcher on); the bench publishes `--publishes` adapter versions, one every `--publish-gap-s`,
   and for each version takes publish time -> the moment the *last* actor had swapped it in (each
   actor records when the version became live). p50 / p99 / max over versions.
3. Serving tokens/s with learning on and off: the same workload through `run_service` twice
   (learner + trajectory publishing, then `learn=False`), side by side: tokens/s, tau, wall time.

Writes benchmarks/results/service.json and service.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402

from common.core.codec import encode_trajectory  # noqa: E402
from common.core.config import DecodeConfig, DrafterConfig, ModelSpec  # noqa: E402
from common.transport.redis.client import connect, embedded_redis  # noqa: E402
from common.transport.redis.streams import TrajectoryStream, TransportConfig  # noqa: E402
from common.transport.redis.weights import WeightStore  # noqa: E402

STORIES = ROOT / "tests" / "models" / "stories260K"
RESULTS = ROOT / "benchmarks" / "results"

# (label, hidden size H, context T, drafted N, verifier top-k K)
SIZES = (("stories260K-sized", 64, 128, 48, 32), ("SmolLM2-135M-sized", 576, 256, 64, 32))


def synthetic(request_id: str, hidden: int, context: int, drafted: int, k: int, seed: int):
    """A valid trajectory of the given shape (see tests/helpers.make_trajectory for the structure)."""
    from common.core.types import Trajectory

    g = torch.Generator().manual_seed(seed)
    position = torch.arange(context - drafted, context, dtype=torch.int64)
    token = torch.randint(0, 512, (drafted,), generator=g)
    accepted = torch.zeros(drafted, dtype=torch.bool)  # every record a block's first rejection
    return Trajectory(
        request_id=request_id, weight_version=0, exit_layer=2, temperature=0.0, created_at=time.time(),
        prompt_length=context - drafted, tokens=torch.randint(0, 512, (context + 1,), generator=g),
        hidden=torch.randn(context, hidden, generator=g).to(torch.float16), position=position,
        block_index=torch.zeros(drafted, dtype=torch.int64), token=token, target_token=(token + 1) % 512,
        accepted=accepted, drafter_logprob=-torch.rand(drafted, generator=g),
        verifier_topk_ids=torch.randint(0, 512, (drafted, k), generator=g),
        verifier_topk_logprobs=-torch.rand(drafted, k, generator=g), timestamp=torch.full((drafted,), time.time(), dtype=torch.float64),
        verified_position=torch.zeros(0, dtype=torch.int64), verified_topk_ids=torch.zeros(0, k, dtype=torch.int64),
        verified_topk_logprobs=torch.zeros(0, k),
    ).validate()


class Producer:
    def __init__(self, redis_url: str, transport: TransportConfig):
        torch.set_num_threads(1)
        self.stream = TrajectoryStream(connect(redis_url), transport)

    def publish(self, prefix: str, n: int, size: tuple) -> dict:
        _, hidden, context, drafted, k = size
        traj = synthetic(f"{prefix}-0", hidden, context, drafted, k, 0)
        started = time.time()
        for i in range(n):
            traj.request_id = f"{prefix}-{i}"
            self.stream.publish(traj)
        return {"started": started, "ended": time.time()}


class Consumer:
    """The learner loop's I/O path: XREADGROUP -> decode + validate -> XACK."""

    def __init__(self, redis_url: str, transport: TransportConfig):
        torch.set_num_threads(1)
        self.stream = TrajectoryStream(connect(redis_url), transport)
        self.stream.ensure_group()

    def drain(self, expected: int, timeout_s: float) -> dict:
        got, first, deadline = 0, None, time.monotonic() + timeout_s
        while got < expected and time.monotonic() < deadline:
            batch = self.stream.consume("learner-0", count=64, block_ms=200)
            if batch and first is None:
                first = time.time()
            self.stream.ack([entry_id for entry_id, _ in batch])
            got += len(batch)
        return {"consumed": got, "first": first, "ended": time.time()}


def bench_throughput(redis_url: str, producers: int, total: int) -> list[dict]:
    rows = []
    for size in SIZES:
        label = size[0]
        record = len(encode_trajectory(synthetic("x", *size[1:], 0)))
        transport = TransportConfig(namespace=f"bench:{uuid.uuid4().hex}", maxlen=max(1000, total + 100),
                                    high_water=max(800, total), max_message_bytes=max(8 << 20, 2 * record))
        consumer = ray.remote(num_cpus=0.5)(Consumer).remote(redis_url, transport)
        makers = [ray.remote(num_cpus=0.5)(Producer).remote(redis_url, transport) for _ in range(producers)]
        ray.get([consumer.drain.remote(0, 1.0)] + [m.publish.remote("warm", 1, size) for m in makers])
        per = total // producers
        done_ref = consumer.drain.remote(per * producers + producers, 300.0)  # + the warm-up entries
        pubs = ray.get([m.publish.remote(f"p{i}", per, size) for i, m in enumerate(makers)])
        done = ray.get(done_ref)
        start = min(p["started"] for p in pubs)
        seconds = done["ended"] - start
        n = done["consumed"] - producers
        rows.append({
            "size": label, "record_bytes": record, "producers": producers, "trajectories": n,
            "seconds": round(seconds, 3), "trajectories_per_s": round(n / seconds, 1),
            "mb_per_s": round(n * record / seconds / 1e6, 2),
            "publish_only_per_s": round(per * producers / (max(p["ended"] for p in pubs) - start), 1),
        })
        for actor in [consumer, *makers]:
            ray.kill(actor)
        client = connect(redis_url)
        keys = list(client.scan_iter(match=f"{transport.namespace}:*"))
        if keys:
            client.delete(*keys)
        print(f"  throughput {label}: {rows[-1]}", flush=True)
    return rows


def bench_broadcast(redis_url: str, spec: ModelSpec, actors: int, publishes: int, gap_s: float) -> dict:
    from actors.generator import GeneratorConfig
    from actors.service import GeneratorPool, GeneratorSettings
    from common.model.split import SplitModel

    from common.transport.redis.weights import write_secret_file

    namespace = f"bench:{uuid.uuid4().hex}"
    transport = TransportConfig(namespace=namespace)
    secret_file = write_secret_file(Path(tempfile.mkdtemp(prefix="dvi-bench-")) / "weight-secret")
    pool = GeneratorPool([
        GeneratorSettings(model=spec, redis_url=redis_url, transport=transport,
                          generator=GeneratorConfig(actor_id=f"actor-{i}", learn=False), metrics=False, telemetry=False,
                          secret_file=str(secret_file))
        for i in range(actors)
    ], cpus_per_actor=0.5)
    pool.wait_ready()
    client = connect(redis_url)
    store = WeightStore(client, namespace, secret_file.read_bytes().strip(), model_id=spec.model,
                        exit_layer=spec.drafter.exit_layer)  # signed as the actors require
    state = SplitModel.load(spec).adapter_state()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    published: dict[int, float] = {}
    for version in range(1, publishes + 1):
        g = torch.Generator().manual_seed(version)
        record = store.publish({k: torch.randn(v.shape, generator=g) * 0.01 for k, v in state.items()}, version, "bench")
        published[version] = record.created_at
        time.sleep(gap_s)
    time.sleep(2.0)
    statuses = pool.status()
    pool.shutdown()
    keys = list(client.scan_iter(match=f"{namespace}:*"))
    if keys:
        client.delete(*keys)
    live: dict[int, list[float]] = {}
    for st in statuses.values():
        for swap in st["swaps"]:
            live.setdefault(swap["version"], []).append(swap["swapped_at"])
    latencies = sorted(max(times) - published[v] for v, times in live.items() if len(times) == actors)
    missed = publishes - len(latencies)
    q = (lambda p: latencies[min(len(latencies) - 1, int(round(p * (len(latencies) - 1))))]) if latencies else (lambda p: float("nan"))
    row = {
        "actors": actors, "publishes": publishes, "gap_s": gap_s, "adapter_bytes": nbytes,
        "versions_all_swapped": len(latencies), "versions_skipped": missed,
        "p50_ms": round(1000 * q(0.5), 1), "p99_ms": round(1000 * q(0.99), 1),
        "max_ms": round(1000 * latencies[-1], 1) if latencies else None,
        "mean_ms": round(1000 * statistics.mean(latencies), 1) if latencies else None,
    }
    print(f"  broadcast: {row}", flush=True)
    return row


def bench_serving(redis_url: str, args, tmp: Path) -> list[dict]:
    from dvi.driver import RunConfig, run_service
    from learner.config import LearnerConfig

    workload = tmp / "workload.jsonl"
    subjects = ["a little girl named Lily", "a boy named Tim", "a big red dog", "a small cat", "a happy bird",
                "an old man", "a funny frog", "a brave knight", "a shy bunny", "a kind queen", "a tiny fish", "a silly monkey"]
    workload.write_text("".join(
        json.dumps({"question_id": i, "category": "story",
                    "turns": [f"Once upon a time, there was {subjects[i % 12]} in the park."]}) + "\n"
        for i in range(args.prompts)
    ))
    rows = []
    for learn in (True, False):
        namespace = f"bench:{uuid.uuid4().hex}"
        summary = run_service(RunConfig(
            workload=workload, out=tmp / ("learn" if learn else "no-learn"), actors=args.actors, model=args.model,
            exit_layer=args.exit_layer, decode=DecodeConfig(gamma=4, max_new_tokens=args.max_new_tokens),
            learn=learn, publish_every=2, replay_ratio=2.0,
            learner=LearnerConfig(head_lr=5e-3, lora_lr=5e-3, max_staleness=100),
            redis_url=redis_url, namespace=namespace,
        ))
        client = connect(redis_url)
        keys = list(client.scan_iter(match=f"{namespace}:*"))
        if keys:
            client.delete(*keys)
        rows.append({
            "mode": "learning on" if learn else "--no-learn", "requests": summary["requests"],
            "tokens": summary["tokens"], "serve_seconds": summary["serve_seconds"],
            "tokens_per_s": summary["tokens_per_s"], "tau": round(summary["tau"], 3),
            "weight_versions": summary["weight_versions_published"], "wall_seconds": summary["wall_seconds"],
        })
        print(f"  serving: {rows[-1]}", flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [f"# Service benchmark ({result['date']}, {result['machine']})", ""]
    lines += ["## Trajectory throughput (producers -> Redis stream -> consumer: read, decode, ack)", "",
              "| record | bytes | producers | trajectories | trajectories/s | MB/s | publish-only/s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["throughput"]:
        lines.append(f"| {r['size']} | {r['record_bytes']} | {r['producers']} | {r['trajectories']} | "
                     f"{r['trajectories_per_s']} | {r['mb_per_s']} | {r['publish_only_per_s']} |")
    b = result["broadcast"]
    lines += ["", "## Weight broadcast (publish -> every actor swapped in)", "",
              "| actors | versions | adapter bytes | p50 ms | p99 ms | max ms | all swapped |",
              "|---:|---:|---:|---:|---:|---:|---:|",
              f"| {b['actors']} | {b['publishes']} | {b['adapter_bytes']} | {b['p50_ms']} | {b['p99_ms']} | "
              f"{b['max_ms']} | {b['versions_all_swapped']} |"]
    lines += ["", f"## Serving ({result['config']['model_name']}, exit layer {result['config']['exit_layer']}, "
              f"{result['config']['actors']} actors, {result['config']['prompts']} prompts x "
              f"{result['config']['max_new_tokens']} tokens)", "",
              "| mode | tokens/s | tau | tokens | serve s | weight versions | wall s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["serving"]:
        lines.append(f"| {r['mode']} | {r['tokens_per_s']} | {r['tau']} | {r['tokens']} | {r['serve_seconds']} | "
                     f"{r['weight_versions']} | {r['wall_seconds']} |")
    lines += ["", "CPU only, shared machine: absolute numbers are noisy; compare rows within one run."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=None, help="Redis (default: local, else embedded)")
    parser.add_argument("--model", default=str(STORIES))
    parser.add_argument("--exit-layer", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--trajectories", type=int, default=400, help="per record size, over all producers")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--publishes", type=int, default=20)
    parser.add_argument("--publish-gap-s", type=float, default=0.5)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    spec = ModelSpec(model=args.model, drafter=DrafterConfig(exit_layer=args.exit_layer))
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        with embedded_redis(args.redis_url or "redis://127.0.0.1:6379/0") as redis_url, \
                tempfile.TemporaryDirectory(prefix="dvi-bench-") as tmp:
            print("trajectory throughput...", flush=True)
            throughput = bench_throughput(redis_url, args.producers, args.trajectories)
            print("weight broadcast latency...", flush=True)
            broadcast = bench_broadcast(redis_url, spec, args.actors, args.publishes, args.publish_gap_s)
            print("serving with and without learning...", flush=True)
            serving = bench_serving(redis_url, args, Path(tmp))
    finally:
        ray.shutdown()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {args.num_cpus} Ray CPUs, torch {torch.__version__}, ray {ray.__version__}",
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "model_name": Path(args.model).name},
        "throughput": throughput, "broadcast": broadcast, "serving": serving,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "service.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "service.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
