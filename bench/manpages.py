"""A second corpus for bench/quality.py: Debian's Linux man pages (packages manpages and manpages-dev),
sections 2, 3, 5 and 7, long technical reference pages, with two kinds of known-item queries.

    python bench/manpages.py        # builds (or reads) the cached corpus and prints its size

The packages are fetched with ``apt-get download`` into bench/.cache, unpacked with ``dpkg-deb -x``, and
each page (not the ``.so`` aliases) is rendered with groff (``-t -man -Tutf8``, no hyphenation, no
overstrike) into plain text; the rendered corpus is cached as bench/.cache/manpages.jsonl.gz. A page's
indexed text is its rendered text without its NAME section. Queries:

* ``name``: the page's one-line NAME description (what follows the dash), which the indexed text no longer
  holds; relevant: every page with the same description;
* ``deep``: a sentence of 8 to 30 words from the second half of the page; relevant: every page whose text
  holds that sentence.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
CORPUS = CACHE_DIR / "manpages.jsonl.gz"
PACKAGES = ("manpages", "manpages-dev")
SECTIONS = ("2", "3", "5", "7")
HEADING = re.compile(r"^[A-Z][A-Z0-9 ,/()-]*$")
SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]])[.!?]\s+(?=[A-Z])")


@dataclass(frozen=True)
class ManPage:
    name: str  # e.g. open(2)
    section: str
    description: str  # the NAME line after its dash
    text: str  # the rendered page without its NAME section, paragraphs separated by blank lines


@dataclass(frozen=True)
class Query:
    doc: int
    text: str
    relevant: frozenset[int]


def manpages() -> list[ManPage]:
    if not CORPUS.exists():
        build()
    with gzip.open(CORPUS, "rt", encoding="utf-8") as lines:
        return [ManPage(**json.loads(line)) for line in lines]


def build() -> None:
    root = CACHE_DIR / "manpages-root"
    CACHE_DIR.mkdir(exist_ok=True)
    if not root.exists():
        print(f"fetching {' '.join(PACKAGES)} into {CACHE_DIR} ...", file=sys.stderr, flush=True)
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=CACHE_DIR, check=True, capture_output=True)
        for deb in sorted(CACHE_DIR.glob("manpages*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    sources = []
    for section in SECTIONS:
        for path in sorted((root / "usr/share/man" / f"man{section}").glob("*.gz")):
            if path.is_symlink():  # an alias of another page
                continue
            source = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
            if not re.search(r"^\.so ", source, re.M) or source.count("\n") > 5:
                sources.append((path.name.removesuffix(".gz"), section, source))
    print(f"rendering {len(sources)} pages with groff ...", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(2) as pool:
        rendered = [page for page in pool.map(lambda s: render(*s), sources) if page is not None]
    seen: set[str] = set()
    pages = [page for page in rendered if not (page.text in seen or seen.add(page.text))]
    with gzip.open(CORPUS, "wt", encoding="utf-8") as out:
        for page in pages:
            out.write(json.dumps(vars(page)) + "\n")
    print(f"{len(pages)} pages in {CORPUS}", file=sys.stderr)


def render(filename: str, section: str, source: str) -> ManPage | None:
    done = subprocess.run(
        ["groff", "-t", "-man", "-Tutf8", "-rHY=0", "-P", "-cbou"],
        input=source.encode(),
        capture_output=True,
        check=False,
    )
    lines = done.stdout.decode("utf-8", "replace").splitlines()
    sections: list[tuple[str, list[str]]] = []
    for line in lines[1:-1]:  # the running header and footer
        if HEADING.match(line):
            sections.append((line.strip(), []))
        elif sections:
            sections[-1][1].append(line)
    names = [body for heading, body in sections if heading == "NAME"]
    if not names:
        return None
    name_line = " ".join(" ".join(names[0]).split())
    description = name_line.split(" - ", 1)[1].strip() if " - " in name_line else ""
    if not description:
        return None
    paragraphs = []
    for heading, body in sections:
        if heading == "NAME":
            continue
        paragraphs.append(heading)
        for block in "\n".join(body).split("\n\n"):
            if block.strip():
                paragraphs.append(" ".join(block.split()))
    name = filename.rsplit(".", 1)[0]
    return ManPage(f"{name}({section})", section, description, "\n\n".join(paragraphs))


def name_queries(pages: list[ManPage], count: int, seed: int, exclude: Collection[Query] = ()) -> list[Query]:
    """``count`` NAME-line queries from a seeded sample of the pages; none from a page of ``exclude`` or with
    the description of one of its queries (a held-out set: no query equals one of ``exclude``)."""
    by_description: dict[str, set[int]] = defaultdict(set)
    for i, page in enumerate(pages):
        by_description[page.description].add(i)
    taken = {q.text for q in exclude}
    skipped = {q.doc for q in exclude}
    population = [i for i in range(len(pages)) if i not in skipped and pages[i].description not in taken]
    chosen = sorted(random.Random(seed).sample(population, min(count, len(population))))
    return [Query(i, pages[i].description, frozenset(by_description[pages[i].description])) for i in chosen]


def deep_queries(pages: list[ManPage], count: int, seed: int, exclude: Collection[Query] = ()) -> list[Query]:
    """``count`` deep-sentence queries, one per page of a seeded order; none from a page of ``exclude`` nor
    equal to one of its sentences (a held-out set)."""
    rng = random.Random(seed)
    order = list(range(len(pages)))
    rng.shuffle(order)
    taken = {q.text for q in exclude}
    skipped = {q.doc for q in exclude}
    queries = []
    for i in order:
        if i in skipped:
            continue
        text = pages[i].text
        half = text[len(text) // 2 :]
        sentences = [
            s.strip()
            for paragraph in half.split("\n\n")[1:]  # the first may be cut mid-paragraph
            for s in SENTENCE_END.split(paragraph)
            if 8 <= len(s.split()) <= 30 and not HEADING.match(s) and s.strip() not in taken
        ]
        if not sentences:
            continue
        sentence = rng.choice(sentences)
        relevant = frozenset(j for j, page in enumerate(pages) if sentence in page.text)
        queries.append(Query(i, sentence, relevant))
        if len(queries) == count:
            break
    return sorted(queries, key=lambda q: q.doc)


if __name__ == "__main__":
    corpus = manpages()
    counts = defaultdict(int)
    for page in corpus:
        counts[page.section] += 1
    words = sorted(len(page.text.split()) for page in corpus)
    print(f"{len(corpus)} pages {dict(counts)}; words per page: median {words[len(words) // 2]}, max {words[-1]}")
