# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test tools check bench-encode bench-filtered bench-ingest bench-orm clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: 2.13.0 resolves to the CPU build; anything else pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/pgsim demo

# Two workers, one test file each at a time (their module-scoped databases stay whole). Budget: 8 minutes on
# 2 cores. Last measured only with other work on the same cores (load average 2-9): 14:50 for 516 tests
# (CI, quiet, had 8:52 for 475 before the CLI's and docs' processes were forked from a preloaded one).
test: $(BIN)/.installed tools
	$(BIN)/python -m pytest -n 2 --dist loadfile

# What the tests run besides Python: PgBouncer, for tests/test_connections.py (Debian's package; as root).
tools:
	command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || (apt-get update -qq && apt-get install -y -qq pgbouncer)

# Lint, format, types, the layers' import contract (pyproject's [tool.importlinter]).
check: $(BIN)/.installed
	$(BIN)/ruff check pgsim tests bench
	$(BIN)/ruff format --check pgsim tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/mkdocs build --strict --quiet --site-dir build/site

bench-encode: $(BIN)/.installed
	$(BIN)/python bench/encode.py

# Builds the 63k-package corpus from apt's lists (run `apt-get update -o Acquire::Languages=en` first) and
# encodes it once (about 17 minutes here; cached in bench/.cache).
bench-filtered: $(BIN)/.installed
	$(BIN)/python bench/filtered.py

# Throughput of the write paths (2,000 rows each), sync lag under load, HNSW builds on the whole corpus
# (uses the embeddings bench-filtered caches; about 10 minutes here).
bench-ingest: $(BIN)/.installed
	$(BIN)/python bench/ingest.py

# 10,000 ORM objects: encode-on-flush vs one encode call per object (about 6 minutes here).
bench-orm: $(BIN)/.installed
	$(BIN)/python bench/orm.py

clean:
	rm -rf $(VENV) dist build *.egg-info
