"""Commands that set up, look and search: demo, install, status, search, doctor, index-advise."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from pgsim.cli.common import format_table, lanes_text, open_connection, progress_bar, where_from_filters
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.errors import PgsimError

DEMO_TABLE = "pgsim_demo.packages"  # search, doctor and index-advise default to the demo's table


def cmd_demo(args: argparse.Namespace) -> int:
    from pgsim.demo.corpus import load_sample
    from pgsim.demo.tour import TABLE, run_demo

    started = time.perf_counter()
    conn = open_connection(args)
    bar, progress = progress_bar("embedding")
    packages = load_sample()[: args.rows] if args.rows else None
    with conn:
        try:
            report = run_demo(conn, model=args.model, packages=packages, progress=progress)
        finally:
            bar.close()
    print(f"table {TABLE}: {report.loaded} rows loaded now; {report.encoded} embedded now", end="")
    if report.encoded:
        rate = report.encoded / report.encode_seconds if report.encode_seconds else 0.0
        print(
            f" in {report.seconds:.1f}s ({rate:.0f} texts/s while encoding, {report.truncated} truncated to the "
            "model's limit)",
            end="",
        )
    print("; HNSW index " + ("built" if report.index_built else "already there"))
    for result in report.results:
        print(
            f"\nquery: {result.query.text!r}   filter: {result.query.filter_label}   "
            f"{len(result.hits)} rows in {result.seconds * 1000:.1f} ms"
        )
        rows = [
            [hit.row["package"], hit.row["section"], hit.row["installed_size"], 1 - hit.distance, hit.row["synopsis"]]
            for hit in result.hits
        ]
        print(format_table(["package", "section", "size KiB", "similarity", "synopsis"], rows))
    print(f"\ndone in {time.perf_counter() - started:.1f}s")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from pgsim.db.schema import install

    with open_connection(args) as conn:
        report = install(conn)
    if report.applied:
        print(f"applied {', '.join(report.applied)}")
    print(f"pgsim schema up to date ({len(report.applied) + len(report.already_applied)} SQL files applied in all)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pgsim.db.catalog import has_schema_table, pinned_path
    from pgsim.db.schema import applied_files, package_version

    if not (args.dsn or os.environ.get("PGSIM_DSN")):
        from pgsim.db.server import EmbeddedServer

        server = EmbeddedServer(args.data_dir)
        running = server.running()
        print(f"embedded server: {server.data_dir} - " + (f"running (pid {running.pid})" if running else "not running"))
    with open_connection(args) as conn:
        with pinned_path(conn):  # || on name and int, say: pg_catalog's only (the rule in pgsim.db.catalog)
            info = conn.execute(
                "SELECT current_database(), current_user, current_setting('server_version'), "
                "(SELECT extversion FROM pg_extension WHERE extname = 'vector')"
            ).fetchone()
        assert info is not None
        print(f"database: {info[0]} as {info[1]}, PostgreSQL {info[2]}, pgvector {info[3] or 'not installed'}")
        files = applied_files(conn)
        if files:
            last_version = files[-1][1]
            print(f"pgsim schema: {len(files)} SQL files applied, last by pgsim {last_version}; ", end="")
            print(f"package {package_version()}")
        else:
            print("pgsim schema: not installed (run: pgsim install)")
        if has_schema_table(conn, "sync_status"):
            with pinned_path(conn):
                rows = conn.execute(
                    "SELECT table_name || '.' || column_name, model, coalesce('replaces #' || replaces, ''), queued, "
                    "retrying, dead_letters, coalesce(round(extract(epoch FROM lag)::numeric, 1) || ' s', '') "
                    "FROM pgsim.sync_status ORDER BY id"
                ).fetchall()
            if rows:
                print("\nembedding columns (lag: age of the oldest queued row):")
                headers = ["column", "model", "model change", "queued", "retrying", "dead letters", "lag"]
                print(format_table(headers, rows))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from pgsim.knn.filtered import search

    where = where_from_filters(args.filter)
    with open_connection(args) as conn:
        started = time.perf_counter()
        hits = search(conn, args.table, args.column, args.query, k=args.k, where=where, model=args.model)
        seconds = time.perf_counter() - started
    if not hits:
        print("no rows match")
        return 0
    headers = [name for name in hits[0].row]
    print(format_table(headers + ["distance"], [list(hit.row.values()) + [hit.distance] for hit in hits]))
    print(f"{len(hits)} rows in {seconds * 1000:.1f} ms (including encoding the query)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """The path a search takes and why (with a search TEXT), the indexes its filter lacks (with a filter),
    or the stored calibration curve (``--calibration [TABLE COLUMN]``)."""
    if args.calibration is not None:
        return doctor_calibration(args)
    where = doctor_where(args)
    if args.query is None:
        with open_connection(args) as conn:
            if where is None:
                doctor_statistics(conn, args)
            else:
                print_filter_indexes(conn, args.table, args.column, where)
        return 0
    from pgsim.columns.registry import get_registration
    from pgsim.encoding.encoder import encoder_for
    from pgsim.knn.filtered import explain

    with open_connection(args) as conn:
        plan, analyzed = explain(conn, args.table, args.column, args.query, k=args.k, where=where, model=args.model)
        registration = get_registration(conn, args.table, args.column)
        model = args.model or (registration.model if registration else DEFAULT_MODEL)
        backend = encoder_for(model).backend
        precision = f" in {backend.precision}" if backend.precision else ""  # OpenVINO picks it per CPU
        print(f"encoder: {model} on backend {backend.name}{precision} ({backend.reason}); {lanes_text(backend)}")
        print(f"path: {plan.path}" + (f" using index {plan.index_name}" if plan.path == "hnsw" else ""))
        print(f"why: {plan.reason}")
        print(f"estimated rows passing the filter: {plan.estimated_rows:.0f}", end="")
        if plan.indexed_rows is not None:
            print(f" of {plan.indexed_rows:.0f} indexed (selectivity {plan.selectivity:.4%})", end="")
        print()
        if plan.path == "hnsw":
            print(
                f"settings (SET LOCAL): hnsw.iterative_scan = relaxed_order, hnsw.ef_search = {plan.ef_search}, "
                f"hnsw.max_scan_tuples = {plan.max_scan_tuples}; rows re-sorted by distance"
            )
        else:
            print("settings: none (the filter runs first, then distances; no index can serve the ordering)")
        print("\nEXPLAIN ANALYZE:")
        print(analyzed)
        if where is not None:
            print()
            print_filter_indexes(conn, args.table, args.column, where)
    return 0


def doctor_where(args: argparse.Namespace) -> Any:
    """--filter COLUMN=VALUE and --where SQL as one search filter (None when neither is given)."""
    from psycopg import sql

    from pgsim.knn.statements import filter_sql

    parts: list[sql.Composable] = []
    if args.filter:
        parts.append(filter_sql(where_from_filters(args.filter)).condition)
    if args.where:
        parts.append(sql.SQL("({})").format(sql.SQL(args.where)))  # SQL text, as pgsim.knn's filter
    return sql.SQL(" AND ").join(parts) if parts else None


def doctor_statistics(conn: Any, args: argparse.Namespace) -> None:
    """Without a search or a filter: for each registered embedding (or the --table given), the columns the
    planner's statistics show searches would filter on and that no index serves."""
    from pgsim.columns.registry import registrations
    from pgsim.knn.filter_indexes import likely_filters, missing_indexes_for_likely_filters

    targets = [(f"{r.schema}.{r.table_name}", r.column) for r in registrations(conn)]
    if args.table != DEMO_TABLE or not targets:
        targets = [(args.table, args.column)]
    for table, column in targets:
        checked = [name for name, _ in likely_filters(conn, table, column)]
        if not checked:
            print(f"{table}.{column}: no column to check (none repeats its values, or run ANALYZE {table})")
            continue
        missing = missing_indexes_for_likely_filters(conn, table, column)
        print(f"{table}.{column}: filter columns by the planner's statistics: {', '.join(checked)}")
        if not missing:
            print("  none lacks an index the exact path would use")
        for advice in missing:
            print(
                f"  {advice.column} ({advice.column_type}): no {advice.method} index: a search filtering on it reads "
                f"all {advice.table_rows:.0f} rows on the exact path"
            )
            print(f"    {advice.statement.as_string(conn)};")


def print_filter_indexes(conn: Any, table: str, column: str, where: Any) -> None:
    from pgsim.knn.filter_indexes import missing_filter_indexes

    missing = missing_filter_indexes(conn, table, column, where)
    if not missing:
        print(
            f"filter indexes: none missing on {table} for this filter (an index finds its rows, or one would not help)"
        )
        return
    first = missing[0]
    print(
        f"filter indexes: about {first.estimated_rows:.0f} of {first.table_rows:.0f} rows of {first.table} pass the "
        "filter, and the exact path reads the whole table to find them (Seq Scan with a Filter); missing:"
    )
    for advice in missing:
        print(f"  {advice.column} ({advice.column_type}): no {advice.method} index")
        print(f"    {advice.statement.as_string(conn)};")


def doctor_calibration(args: argparse.Namespace) -> int:
    """The stored knn calibration curve of TABLE COLUMN (default: --table, --column), and whether it is stale."""
    from pgsim.knn.advice import stored_curve

    if len(args.calibration) not in (0, 2):
        raise PgsimError("--calibration takes TABLE COLUMN, or nothing for --table and --column")
    table, column = args.calibration or (args.table, args.column)
    with open_connection(args) as conn:
        curve = stored_curve(conn, table, column)
    if curve is None:
        print(f"not calibrated: run pgsim calibrate {table} {column}")
        return 0
    print(
        f"calibration of {curve.table}.{curve.column}: measured {curve.measured_at:%Y-%m-%d %H:%M:%S %Z} by "
        f"{curve.measured_by} in {curve.seconds:.1f} s on {curve.rows_measured:.0f} rows, index "
        f"{curve.index_measured or '(dropped)'}; k {curve.k}, {curve.queries} queries"
    )
    if curve.stale:
        print(f"STALE, not trusted: {'; '.join(curve.stale)}. Run pgsim calibrate {curve.table} {curve.column}")
    else:
        print(f"fresh: about {curve.rows_now:.0f} rows now; index {curve.index_now}")
    headers = ["selectivity", "rows", "exact ms", *(f"ef {ef}" for ef in curve.ef_search), "filter"]
    rows = []
    for level in curve.levels:
        cells = []
        for position in range(len(curve.ef_search)):
            if position < len(level.recall):
                ms = level.hnsw_ms[position] if position < len(level.hnsw_ms) else None
                cells.append(f"{level.recall[position]:.3f}" + (f" / {ms:.1f} ms" if ms is not None else ""))
            else:
                cells.append("")  # not measured: every query had found all k
        exact = f"{level.exact_ms:.1f}" if level.exact_ms else ""
        rows.append([f"{level.selectivity:.1%}", level.rows, exact, *cells, " OR ".join(level.filters) or "(none)"])
    print(format_table(headers, rows, max_width=48))
    print("(recall@k / median time of the HNSW path per ef_search; blank: all k found at a smaller one)")
    served = curve.served_from()
    if served is not None and served >= 1.0:
        print("the full index reaches recall 0.99 faster than the exact scan unfiltered only")
    elif served is not None:
        print(
            f"the full index reaches recall 0.99 faster than the exact scan for filters keeping {served:.2%} of the "
            "rows or more: index-advise proposes no partial index for those"
        )
    return 0


def cmd_index_advise(args: argparse.Namespace) -> int:
    import json

    from pgsim.knn.advice import advise, calibrated_cover, create

    source = sys.stdin if args.workload == "-" else open(args.workload, encoding="utf-8")
    with source:
        workload = [json.loads(line) for line in source if line.strip()]
    if not all(isinstance(item, dict) for item in workload):
        raise PgsimError('--workload holds one JSON object per line, the filter of one search: {"section": "libs"}')
    with open_connection(args) as conn:
        advice = advise(conn, args.table, args.column, workload, k=args.k, min_share=args.min_share, recall=args.recall)
        served, _ = calibrated_cover(conn, args.table, args.column, args.k, args.recall)
        if served is not None:
            print(
                f"calibrated: the full index reaches recall {args.recall} for filters keeping {served:.2%} of the rows "
                "or more; no partial index advised for those"
            )
        if not advice:
            print(f"no partial index advised for {len(workload)} searches (min share {args.min_share:.0%})")
            return 0
        rows = [
            [a.column, a.value, f"{a.share:.0%}", a.current.path, f"{a.current.estimated_rows:.0f}", a.current.reason]
            for a in advice
        ]
        print(format_table(["filter column", "value", "share", "path now", "rows", "why"], rows, max_width=70))
        for item in advice:
            statement = item.statement.as_string(conn)
            if args.create:
                started = time.perf_counter()
                create(conn, item)
                print(f"created in {time.perf_counter() - started:.1f}s: {statement}")
            else:
                print(statement + ";")
    return 0


def cmd_encoder(args: argparse.Namespace) -> int:
    """The backend the encoder uses for a model here and why; ``--measure`` measures the backends again."""
    from pgsim.encoding.encoder import encoder_for

    if args.measure:
        from pgsim.encoding.backends.auto import measure_again

        measure_again(args.model)
    backend = encoder_for(args.model).backend
    precision = f" in {backend.precision}" if backend.precision else ""
    print(f"encoder: {args.model} on backend {backend.name}{precision} ({backend.reason}); {lanes_text(backend)}")
    return 0
