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
    rows = re.findall(r"\| (\d+) / [\d.]+ M \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) \|", table)
    assert [int(r[0]) for r in rows] == [20, 40]
    for budget, cosine, wsd, diff in rows:
        logged = {}
        for name in (f"cosine-{budget}", f"wsd-decay-{budget}"):
            lines = (tmp_path / "work" / name / "log.jsonl").read_text().splitlines()
            logged[name] = [json.loads(x) for x in lines if "eval_loss" in x][-1]
            assert logged[name]["step"] == int(budget)
        assert float(cosine) == round(logged[f"cosine-{budget}"]["eval_loss"], 4)
        assert float(wsd) == round(logged[f"wsd-decay-{budget}"]["eval_loss"], 4)
        assert abs(float(diff) - (float(wsd) - float(cosine))) < 2e-4
    # the decay branches start from the stable run's checkpoints at 90% of each budget
    stable = tmp_path / "work" / "wsd-stable" / "checkpoints"
    assert (stable / "step-000018").is_dir() and (stable / "step-000036").is_dir()
