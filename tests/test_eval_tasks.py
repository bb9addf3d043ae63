"""`minicpm eval tasks` and minicpm.evaluation.evaluate: task files, the readers of the public exam
layouts, shared-context log-likelihood scoring (checked against a plain forward pass per choice),
acc / acc_norm as lm-eval defines them, the text metrics (against hand-computed values), bad
input, and the command end to end. Tiny seeded models only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from minicpm.errors import MiniCPMError
from minicpm.evaluation import evaluate, load_task
from minicpm.evaluation.loglikelihood import encode_pair, encode_question, score_questions
from minicpm.evaluation.task_runner import choice_predictions, mean_and_stderr
from minicpm.evaluation.textmetrics import contains, corpus_bleu, exact_match, rouge_l, tokens
from minicpm.tokenizer import Tokenizer
from tests.conftest import FIXTURES, random_model, save_tiny_checkpoint, variant_config

EXAMS = FIXTURES / "eval_tasks"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(FIXTURES / "tokenizers" / "minicpm-spm")


def tiny(tokenizer, name: str = "2b", seed: int = 1):
    config = variant_config(name, vocab_size=tokenizer.vocab_size, max_position_embeddings=256)
    return random_model(config, seed=seed)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny(tokenizer)


def full_forward_logprob(model, context: list[int], continuation: list[int]) -> float:
    """log P(continuation | context) from one plain forward pass over the whole sequence."""
    whole = context + continuation
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole]))[0].float(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole)))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


MCQ = [{"q": "The cat sat on the", "options": ["mat", "hat and a very long tail", "x"], "answer": 0},
       {"q": "One plus one is", "options": ["two", "three apples"], "answer": "two"},
       {"q": "A long context: the quick brown fox jumps over the lazy dog again and", "options": ["again", "no"],
        "answer": 1}]
MCQ_YAML = 'data: items.jsonl\nprompt: "Question: {{q}}\\nAnswer:"\nchoices: options\ntarget: answer\n'


# --- log-likelihood scoring ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["2b", "llama"])
def test_shared_context_scores_equal_a_full_forward_per_choice(tokenizer, name):
    """One prefill per context, the cache forked per choice, contexts of different lengths
    left-padded in one batch and continuations of different lengths right-padded: each score is
    what a plain forward pass over context + continuation gives."""
    model = tiny(tokenizer, name)
    pairs = [("The cat sat on the ", ["mat", "hat and the dog", "x"]), ("A", [" b", " c d e f g h"]),
             ("Hello world, this is a longer context than the others. ", ["yes", "no"]),
             ("单字", ["是", "不是的"])]
    questions = [encode_question(tokenizer, c, conts, 256) for c, conts in pairs]
    for batch_size in (1, 3):
        scores = score_questions(model, questions, batch_size=batch_size)
        for q, item_scores in zip(questions, scores):
            for cont, score in zip(q.continuations, item_scores):
                assert score.logprob == pytest.approx(full_forward_logprob(model, q.context, cont), abs=1e-4)
    # an int8 KV cache forks the same way (its scales with its codes): close, not equal
    model.kv_cache_dtype = "int8"
    for q, item_scores in zip(questions, score_questions(model, questions, batch_size=3)):
        for cont, score in zip(q.continuations, item_scores):
            assert score.logprob == pytest.approx(full_forward_logprob(model, q.context, cont), rel=0.02)
    model.kv_cache_dtype = "auto"
    # one-token continuations only: scored from the context's logits, no second pass
    one = [encode_question(tokenizer, "Pick one:", [" a", " b"], 256)]
    assert all(len(c) == 1 for c in one[0].continuations)
    [[a, b]] = score_questions(model, one)
    assert a.logprob == pytest.approx(full_forward_logprob(model, one[0].context, one[0].continuations[0]), abs=1e-4)
    # greedy: the argmax token is greedy, any other is not
    with torch.no_grad():
        best = int(model(torch.tensor([one[0].context]))[0, -1].argmax())
    [[top, other]] = score_questions(model, [type(one[0])(one[0].context, [[best], [(best + 1) % 100]])])
    assert top.greedy and not other.greedy


def test_encode_pair_is_lm_evals(tokenizer):
    """Trailing spaces of the context move into the continuation; the continuation's ids are the
    whole text's ids after the context's; an empty context is the BOS token."""
    ctx, cont = encode_pair(tokenizer, "Question: is it?  ", "yes")
    assert ctx == tokenizer.encode("Question: is it?", add_special_tokens=False)
    whole = tokenizer.encode("Question: is it?  yes", add_special_tokens=False)
    assert cont == whole[len(ctx):] and ctx + cont == whole
    ctx, cont = encode_pair(tokenizer, "", "yes")
    assert ctx == [tokenizer.bos_token_id] and cont == tokenizer.encode("yes", add_special_tokens=False)


def test_acc_and_acc_norm_as_lm_eval_defines_them():
    # acc: the highest summed logprob; acc_norm: logprob per character of the choice
    assert choice_predictions([-4.0, -6.0], ["ab", "abcdef"]) == (0, 1)  # -2/char vs -1/char
    assert choice_predictions([-3.0, -3.0, -1.0], ["a", "b", "cccccc"]) == (2, 2)
    assert choice_predictions([-2.0, -2.0], ["aa", "bb"]) == (0, 0)  # ties go to the first
    mean, err = mean_and_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and err == pytest.approx(math.sqrt(0.25 / 4))  # sample std 0.5


def test_multiple_choice_task_end_to_end(tokenizer, model, tmp_path):
    """acc / acc_norm of a task equal those recomputed from independent forward passes, with the
    target given as an index, as a choice's text and through a label map."""
    jsonl(tmp_path / "items.jsonl", MCQ)
    [result] = evaluate(model, tokenizer, [write(tmp_path / "t.yaml", MCQ_YAML)], progress=False)
    assert result.n == 3 and result.kind == "multiple_choice"
    acc, acc_norm = [], []
    for item, sample in zip(MCQ, result.samples):
        context = f"Question: {item['q']}\nAnswer:"
        assert sample["prompt"] == context
        expected = [full_forward_logprob(model, *encode_pair(tokenizer, context, " " + c)) for c in item["options"]]
        assert sample["logprobs"] == pytest.approx(expected, abs=1e-4)
        target = item["answer"] if isinstance(item["answer"], int) else item["options"].index(item["answer"])
        assert sample["target"] == target
        best = max(range(len(expected)), key=lambda i: expected[i])
        best_norm = max(range(len(expected)), key=lambda i: expected[i] / len(item["options"][i]))
        acc.append(float(best == target))
        acc_norm.append(float(best_norm == target))
    assert result.metrics == {"acc": pytest.approx(sum(acc) / 3), "acc_norm": pytest.approx(sum(acc_norm) / 3)}

    mapped = tmp_path / "mapped.yaml"
    jsonl(tmp_path / "labels.jsonl", [{"s": "x y", "label": "no"}, {"s": "z", "label": "-"},
                                      {"s": "w", "label": "yes"}])
    write(mapped, "data: labels.jsonl\nfilter: \"label != '-'\"\nprompt: '{{s}}?'\nchoices: [Yes, No]\n"
                  "target: label\ntarget_map: {yes: 0, no: 1}\n")
    assert [i.target for i in load_task(mapped).items] == [1, 0]


def test_few_shot_context(tokenizer, model, tmp_path):
    jsonl(tmp_path / "items.jsonl", MCQ)
    task = load_task(write(tmp_path / "t.yaml", MCQ_YAML + 'num_fewshot: 1\nfewshot_separator: "\\n---\\n"\n'))
    [result] = evaluate(model, tokenizer, [task], limit=2, seed=7, progress=False)
    assert result.num_fewshot == 1 and result.n == 2
    for sample in result.samples:
        shot, rest = sample["prompt"].split("\n---\n")
        # a shot is another item with its answer after the target delimiter, never the item itself
        assert rest == f"Question: {MCQ[sample['index']]['q']}\nAnswer:"
        assert shot in [f"Question: {m['q']}\nAnswer: {m['options'][i]}" for i, m in
                        [(0, MCQ[0]), (0, MCQ[1]), (1, MCQ[2])] if m is not MCQ[sample["index"]]]
    again = evaluate(model, tokenizer, [task], limit=2, seed=7, progress=False)[0]
    assert [s["prompt"] for s in again.samples] == [s["prompt"] for s in result.samples]
    with pytest.raises(MiniCPMError, match="3 few-shot examples asked for item 0, but only 2"):
        evaluate(model, tokenizer, [task], num_fewshot=3, progress=False)


# --- generation ----------------------------------------------------------------------------------------------
def test_generation_task_stops_and_scores(tokenizer, model, tmp_path):
    from minicpm.generation.sampling import SamplingParams
    from minicpm.generation.text import generate_texts

    jsonl(tmp_path / "gen.jsonl", [{"src": "Translate: hello", "ref": "bonjour"}, {"src": "Sum: 2+2", "ref": "4"}])
    base = "data: gen.jsonl\nprompt: '{{src}} ->'\ntarget: ref\nmax_new_tokens: 12\n"
    [free] = evaluate(model, tokenizer, [write(tmp_path / "g.yaml", base + "metrics: [exact_match, contains, rouge_l, bleu]\n")],
                      progress=False)
    plain = [generate_texts(model, tokenizer, [tokenizer.encode(f"{s} ->", add_special_tokens=False)],
                            SamplingParams(max_new_tokens=12))[0] for s in ("Translate: hello", "Sum: 2+2")]
    assert [s["generation"] for s in free.samples] == plain  # batched = one at a time, greedy
    assert list(free.metrics) == ["exact_match", "contains", "rouge_l", "bleu"]
    assert free.metrics["rouge_l"] == pytest.approx((rouge_l(plain[0], "bonjour") + rouge_l(plain[1], "4")) / 2)
    assert free.metrics["bleu"] == pytest.approx(corpus_bleu(plain, ["bonjour", "4"]))
    assert free.stderr["bleu"] is None
    # a stop string cuts the text where it first appears
    text = plain[0]
    stop = text.strip()[2:4]
    assert len(stop) == 2
    [cut] = evaluate(model, tokenizer, [write(tmp_path / "s.yaml", base + f"stop: [{json.dumps(stop)}]\n")],
                     limit=1, progress=False)
    assert cut.samples[0]["generation"] == text[:text.index(stop)]


def test_chat_generation_task_uses_the_template(tmp_path):
    task = load_task("advertisegen")
    assert task.chat and task.kind == "generate" and len(task.items) == 3 and len(task.fewshot_pool) == 9
    shots = task.fewshot_pool[:2]
    messages = task.messages(task.items[0], shots)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"] == task.items[0].doc["messages"][1]["content"]
    assert messages[2]["content"] == shots[0].doc["messages"][2]["content"]


# --- metrics, against hand-computed values -------------------------------------------------------------------
def test_text_metrics_by_hand():
    assert tokens("Hello, World! 你好，世界 x_1") == ["hello", ",", "world", "!", "你", "好", "，", "世", "界",
                                                   "x", "_", "1"]
    assert exact_match("  Paris \n", "Paris") == 1.0 and exact_match("Paris.", "Paris") == 0.0
    assert contains("It is Paris, France", "Paris") == 1.0 and contains("paris", "Paris") == 0.0
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)  # LCS a c d: P = R = 3/4
    assert rouge_l("我爱北京", "我爱上海") == pytest.approx(0.5)  # characters: LCS 我爱
    assert rouge_l("a b", "a b c d") == pytest.approx(2 * 1 * 0.5 / 1.5)  # P 1, R 1/2
    assert rouge_l("", "a") == 0.0
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    # p1..p4 = 4/5, 3/4, 2/3, 1/2; brevity penalty exp(1 - 6/5)
    expected = 100 * math.exp(1 - 6 / 5) * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert corpus_bleu(["a b c d e"], ["a b c d f g"]) == pytest.approx(expected)
    # "exp" smoothing: 3-grams and 4-grams have no match -> 1/2 and 1/4 matches
    expected = 100 * (3 / 4 * 1 / 3 * (1 / 2) / 2 * (1 / 4) / 1) ** 0.25
    assert corpus_bleu(["a b x c"], ["a b y c"]) == pytest.approx(expected)
    # corpus level: counts add up over samples before the precisions are taken
    # (1-grams 4/4 + 2/3, 2-grams 3/3 + 1/2, 3-grams 2/2 + 0/1, 4-grams 1/1 + none; c = 7, r = 8)
    expected = 100 * math.exp(1 - 8 / 7) * (6 / 7 * 4 / 5 * 2 / 3 * 1 / 1) ** 0.25
    assert corpus_bleu(["a b c d", "我 爱 你"], ["a b c d e", "我爱她"]) == pytest.approx(expected)
    assert corpus_bleu(["a b"], ["a b c d e"]) == 0.0  # no 3-grams at all


# --- readers of the public exam layouts --------------------------------------------------------------------
def test_ceval_reader_folder_and_subject_shots(tmp_path):
    task = load_task(write(tmp_path / "ceval.yaml", f"format: ceval\ndata: {EXAMS}/ceval/val\n"
                                                    f"fewshot_data: {EXAMS}/ceval/dev\nfewshot_match: subject\n"))
    assert [i.doc["subject"] for i in task.items] == ["college physics", "computer network", "computer network"]
    item = task.items[2]
    assert item.doc["B"] == "可靠, 面向连接" and item.target == 1 and item.choices == ["A", "B", "C", "D"]
    assert item.prompt == "下列关于TCP的说法，正确的是____\nA. 面向无连接\nB. 可靠, 面向连接\nC. 不提供流量控制\nD. 只用于广播\n答案："
    import random

    [shot] = task.shots(item, 1, random.Random(0))
    assert shot.doc["question"] == "HTTP默认使用的端口是____"
    context = task.context(item, [shot])
    assert context.startswith("以下是中国关于computer network考试的单项选择题，请选出其中的正确答案。\n\nHTTP默认")
    assert "\n答案： C\n\n下列关于TCP" in context
    with pytest.raises(MiniCPMError, match="1 few-shot examples asked for item 0, but only 0"):
        task.shots(task.items[0], 1, random.Random(0))  # no college physics dev question


def test_cmmlu_and_mmlu_readers(tmp_path):
    cmmlu = load_task(write(tmp_path / "c.yaml", f"format: cmmlu\ndata: {EXAMS}/cmmlu/agronomy.csv\n"))
    assert [(i.doc["question"][:4], i.target) for i in cmmlu.items] == [("在农业生", 1), ("下列作物", 2)]
    assert cmmlu.describe(cmmlu.items[0]) == "以下是关于agronomy的单项选择题，请直接给出正确答案的选项。\n\n"
    mmlu = load_task(write(tmp_path / "m.yaml", f"format: mmlu\ndata: {EXAMS}/mmlu\n"))
    first, second = mmlu.items
    assert first.doc == {"question": "Find the degree for the given field extension Q(sqrt(2), sqrt(3)) over Q.",
                         "A": "0", "B": "4", "C": "2", "D": "6", "answer": "B", "subject": "abstract algebra"}
    assert second.doc["A"] == "True, True" and second.target == 3
    assert mmlu.context(first, []).endswith("over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    with pytest.raises(MiniCPMError, match="expected the header"):
        load_task(write(tmp_path / "bad.yaml", f"format: ceval\ndata: {EXAMS}/cmmlu/agronomy.csv\n"))


def test_builtin_tasks():
    ocnli = load_task("ocnli")
    assert len(ocnli.items) == 2950 and ocnli.items[0].choices == ["对", "可能", "错"]
    labels = {"entailment": 0, "neutral": 1, "contradiction": 2}
    assert all(i.target == labels[i.doc["label"]] for i in ocnli.items)
    assert ocnli.items[0].prompt == "身上裹一件工厂发的棉大衣,手插在袖筒里\n问题：身上至少一件衣服 对、错，还是可能？\n答案："
    cloze = load_task("wikitext_cloze")
    assert len(cloze.items) == 300 and all(len(i.choices) == 4 for i in cloze.items)


def test_wikitext_cloze_script_is_deterministic(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    shipped = root / "minicpm" / "evaluation" / "tasks" / "data" / "wikitext_cloze.jsonl"
    raw = Path("/work/shared/data/wikitext-2-raw/wiki.valid.raw")
    if not raw.is_file():
        pytest.skip("WikiText-2 valid is not at hand")
    subprocess.run([sys.executable, str(root / "scripts" / "make_wikitext_cloze.py"), str(raw), str(tmp_path / "w.jsonl")],
                   check=True, capture_output=True)
    assert (tmp_path / "w.jsonl").read_bytes() == shipped.read_bytes()


# --- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("yaml_text, data, message", [
    (None, None, "no such task file"),
    ("data: [unclosed\n", None, "not valid YAML"),
    ("- a list\n", None, "expected a mapping"),
    (MCQ_YAML + "promt: x\n", MCQ, "unknown key\\(s\\) promt"),
    ("prompt: x\nchoices: [a, b]\ntarget: 0\n", MCQ, "the key 'data' is required"),
    (MCQ_YAML.replace("{{q}}", "{{question}}"), MCQ, "items.jsonl line 1: the prompt names field 'question'"),
    (MCQ_YAML.replace("choices: options", "choices: opts"), MCQ, "line 1: the choices names field 'opts'"),
    (MCQ_YAML, [], "no items in"),
    (MCQ_YAML, [{"q": "x", "options": ["a", "b"], "answer": 5}], "line 1: bad target 5"),
    (MCQ_YAML, [{"q": "x", "options": ["a", "b"], "answer": "c"}], "bad target 'c'"),
    (MCQ_YAML + "target_map: {yes: 0}\n", [{"q": "x", "options": ["a", "b"], "answer": "no"}], "not in target_map"),
    (MCQ_YAML.replace("items.jsonl", "missing.jsonl"), None, "missing.jsonl: no such file"),
    (MCQ_YAML.replace("{{q}}", "{{q"), MCQ, "bad template"),
    ("data: items.jsonl\nprompt: x\ntarget: answer\nmetrics: [bleu, meteor]\n", MCQ, "unknown metric\\(s\\) meteor"),
])
def test_bad_task_files_name_the_problem(tmp_path, yaml_text, data, message):
    if data is not None:
        jsonl(tmp_path / "items.jsonl", data)
    path = tmp_path / "t.yaml"
    if yaml_text is not None:
        write(path, yaml_text)
    with pytest.raises(MiniCPMError, match=message):
        load_task(path)


def test_malformed_data_lines(tmp_path):
    write(tmp_path / "items.jsonl", '{"q": "x", "options": ["a", "b"], "answer": 0}\n{"q": oops}\n')
    with pytest.raises(MiniCPMError, match="items.jsonl line 2: not valid JSON"):
        load_task(write(tmp_path / "t.yaml", MCQ_YAML))
    write(tmp_path / "rows.csv", "q,answer\nx,0,extra\n")
    with pytest.raises(MiniCPMError, match="rows.csv row 2: 3 columns, the header has 2"):
        load_task(write(tmp_path / "c.yaml", "data: rows.csv\nprompt: '{{q}}'\nchoices: [a, b]\ntarget: answer\n"))


# --- the command ---------------------------------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path, capsys):
    from minicpm.cli.main import main

    checkpoint = save_tiny_checkpoint(tmp_path, dtype=torch.float32)
    jsonl(tmp_path / "items.jsonl", MCQ)
    task = write(tmp_path / "mcq.yaml", MCQ_YAML)
    out = tmp_path / "out"
    assert main(["eval", "tasks", str(checkpoint), "--tasks", f"{task},wikitext_cloze", "--limit", "2",
                 "--batch-size", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr", "n"]
    assert [line.split()[:2] for line in lines[2:6]] == [["mcq", "acc"], ["mcq", "acc_norm"],
                                                         ["wikitext_cloze", "acc"], ["wikitext_cloze", "acc_norm"]]
    report = json.loads((out / "results.json").read_text())
    assert report["command"] == "tasks" and report["settings"]["limit"] == 2
    assert set(report["numbers"]) == {"mcq", "wikitext_cloze"} and report["numbers"]["mcq"]["n"] == 2
    assert report["data"]["wikitext_cloze"]["source"] == "built-in:wikitext_cloze"
    assert len(report["data"]["mcq"]["files"][0]["sha256"]) == 64
    samples = [json.loads(line) for line in (out / "samples_mcq.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and set(samples[0]) >= {"prompt", "choices", "logprobs", "prediction", "target"}
    acc = report["numbers"]["mcq"]["metrics"]["acc"]
    assert acc == sum(s["prediction"] == s["target"] for s in samples) / 2
    row = next(line for line in lines if line.startswith("mcq") and " acc " in f"{line} ")
    assert f"{acc:.4f}" in row

    # a bad task file: one error line, before the model is loaded
    assert main(["eval", "tasks", str(checkpoint), "--tasks", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: task") and "nope.yaml" in err[0]
