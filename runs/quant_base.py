"""Pretrain the small MiniCPM whose weights the quantization report (benchmarks/quantization.py)
measures: real trained bf16 weights that were never quantized, unlike the default model's Q4_1.

With the shipped CLI only:

  1. the training text: WikiText-2's *validation* split (the test split stays unseen: perplexity
     is measured on it) and the English text of the shared Alpaca, DPO and KTO demo sets
     (instructions, inputs, answers; ~3.1 MB in all);
  2. a tokenizer: the default model's (SmolLM2's byte-level BPE: its special tokens, pre-tokenizer
     regexes and chat template) with its merges learnt again from this text at 8,192 tokens instead
     of 49,152, so that the embedding and head, which no method here quantizes to int4, cost a sixth
     of the compute per token and the decoder layers get the training time; llama.cpp reads it from
     our GGUF export as it reads the default one, so both tools score the same tokens;
  3. `minicpm train pretrain`: a MiniCPM with muP (hidden 512, 8 layers, GQA 8/2 heads, FFN 1280,
     tied embedding: 25.2 M parameters, 21.0 M of them in the layers), 512-token windows, WSD
     schedule (the MiniCPM recipe), bf16 autocast, 500 steps of 8 x 512 tokens (2.5 passes over the text); every
     width a multiple of 256, so llama.cpp's k-quants apply to every layer;
  4. the final weights written as bf16 (`minicpm convert --to hf --dtype bfloat16`).

    .venv/bin/python runs/quant_base.py              # ~52 min on 2 cores; prints the output folder
    .venv/bin/python runs/quant_base.py --quick      # a 1-minute check of the pipeline

Finished steps are kept (rerun to continue after an interruption). The recipe the run used is
copied to runs/quant_base/recipe.yaml beside a summary (steps, tokens, time, final loss).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CACHE = Path.home() / ".cache" / "minicpm" / "bench"
VOCAB = 8192  # BPE tokens learnt from the training text (the default tokenizer has 49,152)

MODEL = ("{hidden_size: 512, intermediate_size: 1280, num_hidden_layers: 8, num_attention_heads: 8, "
         "num_key_value_heads: 2, scale_emb: 12, dim_model_base: 64, scale_depth: 1.4, "
         "max_position_embeddings: 512, tie_word_embeddings: true}")
QUICK_MODEL = ("{hidden_size: 256, intermediate_size: 512, num_hidden_layers: 2, num_attention_heads: 4, "
               "num_key_value_heads: 2, scale_emb: 12, dim_model_base: 64, scale_depth: 1.4, "
               "max_position_embeddings: 512, tie_word_embeddings: true}")
FULL = {"model": MODEL, "steps": 500, "warmup": 25, "batch": 8}
QUICK = {"model": QUICK_MODEL, "steps": 4, "warmup": 1, "batch": 2}


def minicpm(*args: str) -> None:
    print("$ minicpm " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "minicpm.cli.main", *args], check=True)


def english_text(shared: Path) -> str:
    """The English prose of the shared Alpaca, DPO and KTO demo sets, one record per paragraph."""
    records = []
    for r in json.loads((shared / "calibration" / "alpaca_data_cleaned.json").read_text(encoding="utf-8")):
        records.append([r["instruction"], r["input"], r["output"]])
    for r in json.loads((shared / "preference" / "dpo_en_demo.json").read_text(encoding="utf-8")):
        records.append([c["value"] for c in r["conversations"]] + [r["chosen"]["value"]])
    for r in json.loads((shared / "preference" / "kto_en_demo.json").read_text(encoding="utf-8")):
        records.append([m["content"] for m in r["messages"]])
    return "".join("\n".join(part for part in parts if part) + "\n\n" for parts in records)


def train_tokenizer(texts: list[Path], out: Path) -> Path:
    """The default model's tokenizer with its BPE merges learnt again, VOCAB tokens, from the training
    text: the same special tokens (ids 0-16), pre-tokenizer regexes, byte-level decoder and chat
    template, so llama.cpp reads it from our GGUF export as it reads the default one."""
    if (out / "tokenizer.json").is_file():
        return out
    from tokenizers import Tokenizer as Engine, pre_tokenizers, trainers

    from minicpm.training.model_setup import load_tokenizer

    # built beside `out` and renamed when done: the default's 49,152-token tokenizer.json written
    # first must never be taken for the finished one by a rerun after an interruption
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    load_tokenizer("default").save_pretrained(tmp)
    engine = Engine.from_file(str(tmp / "tokenizer.json"))
    specials = sorted(json.loads((tmp / "tokenizer.json").read_text())["added_tokens"], key=lambda t: t["id"])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[t["content"] for t in specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    engine.train([str(t) for t in texts], trainer)
    if [engine.token_to_id(t["content"]) for t in specials] != [t["id"] for t in specials]:
        sys.exit("error: the learnt tokenizer moved the default's special tokens; the chat template needs their ids")
    engine.save(str(tmp / "tokenizer.json"))
    tmp.rename(out)
    return out


def prepare(work: Path, shared: Path) -> tuple[Path, str]:
    """The packed training windows and the tokenizer they were cut with."""
    wiki = shared / "wikitext-2-raw" / "wiki.valid.raw"
    if not wiki.is_file():
        sys.exit(f"error: {wiki} is missing; pass --shared with the folder of the shared data sets")
    work.mkdir(parents=True, exist_ok=True)
    english = work / "english.txt"
    if not english.is_file():
        english.write_text(english_text(shared), encoding="utf-8")
    tokenizer = str(train_tokenizer([wiki, english], work / "tokenizer"))
    packed = work / "train"
    if not ((packed / "index.json").is_file() and json.loads((packed / "index.json").read_text()).get("complete")):
        minicpm("pack", str(wiki), str(english), "--tokenizer", tokenizer, "--out", str(packed))
    return packed, tokenizer


def train(work: Path, packed: Path, tokenizer: str, size: dict) -> Path:
    run = work / "run"
    if not (run / "final").is_dir():
        args = [f"model.tokenizer={tokenizer}", f"model.config={size['model']}", f"data.train={packed}",
                "data.seq_len=512", f"train.batch_size={size['batch']}", f"train.micro_batch_size={size['batch']}",
                f"train.steps={size['steps']}", f"train.save_every={max(size['steps'] // 4, 1)}",
                "train.log_every=5", "train.eval_every=1000000", "optim.lr=0.01",
                f"schedule.warmup_steps={size['warmup']}", "schedule.kind=wsd", "schedule.decay_fraction=0.1",
                "schedule.final_ratio=0.01", "seed=0"]
        checkpoints = run / "checkpoints"
        if checkpoints.is_dir() and any(checkpoints.iterdir()):
            minicpm("train", "pretrain", "--resume", "--out", str(run))
        else:
            minicpm("train", "pretrain", *args, "--out", str(run))
    return run


def summary(run: Path, size: dict) -> dict:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in records if "loss" in r and "step" in r][-1]
    return {"steps": last["step"], "tokens": last["step"] * size["batch"] * 512,
            "final_train_loss": round(last["loss"], 4), "training_seconds": round(last["elapsed_s"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 steps: checks the pipeline")
    parser.add_argument("--work", default=None, help=f"working folder (default {CACHE}/quant-base[-quick])")
    parser.add_argument("--shared", default=str(SHARED), help="folder of the shared data sets")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    work = Path(args.work or CACHE / ("quant-base-quick" if args.quick else "quant-base"))
    run = train(work, *prepare(work, Path(args.shared)), size)
    model = work / "model"
    if not (model / "config.json").is_file():
        minicpm("convert", str(run / "final"), str(model), "--to", "hf", "--dtype", "bfloat16", "--force")
    if not args.quick:
        record = ROOT / "runs" / "quant_base"
        record.mkdir(exist_ok=True)
        shutil.copyfile(run / "recipe.yaml", record / "recipe.yaml")
        (record / "summary.json").write_text(json.dumps(summary(run, size), indent=1) + "\n")
    print(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
