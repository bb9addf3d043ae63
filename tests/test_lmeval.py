"""lm-evaluation-harness against a real `minicpm serve` of the default model (SmolLM2), offline and
with no tokenizer arguments: its `local-completions` model (default `tokenizer_backend=auto`) finds
our tokenizer through GET /tokenizer_info, POST /tokenize and POST /detokenize (its remote
tokenizer, `lm_eval.utils.RemoteTokenizer`) and downloads none. The main suite checks those
endpoints' fields over raw HTTP; `make test-peer` (which installs lm-eval) runs lm-eval's own client
and lm-eval end to end on 12 OCNLI dev items (tests/fixtures/lmeval/), each log-likelihood checked
against a forward pass in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import jinja2
import pytest
import torch

import minicpm
from tests.server_process import start_server, stop_server

pytestmark = pytest.mark.slow  # the real default model

MODEL = "SmolLM2-135M-Instruct"
ITEMS = Path(__file__).parent / "fixtures" / "lmeval" / "ocnli_dev_12.jsonl"
CHOICES = ["对", "错", "可能"]  # entailment, contradiction, neutral
TASK_YAML = """\
task: ocnli_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {items}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{sentence1}}}}？{{{{sentence2}}}}\\n答案："
doc_to_choice: {choices}
doc_to_target: "{{{{['entailment', 'contradiction', 'neutral'].index(label)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def server():
    proc, url = start_server(None)  # no model argument: the default model, no API key
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def smol():
    return minicpm.load()


def test_tokenizer_endpoints_give_what_lm_eval_reads(server, smol):
    """The fields lm-eval's remote tokenizer reads (lm_eval/utils.py, RemoteTokenizer): GET
    /tokenizer_info's special tokens, each one token by /tokenize; /tokenize's `tokens` and
    /detokenize's `prompt`, as our tokenizer gives them; bad input is a 400 with OpenAI's body."""
    _, tokenizer = smol
    info = httpx.get(f"{server}/tokenizer_info").json()
    special = (info["eos_token"], info["bos_token"], info["pad_token"])
    assert special == ("<|im_end|>", "<|im_start|>", "<|im_end|>")
    assert info["model_max_length"] == 8192 and info["vocab_size"] == tokenizer.vocab_size == 49152
    tokenize = lambda text: httpx.post(f"{server}/tokenize",  # noqa: E731  (lm-eval's request body)
                                       json={"prompt": text, "add_special_tokens": False}).json()
    # lm-eval takes the EOS id and the prefix (BOS) id as the first token of these texts
    assert tokenize(info["eos_token"])["tokens"] == [tokenizer.eos_token_id] == [2]
    assert tokenize(info["bos_token"])["tokens"] == [tokenizer.bos_token_id] == [1]

    text = "身上裹一件工厂发的棉大衣？ The quick brown fox"
    ids = tokenizer.encode(text, add_special_tokens=False)
    # the fields /tokenize had before stay: count and max_model_len beside tokens
    assert tokenize(text) == {"tokens": ids, "count": len(ids), "max_model_len": 8192}
    for part in (ids, ids[:3]):
        back = httpx.post(f"{server}/detokenize", json={"tokens": part}).json()
        assert back == {"prompt": tokenizer.decode(part)}
    # the template a client renders itself is the one /v1/chat/completions applies
    messages = [{"role": "user", "content": "hi"}]
    rendered = jinja2.Environment().from_string(info["chat_template"]).render(messages=messages,
                                                                            add_generation_prompt=True)
    assert rendered == tokenizer.apply_chat_template(messages)

    for bad in ({"tokens": [49152]}, {"tokens": [-1]}, {"tokens": ["x"]}, {}):
        r = httpx.post(f"{server}/detokenize", json=bad)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, bad
    r = httpx.post(f"{server}/tokenize", json={"add_special_tokens": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


@pytest.mark.peer  # needs lm-eval, which `make test-peer` installs
def test_lm_eval_remote_tokenizer_client(server, smol):
    """lm-eval's own client for the server's tokenizer agrees with ours."""
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    _, tokenizer = smol
    base_url = f"{server}/v1/completions"
    assert check_remote_tokenizer_support(base_url)
    remote = RemoteTokenizer(base_url)
    assert (remote.eos_token_id, remote.bos_token_id) == (tokenizer.eos_token_id, tokenizer.bos_token_id)
    text = "身上裹一件工厂发的棉大衣？ The quick brown fox"
    ids = remote.encode(text)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert remote.batch_decode([ids, ids[:3]]) == [tokenizer.decode(ids), tokenizer.decode(ids[:3])]
    messages = [{"role": "user", "content": "hi"}]
    assert remote.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context) by a plain forward pass, tokenized as lm-eval tokenizes a
    pair for a causal model (the whole text, split where the context's tokens end)."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n_context = len(tokenizer.encode(context, add_special_tokens=False))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole]))[0].float(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


@pytest.mark.peer  # needs lm-eval; minutes on 2 busy cores (36 scoring requests)
def test_lm_eval_local_completions_needs_no_tokenizer_arguments(server, smol, tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "ocnli_tiny.yaml").write_text(
        TASK_YAML.format(items=ITEMS, choices=json.dumps(CHOICES, ensure_ascii=False)), encoding="utf-8")
    # offline, with an empty hub cache: a tokenizer could only come from the server
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
           "--model_args", f"model={MODEL},base_url={server}/v1/completions",
           "--tasks", "ocnli_tiny", "--include_path", str(tmp_path / "tasks"),
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Using remote tokenizer" in run.stderr

    [results_file] = (tmp_path / "out").rglob("results_*.json")
    [samples_file] = (tmp_path / "out").rglob("samples_ocnli_tiny_*.jsonl")
    result = json.loads(results_file.read_text())["results"]["ocnli_tiny"]
    samples = [json.loads(line) for line in samples_file.read_text(encoding="utf-8").splitlines()]
    assert result["sample_len"] == len(samples) == 12

    model, tokenizer = smol
    for sample in samples:
        args = [sample["arguments"][f"gen_args_{i}"] for i in range(len(CHOICES))]
        got = [float(resp[0][0]) for resp in sample["resps"]]
        expected = [continuation_logprob(model, tokenizer, a["arg_0"], a["arg_1"]) for a in args]
        assert got == pytest.approx(expected, abs=1e-3), sample["doc_id"]
        best = max(range(len(CHOICES)), key=lambda i: expected[i])
        assert sample["acc"] == float(best == int(sample["target"]))
    assert result["acc,none"] == pytest.approx(sum(s["acc"] for s in samples) / 12)
