"""The data the project ships in data/ (see data/README.md for sources and licences).

Every command's default data path comes from here, inside the clone: nothing is read from
outside the repository.
"""
from __future__ import annotations

import json
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


def require_checkpoint(path: Path | str, flag: str) -> Path:
    """path, or SystemExit saying that `flag` names no Hugging Face checkpoint folder (config.json)."""
    if not (Path(path) / "config.json").is_file():
        what = "no such folder" if not Path(path).exists() else "not a Hugging Face checkpoint folder (no config.json)"
        raise SystemExit(f"{flag} {path}: {what}")
    return Path(path)


def jsonl_records(path: Path | str) -> list[tuple[int, dict]]:
    """(line number, record) of every line of a JSONL file but blank ones; ValueError naming the file
    and line of the first that is not a JSON object."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: not a JSON object")
        out.append((n, rec))
    return out


def jsonl_texts(path: Path | str, field: str) -> list[str]:
    """The string `field` of every record of a JSONL file; ValueError naming the file and line of the
    first record that is not a JSON object with that string."""
    out = []
    for n, rec in jsonl_records(path):
        if not isinstance(rec.get(field), str):
            raise ValueError(f"{path}:{n}: a record without a \"{field}\" text")
        out.append(rec[field])
    return out
