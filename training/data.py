"""Reading training data: text and PDF for domain adaptation, Q/A pairs for SFT.

    text = load_text("book.pdf")                      # cleaned, one string
    pairs = load_pairs("counsel.jsonl", preset="auto") # [Pair(question, answer, group, split)]
    train, val = split_pairs(pairs, val_fraction=0.1)

Errors name the file and, where it helps, the line: DataError("data.csv line 7: empty 'Response'").
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
PAIR_SUFFIXES = (".csv", ".json", ".jsonl")
# preset -> (question column, answer column)
COLUMN_PRESETS = {
    "context_response": ("Context", "Response"),
    "human_zen": ("human", "zen"),
    "questions_answers": ("Questions", "Answers"),
}
MARKERS = re.compile(r"<HUMAN>:\s*(?P<q>.*?)\s*<ASSISTANT>:\s*(?P<a>.*)", re.S)


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line)."""


@dataclass
class Pair:
    question: str
    answer: str
    group: str = ""
    split: str | None = None


# ---------------------------------------------------------------- text and PDF


def clean_text(text: str, page_texts: list[str] | None = None) -> str:
    """Undo typesetting: hyphenation, running headers/footers, page numbers, broken lines."""
    text = unicodedata.normalize("NFKC", text).replace("\u00ad", "")
    if page_texts:
        # lines that repeat on many pages are running headers or footers
        counts = Counter(line.strip() for page in page_texts for line in set(page.splitlines()) if line.strip())
        repeated = {line for line, n in counts.items() if n >= max(3, len(page_texts) // 3) and len(line) <= 80}
        text = "\n".join(line for line in text.splitlines() if line.strip() not in repeated)
    lines = [line for line in text.splitlines() if not re.fullmatch(r"\s*(page\s*)?\d{1,4}\s*", line, re.I)]
    text = "\n".join(lines)
    text = re.sub(r"(\w)-\n(\w)", r"\1\2", text)  # hyphenated line breaks
    text = re.sub(r"[ \t]+", " ", text)
    paragraphs = re.split(r"\n\s*\n", text)
    paragraphs = [re.sub(r"\s*\n\s*", " ", p).strip() for p in paragraphs]
    return "\n\n".join(p for p in paragraphs if p)


def read_pdf(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable PDF ({exc})") from None
    if not any(p.strip() for p in pages):
        raise DataError(f"{path}: the PDF has no extractable text (scanned images need OCR first)")
    # page breaks end paragraphs only when the sentence ended
    return clean_text("\n".join(pages), page_texts=pages)


def load_text(path: str | Path) -> str:
    """One cleaned string from a .pdf, .txt or .md file, or every such file in a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".pdf", *TEXT_SUFFIXES))
        if not files:
            raise DataError(f"{path}: no .pdf, .txt or .md files in this folder")
        return "\n\n".join(load_text(p) for p in files)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() == ".pdf":
        text = read_pdf(path)
    elif path.suffix.lower() in TEXT_SUFFIXES:
        text = clean_text(_read(path))
    else:
        raise DataError(f"{path}: unsupported text file type (use .pdf, .txt or .md)")
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def pack(token_lists: list[list[int]], block: int, eos_id: int) -> list[list[int]]:
    """Concatenate documents (eos between them) and cut into full blocks of `block` tokens."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    return [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]


# ---------------------------------------------------------------- Q/A pairs


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text ({exc.reason}); re-save the file as UTF-8") from None


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every record of a CSV, JSON or JSONL file."""
    text = _read(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines(keepends=True))
        try:
            return [(reader.line_num, row) for row in reader]
        except csv.Error as exc:
            raise DataError(f"{path} line {reader.line_num}: {exc}") from None
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {n}: expected a JSON object")
            rows.append((n, row))
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
        if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a list of objects (or one key holding such a list)")
        return [(i + 1, r) for i, r in enumerate(data)]
    raise DataError(f"{path}: unsupported file type (use .csv, .json or .jsonl)")


def detect_preset(columns: set[str], where: str = "data") -> str:
    for preset, (q, a) in COLUMN_PRESETS.items():
        if q in columns and a in columns:
            return preset
    if "text" in columns:
        return "text_markers"
    raise DataError(
        f"{where}: cannot tell the layout from the columns {sorted(columns)}: set preset, or preset: columns with "
        "question_column and answer_column"
    )


def _hub_files(repo_id: str) -> list[Path]:
    """Download a Hub data set's CSV/JSON/JSONL files (needs a network)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.csv", "*.json", "*.jsonl"]))
    except Exception as exc:  # network, auth or a missing repo: one message
        raise DataError(f"{repo_id}: could not download the Hub data set ({exc})") from None
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PAIR_SUFFIXES)
    if not files:
        raise DataError(f"{repo_id}: the Hub data set has no CSV/JSON/JSONL files")
    return files


def source_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in PAIR_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no .csv, .json or .jsonl files in this folder")
        return files
    if path.suffix.lower() in PAIR_SUFFIXES or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise DataError(f"{source}: file not found")
    return _hub_files(source)


def load_pairs(
    source: str | Path,
    preset: str = "auto",
    question_column: str | None = None,
    answer_column: str | None = None,
    group_column: str | None = None,
    split_column: str | None = None,
) -> list[Pair]:
    """Q/A pairs from a file, folder or Hub data set id, in one of the known layouts."""
    pairs: list[Pair] = []
    for path in source_files(str(source)):
        rows = read_rows(path)
        if not rows:
            raise DataError(f"{path}: no records")
        columns = set(rows[0][1])
        layout = detect_preset(columns, str(path)) if preset == "auto" else preset
        if layout == "columns":
            q_col, a_col = question_column, answer_column
        elif layout in COLUMN_PRESETS:
            q_col, a_col = COLUMN_PRESETS[layout]
        else:
            q_col, a_col = "text", None
        for col in (q_col, a_col, group_column, split_column):
            if col and col not in columns:
                where = "line 1 (header)" if path.suffix.lower() == ".csv" else f"line {rows[0][0]}"
                raise DataError(f"{path} {where}: no column {col!r} (columns: {sorted(columns)})")
        for line, row in rows:
            if a_col is None:
                match = MARKERS.search(str(row.get("text") or ""))
                if not match:
                    raise DataError(f"{path} line {line}: 'text' lacks '<HUMAN>: ... <ASSISTANT>: ...' markers")
                question, answer = match["q"], match["a"]
            else:
                question, answer = row.get(q_col), row.get(a_col)
                for name, value in ((q_col, question), (a_col, answer)):
                    if value is None or not str(value).strip():
                        raise DataError(f"{path} line {line}: empty {name!r}")
            question, answer = str(question).strip(), str(answer).strip()
            group = str(row[group_column]) if group_column else _key(question)
            split = str(row[split_column]).strip().lower() if split_column else None
            pairs.append(Pair(question, answer, group, split))
    return pairs


def _key(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def dedup(pairs: list[Pair]) -> tuple[list[Pair], int]:
    """Drop repeated (question, answer) pairs, ignoring case, punctuation and spacing."""
    seen, out = set(), []
    for p in pairs:
        key = (_key(p.question), _key(p.answer))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out, len(pairs) - len(out)


def _bucket(group: str) -> float:
    return int(hashlib.sha1(group.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_pairs(pairs: list[Pair], val_fraction: float = 0.1, split: str | None = None) -> tuple[list[Pair], list[Pair]]:
    """Train and validation pairs; a group (question) never lands in both.

    With a split column the rows say where they go ('train' vs 'val'/'validation'; 'test' rows are
    left out of both). Otherwise groups are assigned by a stable hash, so the split does not depend
    on row order or on the seed.
    """
    if any(p.split for p in pairs):
        train = [p for p in pairs if p.split == "train"]
        val = [p for p in pairs if p.split in ("val", "valid", "validation", "dev")]
        return train, val
    train = [p for p in pairs if _bucket(p.group) >= val_fraction]
    val = [p for p in pairs if _bucket(p.group) < val_fraction]
    return train, val
