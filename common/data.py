"""The data the project ships in data/ (see data/README.md for sources and licences).

Every command's default data path comes from here, inside the clone: nothing is read from
outside the repository.
"""
from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
HH_PAIRS = DATA_DIR / "hh-harmless-1800.jsonl"
"""1,800 Anthropic hh-rlhf harmless-base pairs, {"chosen", "rejected"} per line (MIT licence)."""


def require(path: Path, what: str) -> Path:
    """path, or SystemExit with a message saying what it is and how to pass another one."""
    if not Path(path).is_file():
        raise SystemExit(f"{what}: {path} not found (the repository ships {HH_PAIRS.relative_to(DATA_DIR.parent)}; "
                         f"pass --data to use another file)")
    return Path(path)
