"""Configuration as data: YAML files under ``configs/`` (the repo's, or the working directory's)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def find_config(kind: str, name: str) -> Path:
    """``configs/{kind}/{name}.yaml``, looked up in the working directory, then the repository."""
    for root in (Path.cwd() / "configs", REPO_CONFIGS):
        path = root / kind / f"{name}.yaml"
        if path.is_file():
            return path
    available = sorted(p.stem for p in (REPO_CONFIGS / kind).glob("*.yaml"))
    raise SystemExit(f"error: no config configs/{kind}/{name}.yaml (available: {', '.join(available) or 'none'})")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SystemExit(f"error: {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def merge(base: dict, override: dict) -> dict:
    """Nested dict merge; values of ``override`` win, None values are ignored."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
