"""Every query of the Grafana dashboard returns data from a real Prometheus scraping a live run.

A local Ray (num_cpus=2) exports application metrics on `_metrics_export_port` through its
metrics agent; a real `prometheus` binary (Debian's package; `.ci/run` installs it) scrapes that
port every second. Two generation actors and the learner serve stories260K prompts in a
background thread for as long as the queries run, so no gauge expires under them. Then each
expression of `panel_queries(build_dashboard(via_ray=True))` goes through `/api/v1/query`, with
the dashboard variables substituted the way Grafana would ("All" for `$actor`/`$version`), and
must return at least one series. Counters of events a healthy run never has (rollbacks, skipped
steps, dead letters) exist at 0 because the service creates them at 0.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from actors.generator import GeneratorConfig
from actors.service import GeneratorPool, GeneratorSettings, Request
from common.core.config import DecodeConfig, DrafterConfig, ModelSpec
from common.transport.redis.client import free_port
from common.transport.redis.streams import TransportConfig
from dvi.dashboard import build_dashboard, panel_queries
from learner.config import LearnerConfig
from learner.service import LearnerLoopConfig, LearnerSettings, create_learner_actor
from tests.tiny_models import STORIES

pytestmark = pytest.mark.slow

SPEC = ModelSpec(model=str(STORIES), drafter=DrafterConfig(exit_layer=2))
DECODE = DecodeConfig(gamma=4, max_new_tokens=24)
OPENINGS = ["Once upon a time, there was a little girl", "The big dog ran", "Tom had a red ball",
            "One day, a bird", "Lily wanted to play", "The cat was sad"]
RATE_INTERVAL = "30s"  # Grafana's $__rate_interval is at least 4 scrape intervals; 30 samples here
RANGE = "10m"  # $__range: the dashboard's time range, longer than the run


def http_json(url: str, params: dict | None = None, timeout: float = 10.0) -> dict:
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def prometheus(target: str) -> Iterator[str]:
    """A private `prometheus` scraping `target` every second; yields its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus binary is not on PATH: apt-get install prometheus (as .ci/run does)")
    tmp = Path(tempfile.mkdtemp(prefix="dvi-prom-"))
    (tmp / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: ray\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"prometheus did not start: {(tmp / 'prometheus.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_metrics_port() -> Iterator[int]:
    """A local Ray whose metrics agent serves application metrics on the yielded port."""
    port = free_port()
    # address="local": never attach to a cluster someone else started; metrics reported every
    # second instead of every 10 s so the first scrape comes sooner.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 1000})
    yield port
    ray.shutdown()


def query(url: str, expr: str) -> list[dict]:
    reply = http_json(f"{url}/api/v1/query", {"query": expr})
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def broadcast_interval(url: str, since: float) -> str | None:
    """A `$__interval` at which the weight-broadcast annotation finds a broadcast: how long ago the
    learner's version was still below its latest (never before Prometheus first saw it)."""
    reply = http_json(f"{url}/api/v1/query_range", {"query": "max(ray_dvi_learner_weight_version)",
                                                      "start": since, "end": time.time(), "step": 1})
    result = reply["data"]["result"]
    points = [(float(t), float(v)) for t, v in result[0]["values"]] if result else []
    # the earliest point after the first whose successor is still below the latest value: an
    # offset of floor(now - t) lands in [t, t + 1), inside the series and before the last broadcast
    for (t, _), (_, after) in zip(points[1:], points[2:]):
        if after < points[-1][1]:
            return f"{int(time.time() - t)}s"
    return None


def substitute(expr: str, interval: str) -> str:
    for var, value in (("$__rate_interval", RATE_INTERVAL), ("$__range", RANGE), ("$__interval", interval),
                       ("$actor", ".*"), ("$version", ".*")):
        expr = expr.replace(var, value)
    assert "$" not in expr, expr
    return expr


def test_every_dashboard_query_returns_data_from_a_live_run(ray_metrics_port, redis_url, redis_client):
    queries = panel_queries(build_dashboard(via_ray=True))
    namespace = f"test:{uuid.uuid4().hex}"
    transport = TransportConfig(namespace=namespace)
    stop = threading.Event()
    served: list[dict] = []
    errors: list[BaseException] = []
    learner = pool = worker = None
    with prometheus(f"127.0.0.1:{ray_metrics_port}") as url:
        started = time.time()
        try:
            learner = create_learner_actor(LearnerSettings(
                model=SPEC, redis_url=redis_url, transport=transport,
                learner=LearnerConfig(head_lr=5e-3, lora_lr=5e-3, max_staleness=100, batch_tokens=32),
                loop=LearnerLoopConfig(publish_every_steps=2, publish_every_s=3.0, block_ms=200),
            ))
            pool = GeneratorPool([
                GeneratorSettings(model=SPEC, redis_url=redis_url, transport=transport,
                                  generator=GeneratorConfig(actor_id=f"actor-{i}", seed=i, ar_fallback_gamma=DECODE.gamma))
                for i in range(2)
            ], cpus_per_actor=0.5)
            pool.wait_ready(timeout_s=180)
            ray.get(learner.ping.remote(), timeout=180)

            def serve_until_stopped() -> None:  # keeps every gauge re-reported while we query
                batch = 0
                try:
                    while not stop.is_set():
                        requests = [Request(f"{namespace}-{batch}-{i}", prompt=OPENINGS[(batch + i) % len(OPENINGS)])
                                    for i in range(4)]
                        served.extend(pool.map(requests, DECODE))
                        batch += 1
                except BaseException as err:  # noqa: BLE001 - reported by the test thread
                    errors.append(err)

            worker = threading.Thread(target=serve_until_stopped, name="workload", daemon=True)
            worker.start()

            # Prometheus scrapes Ray's metrics agent ...
            def target_up() -> bool:
                targets = http_json(f"{url}/api/v1/targets")["data"]["activeTargets"]
                return any(t["health"] == "up" for t in targets)

            deadline = time.monotonic() + 60
            while not target_up():
                assert time.monotonic() < deadline, http_json(f"{url}/api/v1/targets")
                time.sleep(1)

            # ... until every panel has data (series appear as the run warms up: a published
            # version, learner steps, a swap under which an actor drafts ...)
            empty: list[str] = queries
            deadline = time.monotonic() + 150
            while empty and time.monotonic() < deadline and not errors:
                time.sleep(2)
                interval = broadcast_interval(url, started) or "1s"  # "1s": no broadcast seen yet
                empty = [q for q in queries if not query(url, substitute(q, interval))]
            assert not errors, errors
            assert not empty, f"{len(empty)} of {len(queries)} dashboard queries returned no series: {empty}"

            # the dashboard's template variables list both actors
            actors = http_json(f"{url}/api/v1/label/actor/values", {"match[]": "ray_dvi_actor_weight_version"})
            versions = http_json(f"{url}/api/v1/label/version/values", {"match[]": "ray_dvi_actor_acceptance_rate"})
            assert set(actors["data"]) >= {"actor-0", "actor-1"} and versions["data"], (actors, versions)
            assert len(served) >= 4 and not any("error" in r for r in served)
        finally:
            stop.set()
            if worker is not None:
                worker.join(timeout=120)
            if pool is not None:
                pool.shutdown()
            if learner is not None:
                with contextlib.suppress(Exception):
                    ray.kill(learner, no_restart=True)
            keys = list(redis_client.scan_iter(match=f"{namespace}:*", count=1000))
            if keys:
                redis_client.delete(*keys)
