"""Evaluation sets and metrics for bench/quality.py, built from the Debian corpus (see corpus_cache.py).

Three tasks come from the corpus itself, with no hand labelling:

* known-item search: the query is a package's one-line synopsis, the document is its long description
  only; the relevant documents are that package and every package whose long description is identical
  to it (Debian repeats descriptions verbatim, e.g. across gcc cross toolchains), so the relevant set has
  one or more members and "recall@10" means "some relevant document is in the top 10";
* duplicates / entity linking: packages built from one ``Source:`` are one entity;
* labels: ``Section`` is the label of a package.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pgsim.demo.corpus import Package

Matrix = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True)
class KnownItem:
    doc: int  # the package's position in the document list (its id in the table)
    text: str  # its synopsis
    relevant: frozenset[int]  # the package and its identical-description twins


def documents(corpus: Sequence[Package]) -> list[Package]:
    """The packages with a non-blank long description: the rows of the search table."""
    return [p for p in corpus if p.description.strip()]


def twin_groups(docs: Sequence[Package]) -> list[frozenset[int]]:
    """For each document, the documents whose long description is identical to its own (itself included)."""
    by_text: dict[str, list[int]] = defaultdict(list)
    for position, package in enumerate(docs):
        by_text[package.description].append(position)
    groups = {text: frozenset(members) for text, members in by_text.items()}
    return [groups[p.description] for p in docs]


def known_items(docs: Sequence[Package], twins: Sequence[frozenset[int]], count: int, seed: int) -> list[KnownItem]:
    """A fixed-seed sample of ``count`` documents whose synopsis is not blank, as known-item queries."""
    eligible = [i for i, p in enumerate(docs) if p.synopsis.strip()]
    chosen = sorted(random.Random(seed).sample(eligible, min(count, len(eligible))))
    return [KnownItem(i, docs[i].synopsis, twins[i]) for i in chosen]


def reciprocal_rank(ranked: Sequence[int], relevant: frozenset[int], k: int = 10) -> float:
    for rank, doc in enumerate(ranked[:k], start=1):
        if doc in relevant:
            return 1.0 / rank
    return 0.0


def hit(ranked: Sequence[int], relevant: frozenset[int], k: int = 10) -> float:
    """Recall@k of a known item with twins: 1 when any relevant document is in the top k."""
    return 1.0 if any(doc in relevant for doc in ranked[:k]) else 0.0


def mrr_recall(rankings: Sequence[Sequence[int]], items: Sequence[KnownItem], k: int = 10) -> tuple[float, float]:
    rr = [reciprocal_rank(r, q.relevant, k) for r, q in zip(rankings, items, strict=True)]
    hits = [hit(r, q.relevant, k) for r, q in zip(rankings, items, strict=True)]
    return float(np.mean(rr)), float(np.mean(hits))


def pairwise_prf(predicted: Sequence[Hashable], truth: Sequence[Hashable]) -> tuple[float, float, float]:
    """Pairwise precision, recall and F1 of a grouping (one cluster label per item) against the true one:
    a pair of items is positive when both share a label."""

    def pairs(counts: Iterable[int]) -> int:
        return sum(n * (n - 1) // 2 for n in counts)

    together = pairs(Counter(zip(predicted, truth, strict=True)).values())
    predicted_pairs = pairs(Counter(predicted).values())
    true_pairs = pairs(Counter(truth).values())
    precision = together / predicted_pairs if predicted_pairs else 1.0
    recall = together / true_pairs if true_pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def components(count: int, edges: Iterable[tuple[int, int]]) -> list[int]:
    """Connected components (union-find) of items 0..count-1: each item's component label."""
    parent = list(range(count))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(x) for x in range(count)]


def accuracy_macro_f1(predicted: Sequence[str], truth: Sequence[str]) -> tuple[float, float]:
    """Accuracy, and F1 averaged over the true labels (a label never predicted scores 0)."""
    correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
    tp: Counter[str] = Counter(t for p, t in zip(predicted, truth, strict=True) if p == t)
    predicted_count, true_count = Counter(predicted), Counter(truth)
    f1s = []
    for label in true_count:
        precision = tp[label] / predicted_count[label] if predicted_count[label] else 0.0
        recall = tp[label] / true_count[label]
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return correct / len(truth), float(np.mean(f1s))


def skewness(values: Sequence[float] | np.ndarray[Any, Any]) -> float:
    array = np.asarray(values, dtype=np.float64)
    centred = array - array.mean()
    spread = math.sqrt(float(np.mean(centred**2)))
    return float(np.mean(centred**3) / spread**3) if spread else 0.0


def intra_list_similarity(vectors: Matrix) -> float:
    """Mean pairwise cosine of a result list's (unit) vectors."""
    n = len(vectors)
    if n < 2:
        return 1.0
    sims = vectors @ vectors.T
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


def threshold_prf(
    best: np.ndarray[Any, Any], best_relevant: np.ndarray[Any, Any], answerable: np.ndarray[Any, Any], t: Any
) -> tuple[Any, Any, Any]:
    """Precision, recall and F1 of "returned something, and something returned is relevant" when each query
    returns its top results scoring >= t (one threshold, or an array of them). Per query: ``best`` is its
    best score, ``best_relevant`` the best score among its relevant results (-inf when none is among them),
    ``answerable`` whether the table holds a relevant document for it at all."""
    thresholds = np.atleast_1d(np.asarray(t, dtype=np.float64))[:, None]
    returned = (best[None, :] >= thresholds).sum(axis=1)
    good = (best_relevant[None, :] >= thresholds).sum(axis=1)
    precision = np.where(returned > 0, good / np.maximum(returned, 1), 1.0)
    recall = good / max(1, int(answerable.sum()))
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    if np.ndim(t) == 0:
        return float(precision[0]), float(recall[0]), float(f1[0])
    return precision, recall, f1


def best_threshold(
    pooled: np.ndarray[Any, Any],
    best: np.ndarray[Any, Any],
    best_relevant: np.ndarray[Any, Any],
    answerable: np.ndarray[Any, Any],
    min_precision: float | None = None,
) -> float:
    """The threshold with the best F1 on these queries, or with the best recall among those whose precision
    is at least ``min_precision`` (tried at 400 quantiles of the ``pooled`` scores)."""
    candidates = np.unique(np.quantile(pooled[np.isfinite(pooled)], np.linspace(0, 1, 401)))
    precision, recall, f1 = threshold_prf(best, best_relevant, answerable, candidates)
    if min_precision is None:
        return float(candidates[np.argmax(f1)])
    ok = np.flatnonzero(precision >= min_precision)
    if not len(ok):
        return float(candidates[np.argmax(precision)])
    return float(candidates[ok[np.lexsort((candidates[ok], -recall[ok]))[0]]])


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    equal = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * equal)


# A short English description per Debian section, after the section pages of packages.debian.org, for
# zero-shot labelling. Each says what the section holds, not which words its packages use.
SECTION_DESCRIPTIONS = {
    "admin": "System administration utilities: manage system resources, user accounts, services and boot.",
    "cli-mono": "Mono and the Common Language Infrastructure: .NET runtime, C# libraries and tools.",
    "comm": "Communication programs: modems, fax, serial lines, telephony and dial-up.",
    "database": "Databases: database servers, clients and tools for SQL and NoSQL data stores.",
    "debug": "Debugging symbols: debug information for executables and shared libraries.",
    "devel": "Software development: compilers, debuggers, build tools and development environments.",
    "doc": "Documentation: manuals, FAQs, HOWTOs, API reference and software to browse documentation.",
    "editors": "Text editors and programming environments for editing files.",
    "education": "Educational software for learning and teaching.",
    "electronics": "Electronics: circuit design, simulation, PCB layout and microcontroller tools.",
    "embedded": "Software for embedded systems and devices.",
    "fonts": "Fonts: typefaces for screen and print.",
    "games": "Games and amusements.",
    "gnome": "The GNOME desktop environment and its applications.",
    "gnu-r": "GNU R, the statistical computing language, and its CRAN packages.",
    "gnustep": "The GNUstep environment, an Objective-C desktop framework.",
    "golang": "The Go programming language: Go libraries and development tools.",
    "graphics": "Graphics: image editors, viewers, converters and drawing programs.",
    "hamradio": "Software for amateur (ham) radio operators.",
    "haskell": "The Haskell programming language: Haskell libraries and tools.",
    "httpd": "Web servers and their modules.",
    "interpreters": "Interpreters for scripting and interpreted languages, and macro processors.",
    "introspection": "GObject introspection data: typelib bindings of GObject libraries for other languages.",
    "java": "The Java programming language: Java libraries, virtual machines and tools.",
    "javascript": "JavaScript: Node.js modules, JavaScript libraries and development tools.",
    "kde": "The KDE desktop environment and its applications.",
    "kernel": "Operating system kernels, kernel modules and firmware.",
    "libdevel": "Library development files: headers and static libraries needed to build programs against a library.",
    "libs": "Shared libraries that other programs need at run time.",
    "lisp": "The Lisp programming languages: Common Lisp, Emacs Lisp libraries and implementations.",
    "localization": "Localization: translations and language packs for large software.",
    "mail": "Electronic mail: programs to route, read, filter and compose e-mail.",
    "math": "Mathematics software: computer algebra, numerical computation and plotting.",
    "metapackages": "Metapackages that mainly depend on a set of other packages.",
    "misc": "Miscellaneous software that fits no other section.",
    "net": "Networking: daemons and clients that connect the system to the network.",
    "news": "Usenet news: newsreaders and news servers.",
    "ocaml": "The OCaml programming language: OCaml libraries and tools.",
    "oldlibs": "Obsolete and transitional libraries kept for backward compatibility.",
    "otherosfs": "Other operating systems and file systems: emulators and tools for foreign file systems.",
    "perl": "The Perl programming language: Perl modules and tools.",
    "php": "The PHP programming language: PHP libraries and extensions.",
    "python": "The Python programming language: Python modules and tools.",
    "ruby": "The Ruby programming language: Ruby gems and tools.",
    "rust": "The Rust programming language: Rust crates and development tools.",
    "science": "Scientific software for research in physics, chemistry, biology and astronomy.",
    "shells": "Command shells and command-line interpreters.",
    "sound": "Sound and audio: players, mixers, recorders, audio editors and synthesizers.",
    "tasks": "Tasks for tasksel: packages that set up the system for a particular job.",
    "tex": "TeX and LaTeX typesetting: TeX distributions, packages and fonts.",
    "text": "Text processing: utilities to format, convert, search and print text documents.",
    "utils": "Utilities: file and disk tools, backup and archiving, system monitoring.",
    "vcs": "Version control systems such as git and subversion, and related tools.",
    "video": "Video: players, editors, encoders, recording and streaming.",
    "web": "Web software: web browsers, proxies, web applications and download tools.",
    "x11": "The X Window System: X servers, window managers, terminal emulators and X applications.",
    "xfce": "The Xfce desktop environment and its applications.",
    "zope": "The Zope application server and the Plone content management system.",
}
