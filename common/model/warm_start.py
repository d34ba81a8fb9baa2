"""Where a drafter's warm start lives: the adapter `dvi warmstart` trained for a base model and an
exit layer, which the product's default drafter starts from (learner/warmstart.py makes them).

Looked up by the base model's fingerprint and the exit layer, first in the user's cache (what
`dvi warmstart` installs: `<cache>/warmstart/<fingerprint>-k<k>/adapter`), then among the ones
shipped in this package (`common/model/warmstarts/<fingerprint>-k<k>/`, bf16 safetensors). A candidate
that does not fit the drafter (another drafter shape, a corrupt file) is skipped with a log line;
with none left the drafter starts untrained, also logged.
"""

from __future__ import annotations

from pathlib import Path

from common.model.loading import cache_dir

SHIPPED_DIR = Path(__file__).resolve().parent / "warmstarts"


def warm_start_name(fingerprint: str, exit_layer: int) -> str:
    return f"{fingerprint}-k{exit_layer}"


def installed_warm_start_dir(fingerprint: str, exit_layer: int) -> Path:
    """Where `dvi warmstart` installs the adapter for this model and exit layer (in the user's cache)."""
    return cache_dir() / "warmstart" / warm_start_name(fingerprint, exit_layer) / "adapter"


def warm_start_candidates(fingerprint: str, exit_layer: int) -> list[Path]:
    """Existing warm-start adapter directories for this model and exit layer, most preferred first."""
    name = warm_start_name(fingerprint, exit_layer)
    return [d for d in (installed_warm_start_dir(fingerprint, exit_layer), SHIPPED_DIR / name) if d.is_dir()]
