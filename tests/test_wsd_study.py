"""The WSD-vs-cosine study script runs end to end (its --quick size, on a WikiText excerpt) and
reports the numbers its runs logged."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]


def test_study_runs_and_reports_its_runs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "runs" / "wsd_vs_cosine.py"), "--quick",
                           "--wiki", str(FIXTURES / "training" / "wiki"), "--work", str(tmp_path / "work"),
                           "--docs", str(tmp_path / "docs")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "docs" / "wsd_vs_cosine-quick.md").read_text()
    assert (tmp_path / "docs" / "wsd_vs_cosine-quick.png").stat().st_size > 5000
    rows = re.findall(r"\| (\d+) / [\d.]+ M \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) \| ([+-][\d.]+) \|",
                      table)
    assert [int(r[0]) for r in rows] == [20, 40]

    def last_eval(name: str) -> dict:
        lines = (tmp_path / "work" / name / "log.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if "eval_loss" in x][-1]

    for budget, cosine, wsd10, wsd20, diff10, diff20 in rows:
        for name, shown in ((f"cosine-{budget}", cosine), (f"wsd-decay10-{budget}", wsd10),
                            (f"wsd-decay20-{budget}", wsd20)):
            assert last_eval(name)["step"] == int(budget) and float(shown) == round(last_eval(name)["eval_loss"], 4)
        assert abs(float(diff10) - (float(wsd10) - float(cosine))) < 2e-4
        assert abs(float(diff20) - (float(wsd20) - float(cosine))) < 2e-4
    # the stable run was stopped at each branch point (80% and 90% of each budget) and resumed
    stable = tmp_path / "work" / "wsd-stable" / "checkpoints"
    assert sorted(p.name for p in stable.glob("step-*")) == [f"step-{s:06d}" for s in (16, 18, 32, 36)]
