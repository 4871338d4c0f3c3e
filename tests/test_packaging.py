"""The wheel carries sql/, migrations/, the sample corpus and py.typed; importing pgsim stays light."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pgsim._util import require
from pgsim.db.sqlfiles import function_files, sql_files
from pgsim.errors import MissingDependency

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_sql_migrations_and_data(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("pgsim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (ROOT / "pgsim" / "db" / "sql", ROOT / "pgsim" / "alembic" / "migrations"):
        for path in shipped.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                assert path.relative_to(ROOT).as_posix() in names
    assert "pgsim/py.typed" in names
    assert "pgsim/demo/data/debian-sample.jsonl.gz" in names
    assert "pgsim/cli/main.py" in names
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    declared = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[alembic.plugins]\npgsim = pgsim.alembic_plugin" in declared


def test_alembic_loads_the_plugin_without_importing_pgsim_alembic() -> None:
    """Alembic imports every alembic.plugins entry point while it is itself being imported."""
    code = (
        "import sys, alembic.runtime.plugins as plugins; "
        "print('pgsim' in plugins._all_plugins, 'pgsim.alembic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["True", "False"]


def test_sql_files_are_numbered_and_found() -> None:
    files = sql_files()
    numbered = (ROOT / "pgsim" / "db" / "sql").glob("[0-9][0-9][0-9][0-9]_*.sql")
    assert [f.name for f in files] == sorted(p.name for p in numbered)
    assert files and files[0].name.startswith("0001_")
    functions = (ROOT / "pgsim" / "db" / "sql" / "functions").glob("*.sql")
    assert [f.name for f in function_files()] == sorted(f"functions/{p.name}" for p in functions)


def test_import_pulls_in_no_optional_or_heavy_module() -> None:
    code = (
        "import sys, pgsim; "
        "print(','.join(m for m in ('sqlalchemy', 'alembic', 'testcontainers', 'torch', 'sentence_transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == ""


def test_missing_optional_dependency_names_the_extra() -> None:
    with pytest.raises(MissingDependency, match=r"pip install 'pgsim\[sqlalchemy\]'"):
        require("pgsim_no_such_module.sub", "sqlalchemy")
    assert require("json", "none").__name__ == "json"
