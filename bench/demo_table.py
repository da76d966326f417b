#!/usr/bin/env python
"""
Change vs base (mean ± SE over pairs) for every arm, seed and set that a demo run folder has scored
so far, and the MSM stages' final training loss: a look inside a run that is still going or was
stopped (demo.py writes its own results.md only at the end). Cells not scored yet print "-".

    python bench/demo_table.py runs/demo runs/demo-long ...
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import demo  # noqa: E402  (the same arm names, set names and paired statistic as the demo)


def rows(folder: Path, name: str):
    path = folder / name / "samples.jsonl"
    return demo.read_rows(path) if path.is_file() else None


def final_loss(run: Path):
    path = run / "metrics.jsonl"
    losses = [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r] if path.is_file() else []
    return f"{losses[-1]:.3f}" if losses else "-"


def table(out: Path) -> str:
    base = {k: rows(out / "eval" / "base", k) for k in demo.SETS}
    lines = [f"## {out}", "", "| arm | seed | " + " | ".join(demo.SETS) + " |", "| --- | --- |" + " --- |" * len(demo.SETS),
             "| base (p(aligned)) | | " + " | ".join(
                 "-" if b is None else f"{sum(r['p_aligned'] for r in b) / len(b):.3f}" for b in base.values()) + " |"]
    for seed_dir in sorted(out.glob("seed*")):
        for arm in demo.ARMS[1:]:
            arm_rows = {k: rows(seed_dir / "eval" / demo.arm_dir(arm), k) for k in demo.SETS}
            cells = ["-" if r is None or base[k] is None else demo.fmt_change(*demo.paired_delta(r, base[k]))
                     for k, r in arm_rows.items()]
            lines.append(f"| {arm} | {seed_dir.name[4:]} | " + " | ".join(c.replace(" (1 seed)", "") for c in cells) + " |")
    losses = ", ".join(f"{d.parent.name}/{d.name} {final_loss(d)}" for d in sorted(out.glob("seed*/msm_*")))
    return "\n".join(lines + ["", f"MSM final training loss: {losses or '-'}", ""])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for folder in sys.argv[1:]:
        print(table(Path(folder)))
