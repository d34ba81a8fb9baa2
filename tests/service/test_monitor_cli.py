"""`dvi monitor --once` against a real Redis namespace filled through Telemetry."""

from __future__ import annotations

import json
import time

from common.transport.redis.client import free_port
from common.transport.redis.telemetry import Telemetry
from dvi.cli import main


def test_monitor_once_shows_the_published_state(redis_client, redis_url, redis_ns, capsys, tmp_path):
    tel = Telemetry(redis_client, namespace=redis_ns)
    now = time.time()
    for i in range(5):
        tel.publish_learner({"step": 100 + i, "phase": "kl", "version": 7, "kl": 0.5 - i / 20}, t=now - 50 + i)
    tel.publish_actor("gen-0", {"version": 7, "tau": 2.5, "acceptance": 0.6, "gamma": 5, "ar_fallback": 0}, t=now - 2)
    tel.publish_actor("gen-1", {"version": 6, "tau": 1.1, "acceptance": 0.02, "gamma": 0, "ar_fallback": 1}, t=now - 1)
    tel.event("rollback", actor="gen-1", bad_version=7, good_version=6)

    code = main(["monitor", "--once", "--redis-url", redis_url, "--namespace", redis_ns, "--width", "120",
                 "--run-dir", str(tmp_path)])
    out = capsys.readouterr().out.replace("\u00a0", " ")  # the header keeps "key value" together
    assert code == 0
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "gen-" in line and "│" in line}
    assert set(rows) == {"gen-0", "gen-1"}
    assert "2.50" in rows["gen-0"] and "spec" in rows["gen-0"]
    assert "AR" in rows["gen-1"]
    assert "step 104" in out and "rollback" in out and "bad_version=7" in out
    # --run-dir kept the history for `dvi report`
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[-1])["source"] == "actor:gen-1"


def test_monitor_unreachable_redis_is_a_one_line_error(capsys):
    start = time.monotonic()
    code = main(["monitor", "--once", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: cannot reach Redis") and captured.err.count("\n") == 1
    assert captured.out == ""
    assert time.monotonic() - start < 5


def test_monitor_rejects_bad_refresh(capsys):
    assert main(["monitor", "--demo", "--refresh", "0"]) == 2
    assert "--refresh must be > 0" in capsys.readouterr().err
