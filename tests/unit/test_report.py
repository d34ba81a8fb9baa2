"""`dvi report` on a synthetic run directory."""

from __future__ import annotations

import json

import pytest

from common.transport.redis.telemetry import RunMetricsWriter
from dvi.cli import main
from dvi.monitor import demo_state
from dvi.report import build_report, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_dir(tmp_path):
    run = tmp_path / "run1"
    RunMetricsWriter(run).write(demo_state(seed=1))
    (run / "summary.json").write_text(json.dumps({"model": "smollm2-135m-instruct", "exit_layer": 8, "tau": 3.1}))
    return run


def test_report_writes_pngs_and_markdown(tmp_path):
    run = _run_dir(tmp_path)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"t": 1.0, "source": "act')  # a line cut by a crash is skipped, not fatal
    result = build_report(run)
    names = {p.name for p in result.plots}
    assert names == {"tau.png", "acceptance.png", "kl.png", "versions.png", "throughput.png"}
    for path in result.plots:
        assert path.parent == run / "report" and path.read_bytes()[:8] == PNG_MAGIC
    md = result.markdown.read_text()
    assert result.markdown == run / "report" / "report.md"
    for name in names:
        assert f"]({name})" in md
    assert "| drift-guard rollbacks | 3 |" in md
    assert "| model | smollm2-135m-instruct |" in md
    assert "tau: first 10% → last 10%" in md and "rollback" in md
    assert "| malformed metrics lines skipped | 1 |" in md


def test_report_only_plots_what_exists(tmp_path):
    run = tmp_path / "learner-only"
    run.mkdir()
    rows = [{"t": 100.0 + i, "source": "learner", "step": i, "kl": 1.0 / (i + 1), "version": i // 3} for i in range(10)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = build_report(run)
    assert {p.name for p in result.plots} == {"kl.png", "versions.png"}
    assert "| learner steps | 9 |" in result.markdown.read_text()
    assert load_run(run).actors == {}


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="metrics.jsonl is missing"):
        build_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no learner or actor rows"):
        build_report(tmp_path)
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_cli(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "report.md" in out and "tau.png" in out


def test_progress_prints_lines_when_not_on_a_terminal():
    import io

    from rich.console import Console

    from dvi.progress import LineProgress, progress_bar

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with progress_bar(console) as progress:
        assert isinstance(progress, LineProgress)
        task = progress.add_task("learn kl-only", total=3, now="")
        progress.update(task, advance=1, now="tau 1.20")  # within the interval: no line yet
        progress.update(task, advance=2, now="tau 1.40")  # the end: always a line
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("learn kl-only 3/3 (") and lines[0].endswith("tau 1.40")
