"""``pgsim grant`` and ``pgsim revoke``: least-privilege roles (:mod:`pgsim.columns.grants`)."""

from __future__ import annotations

import argparse

from pgsim.cli.common import open_connection


def cmd_grant(args: argparse.Namespace) -> int:
    from pgsim.columns.grants import grant, revoke

    with open_connection(args) as conn:
        apply = revoke if args.revoke else grant
        statements = apply(conn, args.kind, args.role, tables=args.tables)
    for statement in statements:
        print(f"{statement};")
    return 0
