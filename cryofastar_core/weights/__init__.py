"""The shipped default weights and how a ``--weights`` value resolves to a file."""
from __future__ import annotations

from pathlib import Path

from cryofastar_core.runtime.errors import WeightsError

WEIGHTS_DIR = Path(__file__).resolve().parent
DEFAULT = "default"


def shipped_weights() -> dict[str, Path]:
    """Names of the weights inside the package -> their files (``<name>.pt``)."""
    return {p.stem: p for p in sorted(WEIGHTS_DIR.glob("*.pt"))}


def resolve_weights(name_or_path: str | Path) -> Path:
    """``"default"``, a shipped name, or a path -> an existing weights file (WeightsError otherwise)."""
    shipped = shipped_weights()
    key = str(name_or_path)
    if key in shipped:
        return shipped[key]
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    names = ", ".join(shipped) or "none"
    raise WeightsError(f"{name_or_path}: no such weights file or shipped weights name (shipped: {names}). "
                       f"Fix: pass --weights with a path to a file written by `cryofastar train`, or a shipped name")
