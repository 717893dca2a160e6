"""The embedded corpora: four domains and a public mixture, built offline and reproducibly.

Recipe (every file list sorted, then ordered by a hash of its relative path; documents of at
most `DOC_BYTES`; exact duplicates and near copies dropped, see `NearCopies`; no absolute path
ever enters the text):
  code   Python source of the standard library (`sysconfig` stdlib; tests, idlelib,
         turtledemo and lib2to3 left out), the first piece of each file.
  prose  English technical prose from the packages moesaic depends on: docstrings (parsed
         with `ast`, never imported) and .rst/.md/.txt documentation, kept when mostly
         letters and spaces.
  law    license and legal text: LICENSE/COPYING/NOTICE files of those packages (their
         *.dist-info ones included), then the stdlib LICENSE.txt.
  math   arithmetic and word problems with answers, from a seeded generator.
"Those packages" are the installed distributions that moesaic requires, followed through their
own requirements (extras left out, moesaic itself left out), each file as its RECORD lists it:
what else is installed (pip, the test tools) never enters a corpus, and the locked environment
(requirements/demo.lock) fixes every version, so a fresh `make demo` reads the same text.
A document is held out when its stable hash falls below `HELDOUT_FRACTION`; documents are
taken until the train split has (1 - HELDOUT_FRACTION) * SIZES[size] bytes and the held-out
split HELDOUT_FRACTION * SIZES[size] (law runs short: its
train and held-out splits are smaller than the others).
`public` takes the training documents of every domain whose second hash (salt "public") is
below `PUBLIC_SHARE` for its train split, and the band [PUBLIC_SHARE, PUBLIC_SHARE +
PUBLIC_HELDOUT_SHARE) for its held-out split; the band is then taken out of the domains'
train splits, so no model trains on a document it is scored on (the public model never
sees a domain's held-out document, a party's expert never sees public held-out text).
The same machine builds the same bytes twice.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import inspect
import os
import random
import re
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tqdm import tqdm

from moesaic.data.prepare import write_source
from moesaic.data.sources import cut_document, heldout_score
from moesaic.data.tokenizer import BYTES

SIZES = {"default": 1_300_000, "smoke": 130_000}  # bytes of text per domain, both splits
DOC_BYTES = 6_000
MAX_FILE_BYTES = 400_000
HELDOUT_FRACTION = 0.06
PUBLIC_SHARE = 0.12
PUBLIC_HELDOUT_SHARE = 0.02
DOMAINS = ("code", "prose", "law", "math")
SKIP_STDLIB_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib",
                     "turtledemo", "lib2to3", "__pycache__"}
LICENSE_NAME = re.compile(r"^(licen[cs]e|copying|notice|copyright)", re.IGNORECASE)
PROSE_SUFFIXES = {".rst", ".md", ".txt"}
SHINGLE_WORDS = 8
NEAR_COPY = 0.8  # share of a document's word 8-grams found in one kept document


def _hash_ordered(root: Path, paths: Iterable[Path]) -> list[tuple[str, Path]]:
    rel = [(p.relative_to(root).as_posix(), p) for p in paths]
    return sorted(rel, key=lambda item: (hashlib.sha256(item[0].encode()).digest(), item[0]))


def _read_text(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = path.read_bytes()
        return None if b"\0" in data else data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _mostly_words(text: str) -> bool:
    return len(text) >= 160 and sum(c.isalpha() or c.isspace() for c in text) >= 0.8 * len(text)


def shingles(text: str) -> set[str]:
    """The text's runs of SHINGLE_WORDS whitespace-separated words (the whole text if shorter)."""
    words = text.split()
    return {" ".join(words[i:i + SHINGLE_WORDS])
            for i in range(max(1, len(words) - SHINGLE_WORDS + 1))}


class NearCopies:
    """Remembers kept documents; `is_copy(text)` is True when at least NEAR_COPY of the text's
    word 8-grams occur in one kept document, or of a kept document's in the text (a licence
    with another copyright line, a codec table generated from the same template). Without it
    the hash split holds such copies out while their twins train, and the held-out score
    partly measures memorisation."""

    def __init__(self):
        self._docs_of: dict[str, list[int]] = {}  # 8-gram -> kept documents holding it
        self._sizes: list[int] = []  # 8-grams of each kept document

    def is_copy(self, text: str) -> bool:
        grams = shingles(text)
        hits = Counter(doc for gram in grams for doc in self._docs_of.get(gram, ()))
        if any(n >= NEAR_COPY * min(len(grams), self._sizes[doc]) for doc, n in hits.items()):
            return True
        for gram in grams:
            self._docs_of.setdefault(gram, []).append(len(self._sizes))
        self._sizes.append(len(grams))
        return False


def _pieces(texts: Iterable[str], *, whole: bool = True) -> Iterator[str]:
    """Documents of at most DOC_BYTES from `texts` (all pieces, or only the first when
    `whole` is False); short ones, exact duplicates (up to whitespace) and near copies of a
    document already given dropped."""
    seen, near = set(), NearCopies()
    for text in texts:
        pieces = cut_document(text.strip() + "\n", DOC_BYTES)
        for piece in pieces if whole else pieces[:1]:
            key = hashlib.sha256(" ".join(piece.split()).encode()).digest()
            if key not in seen and len(piece) >= 200:
                seen.add(key)
                if not near.is_copy(piece):
                    yield piece


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def dependency_names(root: str = "moesaic") -> list[str]:
    """The installed distributions `root` requires, followed through their requirements
    (extras left out; a requirement not installed is skipped), `root` itself left out."""
    seen: set[str] = set()
    todo = [canonicalize_name(root)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return sorted(seen - {canonicalize_name(root)})


@functools.cache
def dependency_files() -> tuple[Path, ...]:
    """Every file in site-packages that belongs to one of `dependency_names()`."""
    root = _site_packages().resolve()
    files = set()
    for name in dependency_names():
        dist = importlib.metadata.distribution(name)
        for entry in dist.files or ():
            path = Path(dist.locate_file(entry)).resolve()
            if path.is_relative_to(root) and path.is_file():
                files.add(path)
    return tuple(sorted(files))


def code_texts() -> Iterator[str]:
    root = _stdlib()
    # parts below the root only: where Python is installed must not change the corpus
    files = (p for p in root.rglob("*.py")
             if not SKIP_STDLIB_PARTS & set(p.relative_to(root).parts))
    for _, path in _hash_ordered(root, files):
        text = _read_text(path)
        if text:
            yield text


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = (ast.get_docstring(node, clean=True) for node in ast.walk(tree)
             if isinstance(node, kinds))
    return [inspect.cleandoc(d) for d in found if d and _mostly_words(d)]


def prose_texts() -> Iterator[str]:
    root = _site_packages().resolve()
    files = (p for p in dependency_files() if (p.suffix == ".py" or p.suffix in PROSE_SUFFIXES)
             and ".dist-info" not in p.relative_to(root).as_posix()
             and not LICENSE_NAME.match(p.name))
    for _, path in _hash_ordered(root, files):
        text = _read_text(path)
        if not text:
            continue
        if path.suffix == ".py":
            strings = _docstrings(text)
            if strings:
                yield "\n\n".join(strings)
        elif _mostly_words(text):
            yield text


def law_texts() -> Iterator[str]:
    site = _site_packages().resolve()
    yield from (t for _, p in _hash_ordered(site, (p for p in dependency_files()
                                                    if LICENSE_NAME.match(p.name)))
                if (t := _read_text(p)))
    stdlib_license = _stdlib() / "LICENSE.txt"
    if stdlib_license.is_file() and (t := _read_text(stdlib_license)):
        yield t


NAMES = ("Ada", "Bela", "Chen", "Dara", "Emil", "Farah", "Gus", "Hana", "Ivo", "Jun", "Kofi",
         "Lena", "Mira", "Noor", "Otto", "Priya", "Quinn", "Rosa", "Sami", "Tova")
ITEMS = ("apples", "books", "marbles", "stamps", "coins", "pencils", "shells", "cards")


def _problem(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(8)
    a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 99)
    if kind == 0:
        op = rng.choice("+-*")
        return f"What is {a} {op} {b}?", str(eval(f"{a} {op} {b}"))  # noqa: S307 (digits only)
    if kind == 1:
        return f"Compute {a} * ({b} - {c}).", str(a * (b - c))
    if kind == 2:
        q, r = divmod(a * c + b % c, c)
        return f"Divide {a * c + b % c} by {c}. Give quotient and remainder.", f"{q} r {r}"
    if kind == 3:
        name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
        give = rng.randint(1, a + b)
        return (f"{name} has {a} {item}. {name} buys {b} more and gives {give} to {other}. "
                f"How many {item} does {name} have now?", str(a + b - give))
    if kind == 4:
        v, t = rng.randint(20, 180), rng.randint(1, 12)
        return f"A train travels at {v} km/h for {t} hours. How far does it go?", f"{v * t} km"
    if kind == 5:
        w, h = rng.randint(2, 60), rng.randint(2, 60)
        return (f"A rectangle is {w} m wide and {h} m long. What are its area and perimeter?",
                f"area {w * h} m^2, perimeter {2 * (w + h)} m")
    if kind == 6:
        p, n = rng.choice((5, 10, 15, 20, 25, 40, 50, 75)), rng.randint(1, 90) * 20
        return f"What is {p}% of {n}?", f"{p * n // 100}" + (".5" if p * n % 100 else "")
    x, k = rng.randint(-40, 40), rng.randint(2, 12)
    return f"Solve for x: {k}x + {b} = {k * x + b}.", f"x = {x}"


def math_texts(seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    while True:
        problems = (_problem(rng) for _ in range(rng.randint(8, 24)))
        yield "\n\n".join(f"Problem {i + 1}: {q}\nAnswer: {a}"
                          for i, (q, a) in enumerate(problems))


TEXTS: dict[str, Callable[[], Iterator[str]]] = {
    "code": code_texts, "prose": prose_texts, "law": law_texts, "math": math_texts}


def domain_documents(domain: str, size: str = "default") -> dict[str, list[str]]:
    """{"train": [...], "heldout": [...]} documents of one embedded domain."""
    if size not in SIZES:
        raise ValueError(f"size {size!r}: one of {sorted(SIZES)}")
    want = {"train": SIZES[size] * (1 - HELDOUT_FRACTION),
            "heldout": SIZES[size] * HELDOUT_FRACTION}
    docs: dict[str, list[str]] = {"train": [], "heldout": []}
    have = {"train": 0, "heldout": 0}
    for doc in _pieces(TEXTS[domain](), whole=domain != "code"):
        split = "heldout" if heldout_score(doc) < HELDOUT_FRACTION else "train"
        if have[split] < want[split]:
            docs[split].append(doc)
            have[split] += len(doc.encode("utf-8"))
        if all(have[k] >= want[k] for k in want):
            break
    return docs


def public_documents(domains: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    """A share of every domain's training documents; never a domain's held-out document.
    The held-out band must then leave the domains' train splits (`build_embedded` does)."""
    train, held = [], []
    for name in sorted(domains):
        for doc in domains[name]["train"]:
            score = heldout_score(doc, salt="public")
            if score < PUBLIC_SHARE:
                train.append((score, doc))
            elif score < PUBLIC_SHARE + PUBLIC_HELDOUT_SHARE:
                held.append((score, doc))
    return {"train": [d for _, d in sorted(train)], "heldout": [d for _, d in sorted(held)]}


def build_embedded(out_dir: str | os.PathLike, *, size: str = "default") -> dict[str, dict]:
    """Write code, prose, law, math and public under `out_dir`; return their manifests."""
    domains = {name: domain_documents(name, size)
               for name in tqdm(DOMAINS, desc="embedded corpora: reading", unit="domain")}
    public = public_documents(domains)
    public_heldout = set(public["heldout"])
    sources = {**{name: {"train": [d for d in splits["train"] if d not in public_heldout],
                         "heldout": splits["heldout"]} for name, splits in domains.items()},
               "public": public}
    manifests = {}
    for name, splits in tqdm(sources.items(), desc="embedded corpora: writing",
                             unit="source"):
        origin = {"kind": "embedded", "size": size, "recipe": "moesaic.data.corpora",
                  "heldout_fraction": HELDOUT_FRACTION, "doc_bytes": DOC_BYTES}
        if name == "public":
            origin.update(share=PUBLIC_SHARE, heldout_share=PUBLIC_HELDOUT_SHARE)
        manifests[name] = write_source(
            out_dir, name, {split: (lambda docs=docs: docs) for split, docs in splits.items()},
            tokenizer=BYTES, origin=origin)
    return manifests
