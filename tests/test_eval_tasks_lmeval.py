"""Same numbers as lm-eval: a local JSONL multiple-choice task run by lm-evaluation-harness
(`lm_eval --model local-completions`, the pinned lm-eval[api]==0.4.13) against `minicpm serve`
gives the per-choice log-likelihoods (to 1e-4) and the acc / acc_norm that `minicpm eval tasks`
gives on the same task written as our YAML. The model is SmolLM2 dequantized to float32 (an HF
folder both sides load), so that both sides compute the same float arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

import minicpm
from minicpm.cli.main import main
from minicpm.evaluation import load_task
from minicpm.evaluation.taskfile import BUILTIN
from tests.server_process import start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.peer]
ITEMS = 24


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2") / "smollm2-f32"
    model, tokenizer = minicpm.load(dtype="float32")
    minicpm.save(model, tokenizer, str(path))
    return path


def test_lm_eval_local_completions_gives_our_loglikelihoods(float_model, tmp_path):
    ours = yaml.safe_load((BUILTIN / "ocnli.yaml").read_text(encoding="utf-8"))
    docs = [item.doc for item in load_task("ocnli").items[:ITEMS]]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    # our task file: the built-in one over these items
    task = tmp_path / "ocnli_part.yaml"
    task.write_text(yaml.safe_dump({**ours, "name": "ocnli_part", "data": str(data)}, allow_unicode=True),
                    encoding="utf-8")
    # lm-eval's: the same prompt, choices and gold index, in its own keys
    labels = sorted(ours["target_map"], key=ours["target_map"].get)
    (tmp_path / "lmeval").mkdir()
    (tmp_path / "lmeval" / "ocnli_part.yaml").write_text(yaml.safe_dump({
        "task": "ocnli_part", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": ours["prompt"],
        "doc_to_choice": ours["choices"], "doc_to_target": "{{" + json.dumps(labels) + ".index(label)}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}, allow_unicode=True), encoding="utf-8")

    proc, url = start_server(float_model)
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HOME": str(tmp_path / "hf")}
        cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
               "--model_args", f"model={float_model.name},base_url={url}/v1/completions", "--batch_size", "8",
               "--tasks", "ocnli_part", "--include_path", str(tmp_path / "lmeval"),
               "--output_path", str(tmp_path / "lm-out"), "--log_samples"]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    finally:
        stop_server(proc)
    assert run.returncode == 0, run.stderr[-4000:]
    [results_file] = (tmp_path / "lm-out").rglob("results_*.json")
    [samples_file] = (tmp_path / "lm-out").rglob("samples_ocnli_part_*.jsonl")
    theirs = json.loads(results_file.read_text())["results"]["ocnli_part"]
    their_samples = sorted((json.loads(line) for line in samples_file.read_text(encoding="utf-8").splitlines()),
                           key=lambda s: s["doc_id"])

    assert main(["eval", "tasks", str(float_model), "--tasks", str(task), "--output", str(tmp_path / "ours")]) == 0
    our_samples = [json.loads(line) for line in
                   (tmp_path / "ours" / "samples_ocnli_part.jsonl").read_text(encoding="utf-8").splitlines()]
    report = json.loads((tmp_path / "ours" / "results.json").read_text())["numbers"]["ocnli_part"]

    assert len(their_samples) == len(our_samples) == ITEMS
    for mine, other in zip(our_samples, their_samples):
        assert mine["prompt"] == other["arguments"]["gen_args_0"]["arg_0"]
        assert mine["target"] == int(other["target"])
        their_logprobs = [float(r[0][0]) for r in other["resps"]]
        assert mine["logprobs"] == pytest.approx(their_logprobs, abs=1e-4), other["doc_id"]
        assert (mine["acc"], mine["acc_norm"]) == (other["acc"], other["acc_norm"])
    assert report["metrics"]["acc"] == pytest.approx(theirs["acc,none"])
    assert report["metrics"]["acc_norm"] == pytest.approx(theirs["acc_norm,none"])
    assert report["stderr"]["acc"] == pytest.approx(theirs["acc_stderr,none"])
