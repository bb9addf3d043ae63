"""Build the built-in `wikitext_cloze` task's data from WikiText-2 (raw) valid, deterministically.

Each item is one sentence of an article paragraph: the context is the sentence before it (same
paragraph) plus the sentence's first half (by words); the true ending is the second half; three
distractor endings are second halves of other sentences of the split with the same number of
words (so length tells nothing), drawn with a seeded generator. The choices are shuffled by the
same generator. WikiText's tokenization is undone lightly (" @-@ " -> "-", " , " -> ", ", ...).

    python scripts/make_wikitext_cloze.py /path/to/wiki.valid.raw \
        minicpm/evaluation/tasks/data/wikitext_cloze.jsonl --items 300 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import defaultdict
from pathlib import Path

_UNDO = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" 's", "'s"), (" n't", "n't"),
         ("( ", "("), (" )", ")"), (" ;", ";"), (" :", ":"), (" ,", ","), (" .", "."), (" !", "!"),
         (" ?", "?")]


def detokenize(text: str) -> str:
    for old, new in _UNDO:
        text = text.replace(old, new)
    return re.sub(r'" (.*?) "', r'"\1"', text).strip()


def sentences_by_paragraph(raw: str) -> list[list[str]]:
    """Article paragraphs (headings and blank lines dropped) as lists of sentences."""
    paragraphs = []
    for line in raw.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        parts = re.split(r"(?<=[.!?]) (?=[A-Z])", detokenize(line))
        paragraphs.append([p for p in parts if p])
    return paragraphs


def build(raw: str, n_items: int, seed: int, min_words: int = 12, max_words: int = 40) -> list[dict]:
    candidates = []  # (previous sentence, first half, second half)
    for paragraph in sentences_by_paragraph(raw):
        for previous, sentence in zip(paragraph, paragraph[1:]):
            words = sentence.split()
            if min_words <= len(words) <= max_words:
                cut = len(words) // 2
                candidates.append((previous, " ".join(words[:cut]), " ".join(words[cut:])))
    endings_by_length = defaultdict(list)
    for _, _, ending in candidates:
        endings_by_length[len(ending.split())].append(ending)
    rng = random.Random(seed)
    order = list(range(len(candidates)))
    rng.shuffle(order)
    items = []
    for index in order:
        previous, start, ending = candidates[index]
        others = [e for e in endings_by_length[len(ending.split())] if e != ending]
        if len(set(others)) < 3:
            continue
        choices = rng.sample(sorted(set(others)), 3) + [ending]
        rng.shuffle(choices)
        items.append({"id": index, "context": f"{previous} {start}", "choices": choices,
                      "label": choices.index(ending)})
        if len(items) == n_items:
            break
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", help="wiki.valid.raw")
    parser.add_argument("out", help="the JSONL to write")
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    items = build(Path(args.raw).read_text(encoding="utf-8"), args.items, args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"wrote {len(items)} items to {args.out}")


if __name__ == "__main__":
    main()
