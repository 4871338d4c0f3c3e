"""ORM inserts with embeddings: encode-on-flush (one batch) vs one encode call per object, same run.

    python bench/orm.py [--dsn DSN] [--objects 10000]

Both modes insert the same Debian packages (synopsis + long description) as ORM objects into a table with
an HNSW index, then commit once. "per object" is what a user writes without pgsim's flush hook: set
``obj.embedding = model.encode(text)`` for each object as it is created.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_cache import debian_packages  # noqa: E402
from sqlalchemy import String, create_engine, func, select  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pgsim.cli.common import format_table  # noqa: E402
from pgsim.encoding.encoder import encoder_for  # noqa: E402
from pgsim.sqlalchemy import database_url, embedding_column  # noqa: E402


class Base(DeclarativeBase):
    pass


class FlushDoc(Base):
    __tablename__ = "bench_orm_flush"
    package: Mapped[str] = mapped_column(String, primary_key=True)
    section: Mapped[str]
    synopsis: Mapped[str]
    description: Mapped[str]
    embedding = embedding_column(source=["synopsis", "description"])


class ManualDoc(Base):
    __tablename__ = "bench_orm_manual"
    package: Mapped[str] = mapped_column(String, primary_key=True)
    section: Mapped[str]
    synopsis: Mapped[str]
    description: Mapped[str]
    embedding = embedding_column(source=["synopsis", "description"], sync="worker")  # no flush hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--objects", type=int, default=10_000)
    args = parser.parse_args()
    packages = [p for p in debian_packages() if p.description][: args.objects]
    engine = create_engine(database_url(args.dsn))
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    model = encoder_for("all-MiniLM-L6-v2").model
    model.encode(["warm up"])
    results: list[list[Any]] = []

    with Session(engine) as session:
        started = time.perf_counter()
        for p in tqdm(packages, desc="per object", unit="obj", file=sys.stderr):
            doc = ManualDoc(package=p.package, section=p.section, synopsis=p.synopsis, description=p.description)
            doc.embedding = np.asarray(model.encode(p.text, normalize_embeddings=True), dtype=np.float32)
            session.add(doc)
        session.commit()
        results.append(["one model.encode(text) per object", time.perf_counter() - started])
        assert session.scalar(select(func.count(ManualDoc.embedding))) == len(packages)

    with Session(engine) as session:
        started = time.perf_counter()
        session.add_all(
            FlushDoc(package=p.package, section=p.section, synopsis=p.synopsis, description=p.description)
            for p in packages
        )
        print("encode on flush: one batch (no progress bar inside a flush) ...", file=sys.stderr, flush=True)
        session.commit()
        results.append(["pgsim encode-on-flush, one batch", time.perf_counter() - started])
        assert session.scalar(select(func.count(FlushDoc.embedding))) == len(packages)
    Base.metadata.drop_all(engine)

    baseline = len(packages) / results[0][1]
    print(f"\n{len(packages)} ORM objects (Debian packages, synopsis + long description), HNSW index, one commit\n")
    print(
        format_table(
            ["mode", "seconds", "objects/s", "vs per object"],
            [
                [mode, f"{seconds:.1f}", f"{len(packages) / seconds:.1f}", f"{len(packages) / seconds / baseline:.2f}x"]
                for mode, seconds in results
            ],  # fmt: skip
        )
    )


if __name__ == "__main__":
    main()
