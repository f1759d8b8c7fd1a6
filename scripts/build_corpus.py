"""Build the bundled English corpus in data/corpus/ from the Python 3.11 documentation.

Source: the reStructuredText sources of the Python 3.11 documentation as shipped by Debian's
``python3.11-doc`` package (``/usr/share/doc/python3.11/html/_sources``), released under the
PSF License Agreement, which permits redistribution of derived works with the licence notice.

Prose paragraphs are stripped of reST markup and become the English corpus; the literal code
blocks become a separate out-of-distribution set (``code.txt``). Documents (source files) are
shuffled with a fixed seed and split by document, so no paragraph of a test document is seen in
training. Run:  ``apt-get install python3.11-doc && python scripts/build_corpus.py``
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import shutil
from pathlib import Path

SOURCE = Path("/usr/share/doc/python3.11/html/_sources")
LICENSE = Path("/usr/share/doc/python3.11-doc/copyright")
OUT = Path(__file__).resolve().parent.parent / "data" / "corpus"

HEADING = re.compile(r"^([=\-~*^#\"'+`])\1{2,}\s*$")
DIRECTIVE = re.compile(r"^\s*\.\. ")
CODE_DIRECTIVE = re.compile(r"^\s*\.\. (code-block|sourcecode|doctest|testcode|testoutput|productionlist)::")
ROLE = re.compile(r":[\w:+-]+:`(?:~|!)?([^`<]*?)(?:\s*<[^`>]*>)?`")
INLINE = [
    (re.compile(r"``([^`]+)``"), r"\1"),
    (re.compile(r"`([^`<]+?)(?:\s*<[^`>]*>)?`_{1,2}"), r"\1"),
    (re.compile(r"`([^`]+)`"), r"\1"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])"), r"\1"),
    (re.compile(r"\|([\w-]+)\|"), r"\1"),
    (re.compile(r"\s+"), " "),
]


def clean_inline(text: str) -> str:
    text = ROLE.sub(lambda m: m.group(1).split(".")[-1] if "~" in m.group(0) else m.group(1), text)
    for pattern, repl in INLINE:
        text = pattern.sub(repl, text)
    text = re.sub(r"::$", ":", text.strip())
    return text


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def split_blocks(lines: list[str]) -> list[list[str]]:
    blocks, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def parse_document(text: str) -> tuple[list[str], list[str]]:
    """Return (prose paragraphs, code blocks) of one reST document."""
    prose, code = [], []
    expect_code_above: int | None = None  # indentation of the paragraph that announced a literal block
    for block in split_blocks(text.splitlines()):
        ind = indent_of(block[0])
        if expect_code_above is not None and ind > expect_code_above:
            code.append("\n".join(line[ind:] if len(line) >= ind else line.strip() for line in block))
            continue
        expect_code_above = None
        first = block[0].strip()
        if CODE_DIRECTIVE.match(block[0]):
            expect_code_above = ind
            body = [line for line in block[1:] if not line.strip().startswith(":")]
            if body:
                bind = indent_of(body[0])
                code.append("\n".join(line[bind:] for line in body))
            continue
        if DIRECTIVE.match(block[0]) or first.startswith((":", "+", "|", "=")) or HEADING.match(first):
            # directives, field lists, tables, substitutions and headings carry no prose;
            # a directive's indented body follows as its own block and is judged on its own.
            if first.endswith("::") and not DIRECTIVE.match(block[0]):
                expect_code_above = ind
            continue
        if len(block) >= 2 and HEADING.match(block[-1].strip()):
            continue  # a heading: text line(s) then an underline
        if first.startswith((">>>", "$ ", "- ", "* ", "#")) and ind >= 0 and ">>>" in first:
            code.append("\n".join(line[ind:] for line in block))
            continue
        joined = " ".join(line.strip() for line in block)
        if joined.endswith("::"):
            expect_code_above = ind
        paragraph = clean_inline(joined)
        letters = sum(ch.isalpha() or ch == " " for ch in paragraph)
        if len(paragraph) >= 40 and letters >= 0.85 * len(paragraph):
            prose.append(paragraph)
    return prose, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-chars", type=int, default=3_000_000, help="cap on prose characters")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.source.is_dir():
        raise SystemExit(f"--source {args.source} not found: apt-get install python3.11-doc")

    files = sorted(p for p in args.source.rglob("*.rst.txt") if "whatsnew/changelog" not in str(p))
    documents = []
    seen: set[str] = set()
    for path in files:
        prose, code = parse_document(path.read_text(encoding="utf-8"))
        unique = []
        for paragraph in prose:  # de-duplicate paragraphs across the whole corpus
            digest = hashlib.sha1(paragraph.encode()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                unique.append(paragraph)
        if unique:
            documents.append((str(path.relative_to(args.source)), unique, code))

    random.Random(args.seed).shuffle(documents)
    splits = {"train": [], "validation": [], "test": []}
    code_blocks = []
    total = 0
    for index, (name, prose, code) in enumerate(documents):
        if total >= args.max_chars:
            break
        split = "validation" if index % 10 == 1 else "test" if index % 10 == 2 else "train"
        splits[split].append("\n\n".join(prose))
        total += sum(len(p) for p in prose)
        code_blocks.extend(code)

    args.out.mkdir(parents=True, exist_ok=True)
    for split, docs in splits.items():
        (args.out / f"{split}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    random.Random(args.seed).shuffle(code_blocks)
    code_text = "\n\n".join(code_blocks)[:400_000]
    (args.out / "code.txt").write_text(code_text + "\n", encoding="utf-8")
    if LICENSE.exists():
        shutil.copyfile(LICENSE, args.out / "LICENSE-PSF.txt")
    for split in [*splits, "code"]:
        size = (args.out / f"{split}.txt").stat().st_size
        print(f"{split:10s} {size / 1e6:6.2f} MB")


if __name__ == "__main__":
    main()
