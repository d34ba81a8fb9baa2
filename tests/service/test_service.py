"""The distributed service on a real local Ray (num_cpus=2) and a real Redis, on stories260K.

One Ray session is shared by the module. Every test works under its own random Redis namespace
and deletes it afterwards. The model is the 5-layer stories260K Llama cut at layer 2; requests
are short, so the whole module runs in a few minutes on two cores.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray
import torch

from actors.generator import GeneratorConfig
from actors.service import GeneratorPool, GeneratorSettings
from common.core.config import DrafterConfig, ModelSpec
from common.model.split import DRAFT_VOCAB_KEY
from common.transport.redis.client import PrivateRedis, free_port
from common.decoding.speculative import SpeculativeDecoder
from common.transport.redis.streams import TrajectoryStream, TransportConfig
from common.transport.redis.weights import WeightStore
from dvi.cli import main
from dvi.driver import SUMMARY_KEYS, RunConfig, run_service
from learner.config import LearnerConfig
from learner.service import LearnerLoopConfig, LearnerSettings, create_learner_actor
from tests.helpers import head_only, make_trajectory
from tests.service.conftest import TEST_WEIGHT_SECRET
from tests.tiny_models import STORIES, stories_split

pytestmark = pytest.mark.slow

EXIT_LAYER = 2
DRAFT_VOCAB = 256  # of stories260K's 512 tokens: the reduced-vocabulary path end to end
SPEC = ModelSpec(model=str(STORIES), drafter=DrafterConfig(exit_layer=EXIT_LAYER))
DECODE = head_only(gamma=4, max_new_tokens=24)  # every block asks the exit head: the learner sees its drafts
# A fast learner for a 260K-parameter model: a few dozen requests move acceptance visibly.
LEARNER = LearnerConfig(head_lr=5e-3, lora_lr=5e-3, max_staleness=100)
SUBJECTS = ["a little girl named Lily", "a boy named Tim", "a big red dog", "a small cat", "a happy bird",
            "an old man", "a funny frog", "a brave knight", "a shy bunny", "a kind queen", "a tiny fish",
            "a silly monkey"]
DVI = str(Path(sys.executable).parent / "dvi")


def write_workload(path: Path, n: int, opening: str = "Once upon a time, there was {s} {p}.") -> Path:
    places = ["in the park", "by the sea", "in a big forest", "at school"]
    rows = [
        {"question_id": i, "category": "story", "turns": [opening.format(s=SUBJECTS[i % 12], p=places[(i // 12) % 4])]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def delete_namespace(client, namespace: str) -> None:
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="module")
def ray_session():
    # address="local": never attach to a cluster someone else started on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


# ---------------------------------------------------------------------------------- CLI errors


def test_cli_reports_unreachable_redis_and_wrong_password(tmp_path, capsys):
    workload = write_workload(tmp_path / "w.jsonl", 2)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["run", "--workload", str(workload), "--out", str(tmp_path / "o"), "--redis-url", dead]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: cannot reach Redis at") and "--redis-url" in err

    with PrivateRedis(extra_args=["--requirepass", "right-password"]) as server:
        wrong = f"redis://:wrong-password@127.0.0.1:{server.port}/0"
        assert main(["run", "--workload", str(workload), "--out", str(tmp_path / "o"), "--redis-url", wrong]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rejected the password" in err and "wrong-password" not in err


def test_cli_reports_missing_ray_cluster(tmp_path, redis_url):
    workload = write_workload(tmp_path / "w.jsonl", 2)
    proc = subprocess.run(
        [DVI, "run", "--workload", str(workload), "--out", str(tmp_path / "o"), "--redis-url", redis_url,
         "--ray-address", f"127.0.0.1:{free_port()}", "--model", str(STORIES), "--exit-layer", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no Ray cluster at 127.0.0.1:")
    assert "ray start --head" in proc.stderr


def test_static_arguments_fail_before_ray_and_redis_start(tmp_path, capsys):
    """Fail fast (issue 14): a bad exit layer or model is refused in seconds, not after Ray starts."""
    workload = write_workload(tmp_path / "w.jsonl", 2)
    dead = f"redis://127.0.0.1:{free_port()}/0"  # never reached: the arguments are checked first
    for extra, message in ((["--model", str(STORIES), "--exit-layer", "9"], "exit layer 9 is out of range"),
                           (["--model", str(tmp_path / "no-such-model")], "model path not found")):
        started = time.monotonic()
        assert main(["run", "--workload", str(workload), "--out", str(tmp_path / "o"), "--redis-url", dead,
                     *extra]) == 2
        assert time.monotonic() - started < 10
        err = capsys.readouterr().err.strip()
        assert message in err and "cannot reach Redis" not in err, err


# ---------------------------------------------------------------------------------- the whole service


def test_run_survives_a_redis_restart_and_accounts_for_every_trajectory(ray_session, tmp_path):
    """Issue 14's outage test: redis-server is killed (kill -9) during a run and started again 3 s
    later on its AOF. No request fails, the learner stays alive and drains, and
    produced = consumed + dead-lettered + counted as lost."""
    with PrivateRedis(directory=tmp_path / "redis") as server:
        out = tmp_path / "run"
        config = RunConfig(
            workload=write_workload(tmp_path / "train.jsonl", 24), out=out, actors=2, model=str(STORIES),
            exit_layer=EXIT_LAYER, decode=DECODE, publish_every=2, replay_ratio=2.0, learner=LEARNER,
            redis_url=server.url, drain_timeout_s=180,
        )
        outage: list[float] = []

        def restart() -> None:
            server.kill()
            outage.append(time.monotonic())
            time.sleep(3.0)
            server.start()
            outage.append(time.monotonic())

        thread = threading.Thread(target=restart)

        def on_result(state, result) -> None:
            if len(state.results) == 6:
                thread.start()

        summary = run_service(config, on_result=on_result)
        thread.join()
        assert len(outage) == 2
        assert summary["failed_requests"] == 0 and summary["requests"] == 24
        assert summary["trajectories_produced"] == 24
        assert summary["accounting_ok"], {k: summary[k] for k in SUMMARY_KEYS[:5]}
        assert summary["learner"]["final_version"] >= 1
        assert sum(st["counters"]["redis_outages"] for st in summary["actor_status"].values()) >= 1




def test_run_learns_and_every_actor_reaches_the_final_version(ray_session, redis_url, redis_client, tmp_path):
    """Two actors + the learner on 24 prompts: versions rise, every actor ends on the final one,
    nothing is lost, and held-out acceptance with the final published weights beats version 0."""
    namespace = f"test:{uuid.uuid4().hex}"
    out = tmp_path / "run"
    config = RunConfig(
        workload=write_workload(tmp_path / "train.jsonl", 24), out=out, actors=2, model=str(STORIES),
        exit_layer=EXIT_LAYER, draft_vocab_size=DRAFT_VOCAB, decode=DECODE, publish_every=2, replay_ratio=2.0,
        learner=LEARNER, redis_url=redis_url, namespace=namespace,
    )
    try:
        summary = run_service(config)
        assert set(SUMMARY_KEYS) <= set(summary)
        assert summary == json.loads((out / "summary.json").read_text())
        assert summary["failed_requests"] == 0
        assert summary["trajectories_produced"] == summary["trajectories_consumed"] == 24
        assert summary["dead_lettered"] == summary["trajectories_lost"] == 0 and summary["accounting_ok"]
        assert summary["learner"]["counters"]["duplicates"] == 0
        assert summary["weight_versions_published"] >= 3
        final = summary["learner"]["final_version"]
        assert final == summary["weight_versions_published"]
        seen = summary["versions_seen_per_actor"]
        assert sorted(seen) == ["actor-0", "actor-1"]
        for versions in seen.values():
            assert versions == sorted(set(versions)) and versions[0] == 0 and versions[-1] == final
            assert len(versions) >= 2
        assert len(summary["tau_over_time"]) == 24
        assert {p["version"] for p in summary["tau_over_time"]} > {0}
        lines = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
        assert sorted(int(x["question_id"]) for x in lines) == list(range(24))
        assert all({"actor", "version", "text", "tokens", "tau"} <= set(x) for x in lines)

        # Held out: prompts the service never saw, decoded greedily in-process.
        split = stories_split(EXIT_LAYER, draft_vocab_size=DRAFT_VOCAB)
        decoder = SpeculativeDecoder(split)
        held_out = [split.tokenizer(f"One day, {s} went to the zoo.")["input_ids"] for s in SUBJECTS[:8]]
        evaluation = head_only(gamma=4, max_new_tokens=32)

        def acceptance() -> float:
            results = [decoder.generate(ids, evaluation) for ids in held_out]
            return sum(r.accepted for r in results) / sum(r.drafted for r in results)

        before = acceptance()
        record = WeightStore(redis_client, namespace).fetch()
        assert record.version == final
        # the draft vocabulary travels with the weights: the learner picked it from the traffic
        vocab = record.tensors[DRAFT_VOCAB_KEY]
        assert vocab.shape == (DRAFT_VOCAB,) and not torch.equal(vocab, split.draft_vocab.cpu())
        split.load_adapter_state(record.tensors, record.version)
        assert torch.equal(split.draft_vocab.cpu(), vocab)
        after = acceptance()
        assert after > before + 0.05, (before, after)
    finally:
        delete_namespace(redis_client, namespace)


def test_dvi_run_serves_every_good_prompt_and_counts_every_over_long_one(ray_session, redis_url, redis_client, tmp_path, capsys):
    """One bad request never ends a run: over-long prompts are skipped and counted, the rest served."""
    workload = write_workload(tmp_path / "w.jsonl", 6)
    long_story = "Once upon a time there was a little dog who liked to run. " * 40  # > 512 tokens here
    with workload.open("a") as fh:
        for qid in ("long-a", "long-b"):
            fh.write(json.dumps({"question_id": qid, "category": "story", "turns": [long_story]}) + "\n")
    namespace = f"test:{uuid.uuid4().hex}"
    out = tmp_path / "run"
    args = ["run", "--workload", str(workload), "--actors", "1", "--model", str(STORIES), "--exit-layer", "2",
            "--gamma", "4", "--max-new-tokens", "16", "--publish-every", "1", "--batch-tokens", "16",
            "--redis-url", redis_url, "--namespace", namespace, "--no-live", "--out", str(out)]
    try:
        assert main(args) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["requests"] == 8 and summary["failed_requests"] == 0
        assert summary["skipped_requests"] == 2
        assert sorted(s["question_id"] for s in summary["skipped"]) == ["long-a", "long-b"]
        assert all("exceeds the model's context of 512 tokens" in s["reason"] for s in summary["skipped"])
        assert summary["trajectories_produced"] == summary["trajectories_consumed"] == 6
        lines = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
        assert sorted(str(x["question_id"]) for x in lines if "text" in x) == [str(i) for i in range(6)]
        assert sorted(x["question_id"] for x in lines if "skipped" in x) == ["long-a", "long-b"]
        assert "2 request(s) skipped" in capsys.readouterr().err
    finally:
        delete_namespace(redis_client, namespace)


def test_dvi_run_of_only_over_long_prompts_exits_2(ray_session, redis_url, redis_client, tmp_path, capsys):
    workload = tmp_path / "w.jsonl"
    workload.write_text(json.dumps({"question_id": "x", "category": "story", "turns": ["Once upon a time. " * 200]}) + "\n")
    namespace = f"test:{uuid.uuid4().hex}"
    try:
        code = main(["run", "--workload", str(workload), "--actors", "1", "--model", str(STORIES), "--exit-layer", "2",
                     "--max-new-tokens", "16", "--no-learn", "--redis-url", redis_url, "--namespace", namespace,
                     "--no-live", "--out", str(tmp_path / "o")])
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: every request of the workload was skipped (1; first: question x: prompt (")
    finally:
        delete_namespace(redis_client, namespace)


# ---------------------------------------------------------------------------------- the learner


def test_learner_loop_acks_only_what_a_checkpoint_holds(redis_client, redis_ns, tmp_path):
    """In-process LearnerLoop (no Ray): entries stay pending until a checkpoint includes them; a
    loop that dies before checkpointing is replaced by one that resumes and re-reads them; entries
    a dead consumer left pending are claimed."""
    from learner.learner import Learner
    from learner.service import LearnerLoop

    transport = TransportConfig(namespace=redis_ns)
    producer = TrajectoryStream(redis_client, transport)
    config = LearnerLoopConfig(checkpoint_dir=str(tmp_path / "ckpt"), publish_every_steps=1000,
                               checkpoint_every_steps=1000, checkpoint_every_s=3600, block_ms=0,
                               claim_min_idle_ms=0)

    def new_loop() -> LearnerLoop:
        learner = Learner(stories_split(EXIT_LAYER), LEARNER)
        return LearnerLoop(learner, TrajectoryStream(redis_client, transport),
                           WeightStore(redis_client, redis_ns), config)

    loop = new_loop()
    loop.start()
    for i in range(6):
        producer.publish(trajectory(i, "loop"))
    assert loop.poll() == 6
    assert producer.pending_count() == 6  # applied, not yet durable: not acked
    loop._checkpoint()
    assert producer.pending_count() == 0
    for i in range(6, 10):
        producer.publish(trajectory(i, "loop"))
    assert loop.poll() == 4 and producer.pending_count() == 4
    del loop  # dies before its next checkpoint: entries 6..9 were applied, then lost with it

    TrajectoryStream(redis_client, transport).consume("crashed-consumer", count=10, block_ms=0)  # nothing new
    producer.publish(trajectory(10, "loop"))
    TrajectoryStream(redis_client, transport).consume("crashed-consumer", count=10, block_ms=0)  # takes #10, dies

    resumed = new_loop()
    info = resumed.start()
    assert info["resumed"] and info["replayed"] == 4 and info["claimed"] == 1
    counters = resumed.learner.counters()
    assert counters["added"] == 11 and counters["duplicates"] == 0  # 6 from the checkpoint + 4 + 1
    resumed.finish()
    assert producer.pending_count() == 0


@pytest.fixture(scope="module")
def learner_service(ray_session, redis_client, redis_url):
    """One restartable learner actor on its own namespace and checkpoint directory."""
    namespace = f"test:{uuid.uuid4().hex}"
    checkpoints = Path(tempfile.mkdtemp(prefix="dvi-learner-"))
    transport = TransportConfig(namespace=namespace, max_message_bytes=256 * 1024)
    loop = LearnerLoopConfig(
        checkpoint_dir=str(checkpoints / "ckpt"), publish_every_steps=2, checkpoint_every_steps=2,
        checkpoint_every_s=0.5, block_ms=100, claim_min_idle_ms=1000,
    )
    actor = create_learner_actor(
        LearnerSettings(model=SPEC, redis_url=redis_url, transport=transport, learner=LEARNER, loop=loop)
    )
    ray.get(actor.ping.remote(), timeout=120)
    yield actor, TrajectoryStream(redis_client, transport)
    ray.kill(actor, no_restart=True)
    shutil.rmtree(checkpoints, ignore_errors=True)
    delete_namespace(redis_client, namespace)


def trajectory(i: int, prefix: str):
    # stories260K: hidden size 64, vocabulary 512, cut at layer 2
    return make_trajectory(n_drafted=12, hidden=64, k=8, vocab=512, exit_layer=EXIT_LAYER, seed=i,
                           request_id=f"{prefix}-{i}", created_at=time.time())


def learner_status(actor) -> dict:
    return ray.get(actor.status.remote(), timeout=60)


def test_malformed_and_oversized_messages_are_dead_lettered(learner_service):
    actor, stream = learner_service
    before = learner_status(actor)
    stream.publish(trajectory(0, "dl"))
    stream.publish_raw(b"\x93not a trajectory")  # malformed
    stream.publish_raw(b"\x00" * (300 * 1024))  # over max_message_bytes (256 KiB)
    stream.publish(trajectory(1, "dl"))
    wait_for(lambda: learner_status(actor).get("seen", 0) >= before.get("seen", 0) + 2, 60, "the two good ones")
    assert stream.dead_letter_count() == 2
    reasons = sorted(d.reason for d in stream.read_dead_letters())
    assert len(reasons) == 2 and any("bytes" in r or "large" in r or "size" in r for r in reasons), reasons
    status = learner_status(actor)
    assert status["running"] and status["error"] is None


def test_learner_killed_mid_run_loses_and_duplicates_nothing(learner_service):
    """Kill the learner while trajectories stream in; the restarted one resumes from its checkpoint,
    replays its unacked entries, and ends having applied every request id exactly once."""
    actor, stream = learner_service
    start = learner_status(actor)
    first_pid = start["pid"]
    n = 60
    for i in range(n // 2):
        stream.publish(trajectory(i, "kill"))
    wait_for(lambda: learner_status(actor)["loop"]["checkpoints"] > start["loop"]["checkpoints"]
             and learner_status(actor)["loop"]["acked"] > start["loop"]["acked"], 60, "a checkpoint and an ack")
    ray.kill(actor, no_restart=False)  # Ray restarts it: it resumes from its checkpoint
    for i in range(n // 2, n):
        stream.publish(trajectory(i, "kill"))
    for i in range(5):  # a producer retry after a dropped connection: same request ids again
        stream.publish(trajectory(i, "kill"))
    final = ray.get(actor.drain.remote(120.0), timeout=180)  # retried on the restarted actor
    assert final["pid"] != first_pid
    assert final["start"]["resumed"] is True
    grew = {k: final["learner"][k] - start["learner"][k] for k in ("added", "stale_dropped", "duplicates")}
    assert final["seen"] - start["seen"] == n  # every id once, none lost
    assert grew["added"] + grew["stale_dropped"] == n  # none applied twice
    assert grew["duplicates"] >= 5  # the retries were recognised and ignored
    assert final["learner"]["tokens_seen"] - start["learner"]["tokens_seen"] == 12 * grew["added"]
    assert stream.pending_count() == 0
    assert final["version"] >= start["version"] + 1


# ---------------------------------------------------------------------------------- generation actors


def signed_store(client, namespace: str, secret: bytes = TEST_WEIGHT_SECRET) -> WeightStore:
    """A weight store signing as this session's actors verify (secret, model, exit layer)."""
    return WeightStore(client, namespace, secret, model_id=SPEC.model, exit_layer=EXIT_LAYER)


@pytest.fixture(scope="module")
def one_actor(ray_session, redis_client, redis_url):
    namespace = f"test:{uuid.uuid4().hex}"
    settings = GeneratorSettings(model=SPEC, redis_url=redis_url, transport=TransportConfig(namespace=namespace),
                                 generator=GeneratorConfig(actor_id="actor-0", learn=False), metrics=False,
                                 watch=False)  # swaps only on sync() / before a request: no race with tampering
    pool = GeneratorPool([settings])
    pool.wait_ready(timeout_s=120)
    yield pool.actors["actor-0"], signed_store(redis_client, namespace), namespace
    pool.shutdown()
    delete_namespace(redis_client, namespace)


@functools.cache
def adapter_shapes() -> dict[str, torch.Size]:
    return {k: v.shape for k, v in stories_split(EXIT_LAYER).adapter_state().items()}


def adapter(seed: int) -> dict[str, torch.Tensor]:
    """Random LoRA tensors of the right names and shapes (a stand-in for a learner's weights)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.1 for k, shape in adapter_shapes().items()}


def test_actor_refuses_a_tampered_or_badly_signed_blob(one_actor, redis_client):
    actor, store, namespace = one_actor
    base = (store.latest_version() or 0) + 1
    store.publish(adapter(1), base, "learner-0")
    assert ray.get(actor.sync.remote()) == base

    forged = signed_store(redis_client, namespace, b"not-the-secret")
    forged.publish(adapter(2), base + 1, "learner-0")  # wrong signature: its `latest` pointer too
    assert ray.get(actor.sync.remote()) == base  # the pointer does not verify: ignored
    assert ray.get(actor.status.remote())["latest_known"] is None

    store.publish(adapter(3), base + 2, "learner-0")
    key = f"{namespace}:weights:v:{base + 2}"
    blob = bytearray(redis_client.hget(key, "tensors"))
    blob[-1] ^= 0xFF  # flip bits: the sha256 no longer matches
    redis_client.hset(key, "tensors", bytes(blob))
    assert ray.get(actor.sync.remote()) == base

    status = ray.get(actor.status.remote())
    assert status["refused_versions"] == [base + 2]
    assert status["counters"]["weights_refused"] == 1
    served = ray.get(actor.serve.remote("refused-0", "Once upon a time", None, DECODE))
    assert served["version"] == base and served["new_tokens"] > 0  # still serving on its weights

    store.publish(adapter(4), base + 3, "learner-0")  # a good one is taken again
    assert ray.get(actor.sync.remote()) == base + 3


def test_killed_actor_restarts_and_resyncs_to_the_latest_version(one_actor):
    actor, store, _ = one_actor
    first_pid = ray.get(actor.ping.remote())
    ray.kill(actor, no_restart=False)
    latest = (store.latest_version() or 0) + 1
    store.publish(adapter(5), latest, "learner-0")  # published while it is down
    # ray.kill is asynchronous: the old process may still answer a ping or two before it dies
    pid = wait_for(lambda: _new_pid(actor, first_pid), 120, "a restarted actor process")
    assert pid != first_pid
    status = ray.get(actor.status.remote())
    assert status["version"] == latest
    assert status["versions_seen"][0] == 0 and status["versions_seen"][-1] == latest  # synced on (re)start
    served = ray.get(actor.serve.remote("after-restart", "Once upon a time", None, DECODE))
    assert served["version"] == latest


def _new_pid(actor, old_pid: int) -> int | None:
    pid = _ping(actor)
    return pid if pid is not None and pid != old_pid else None


def _ping(actor) -> int | None:
    try:
        return ray.get(actor.ping.remote(), timeout=30)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


# ---------------------------------------------------------------------------------- ray job submit


def test_ray_job_submit_runs_a_workload(redis_url, redis_client, tmp_path):
    """`ray start --head` (private temp dir and ports) + `ray job submit`-style submission of `dvi run`."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    temp = Path(tempfile.mkdtemp(prefix="rj"))  # short: Ray's unix socket paths are length-limited
    dashboard = free_port()
    head = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--temp-dir={temp}", f"--port={free_port()}", "--num-cpus=2", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
    ]
    # A private head on 127.0.0.1 without token auth (Ray's default would make every client need the token).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(head, cwd=temp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workload = write_workload(tmp_path / "w.jsonl", 4)
    out = tmp_path / "job-out"
    try:
        def connect():
            try:
                return JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
            except (ConnectionError, RuntimeError):
                return None

        client = wait_for(connect, 120, "the Ray job server", every_s=1.0)
        entrypoint = " ".join([
            DVI, "run", "--workload", str(workload), "--actors", "1", "--model", str(STORIES), "--exit-layer", "2",
            "--gamma", "4", "--max-new-tokens", "16", "--publish-every", "1", "--head-lr", "5e-3", "--batch-tokens", "16",
            "--redis-url", redis_url, "--out", str(out),
        ])
        job = client.submit_job(entrypoint=entrypoint)
        terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        status = wait_for(lambda: (s := client.get_job_status(job)) in terminal and s, 240, "the job", every_s=1.0)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["requests"] == 4 and summary["failed_requests"] == 0
        assert summary["trajectories_produced"] == summary["trajectories_consumed"] == 4
        assert summary["versions_seen_per_actor"]["actor-0"][-1] == summary["learner"]["final_version"] >= 1
        delete_namespace(redis_client, summary["namespace"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
