"""The package's shape: the public API as it stands, module names that do not hide exported functions, no
module over 400 lines, and the import contract of ``make check`` (which a planted wrong-way import breaks)."""

from __future__ import annotations

import inspect
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pgsim

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_API = [
    "Between", "Calibration", "Chunks", "CorrectedHit", "DEFAULT_MODEL", "EmbeddedServer", "Encoder",
    "ExtensionMissing", "FusedHit", "HNSW", "Hit", "IngestReport", "InstallError", "InstallReport", "InvalidInput",
    "MissingDependency", "ModelNotFound", "NoIndexWarning", "PgsimError", "Plan", "ReadOnlyStandby", "Registration",
    "RelevantHit", "SchemaMissing", "ServerError", "SyncReport", "Text", "Tuning", "Worker", "add_embedding",
    "backfill", "calibrate", "change_embedding", "change_model", "check_vector", "connect", "corrected_search",
    "diverse_search", "get_registration", "grant", "hybrid_search", "ingest", "install", "label_rows",
    "near_duplicates", "register", "register_async", "relevant_search", "remove_chunks", "remove_embedding",
    "resolve_dsn", "revoke", "search", "set_query_bank", "sync", "wait_for_sync",
]  # fmt: skip


def test_the_public_api_is_importable_from_pgsim_as_before() -> None:
    assert sorted(pgsim.__all__) == sorted(PUBLIC_API)
    for name in PUBLIC_API:
        assert getattr(pgsim, name) is not None


def test_no_module_shares_its_name_with_an_exported_function() -> None:
    functions = {name for name in PUBLIC_API if inspect.isfunction(getattr(pgsim, name))}
    modules = {info.name.rsplit(".", 1)[-1] for info in pkgutil.walk_packages(pgsim.__path__, "pgsim.")}
    assert functions and modules
    assert not functions & modules


def test_no_module_is_over_400_lines() -> None:
    sizes = {path: len(path.read_text().splitlines()) for path in (ROOT / "pgsim").rglob("*.py")}
    assert sizes
    assert {str(path.relative_to(ROOT)): lines for path, lines in sizes.items() if lines > 400} == {}


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": str(lint.parent)},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("module", "wrong_way"),
    [("pgsim/encoding/encoder.py", "pgsim.knn.filtered"), ("pgsim/db/catalog.py", "pgsim.columns.registry")],
)
def test_the_import_contract_fails_on_a_wrong_way_import(tmp_path: Path, module: str, wrong_way: str) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "pgsim", tree / "pgsim", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    kept = _lint_imports(tree)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    planted = tree / module
    planted.write_text(planted.read_text() + f"\n\ndef _wrong_way() -> None:\n    import {wrong_way}  # noqa\n")
    broken = _lint_imports(tree)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout and wrong_way in broken.stdout
