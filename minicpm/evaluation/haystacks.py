"""The prompts of the long-context sweep (`minicpm eval longctx`), generated from a seed and
sized in the model's own tokens: InfiniteBench's synthetic tasks (passkey, number_string,
kv_retrieval) and a needle-in-a-haystack sweep (niah); and InfiniteBench's scoring of answers.

Every prompt is a haystack of whole filler units with one needle in it:

- passkey / number_string: InfiniteBench's noise line ("The grass is green. ...") repeated, the
  needle line ("The pass key is 12345. Remember it. 12345 is the pass key.") after the first
  round(depth * units) lines; keys drawn as InfiniteBench draws them (5 random digits; for
  number_string 5 digits, then 5 times a copy of a random digit inserted next to it).
- kv_retrieval: a JSON object of random UUID keys and values (`JSON data:\\n{"k": "v", ...}`),
  the asked-for pair at index round(depth * (pairs - 1)).
- niah: sentences of WikiText-2 (the first NIAH_LINES non-blank lines of the validation split that
  `minicpm eval ppl` ships, data/wiki.valid.raw, CC BY-SA) from a seeded start, the
  San Francisco needle sentence after the first round(depth * units) sentences.

Sizing: a cell of length L holds the prompt and the answer, so the prompt (template and special
tokens included) gets the most filler units whose token count stays within L - max_new_tokens,
counted with the model's tokenizer. Lengths above the model's context are refused; a prompt that
still does not fit the context is cut in the middle, as InfiniteBench cuts its 128k inputs.

Templates: "completion" (the default) is InfiniteBench's completion style: the prompt ends "The
pass key is", so base and chat models alike answer with the key first. "chat" is InfiniteBench's
chat-model text wrapped in the tokenizer's chat template; a chat model that restates the
question ("The pass key is 5...") then runs out of InfiniteBench's 6-token budget before the
key is complete (SmolLM2 spells numbers one digit per token), so raise `max_new_tokens` with it.

Scoring is InfiniteBench's: passkey and number_string are right when the first run of digits
in the answer equals the key; kv_retrieval when the value is one of the answer's words after
\\n : " ' . , ? ! { } become spaces. niah is right when the answer holds all of the words
"sandwich", "Dolores" and "Park" (case-insensitive, whole words).
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from minicpm.errors import MiniCPMError

TASKS = ("passkey", "number_string", "kv_retrieval", "niah")
TEMPLATES = ("completion", "chat")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# InfiniteBench's answer budgets (src/eval_utils.py); niah's holds a one-sentence answer
MAX_NEW_TOKENS = {"passkey": 6, "number_string": 12, "kv_retrieval": 50, "niah": 48}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLES = {"passkey": "The pass key is {key}. Remember it. {key} is the pass key.\n",
           "number_string": "The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n"}
QUESTIONS = {"passkey": "What is the pass key?", "number_string": "What is the sequence of digits?",
             "kv_retrieval": '\nKey: "{key}"\nThe value associated with the specified key is: ',
             "niah": "What is the best thing to do in San Francisco?"}
NIAH_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NIAH_KEY_WORDS = ("sandwich", "dolores", "park")
NIAH_HAYSTACK = Path(__file__).with_name("data") / "wiki.valid.raw"
NIAH_LINES = 236  # non-blank lines of it: its first five articles (~24k tokens; longer haystacks wrap around)

_FIND = "There is an important info hidden inside a lot of irrelevant text. "
_KV = "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}"
# InfiniteBench src/prompt.py: yarn_mistral_templates (completion) and gpt4_templates (chat)
PROMPTS = {
    ("passkey", "completion"): _FIND + "Find it and memorize it. I will quiz you about the important "
                                       "information.\n\n{context}\n\n{input}\n\nThe pass key is",
    ("passkey", "chat"): _FIND + "Find it and memorize them. I will quiz you about the important "
                                 "information there.\n\n{context}\n\n{input}",
    ("number_string", "completion"): _FIND + "Find it. I will quiz you about the important information "
                                             "there.\n\n{context}\n\n{input}\n\nThe sequence of digits is",
    ("number_string", "chat"): _FIND + "Find it. I will quiz you about the important information "
                                       "there.\n\n{context}\n\n{input}",
    ("kv_retrieval", "completion"): _KV,
    ("kv_retrieval", "chat"): _KV,
    # gkamradt's needle-in-a-haystack question; completion style primes the answer like passkey's
    ("niah", "completion"): "{context}\n\nQuestion: {input}\nAnswer: The best thing to do in San Francisco is",
    ("niah", "chat"): "{context}\n\n{input} Don't give information outside the document or repeat your findings.",
}


# ---- scoring ------------------------------------------------------------------------------------

def first_int(prediction: str) -> str:
    """The first run of digits in the text ("" if none), InfiniteBench's first_int_match."""
    return next((piece for piece in re.split("[^0-9]", prediction) if piece), "")


def kv_words(prediction: str) -> list[str]:
    for c in ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"):
        prediction = prediction.replace(c, " ")
    return prediction.split()


def is_correct(task: str, prediction: str, answer: str) -> bool:
    if task in ("passkey", "number_string"):
        return first_int(prediction) == answer
    if task == "kv_retrieval":
        return answer in kv_words(prediction)
    words = set(re.findall(r"[a-z]+", prediction.lower()))
    return all(word in words for word in NIAH_KEY_WORDS)


# ---- haystacks ----------------------------------------------------------------------------------

@dataclass
class Filled:
    """A haystack rendered with `units` filler units around its needle."""

    context: str
    question: str
    answer: str
    needle: str


def needle_index(units: int, depth: float) -> int:
    """How many filler units come before the needle."""
    return round(depth * units)


class NoiseHaystack:
    """passkey / number_string: noise lines with the key's needle line among them."""

    def __init__(self, task: str, key: str):
        self.key, self.needle = key, NEEDLES[task].format(key=key)
        self.question = QUESTIONS[task]

    def render(self, units: int, depth: float) -> Filled:
        j = needle_index(units, depth)
        return Filled(NOISE * j + self.needle + NOISE * (units - j), self.question, self.key, self.needle)


class KVHaystack:
    """kv_retrieval: `units + 1` random UUID pairs; the asked-for one sits at the depth."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.pairs: list[tuple[str, str]] = []

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def render(self, units: int, depth: float) -> Filled:
        while len(self.pairs) < units + 1:  # the same seed always gives the same pair sequence
            self.pairs.append((self._uuid(), self._uuid()))
        pairs = self.pairs[:units + 1]
        key, value = pairs[needle_index(units, depth)]
        body = ", ".join(f'"{k}": "{v}"' for k, v in pairs)
        return Filled("JSON data:\n{" + body + "}", QUESTIONS["kv_retrieval"].format(key=key), value,
                      f'"{key}": "{value}"')


class SentenceHaystack:
    """niah: consecutive sentences of the shipped WikiText slice (wrapping around at its end)."""

    def __init__(self, sentences: Sequence[str], start: int):
        self.sentences, self.start = sentences, start

    def render(self, units: int, depth: float) -> Filled:
        n = len(self.sentences)
        chosen = [self.sentences[(self.start + i) % n] for i in range(units)]
        j = needle_index(units, depth)
        needle = NIAH_NEEDLE + " "
        return Filled("".join(chosen[:j]) + needle + "".join(chosen[j:]), QUESTIONS["niah"],
                      " ".join(NIAH_KEY_WORDS), needle)


_SENTENCES: list[str] | None = None


def niah_sentences() -> list[str]:
    """The haystack's sentences, each with its trailing space (newline at a paragraph's end);
    headings and blank lines are left out."""
    global _SENTENCES
    if _SENTENCES is None:
        out = []
        lines = [line.strip() for line in NIAH_HAYSTACK.read_text(encoding="utf-8").splitlines()]
        for line in [line for line in lines if line][:NIAH_LINES]:
            if line.startswith("="):
                continue
            parts = re.split(r"(?<= \.) ", line)
            out += [p + " " for p in parts[:-1]] + [parts[-1] + "\n"]
        _SENTENCES = out
    return _SENTENCES


def make_haystack(task: str, rng: random.Random):
    if task == "passkey":
        return NoiseHaystack(task, "".join(str(rng.randint(0, 9)) for _ in range(5)))
    if task == "number_string":
        digits = [str(rng.randint(0, 9)) for _ in range(5)]
        for k in range(5):  # InfiniteBench: a copy of a random digit goes in next to it
            pos = rng.randint(0, 5 + k - 1)
            digits.insert(pos, digits[pos])
        return NoiseHaystack(task, "".join(digits))
    if task == "kv_retrieval":
        return KVHaystack(rng)
    sentences = niah_sentences()
    return SentenceHaystack(sentences, rng.randrange(len(sentences)))


# ---- prompts ------------------------------------------------------------------------------------

@dataclass
class Prompt:
    """One generated prompt, ready to run."""

    task: str
    length: int
    depth: float
    sample: int
    units: int          # filler units (noise lines, extra JSON pairs, sentences)
    answer: str
    question: str
    needle: str
    context: str
    text: str           # the prompt before the chat template (if any)
    ids: list[int]


def encode_prompt(tokenizer, text: str, template: str) -> list[int]:
    if template == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return [bos] + ids if getattr(tokenizer, "add_bos_token", False) and bos is not None else ids


def sample_rng(seed: int, task: str, length: int, depth: float, sample: int) -> random.Random:
    # a string seed is hashed with SHA-512: the same on every run and machine
    return random.Random(f"{seed}/{task}/{length}/{float(depth)!r}/{sample}")  # depth 1 and 1.0 alike


def fit_units(count: Callable[[int], int], budget: int) -> int:
    """The most filler units whose prompt has at most `budget` tokens (`count(units)` grows
    with units). Estimates from a few units, then brackets and bisects."""
    base = count(0)
    if base > budget:
        raise MiniCPMError(f"the prompt needs {base} tokens even without filler; "
                           f"a length of at least {base} plus the answer is needed")
    per_unit = max(1.0, (count(8) - base) / 8)
    guess = int((budget - base) / per_unit)
    lo, hi = max(0, int(guess * 0.95) - 1), guess + int(guess * 0.05) + 2
    if count(lo) > budget:
        lo = 0
    while count(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # count(lo) fits, count(hi) does not
        mid = (lo + hi) // 2
        if count(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def build_prompt(tokenizer, task: str, length: int, depth: float, sample: int = 0, seed: int = 0,
                 template: str = "completion", max_new_tokens: int | None = None) -> Prompt:
    """The prompt of one cell sample: its filler sized so the prompt has at most
    length - max_new_tokens tokens (default MAX_NEW_TOKENS[task]) and one more unit would not fit."""
    check_task(task)
    check_template(template)
    haystack = make_haystack(task, sample_rng(seed, task, length, depth, sample))
    pattern = PROMPTS[task, template]

    def text_of(units: int) -> tuple[Filled, str]:
        filled = haystack.render(units, depth)
        return filled, pattern.format(context=filled.context, input=filled.question)

    def count(units: int) -> int:
        return len(encode_prompt(tokenizer, text_of(units)[1], template))

    try:
        units = fit_units(count, length - (max_new_tokens or MAX_NEW_TOKENS[task]))
    except MiniCPMError as e:
        raise MiniCPMError(f"length {length} is too short for {task}: {e}") from None
    filled, text = text_of(units)
    return Prompt(task, length, depth, sample, units, filled.answer, filled.question, filled.needle,
                  filled.context, text, encode_prompt(tokenizer, text, template))


def truncate_middle(ids: list[int], limit: int) -> list[int]:
    """InfiniteBench's cut for inputs over the window: keep the first and last limit/2 tokens."""
    if len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head):]


# ---- options

def check_task(task: str) -> None:
    if task not in TASKS:
        raise MiniCPMError(f"unknown long-context task {task!r}; choose one of {', '.join(TASKS)}")


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise MiniCPMError(f"unknown prompt template {template!r}; choose completion or chat")
