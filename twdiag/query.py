"""SQL over a diagnosis's tables, with DuckDB, read-only.

The target is a scan's dataset (a folder with `tables/<table>/...parquet`,
as `scan` writes it) or one bundle, diagnosed on the fly into the same
tables (`tables`). Only one SELECT (or WITH ... SELECT) statement runs, on a
connection that holds the tables in memory and then forbids any file or
network access (`enable_external_access = false`, configuration locked): a
query can neither write a file nor read one outside the target.
"""
from __future__ import annotations

from pathlib import Path

from . import tables

MAX_ROWS = 1000  # rows printed unless --limit says otherwise


class QueryError(Exception):
    """A refused or failed query; str() is the reason (exit 2)."""


def is_dataset(target: Path) -> bool:
    return (Path(target) / "tables").is_dir()


def dataset_tables(target: Path) -> dict:
    """Every table of a scan's dataset, all partitions and shards as one (columns unioned)."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    out = {}
    for name in tables.TABLES:
        folder = Path(target) / "tables" / name
        files = sorted(str(p) for p in folder.rglob("*.parquet")) if folder.is_dir() else []
        if files:
            # partitions differ: history's columns per stage, an all-null column typed null
            schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
            out[name] = ds.dataset(files, format="parquet", schema=schema).to_table()
    return out


def referenced(sql: str) -> set[str]:
    """The tables a query names (by word; a string that mentions one counts too)."""
    import re
    return {t for t in tables.TABLES if re.search(rf"\b{t}\b", sql, re.IGNORECASE)}


def saved_tables(bundle: Path) -> dict | None:
    """The tables a diagnose of this bundle saved beside its report
    (<out>/tables/, default out dir), when the bundle's content signature
    still matches: the answer without decoding again."""
    import importlib.util
    import json as _json
    if importlib.util.find_spec("pyarrow") is None:
        return None
    from . import outputs
    from .fingerprint import signature
    folder = outputs.default_out_dir(bundle) / "tables"
    try:
        saved = _json.loads((folder / "signature.json").read_text())
    except (OSError, ValueError):
        return None
    if saved.get("signature") != signature(bundle):
        return None
    import pyarrow.parquet as pq
    out = {}
    for name in tables.TABLES:
        path = folder / f"{name}.parquet"
        if path.is_file():
            out[name] = pq.read_table(path)
    return out or None


SAVED = "the tables its last diagnose saved (bundle unchanged since)"
ON_THE_FLY = "bundle, diagnosed on the fly"


def bundle_tables(bundle: Path, thresholds: dict, needed: set[str] | None = None) -> tuple[dict, str]:
    """One bundle's tables and where they came from: those its last diagnose
    saved while it is unchanged, else diagnosed on the fly. A query of the
    history alone then only decodes the logs: no checkpoint, image or report work."""
    from . import bundle as bundle_mod, logs, pipeline, report
    saved = saved_tables(bundle)
    if saved is not None and (needed or set(tables.TABLES)) <= set(saved):
        return saved, SAVED
    b = bundle_mod.discover([bundle], {}, root=bundle, max_entries=int(thresholds["limits"]["max_dir_entries"]))
    if needed is not None and needed <= {"history"}:
        return {"history": tables.history_table(logs.load(b, progress=lambda m: None), str(bundle))}, ON_THE_FLY
    a = pipeline.run(b, thresholds, progress=lambda m: None)
    return tables.from_analysis(a, report.combine(a), str(bundle)), ON_THE_FLY


def check_sql(sql: str) -> None:
    import duckdb
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"the query does not parse: {exc}".splitlines()[0][:500]) from None
    if len(statements) != 1:
        raise QueryError(f"one statement please ({len(statements)} given)")
    kind = str(statements[0].type).rsplit(".", 1)[-1]
    if kind != "SELECT":
        raise QueryError(f"only SELECT (or WITH ... SELECT) queries run here, not {kind}: queries are read-only")


def run(target: Path, sql: str, thresholds: dict, limit: int = MAX_ROWS) -> dict:
    """{"columns", "rows" (at most `limit`), "row_count", "cut", "tables"}."""
    import duckdb
    check_sql(sql)
    if is_dataset(target):
        loaded, source = dataset_tables(target), "scan dataset"
    else:
        loaded, source = bundle_tables(target, thresholds, referenced(sql))
    con = duckdb.connect(":memory:")
    try:
        for name, table in loaded.items():
            con.register(name, table)
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        try:
            cur = con.execute(sql)
            columns = [d[0] for d in cur.description or []]
            rows = cur.fetchmany(limit + 1)
        except duckdb.Error as exc:
            raise QueryError(f"{type(exc).__name__}: {exc}"[:1000]) from None
    finally:
        con.close()
    cut = len(rows) > limit
    return {"source": source,
            "tables": {n: int(t.num_rows if hasattr(t, "num_rows") else len(t)) for n, t in loaded.items()},
            "columns": columns, "rows": [dict(zip(columns, r)) for r in rows[:limit]],
            "row_count": min(len(rows), limit), "cut": cut,
            **({"cut_note": f"only the first {limit} rows are shown (--limit)"} if cut else {})}
