"""A project file over the embedded demo's warehouse, for benches that need [realtime] or [delivery] settings.

The embedded demo (``qualify serve`` without a project) takes no such
settings; this writes the same project as a ``qualify.toml`` (the demo's
warehouse, attributes, event models and collection; API keys off) with the
extra sections given, and generates the warehouse beside it once.
"""

from __future__ import annotations

import json
from pathlib import Path


def _value(v) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def _table(name: str, values: dict) -> list[str]:
    return [f"[{name}]"] + [f"{k} = {_value(v)}" for k, v in values.items()] + [""]


def demo_project_file(workdir: Path, people: int, sections: dict[str, dict] | None = None) -> Path:
    """workdir/qualify.toml over a demo warehouse of ``people`` (data in workdir/data); returns its path."""
    from qualify.server.demo import DEMO_ATTRIBUTES, DEMO_EVENT_MODELS, generate_demo_warehouse

    workdir = Path(workdir)
    warehouse = workdir / "data" / f"demo-warehouse-{people}.duckdb"
    if not warehouse.exists():
        generate_demo_warehouse(warehouse, people)
    lines = ['data_dir = "data"', ""]
    lines += _table("warehouse", {"type": "duckdb", "path": str(warehouse)})
    lines += _table("parent_model", {"name": "customers", "query": "SELECT * FROM customers", "primary_key": "user_id"})
    lines += _table("parent_model.attributes", DEMO_ATTRIBUTES)
    lines += ["[collections.customers]", ""]
    for name, spec in DEMO_EVENT_MODELS.items():
        lines += _table(f"event_models.{name}", {k: v for k, v in spec.items() if k != "properties"})
        lines += _table(f"event_models.{name}.properties", spec["properties"])
    lines += _table("auth", {"enabled": False})
    for name, values in (sections or {}).items():
        lines += _table(name, values)
    path = workdir / "qualify.toml"
    path.write_text("\n".join(lines))
    return path
