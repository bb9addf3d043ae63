"""Does one WSD run with decay branches match or beat separate cosine runs at each token budget?

The MiniCPM paper's claim, at small scale on a CPU, with the shipped CLI only:

  1. train a 4096-token BPE tokenizer, pack WikiText-2 (training text: the test split and the
     first 4/5 of the validation split's lines; held out for evaluation: the last fifth, 752 lines);
  2. cosine runs for budgets B1 and B2 (each its own run from scratch);
  3. one WSD run at constant lr (stable phase), stopped and resumed (`train.stop_at`, `--resume`)
     so that it is checkpointed at 0.8 and 0.9 of each budget, and from each checkpoint a decay
     branch (`schedule.decay_from`) over the last 20% or 10% of that budget;
  4. a table (docs/wsd_vs_cosine.md) and a plot (docs/wsd_vs_cosine.png) of held-out loss.

Every run uses the same model (a MiniCPM with muP, ~3.8 M parameters), data order, peak lr,
warmup and final lr. One command repeats everything (about 20 minutes on 2 cores):

    .venv/bin/python runs/wsd_vs_cosine.py            # --quick: a 2-minute check of the pipeline
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw"
HELD_OUT_FRACTION = 5  # the last fifth of the validation split's lines is held out

FULL = {"budgets": (400, 800), "hidden_size": 256, "intermediate_size": 640, "eval_every": 40,
        "eval_batches": 24, "warmup": 40}
FRACTIONS = (0.1, 0.2)  # decay lengths of the WSD branches, as fractions of each budget
QUICK = {"budgets": (20, 40), "hidden_size": 64, "intermediate_size": 160, "eval_every": 10,
         "eval_batches": 2, "warmup": 4}


def minicpm(*args: str) -> None:
    command = [sys.executable, "-m", "minicpm.cli.main", *args]
    print("$ minicpm " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def prepare(work: Path, wiki: Path) -> None:
    """Tokenizer and packed shards (kept between runs of this script)."""
    if (work / "heldout" / "index.json").is_file():
        return
    for name in ("wiki.test.raw", "wiki.valid.raw"):
        if not (wiki / name).is_file():
            sys.exit(f"error: {wiki / name} is missing; pass --wiki with the folder of WikiText-2 (raw)")
    work.mkdir(parents=True, exist_ok=True)
    valid = (wiki / "wiki.valid.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    held = len(valid) // HELD_OUT_FRACTION
    (work / "valid_train.txt").write_text("".join(valid[:-held]), encoding="utf-8")
    (work / "heldout.txt").write_text("".join(valid[-held:]), encoding="utf-8")
    train_files = [str(wiki / "wiki.test.raw"), str(work / "valid_train.txt")]
    minicpm("train", "tokenizer", *train_files, "--vocab-size", "4096", "--out", str(work / "tokenizer"), "--force")
    minicpm("pack", *train_files, "--tokenizer", str(work / "tokenizer"), "--out", str(work / "train"))
    minicpm("pack", str(work / "heldout.txt"), "--tokenizer", str(work / "tokenizer"), "--out", str(work / "heldout"))


def common(work: Path, size: dict) -> list[str]:
    model = (f"{{hidden_size: {size['hidden_size']}, intermediate_size: {size['intermediate_size']}, "
             "num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2, scale_emb: 12, "
             "dim_model_base: 64, scale_depth: 1.4, max_position_embeddings: 128}")
    return [f"model.tokenizer={work / 'tokenizer'}", f"model.config={model}", f"data.train={work / 'train'}",
            f"data.valid={work / 'heldout'}", "data.seq_len=128", "train.batch_size=16", "train.micro_batch_size=16",
            "train.log_every=10", f"train.eval_every={size['eval_every']}", f"train.eval_batches={size['eval_batches']}",
            "optim.lr=0.01", f"schedule.warmup_steps={size['warmup']}", "schedule.final_ratio=0.01", "seed=0"]


def run(out: Path, args: list[str]) -> None:
    if (out / "final").is_dir():
        print(f"(kept: {out})")
        return
    if out.exists():
        import shutil

        shutil.rmtree(out)
    minicpm("train", "pretrain", *args, "--out", str(out))


def final_eval(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_loss" in r][-1]["eval_loss"]


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and budgets: checks the pipeline")
    parser.add_argument("--work", default=None, help="working directory (default runs/work[-quick])")
    parser.add_argument("--wiki", default=str(WIKI), help="folder with wiki.test.raw and wiki.valid.raw")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="where the table and plot go")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    work = Path(args.work or ROOT / "runs" / ("work-quick" if args.quick else "work"))
    started = time.time()
    prepare(work, Path(args.wiki))
    base = common(work, size)
    budgets = size["budgets"]
    for budget in budgets:
        run(work / f"cosine-{budget}", base + ["schedule.kind=cosine", f"train.steps={budget}",
                                              f"train.save_every={budget}"])
    # branch points: each budget's last 10% (and 20%) decays; the stable run is checkpointed there
    branches = {(budget, fraction): round((1 - fraction) * budget) for budget in budgets for fraction in FRACTIONS}
    stable = stable_phase(work / "wsd-stable", base, sorted(set(branches.values())))
    for (budget, fraction), point in branches.items():
        run(work / branch_name(budget, fraction),
            base + ["schedule.kind=wsd", f"schedule.decay_from={stable / f'step-{point:06d}'}",
                    f"train.steps={budget}", f"train.save_every={budget}", "schedule.decay_shape=exp"])
    rows = [(budget, final_eval(work / f"cosine-{budget}"),
             [final_eval(work / branch_name(budget, f)) for f in FRACTIONS]) for budget in budgets]
    write_report(Path(args.docs), work, rows, size, time.time() - started, quick=args.quick)
    return 0


def branch_name(budget: int, fraction: float) -> str:
    return f"wsd-decay{round(fraction * 100)}-{budget}"


def stable_phase(run_dir: Path, base: list[str], points: list[int]) -> Path:
    """One constant-lr run to the last branch point, stopped at each branch point with
    train.stop_at (a checkpoint exactly there) and continued with --resume."""
    checkpoints = run_dir / "checkpoints"
    for i, point in enumerate(points):
        if (checkpoints / f"step-{point:06d}").is_dir():
            continue
        if i == 0 or not checkpoints.is_dir():
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            minicpm("train", "pretrain", *base, "schedule.kind=wsd", "schedule.decay_fraction=0",
                    f"train.steps={points[-1]}", f"train.save_every={points[-1]}", "train.keep_checkpoints=0",
                    f"train.stop_at={point}", "--out", str(run_dir))
        else:
            minicpm("train", "pretrain", "--resume", f"train.stop_at={point}", "--out", str(run_dir))
    return checkpoints


def write_report(docs: Path, work: Path, rows, size: dict, seconds: float, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suffix = "-quick" if quick else ""
    tokens_per_step = 16 * 128
    budgets = [budget for budget, _, _ in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    curves = [(f"cosine-{b}", "--") for b in budgets] + [("wsd-stable", "-")]
    curves += [(branch_name(b, f), "-" if f == FRACTIONS[0] else ":") for b in budgets for f in FRACTIONS]
    for name, style in curves:
        curve = eval_curve(work / name)
        if name.startswith("wsd-decay"):  # a branch continues the stable run from its checkpoint
            curve = [p for p in eval_curve(work / "wsd-stable") if p[0] <= _branch_start(work / name)] + curve
        ax.plot([s * tokens_per_step / 1e6 for s, _ in curve], [v for _, v in curve], style, label=name, lw=1.2)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("held-out loss (WikiText-2)")
    ax.set_title("WSD with decay branches vs cosine per budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    docs.mkdir(parents=True, exist_ok=True)
    fig.savefig(docs / f"wsd_vs_cosine{suffix}.png", dpi=110)
    lines = [f"# WSD vs cosine at small scale{' (quick check)' if quick else ''}", "",
             "Produced by `.venv/bin/python runs/wsd_vs_cosine.py" + (" --quick" if quick else "") + "` "
             f"(this invocation: {seconds / 60:.0f} min on 2 cores; runs already finished are kept, all of them "
             "from nothing take about 25 min). Model: MiniCPM with muP (hidden {size['hidden_size']}, "
             "4 layers, GQA 4/2 heads, scale_emb 12, scale_depth 1.4, dim_model_base 64), 4096-token BPE "
             "tokenizer, batch 16 x 128 tokens, AdamW, peak lr 0.01 (hidden matrices at lr / (d / 64)), "
             f"warmup {size['warmup']} steps, final lr 1% of peak for every schedule. WSD decays exponentially "
             "over the last 10% (or 20%) of each budget, branching off one constant-lr run. Held-out loss: "
             f"{size['eval_batches']} batches of the held-out text at the end of each run.", "",
             "| budget (steps / tokens) | cosine | WSD, 10% decay | WSD, 20% decay | WSD 10% - cosine | WSD 20% - cosine |",
             "|---|---|---|---|---|---|"]
    for budget, cosine, wsd in rows:
        lines.append(f"| {budget} / {budget * tokens_per_step / 1e6:.2f} M | {cosine:.4f} | "
                     + " | ".join(f"{w:.4f}" for w in wsd) + " | "
                     + " | ".join(f"{w - cosine:+.4f}" for w in wsd) + " |")
    lines += ["", f"![held-out loss against tokens](wsd_vs_cosine{suffix}.png)", ""]
    (docs / f"wsd_vs_cosine{suffix}.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


def _branch_start(run_dir: Path) -> int:
    recipe = (run_dir / "recipe.yaml").read_text()
    for line in recipe.splitlines():
        if "decay_from:" in line:
            return int(line.rsplit("step-", 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
