"""The embedded default: a deterministic demo warehouse and the project over it.

Every value is a pure function of the person's number, so the demo is the
same on every machine and every run: user-42 always has the same record.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from .config import Project, parse_project

log = logging.getLogger(__name__)

DEMO_PEOPLE = 100_000
DEMO_HTTP_PORT = 8080

# r(i, salt) is a deterministic pseudo-random number in [0, 1) (a multiplicative
# hash; DuckDB's own hash() is not promised stable across versions).
_R = "((({i} * 2654435761 + {salt} * 40503) % 4294967296) / 4294967296.0)"


def _r(salt: int) -> str:
    return _R.format(i="i", salt=salt)


DEMO_SQL = f"""
CREATE OR REPLACE TABLE customers AS
SELECT
    'user-' || i AS user_id,
    ['free', 'free', 'free', 'starter', 'pro', 'enterprise'][1 + floor({_r(1)} * 6)::INT] AS plan,
    ['bronze', 'bronze', 'silver', 'gold', 'platinum'][1 + floor({_r(2)} * 5)::INT] AS loyalty_tier,
    round({_r(3)} * {_r(4)} * 5000, 2) AS ltv,
    round({_r(5)}, 4) AS predicted_churn,
    ['US', 'US', 'GB', 'DE', 'FR', 'CA', 'JP', 'BR', 'IN', 'AU'][1 + floor({_r(6)} * 10)::INT] AS country,
    DATE '2019-01-01' + floor({_r(7)} * 2190)::INT AS signup_date,
    'sku-' || lpad((1 + floor({_r(8)} * 500)::INT)::VARCHAR, 4, '0') AS recommended_product,
    floor({_r(9)} * {_r(10)} * 60)::BIGINT AS orders_count,
    {_r(11)} < 0.62 AS email_opt_in,
    TIMESTAMP '2025-01-01 00:00:00' + to_seconds(floor({_r(12)} * 31536000)::BIGINT) AS last_order_at
FROM range(1, {{people}} + 1) AS t(i)
"""

DEMO_ATTRIBUTES = {
    "plan": "string",
    "loyalty_tier": "string",
    "ltv": "float",
    "predicted_churn": "float",
    "country": "string",
    "signup_date": "timestamp",
    "recommended_product": "string",
    "orders_count": "int",
    "email_opt_in": "bool",
    "last_order_at": "timestamp",
}


# What a storefront streams: page views, product views, cart adds and searches.
DEMO_EVENT_MODELS = {
    "page_views": {"type": "page", "properties": {"path": "string", "title": "string"}},
    "product_views": {"type": "track", "event": "Product Viewed", "properties": {"sku": "string", "price": "float"}},
    "cart_adds": {"type": "track", "event": "Product Added", "properties": {"sku": "string", "price": "float"}},
    "searches": {"type": "track", "event": "Products Searched", "properties": {"query": "string"}},
    "orders": {"type": "track", "event": "Order Completed", "properties": {"sku": "string", "total": "float"}},
}


def generate_demo_warehouse(path: Path, people: int = DEMO_PEOPLE) -> Path:
    """Writes the demo DuckDB file (customers table) and returns its path."""
    import duckdb

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with duckdb.connect(str(tmp)) as con:
        con.execute(DEMO_SQL.format(people=int(people)))
    tmp.replace(path)  # a half-written warehouse is never picked up
    return path


DEMO_AUDIENCE = "high_intent_pricing"
DEMO_WINDOW = 10.0


def demo_audience(window_seconds: float) -> dict:
    """The /demo page's audience (as `qualify demo` makes it): 3+ views of /pricing in the window, plan free."""
    return {"and": {"conditions": [
        {"event": {"event_model": "page_views",
                   "filters": [{"property": "path", "operator": "OPERATOR_EQ", "value": {"string_value": "/pricing"}}],
                   "scope": "SCOPE_WITHIN", "window": f"{window_seconds:g}s",
                   "comparison": "COMPARISON_GE", "threshold": 3}},
        {"attribute": {"attribute": "plan", "operator": "OPERATOR_EQ", "value": {"string_value": "free"}}},
    ]}}


def demo_project(data_dir: Path, people: int = DEMO_PEOPLE, port: int | None = None,
                 window: float = DEMO_WINDOW) -> Project:
    """The project used when no qualify.toml is given; generates its warehouse once.

    Its HTTP listener serves /demo, whose audience has a ``window``-second window.
    """
    data_dir = data_dir.resolve()
    warehouse = data_dir / f"demo-warehouse-{people}.duckdb"
    if not warehouse.exists():
        log.info("generating the demo warehouse: %d people in %s", people, warehouse)
        generate_demo_warehouse(warehouse, people)
    raw = {
        "data_dir": str(data_dir),
        "warehouse": {"type": "duckdb", "path": str(warehouse)},
        "parent_model": {
            "name": "customers",
            "query": "SELECT * FROM customers",
            "primary_key": "user_id",
            "attributes": DEMO_ATTRIBUTES,
        },
        "collections": {"customers": {}},
        "event_models": DEMO_EVENT_MODELS,
        "auth": {"enabled": False},  # a local try-out; `qualify serve --auth on` turns keys on
        "http": {"port": DEMO_HTTP_PORT},  # the tracking API, JSON reads and /demo; --http-port moves it
    }
    if port is not None:
        raw["server"] = {"port": port}
    project = parse_project(raw, base=data_dir)
    http = replace(project.ops.http, demo_window=window)
    return replace(project, ops=replace(project.ops, http=http))
