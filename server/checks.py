"""``qualify check``: the project file's own rules, then the warehouse and the stored audiences.

- The warehouse: every query runs (schema only) and returns the columns the
  project names.
- The audiences stored in the data folder (the project file declares none:
  they are created through AudienceService and live in LMDB): each must
  still parse against the project's attributes and event models, and no
  window may be longer than ``[realtime] event_retention`` (the rule
  CreateAudience applies, ``domain.audiences.check_windows``). Lowering the
  retention below a saved audience's window would leave that audience
  reading a history the log no longer keeps. The environment is opened
  read-only, so this runs beside a server that is using it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lmdb

from .config import Project, ProjectError, load_project
from .domain.audiences import check_windows
from .domain.conditions import parse_condition
from .domain.errors import InvalidAudience
from .storage.lmdb_store import data_path
from .storage.realtime import stored_audiences
from .storage.warehouse_sources import WarehouseError, open_source


def warehouse_problems(project: Project) -> list[str]:
    problems = []
    try:
        with open_source(project.warehouse) as source:
            pm = project.parent_model
            checks = [("parent_model.query", pm.query, [("parent_model.primary_key", pm.primary_key)]
                       + [(f"parent_model.attributes.{a.name}", a.name) for a in pm.attributes])]
            checks += [(f"collections.{c.name}.query", c.query, [(f"collections.{c.name}.key", c.key)])
                       for c in project.collections if c.query]
            for key, query, needed in checks:
                try:
                    columns = source.schema(query).names
                except WarehouseError as exc:
                    problems.append(f"{key}: the query fails: {exc}")
                    continue
                for k, col in needed:
                    if col not in columns:
                        problems.append(f"{k} = {col!r}: the query returns no such column (it returns {', '.join(columns)})")
    except WarehouseError as exc:
        problems.append(f"warehouse: {exc}")
    return problems


def audience_problems(project: Project) -> tuple[list[str], str | None]:
    """Problems of the audiences stored in the data folder, and a line saying what was checked (None: no data)."""
    where = data_path(project.data_dir)
    try:
        records = stored_audiences(where)
    except lmdb.Error as exc:
        return [f"data_dir: the stored audiences in {where} cannot be read: {exc}"], None
    if records is None:
        return [], None
    attributes = {a.name: a.type for a in project.parent_model.attributes}
    models = {m.name: dict(m.properties) for m in project.event_models}
    retention_us = int(project.event_retention * 1_000_000)
    problems = []
    for rec in sorted(records, key=lambda r: r["id"]):
        aid = rec["id"]
        try:
            condition = parse_condition(rec["condition"], attributes, models, path="condition")
        except InvalidAudience as exc:
            problems.append(f"audience {aid!r} (stored in {where}) no longer fits this project, "
                            f"and the server would not load it: {exc}")
            continue
        try:
            check_windows(condition, retention_us)
        except InvalidAudience as exc:
            problems.append(f"audience {aid!r} (stored in {where}): {exc}; raise event_retention, "
                            "or shorten the audience's window (UpdateAudience)")
    note = (f"{len(records)} stored audience{'s' if len(records) != 1 else ''} checked against "
            f"[realtime] event_retention ({project.event_retention:g}s)")
    return problems, note


def check(project_file: str | None) -> int:
    """``qualify check [--project FILE]``: prints every problem, or ok with notes; the exit code."""
    path = project_file or "qualify.toml"
    if project_file is None and not Path(path).is_file():
        print("qualify check: no ./qualify.toml here; give the project file with --project FILE "
              "(serve and sync without one run the embedded demo, which needs no check)", file=sys.stderr)
        return 2
    try:
        project = load_project(path)
    except ProjectError as exc:
        print(f"{exc.path}: {len(exc.problems)} problem(s)")
        for p in exc.problems:
            print(f"  {p}")
        return 1
    problems = warehouse_problems(project)
    stored, note = audience_problems(project)
    problems += stored
    if problems:
        print(f"{path}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"{path}: ok ({len(project.parent_model.attributes)} attributes, "
          f"collections: {', '.join(c.name for c in project.collections)})")
    if note:
        print(f"  {note}")
    limits, workers = project.ops.limits, project.server.workers
    if project.ops.auth and limits.requests_per_second:
        # Each serving process keeps its own token buckets (nothing is shared between them).
        print(f"  note: per-key rate limits apply per serving process: with {workers} serving process"
              f"{'es' if workers != 1 else ''} (--workers), a key may make up to "
              f"{workers * limits.requests_per_second:g} requests/s (burst {workers * limits.burst})")
    return 0
