"""Fault-injection soak of the whole service (issue 14): serve through crashes, poison and forgeries.

    python benchmarks/soak.py [--requests 240] [--actors 4] [--redis-restarts 2] [--learner-kills 1]
                              [--actor-kills 1] [--poison 24] [--forgeries 8] [--out benchmarks/results/soak]

One `run_service` on stories260K (exit layer 2, local Ray, a private `redis-server` with AOF
`appendfsync everysec`) while a fault thread, driven by the number of completed requests, does:
  * `--redis-restarts` x: kill -9 the redis-server, wait `--outage-s`, start it again on its AOF;
  * `--learner-kills` x: SIGKILL the learner actor's process (Ray restarts it from its checkpoint);
  * `--actor-kills` x: SIGKILL a generation actor's process (Ray restarts it, the request is retried);
and an injector thread mixes in `--poison` malformed stream entries (garbage, hostile shapes,
out-of-vocabulary ids, a 7 MB request id, NaN log-probabilities, another exit layer) and
`--forgeries` forged weights (unsigned, signed with the wrong key, a signed record of another run
relabelled as a newer version, NaN tensors, a `latest` pointer of 10**12).

It checks the accounting invariant, produced = applied + dead-lettered + counted as lost (the
poison entries are dead-lettered on top), that no forged version was ever served, and reports:
requests served and failed; trajectories produced, applied, dead-lettered and lost; versions
published; forgeries refused; the longest time without serving a request. Writes
OUT/soak.json and OUT/soak.md and prints the table. `run_soak` is what the CI test calls with a
shorter setting.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import msgpack  # noqa: E402
import torch  # noqa: E402

from common.core.codec import encode_trajectory  # noqa: E402
from common.core.errors import ServiceError  # noqa: E402
from common.transport.redis.client import PrivateRedis, connect  # noqa: E402
from common.transport.redis.streams import TrajectoryStream, TransportConfig  # noqa: E402
from common.transport.redis.weights import WeightStore  # noqa: E402

log = logging.getLogger("soak")
STORIES = REPO / "tests" / "models" / "stories260K"
EXIT_LAYER = 2
SUBJECTS = ["a little girl named Lily", "a boy named Tim", "a big red dog", "a small cat", "a happy bird",
            "an old man", "a funny frog", "a brave knight", "a shy bunny", "a kind queen"]
PLACES = ["in the park", "by the sea", "in a big forest", "at school", "on a farm", "in the sky"]


@dataclass(frozen=True)
class SoakConfig:
    """One soak run; fault counts are spread over the run by completed requests."""

    out: Path
    """Where soak.json and soak.md go."""
    work: Path | None = None
    """Where the redis-server's AOF and the run's files go; None: a fresh temp dir (removed after)."""
    requests: int = 240
    """Prompts served."""
    actors: int = 4
    """Generation actors."""
    redis_restarts: int = 2
    """kill -9 + restart of redis-server on its AOF."""
    outage_s: float = 2.0
    """Seconds Redis stays down each time."""
    learner_kills: int = 1
    """SIGKILLs of the learner's process."""
    actor_kills: int = 1
    """SIGKILLs of a generation actor's process."""
    poison: int = 24
    """Malformed stream entries injected."""
    forgeries: int = 8
    """Forged weight records / pointers injected."""
    max_new_tokens: int = 24
    """Tokens per request."""
    seed: int = 0
    """Seeds the workload order and the injected records."""


@dataclass
class FaultLog:
    """What the fault and injector threads did, with wall times."""

    events: list[dict[str, Any]] = field(default_factory=list)
    poison_injected: int = 0
    forged_versions: list[int] = field(default_factory=list)
    forged_pointers: int = 0

    def note(self, kind: str, **fields: Any) -> None:
        self.events.append({"t": time.time(), "kind": kind, **fields})
        log.warning("soak: %s %s", kind, fields)


def write_workload(path: Path, n: int) -> Path:
    rows = [{"question_id": i, "category": "story",
             "turns": [f"Once upon a time, there was {SUBJECTS[i % len(SUBJECTS)]} {PLACES[(i // 10) % len(PLACES)]}."]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _schedule(total: int, count: int, start: float, end: float) -> list[int]:
    """`count` completion counts spread evenly over [start, end] of the run."""
    return [max(1, round(total * (start + (end - start) * (i + 0.5) / count))) for i in range(count)] if count else []


def poison_payloads(n: int, seed: int, hidden: int, vocab: int) -> list[bytes | None]:
    """`n` malformed entries cycling through the kinds the learner must dead-letter (None: no data field)."""
    from tests.helpers import make_trajectory

    def traj(i: int):
        return make_trajectory(n_drafted=4, hidden=hidden, vocab=vocab, k=4, exit_layer=EXIT_LAYER, seed=seed + i,
                               request_id=f"poison-{seed}-{i}")

    def mutate(i: int, fn) -> bytes:
        message = msgpack.unpackb(encode_trajectory(traj(i)), raw=False)
        fn(message)
        return msgpack.packb(message, use_bin_type=True)

    kinds = [
        lambda i: b"\xc1 not msgpack " + bytes([i % 256]),
        lambda i: None,
        lambda i: mutate(i, lambda m: m["tensors"]["verified_topk_ids"].update(shape=[0, 2**62])),
        lambda i: mutate(i, lambda m: m["tensors"]["token"].update(shape=[1] * 65)),
        lambda i: mutate(i, lambda m: m["scalars"].update(request_id="r" * 7_000_000)),
        lambda i: mutate(i, lambda m: m["tensors"]["token"].update(
            data=torch.full((len(m["tensors"]["token"]["data"]) // 8,), vocab + 5, dtype=torch.int64).numpy().tobytes())),
        lambda i: mutate(i, lambda m: m["tensors"]["drafter_logprob"].update(
            data=torch.full((len(m["tensors"]["drafter_logprob"]["data"]) // 4,), math.nan).numpy().tobytes())),
        lambda i: mutate(i, lambda m: m["scalars"].update(exit_layer=EXIT_LAYER + 1)),
    ]
    return [kinds[i % len(kinds)](i) for i in range(n)]


def _forge(client, namespace: str, kind: int, template: dict[str, torch.Tensor], faults: FaultLog) -> None:
    """One forgery of kind `kind % 5` aimed at the run's actors."""
    real = WeightStore(client, namespace)  # reads without a secret: what an attacker sees
    newest = max(real.versions() or [0])
    version = newest + 1
    kind %= 5
    if kind == 0:  # unsigned
        WeightStore(client, namespace, model_id=str(STORIES), exit_layer=EXIT_LAYER).publish(
            {k: torch.randn_like(v) for k, v in template.items()}, version, "forger")
    elif kind == 1:  # signed with a key that is not the run's
        WeightStore(client, namespace, b"guessed-key", model_id=str(STORIES), exit_layer=EXIT_LAYER).publish(
            {k: torch.randn_like(v) for k, v in template.items()}, version, "forger")
    elif kind == 2:  # a genuine signed record replayed under a newer version number
        kept = real.versions()
        if not kept:
            return
        fields = client.hgetall(f"{namespace}:weights:v:{kept[-1]}")
        fields[b"version"] = str(version).encode()
        client.hset(f"{namespace}:weights:v:{version}", mapping=fields)
        client.zadd(f"{namespace}:weights:versions", {str(version): version})
        client.set(f"{namespace}:weights:latest", version)
        client.publish(f"{namespace}:weights:notices", json.dumps({"version": version}))
    elif kind == 3:  # NaN tensors (unsigned; a signed one would need the key)
        import hashlib

        from safetensors.torch import save

        blob = save({k: torch.full_like(v, math.nan) for k, v in template.items()})
        client.hset(f"{namespace}:weights:v:{version}", mapping={
            "tensors": blob, "sha256": hashlib.sha256(blob).hexdigest(), "version": str(version),
            "created_at": repr(time.time()), "learner_id": "forger", "metadata": "{}", "signature": ""})
        client.zadd(f"{namespace}:weights:versions", {str(version): version})
        client.set(f"{namespace}:weights:latest", version)
        client.publish(f"{namespace}:weights:notices", json.dumps({"version": version}))
    else:  # a runaway `latest` pointer
        client.set(f"{namespace}:weights:latest", 10**12)
        client.publish(f"{namespace}:weights:notices", json.dumps({"version": 10**12}))
        faults.forged_pointers += 1
        faults.note("forged latest pointer", version=10**12)
        return
    faults.forged_versions.append(version)
    faults.note("forged weights", forgery=["unsigned", "wrong key", "replayed", "NaN"][kind], version=version)


def _kill(actor, what: str, faults: FaultLog) -> None:
    import ray

    try:
        pid = ray.get(actor.ping.remote(), timeout=60)
    except Exception as err:  # noqa: BLE001 - a fault tool: note and go on
        faults.note(f"{what} kill skipped", error=str(err)[:200])
        return
    os.kill(pid, signal.SIGKILL)
    faults.note(f"{what} killed", pid=pid)


def run_soak(config: SoakConfig) -> dict[str, Any]:
    """Run the soak (module docstring); return the report (also OUT/soak.json)."""
    from dvi.driver import RunConfig, run_service
    from learner.config import LearnerConfig
    from tests.helpers import head_only
    from tests.tiny_models import stories_split

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="dvi-soak-") if config.work is None else None
    work = Path(scratch.name) if scratch is not None else Path(config.work)
    namespace = f"soak:{uuid.uuid4().hex[:8]}"
    split = stories_split(EXIT_LAYER)
    template = split.adapter_state()
    template.pop(next((k for k in template if "draft_vocab" in k), ""), None)
    payloads = poison_payloads(config.poison, config.seed, split.hidden_size, split.vocab_size)
    faults = FaultLog()
    done = threading.Event()
    total = config.requests
    restarts_at = _schedule(total, config.redis_restarts, 0.15, 0.75)
    learner_at = _schedule(total, config.learner_kills, 0.35, 0.45)
    actor_at = _schedule(total, config.actor_kills, 0.5, 0.6)
    inject_at = _schedule(total, config.poison + config.forgeries, 0.05, 0.9)
    completions: list[float] = []

    with PrivateRedis(directory=work / "redis") as server:
        client = connect(server.url, retries=2, backoff_s=0.05)
        stream = TrajectoryStream(client, TransportConfig(namespace=namespace))
        state_box: dict[str, Any] = {}
        progress = threading.Condition()

        def wait_for(count: int) -> bool:
            with progress:
                return progress.wait_for(lambda: done.is_set() or len(completions) >= count) and not done.is_set()

        def fault_thread() -> None:
            plan = sorted([(n, "redis") for n in restarts_at] + [(n, "learner") for n in learner_at]
                          + [(n, "actor") for n in actor_at])
            for n, kind in plan:
                if not wait_for(n):
                    return
                state = state_box["state"]
                if kind == "redis":
                    server.kill()
                    faults.note("redis killed (kill -9)", at_request=n)
                    time.sleep(config.outage_s)
                    server.start()
                    faults.note("redis restarted on its AOF", at_request=n)
                elif kind == "learner" and state.learner_actor is not None:
                    _kill(state.learner_actor, "learner", faults)
                elif kind == "actor" and state.pool is not None:
                    _kill(state.pool.actors[sorted(state.pool.actors)[-1]], "actor", faults)

        def injector_thread() -> None:
            kinds = ["poison"] * config.poison + ["forgery"] * config.forgeries
            order = torch.randperm(len(kinds), generator=torch.Generator().manual_seed(config.seed)).tolist()
            for n, index in zip(inject_at, order):
                if not wait_for(n):
                    return
                for _ in range(20):  # Redis may be restarting: try again shortly
                    try:
                        if kinds[index] == "poison":
                            payload = payloads[faults.poison_injected]
                            if payload is None:
                                client.xadd(f"{namespace}:trajectories", {"seq": 0, "junk": b"x"})
                            else:
                                stream.publish_raw(payload)
                            faults.poison_injected += 1
                            faults.note("poison entry", number=faults.poison_injected)
                        else:
                            _forge(client, namespace, index, template, faults)
                        break
                    except (ServiceError, OSError) as err:
                        log.info("soak: injection waits for Redis: %s", err)
                        time.sleep(0.5)
                    except Exception as err:  # noqa: BLE001 - redis errors during a restart
                        log.info("soak: injection retried: %s", err)
                        time.sleep(0.5)

        def on_phase(state) -> None:
            state_box["state"] = state

        def on_result(state, result) -> None:
            state_box["state"] = state
            with progress:
                completions.append(time.time())
                progress.notify_all()

        threads = [threading.Thread(target=fault_thread, name="soak-faults", daemon=True),
                   threading.Thread(target=injector_thread, name="soak-inject", daemon=True)]
        for t in threads:
            t.start()
        run = RunConfig(
            workload=write_workload(work / "workload.jsonl", total), out=work / "run", actors=config.actors,
            model=str(STORIES), exit_layer=EXIT_LAYER,
            decode=head_only(gamma=4, max_new_tokens=config.max_new_tokens), publish_every=2, replay_ratio=2.0,
            learner=LearnerConfig(head_lr=5e-3, lora_lr=5e-3, max_staleness=100), redis_url=server.url,
            namespace=namespace, seed=config.seed, drain_timeout_s=300, keep_redis_s=0,
        )
        started = time.time()
        try:
            summary = run_service(run, on_result=on_result, on_phase=on_phase)
        finally:
            done.set()
            with progress:
                progress.notify_all()
            for t in threads:
                t.join(timeout=60)
        serve_start = state_box["state"].started
        client.close()
    if scratch is not None:
        scratch.cleanup()

    served_versions = {v for vs in summary["versions_seen_per_actor"].values() for v in vs}
    served_versions |= {p["version"] for p in summary["tau_over_time"]}
    forged_served = sorted(set(faults.forged_versions) & served_versions)
    refused = sorted({v for st in summary["actor_status"].values() for v in st.get("refused_versions", [])
                      if v in faults.forged_versions or v == 10**12})
    stamps = [serve_start, *sorted(completions)]
    longest_gap = max((b - a for a, b in zip(stamps, stamps[1:])), default=0.0)
    real_dead = summary["dead_lettered"] - faults.poison_injected
    produced, applied, lost = (summary["trajectories_produced"], summary["trajectories_consumed"],
                               summary["trajectories_lost"])
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
        "requests_served": summary["requests"] - summary["failed_requests"],
        "requests_failed": summary["failed_requests"],
        "trajectories_produced": produced,
        "trajectories_applied": applied,
        "trajectories_dead_lettered": real_dead,
        "trajectories_lost": lost,
        "invariant_holds": produced == applied + real_dead + lost,
        "poison_injected": faults.poison_injected,
        "poison_dead_lettered": summary["dead_lettered"] - real_dead,
        "versions_published": summary["weight_versions_published"],
        "forgeries_injected": len(faults.forged_versions) + faults.forged_pointers,
        "forgeries_served": len(forged_served),
        "forgeries_refused": len(faults.forged_versions) + faults.forged_pointers - len(forged_served),
        "forged_versions_refused_by_an_actor": len(refused),
        "longest_without_serving_s": round(longest_gap, 2),
        "wall_s": round(time.time() - started, 1),
        "faults": faults.events,
    }
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "soak.md").write_text(table(report) + "\n")
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(report: dict[str, Any]) -> str:
    rows = [("requests served / failed", f"{report['requests_served']} / {report['requests_failed']}"),
            ("trajectories produced", report["trajectories_produced"]),
            ("trajectories applied (incl. dropped as stale)", report["trajectories_applied"]),
            ("trajectories dead-lettered (real ones)", report["trajectories_dead_lettered"]),
            ("trajectories counted as lost", report["trajectories_lost"]),
            ("produced = applied + dead-lettered + lost", "holds" if report["invariant_holds"] else "VIOLATED"),
            ("poison entries injected / dead-lettered", f"{report['poison_injected']} / {report['poison_dead_lettered']}"),
            ("weight versions published", report["versions_published"]),
            ("forgeries injected / refused / served", f"{report['forgeries_injected']} / {report['forgeries_refused']} "
                                                      f"/ {report['forgeries_served']}"),
            ("longest time without serving a request", f"{report['longest_without_serving_s']} s"),
            ("wall time", f"{report['wall_s']} s")]
    return "\n".join(["| measure | value |", "|---|---:|", *[f"| {k} | {v} |" for k, v in rows]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = SoakConfig(out=REPO / "benchmarks" / "results" / "soak")
    parser.add_argument("--out", type=Path, default=defaults.out)
    for name in ("requests", "actors", "redis_restarts", "learner_kills", "actor_kills", "poison", "forgeries",
                 "max_new_tokens", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--outage-s", type=float, default=defaults.outage_s)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    report = run_soak(SoakConfig(**vars(args)))
    print(table(report))
    print(f"machine: {report['machine']}; faults: {[e['kind'] for e in report['faults']]}")
    ok = report["invariant_holds"] and report["requests_failed"] == 0 and report["forgeries_served"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
