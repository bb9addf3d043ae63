"""Metrics of generated text against a reference: exact match, contains, ROUGE-L, BLEU.

Tokens (ROUGE-L and BLEU): the text is lower-cased; every CJK character (Chinese hanzi, Japanese
kana, Korean hangul, and CJK punctuation / full-width forms) is a token of its own, so Chinese is
scored by characters; elsewhere a run of letters and digits is a token, and every other
non-space character (punctuation) is a token by itself. Whitespace separates only.

ROUGE-L: the F-measure (beta = 1) of the longest common subsequence of the token lists,
per sample (0 when either side has no tokens), averaged over samples.

BLEU: corpus BLEU-4 over all samples with one reference each (Papineni et al. 2002): clipped
n-gram precisions summed over the corpus for n = 1..4, their geometric mean, times the brevity
penalty exp(1 - r/c) when the candidates' total length c is below the references' r. Smoothing
as sacrebleu's default ("exp"): the k-th order with no match counts 1/2^k matches instead of 0.
Reported on sacrebleu's 0-100 scale.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_CJK = ("\u1100-\u11ff\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf"
        "\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef")
_CJK_CHAR = re.compile(f"([{_CJK}])")
_TOKEN = re.compile(r"[^\W_]+|[^\w\s]|_")


def tokens(text: str) -> list[str]:
    """The text as metric tokens (see the module's docstring)."""
    return _TOKEN.findall(_CJK_CHAR.sub(r" \1 ", text.lower()))


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def contains(prediction: str, reference: str) -> float:
    return float(reference.strip() in prediction)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = tokens(prediction), tokens(reference)
    common = lcs_length(pred, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _ngrams(toks: list[str], n: int) -> Counter:
    return Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], max_order: int = 4) -> float:
    """Corpus BLEU (0-100) of the predictions against one reference each."""
    matches, totals = [0] * max_order, [0] * max_order
    pred_len = ref_len = 0
    for prediction, reference in zip(predictions, references, strict=True):
        pred, ref = tokens(prediction), tokens(reference)
        pred_len, ref_len = pred_len + len(pred), ref_len + len(ref)
        for n in range(1, max_order + 1):
            pred_ngrams, ref_ngrams = _ngrams(pred, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(count, ref_ngrams[g]) for g, count in pred_ngrams.items())
            totals[n - 1] += max(len(pred) - n + 1, 0)
    if pred_len == 0:
        return 0.0
    log_precisions, unmatched = [], 0
    for match, total in zip(matches, totals):
        if total == 0:
            return 0.0  # candidates shorter than the order: no n-grams to score (sacrebleu: 0)
        if match == 0:
            unmatched += 1
            match = 1 / 2 ** unmatched
        log_precisions.append(math.log(match / total))
    brevity = 1.0 if pred_len >= ref_len else math.exp(1 - ref_len / pred_len)
    return 100 * brevity * math.exp(sum(log_precisions) / max_order)


SAMPLE_METRICS = {"exact_match": exact_match, "contains": contains, "rouge_l": rouge_l}
