"""Debian's package lists as a corpus: real text (descriptions) with real attributes to filter on.

pgsim ships a few thousand packages (``pgsim/demo/data/debian-sample.jsonl.gz``) for the demo and the tests.
The full list (about 63k packages) is built on demand from this machine's apt lists:

    apt-get update -o Acquire::Languages=en       # fetches the long descriptions (Translation-en)
    python -m pgsim.demo.corpus full --out packages.jsonl.gz
    python -m pgsim.demo.corpus sample --rows 3000 --out pgsim/demo/data/debian-sample.jsonl.gz  # the sample

``apt-cache dumpavail`` gives Package, Section, Priority, Installed-Size, Source and the one-line synopsis;
the long description lives in apt's ``*Translation-en*`` files, joined on Package and Description-md5.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import random
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

APT_LISTS = "/var/lib/apt/lists"
APT_HELPER = "/usr/lib/apt/apt-helper"
SAMPLE = "debian-sample.jsonl.gz"


@dataclass(frozen=True)
class Package:
    package: str
    section: str
    priority: str
    installed_size: int  # KiB
    source: str
    synopsis: str
    description: str  # the long description, without the synopsis

    @property
    def text(self) -> str:
        """What the demo embeds: the synopsis and the long description."""
        return f"{self.synopsis}\n\n{self.description}" if self.description else self.synopsis


def parse_stanzas(lines: Iterable[str]) -> Iterator[dict[str, str]]:
    """Deb822 stanzas as dicts; continuation lines are joined with newlines."""
    stanza: dict[str, str] = {}
    key = None
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            if stanza:
                yield stanza
            stanza, key = {}, None
        elif line[0] in " \t" and key is not None:
            stanza[key] += "\n" + line
        elif ":" in line:
            key, _, value = line.partition(":")
            stanza[key] = value.strip()
    if stanza:
        yield stanza


def long_description(field: str) -> tuple[str, str]:
    """(synopsis, long text) of a Description field; ' .' lines are paragraph breaks."""
    first, *rest = field.split("\n")
    paragraphs: list[str] = [""]
    for raw in rest:
        line = raw[1:] if raw.startswith(" ") else raw
        if line.strip() == ".":
            paragraphs.append("")
        else:
            paragraphs[-1] = f"{paragraphs[-1]} {line.strip()}".strip()
    return first.strip(), "\n\n".join(p for p in paragraphs if p)


def read_translations(lists_dir: str = APT_LISTS) -> dict[tuple[str, str], str]:
    """(package, description md5) -> long description, from every Translation-en file apt has."""
    found: dict[tuple[str, str], str] = {}
    for path in sorted(glob.glob(f"{lists_dir}/*Translation-en*")):
        text = subprocess.run([APT_HELPER, "cat-file", path], check=True, capture_output=True, text=True).stdout
        for stanza in parse_stanzas(text.splitlines()):
            if "Package" in stanza and "Description-en" in stanza:
                _, body = long_description(stanza["Description-en"])
                found[(stanza["Package"], stanza.get("Description-md5", ""))] = body
    return found


def read_apt(lists_dir: str = APT_LISTS) -> list[Package]:
    """Every package apt knows, with its long description where a Translation-en file has it."""
    translations = read_translations(lists_dir)
    if not translations:
        raise SystemExit("apt has no Translation-en files: run `apt-get update -o Acquire::Languages=en` first.")
    dump = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    packages: dict[str, Package] = {}
    for stanza in parse_stanzas(dump.splitlines()):
        name = stanza.get("Package")
        if not name or name in packages:
            continue
        synopsis, body = long_description(stanza.get("Description", ""))
        body = body or translations.get((name, stanza.get("Description-md5", "")), "")
        packages[name] = Package(
            package=name,
            section=stanza.get("Section", "unknown"),
            priority=stanza.get("Priority", "optional"),
            installed_size=int(stanza.get("Installed-Size", "0") or 0),
            source=stanza.get("Source", name).split(" ")[0],
            synopsis=synopsis,
            description=body,
        )
    return sorted(packages.values(), key=lambda p: p.package)


def write_jsonl(packages: Iterable[Package], path: Path) -> int:
    count = 0
    with gzip.open(path, "wt", encoding="utf-8") as out:
        for package in packages:
            out.write(json.dumps(asdict(package), ensure_ascii=False, separators=(",", ":")) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[Package]:
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [Package(**json.loads(line)) for line in lines]


def load_sample() -> list[Package]:
    """The sample shipped inside the package."""
    with resources.as_file(resources.files("pgsim.demo") / "data" / SAMPLE) as path:
        return read_jsonl(path)


def sample(packages: list[Package], rows: int, seed: int = 7) -> list[Package]:
    """A reproducible random sample of packages that have a long description."""
    described = [p for p in packages if p.description]
    chosen = random.Random(seed).sample(described, min(rows, len(described)))
    return sorted(chosen, key=lambda p: p.package)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pgsim.demo.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["full", "sample"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=3000, help="rows in the sample")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    packages = read_apt()
    chosen = packages if args.what == "full" else sample(packages, args.rows, args.seed)
    count = write_jsonl(chosen, args.out)
    print(f"wrote {count} packages to {args.out}")


if __name__ == "__main__":
    main()
