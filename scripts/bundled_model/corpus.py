"""English prose for speech synthesis, and the train / held-out split shared by training and evaluation.

Sources (all already on the machine, no download): licence texts in /usr/share/common-licenses, README files in
/usr/share/doc, and docstrings of the Python standard library and installed packages. Every source file is a
*document*; a document is held out when a hash of its id falls in the held-out bucket. Sentences are deduplicated
globally and any sentence that occurs in a training document is removed from held-out documents, so no held-out
sentence is ever spoken in training.

Transcripts are normalized for ASR: lowercase words and apostrophes only (the synthesizer reads the original
sentence, whose punctuation gives natural pauses).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELDOUT_PERCENT = 6  # share of documents reserved for evaluation

# Sentences must be plain prose the synthesizers read word for word.
_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z ,;:'\"!?()\-]*[.!?]?$")
_BAD_WORD = re.compile(r"[A-Z][a-z]+[A-Z]|^[a-z]+[A-Z]")  # camelCase / code identifiers
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_ABBREVIATIONS = ("e.g", "i.e", "etc", "vs.", "cf.", "Mr.", "Dr.", "St.", "Inc.", "No.")

PYTHON_PACKAGES = (
    "numpy", "scipy", "torch", "transformers", "matplotlib", "sympy", "networkx", "jinja2", "docutils", "IPython",
    "pandas", "sklearn", "librosa", "hypothesis", "botocore", "boto3", "click", "flask", "jedi", "pygments",
    "setuptools", "pip", "_pytest", "huggingface_hub", "tokenizers", "typer", "rich", "numba", "PIL",
)


@dataclass(frozen=True)
class Document:
    doc_id: str
    sentences: tuple[str, ...]  # original text, as spoken


def normalize_transcript(text: str) -> str:
    """The ASR target form: lowercase words, inner apostrophes kept, everything else a space."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z' ]+", " ", text)
    words = [w.strip("'") for w in text.split()]
    return " ".join(w for w in words if w)


def is_heldout_doc(doc_id: str) -> bool:
    digest = hashlib.sha256(doc_id.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELDOUT_PERCENT


def _clean_sentence(raw: str) -> str | None:
    s = " ".join(raw.replace("``", "").replace("`", "").replace("*", "").split())
    if any(a in s for a in _ABBREVIATIONS):
        return None
    s = s.replace('"', "").replace("(", ", ").replace(")", ",")
    s = re.sub(r"\s+,", ",", s)
    s = re.sub(r",\s*([,.!?;:])", r"\1", s).strip(" ,;:")
    if not _ALLOWED.match(s):
        return None
    words = s.split()
    if not 3 <= len(words) <= 60:
        return None
    if any(_BAD_WORD.search(w) or len(w.strip(".,;:!?'")) > 18 for w in words):
        return None
    if sum(c.isupper() for c in s) > 0.3 * len(words) + 2:  # shouty headers, acronym soup
        return None
    if not normalize_transcript(s):
        return None
    return s


def _split_paragraphs(text: str) -> list[str]:
    """Join wrapped lines into paragraphs; drop code, tables, headings and reST directives."""
    paragraphs, current = [], []
    for line in text.splitlines():
        stripped = line.strip()
        code_like = (
            stripped.startswith((">>>", "...", "..", "$", "#", "|", "+", "=", "-", ":", "[", "{", "}", "<", "*"))
            or line.startswith("        ")
            or stripped.endswith("::")
        )
        if not stripped or code_like:
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(stripped)
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def _sentences(text: str) -> list[str]:
    out = []
    for paragraph in _split_paragraphs(text):
        for raw in _SENTENCE_END.split(paragraph):
            cleaned = _clean_sentence(raw)
            if cleaned:
                out.append(cleaned)
    return out


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
    except (SyntaxError, ValueError, RecursionError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(doc)
    return "\n\n".join(parts)


def _raw_documents() -> list[tuple[str, str]]:
    docs: list[tuple[str, str]] = []
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        for path in sorted(licenses.iterdir()):
            if path.is_file() and not path.is_symlink():
                docs.append((f"license:{path.name}", path.read_text(errors="ignore")))
    share_doc = Path("/usr/share/doc")
    if share_doc.is_dir():
        for path in sorted(share_doc.glob("*/README*")):
            if path.is_file():
                if path.suffix == ".gz":
                    try:
                        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="ignore")
                    except OSError:
                        continue
                else:
                    text = path.read_text(errors="ignore")
                docs.append((f"doc:{path.parent.name}/{path.name}", text))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if rel.startswith(("test/", "idlelib/idle_test", "site-packages/", "lib2to3/tests")):
            continue
        docs.append((f"py:{rel}", _docstrings(path)))
    site = Path(sysconfig.get_paths()["purelib"])
    for package in PYTHON_PACKAGES:
        root = site / package
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(site).as_posix()
            if "/tests/" in rel or "/test/" in rel:
                continue
            docs.append((f"site:{rel}", _docstrings(path)))
    return docs


def build_corpus() -> tuple[list[Document], list[Document]]:
    """(train documents, held-out documents); deterministic for a given set of installed files."""
    train, heldout = [], []
    seen: set[str] = set()
    raw = _raw_documents()
    # Training documents claim their sentences first, so held-out documents only keep unseen sentences.
    ordered = [d for d in raw if not is_heldout_doc(d[0])] + [d for d in raw if is_heldout_doc(d[0])]
    for doc_id, text in ordered:
        kept = []
        for sentence in _sentences(text):
            key = normalize_transcript(sentence)
            if key in seen:
                continue
            seen.add(key)
            kept.append(sentence)
        if kept:
            (heldout if is_heldout_doc(doc_id) else train).append(Document(doc_id, tuple(kept)))
    return train, heldout


if __name__ == "__main__":
    tr, ho = build_corpus()
    for name, docs in (("train", tr), ("heldout", ho)):
        n_sent = sum(len(d.sentences) for d in docs)
        n_words = sum(len(s.split()) for d in docs for s in d.sentences)
        print(f"{name}: {len(docs)} documents, {n_sent} sentences, {n_words} words", file=sys.stderr)
    import random

    rng = random.Random(0)
    for d in rng.sample(tr, 8):
        print(d.doc_id, "|", " ".join(d.sentences[:3])[:300])
