"""`dvi run` / `dvi demo` sign weights by default: where the secret comes from (issue 14)."""

from __future__ import annotations

from pathlib import Path

from dvi.driver import RunConfig, resolve_secret_file


def test_a_local_run_without_a_secret_makes_one_and_passes_only_its_path(tmp_path, monkeypatch):
    monkeypatch.delenv("DVI_WEIGHT_SECRET", raising=False)
    monkeypatch.delenv("DVI_WEIGHT_SECRET_FILE", raising=False)
    config = RunConfig(workload=tmp_path / "w.jsonl", out=tmp_path / "out")
    path = Path(resolve_secret_file(config, tmp_path / "out", local_ray=True))
    assert path == (tmp_path / "out" / "weight-secret").resolve() and path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_text().strip()) == 64
    # on an existing cluster every node reads its own ~/.dvi/weight-secret (cluster.yaml copies it there)
    assert resolve_secret_file(config, tmp_path / "out", local_ray=False) is None
    monkeypatch.setenv("DVI_WEIGHT_SECRET", "set")  # the variable is inherited by a local Ray's actors
    assert resolve_secret_file(config, tmp_path / "out", local_ray=True) is None
    given = RunConfig(workload=tmp_path / "w.jsonl", out=tmp_path / "out", secret_file=Path("s"))
    assert resolve_secret_file(given, tmp_path, local_ray=True) == str(Path("s").resolve())
