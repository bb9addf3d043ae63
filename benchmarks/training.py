"""Fine-tuning speed and memory: `minicpm train sft` against Hugging Face `Trainer` (+ `peft`).

The same weights (SmolLM2-135M-Instruct dequantized to float32: ours from an HF folder, the peer
as transformers' LlamaForCausalLM on our llama-format export), the same examples in the same
order (the shipped Chinese SFT demo, tokenized once by us with labels on the replies only; the
peer reads those ids and labels, in our sample order), the same settings: LoRA r 8, alpha 32,
dropout 0.1 on every Linear of the layers, AdamW (lr 5e-5, betas 0.9/0.95, weight decay 0.01)
at a constant rate, clipping at 1, bf16 autocast over fp32 weights, seq 512, batch 8, the same
threads. Each side runs in its own process; reported: tokens/s of the training loop (the real
tokens of the batches, padding not counted, model loading excluded), peak RSS (VmHWM) and the
loss of each step. Ours runs with the micro-batch it chooses from memory ("chosen") and with the
peer's micro-batch of 8. Then full fine-tuning (every weight, AdamW state for all of them) with
activation checkpointing on both sides (ours `train.activation_checkpointing=true`, the peer's
`gradient_checkpointing=True`), micro-batch 8.

    python benchmarks/training.py --steps 20 --threads 2        (also a section of `make bench`)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minicpm.bench.arguments import count  # noqa: E402
from minicpm.bench.machine import machine  # noqa: E402
from minicpm.bench.process import measure_here, run_child  # noqa: E402
from minicpm.bench.report import markdown_table  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "finetune" / "sft_zh_demo.json"
STEPS, BATCH, SEQ = 20, 8, 512
SETTINGS = ["train.method=lora", f"train.batch_size={BATCH}", f"data.seq_len={SEQ}", "schedule.kind=constant",
            "schedule.warmup_steps=0", "optim.lr=5e-5", "optim.weight_decay=0.01", "train.log_every=1",
            "train.precision=bf16", "train.save_every=100000"]


def prepare(workdir: Path, data: Path, steps: int) -> None:
    """The float32 weights in both layouts, and the examples of the first `steps` steps in our
    sample order (ids and labels, as our trainer sees them)."""
    import minicpm
    from minicpm.formats.hf import checkpoint_state_dict, save_pretrained
    from minicpm.formats.llama import to_llama
    from minicpm.training.data import load_chat_dataset
    from minicpm.training.tasks import sample_order

    model, tokenizer = minicpm.load(dtype="float32")
    save_pretrained(model, tokenizer, workdir / "hf", overwrite=True)
    config, state = to_llama(model.config, checkpoint_state_dict(model))
    save_pretrained(None, tokenizer, workdir / "llama", config=config, state_dict=state, overwrite=True)
    examples = load_chat_dataset(data, tokenizer, SEQ, "skip", log=lambda *a: None).examples
    order = sample_order(len(examples), 0, 0, steps * BATCH)
    rows = [{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in order]
    (workdir / "rows.json").write_text(json.dumps(rows))


def real_tokens(workdir: Path) -> int:
    return sum(len(r["input_ids"]) for r in json.loads((workdir / "rows.json").read_text()))


def bench_ours(workdir: Path, which: str, data: str, steps: int) -> dict:
    from minicpm.training.recipe import load_recipe
    from minicpm.training.run import train

    if which == FULL:
        settings = [s for s in SETTINGS if s != "train.method=lora"]
        settings += ["train.method=full", "train.activation_checkpointing=true", f"train.micro_batch_size={BATCH}"]
    else:
        settings = SETTINGS + ([] if which == "chosen" else [f"train.micro_batch_size={which}"])
    recipe = load_recipe("sft", None, [*settings, f"model.path={workdir / 'hf'}", f"data.train={data}",
                                       f"train.steps={steps}", f"out={workdir / ('run-' + which)}"])
    recipe.validate()
    train(recipe, echo=lambda *a, **k: None)
    records = [json.loads(line) for line in (workdir / f"run-{which}" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    seconds = records[-1]["elapsed_s"]
    return {"seconds": seconds, "tokens_per_s": real_tokens(workdir) / seconds, "losses": losses}


def bench_peer(workdir: Path, which: str, data: str, steps: int) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    rows = json.loads((workdir / "rows.json").read_text())
    model = LlamaForCausalLM.from_pretrained(workdir / "llama", dtype=torch.float32)
    if which != FULL:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))

    class InOrder(Trainer):  # our sample order, not a shuffle
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    args = TrainingArguments(output_dir=str(workdir / "peer"), per_device_train_batch_size=BATCH, max_steps=steps,
                             learning_rate=5e-5, lr_scheduler_type="constant", weight_decay=0.01, adam_beta2=0.95,
                             max_grad_norm=1.0, bf16=True, use_cpu=True, logging_steps=1, save_strategy="no",
                             report_to=[], dataloader_num_workers=0, disable_tqdm=True, seed=0,
                             gradient_checkpointing=which == FULL)
    trainer = InOrder(model=model, args=args, train_dataset=rows, data_collator=collate)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"seconds": seconds, "tokens_per_s": real_tokens(workdir) / seconds, "losses": losses}


FULL = "full, checkpointing"  # the full fine-tuning case (micro-batch 8)
ENGINES = {"ours": bench_ours, "Trainer + peft": bench_peer, "Trainer": bench_peer}
# (engine, micro-batch, or FULL); each row's ratio is to the peer row of its kind
CASES = [("ours", "chosen"), ("ours", "8"), ("Trainer + peft", "8"), ("ours", FULL), ("Trainer", FULL)]


def run_training(steps: int = STEPS, threads: int = 2, data: Path = DATA, log=print) -> str:
    """The markdown section of docs/benchmarks.md."""
    import importlib.util

    with tempfile.TemporaryDirectory(prefix="minicpm-bench-train-") as tmp:
        workdir = Path(tmp)
        log("training: preparing weights and data ...")
        prepare(workdir, data, steps)
        rows = []
        for engine, which in CASES:
            if engine == "Trainer + peft" and importlib.util.find_spec("peft") is None:
                rows.append((engine, which, "peft is not installed (`pip install -e .[test]`)"))
                continue
            log(f"training: {engine} {which} ...")
            cmd = [sys.executable, __file__, "--case", engine, which, "--workdir", str(workdir),
                   "--data", str(data), "--steps", str(steps), "--threads", str(threads)]
            rows.append((engine, which, run_child(cmd, threads, timeout=7200, width=160)))
    return training_table(rows, steps, threads)


def training_table(rows: list[tuple[str, str, dict | str]], steps: int, threads: int) -> str:
    peers = {which == FULL: r for e, which, r in rows if e != "ours" and isinstance(r, dict)}

    def cells(which: str, r: dict) -> list[str]:
        peer = peers.get(which == FULL)
        ratios = [f"{r[k] / peer[k]:.2f}x" if peer else "-" for k in ("tokens_per_s", "rss")]
        return [f"{r['tokens_per_s']:.1f}", f"{r['rss']:,.0f}", *ratios,
                ", ".join(f"{x:.3f}" for x in r["losses"][:5])]

    head = [f"## Fine-tuning: SmolLM2-135M-Instruct, seq {SEQ}, batch {BATCH} ({date.today().isoformat()})",
            "", f"Machine: {machine()}; threads: {threads}; {steps} steps of the shipped SFT demo data "
            "(benchmarks/training.py). Tokens/s counts the real tokens of the batches over the training "
            "loop; peak RSS is the process's VmHWM.", ""]
    columns = ["engine", "micro-batch", "tokens/s", "peak RSS MB", "tokens/s vs peer", "peak RSS vs peer",
               "losses (first steps)"]
    return "\n".join(head + markdown_table(columns, 2, rows, cells)) + "\n"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=count(1, "--steps"), default=STEPS)
    parser.add_argument("--threads", type=count(1, "--threads"), default=2)
    parser.add_argument("--data", default=str(DATA), help="SFT data (default: the shipped Chinese demo)")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # a child: ENGINE WHICH
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    args = arguments()
    if not args.case:
        print(run_training(args.steps, args.threads, Path(args.data),
                           log=lambda m: print(m, file=sys.stderr, flush=True)))
        return 0
    runner = ENGINES[args.case[0]]
    print(json.dumps(measure_here(runner, args.threads, Path(args.workdir), args.case[1], args.data, args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
