#!/usr/bin/env python
"""
report.py: evaluation runs side by side, the last step of the pipeline.

Reads the summary.json that evaluate.py writes in each run folder (its "headlines": one figure per
eval and metric), groups the runs into arms by label (runs with the same label are seeds of one
arm), and writes OUT/report.md (mean ± SEM over seeds per arm and figure), OUT/report.png (a bar
chart) and OUT/report.json. With --paper it shows the paper's published numbers (data/paper.json)
beside arms whose labels name them.

  python evaluate.py report runs/eval/aff_* runs/eval/am_* --out runs/report --paper cheese
  python report.py runs/eval/aff_* runs/eval/am_* --out runs/report --paper cheese   (the same)

mean_se (mean and standard error of the mean) lives here and evaluate.py's values summary uses it.
"""
import argparse
import json
import math
import re
from collections import defaultdict
from pathlib import Path

from common import die
from midtrain import atomic_write

ROOT = Path(__file__).resolve().parent


# The paper's published means over seeds (../shared/method.md, "Published numbers"), keyed by arm
# label. Labels of your runs that normalise to one of these keys get the paper's number beside them.
PAPER = {k: v for k, v in json.loads((ROOT / "data" / "paper.json").read_text()).items() if k != "_note"}
PAPER_CHOICES = {"cheese": ("cheese", None), "agentic-qwen2.5": ("agentic", 0), "agentic-qwen3": ("agentic", 1)}
SEED_SUFFIX_RE = re.compile(r"[-_.](?:seed|s)\d+$")


def mean_se(xs: list) -> tuple:
    """Mean and standard error of the mean (SE None with fewer than 2 values)."""
    n = len(xs)
    if n == 0:
        return None, None
    m = sum(xs) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def normalise_arm(label: str) -> str:
    return re.sub(r"[\s_]+", "-", re.sub(r"\s*\+\s*", "+", label.strip().lower()))


def load_run(path: str) -> dict:
    p = Path(path)
    f = p / "summary.json" if p.is_dir() else p
    if not f.is_file():
        die(f"{path}: no summary.json (is it an evaluate.py run folder?)")
    try:
        s = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        die(f"{f}: malformed JSON ({e.msg})")
    if "headlines" not in s:
        die(f"{f}: no headline figures (written by an older evaluate.py?)")
    return {**s, "_dir": str(f.parent)}


def paper_value(paper: str | None, arm: str, head: dict):
    """The paper's number for (arm, headline), or None."""
    if not paper:
        return None
    table, col = PAPER_CHOICES[paper]
    t = PAPER[table]
    numbers = t["arms"].get(normalise_arm(arm))
    if numbers is None or head["metric"] != t["metric"] or head.get("paper_key") is None:
        return None
    if table == "cheese":
        return numbers[t["columns"].index(head["paper_key"])] if head["paper_key"] in t["columns"] else None
    return numbers[col] if head["paper_key"] == "agentic" else None


def aggregate(runs: list[dict], labels: list[str]):
    """-> arms (in order), columns [(eval, metric)], cells {(arm, column): {values, mean, sem, k}}."""
    arms, cols, cells = [], [], defaultdict(lambda: {"values": [], "runs": []})
    for run, label in zip(runs, labels):
        if label not in arms:
            arms.append(label)
        for h in run["headlines"]:
            col = (h["eval"], h["metric"])
            if col not in cols:
                cols.append(col)
            if h["value"] is not None:
                cells[label, col]["values"].append(h["value"])
                cells[label, col]["runs"].append(run["_dir"])
                cells[label, col]["head"] = h
    for c in cells.values():
        c["k"] = len(c["values"])
        c["mean"], c["sem"] = mean_se(c["values"])
    return arms, cols, dict(cells)


def markdown_table(arms, cols, cells, paper) -> str:
    head = ["arm"]
    for ev, metric in cols:
        head.append(f"{ev}: {metric}")
        if paper:
            head.append("paper")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        row = [arm]
        for col in cols:
            c = cells.get((arm, col))
            if not c:
                row.append("-")
            elif c["k"] > 1:
                row.append(f"{c['mean']:.3f} ± {c['sem']:.3f} ({c['k']} seeds)")
            else:
                row.append(f"{c['mean']:.3f} (1 run)")
            if paper:
                pv = paper_value(paper, arm, c["head"]) if c else None
                row.append("-" if pv is None else f"{pv:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def paper_table(paper: str) -> str:
    t = PAPER[PAPER_CHOICES[paper][0]]
    lines = [f"Published numbers, the paper's (not ours): {t['source']}, means over seeds.", "",
             "| arm (label to use) | " + " | ".join(t["columns"]) + " |", "|---|" + "---|" * len(t["columns"])]
    lines += [f"| {arm} | " + " | ".join(f"{v:.2f}" for v in vals) + " |" for arm, vals in t["arms"].items()]
    return "\n".join(lines)


def bar_chart(path: Path, arms, cols, cells, paper):
    """One panel per (eval, metric): a bar per arm (mean over seeds, SEM error bar, one dot per
    seed), and the paper's number as a hatched bar beside it when --paper matches the arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cols = [c for c in cols if any((a, c) in cells for a in arms)]  # a figure nobody computed: no panel
    n_bars = sum(1 for c in cols for a in arms if (a, c) in cells)
    fig, axes = plt.subplots(1, max(len(cols), 1), figsize=(1.5 + 0.9 * n_bars * (1.6 if paper else 1), 3.8),
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.38 if paper else 0.7
    for ax, col in zip(axes[0], cols):
        present, ticks = [a for a in arms if (a, col) in cells], []
        for x, arm in enumerate(present):
            c, colour = cells[arm, col], colours[arms.index(arm) % len(colours)]
            ax.bar(x, c["mean"], width, color=colour, yerr=c["sem"] if c["k"] > 1 else None, capsize=3)
            jitter = [(i - (c["k"] - 1) / 2) * 0.05 for i in range(c["k"])]
            ax.scatter([x + j for j in jitter], c["values"], s=10, color="black", zorder=3)
            pv = paper_value(paper, arm, c["head"])
            if pv is not None:
                ax.bar(x + width, pv, width, color="white", edgecolor=colour, hatch="//")
            ticks.append(x + (width / 2 if pv is not None else 0))
        ax.set_xticks(ticks)
        ax.set_xticklabels(present, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.7, len(present) - 0.3 + (width if paper else 0))
        ax.set_ylim(0, 10 if "score" in col[1] else 1)
        ax.set_title(f"{col[0]}\n{col[1]}", fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color="grey", label="ours: mean ± SEM over seeds, dots = seeds")]
    if paper:
        handles.append(Patch(facecolor="white", edgecolor="grey", hatch="//", label="paper (Li et al. 2026)"))
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)


def cmd_report(args):
    runs = [load_run(p) for p in args.runs]
    labels = args.labels or [r.get("label") or SEED_SUFFIX_RE.sub("", Path(r["_dir"]).name) for r in runs]
    if len(labels) != len(runs):
        die(f"--labels gives {len(labels)} labels for {len(runs)} runs")
    arms, cols, cells = aggregate(runs, labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_run = ["| run | arm | eval | metric | value |", "|---|---|---|---|---|"]
    per_run += [f"| {r['_dir']} | {lab} | {h['eval']} | {h['metric']} | "
                + ("n/a" if h["value"] is None else f"{h['value']:.3f}") + " |"
                for r, lab in zip(runs, labels) for h in r["headlines"]]
    md = ["# Evaluation report", "", "Mean over the runs of each arm (seeds) ± the standard error of that mean.", "",
          markdown_table(arms, cols, cells, args.paper), "", "![bar chart](report.png)", "", "## Runs", "",
          "\n".join(per_run)]
    if args.paper:
        md += ["", "## The paper's numbers", "", paper_table(args.paper)]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    bar_chart(out / "report.png", arms, cols, cells, args.paper)
    cells_json = [{"arm": a, "eval": c[0], "metric": c[1], **{k: v for k, v in cells[a, c].items() if k != "head"}}
                  for a in arms for c in cols if (a, c) in cells]
    summary = {"arms": arms, "columns": [list(c) for c in cols], "paper": args.paper, "cells": cells_json}
    atomic_write(out / "report.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(markdown_table(arms, cols, cells, args.paper))
    print(f"wrote {out / 'report.md'}, {out / 'report.png'} and {out / 'report.json'}")


# ---------------------------------------------------------------------------------------------
# Command line: `python report.py`, and `python evaluate.py report` through add_args
# ---------------------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser):
    """The report's flags, for `python report.py` and for `python evaluate.py report`."""
    p.add_argument("runs", nargs="+", help="run folders (or their summary.json)")
    p.add_argument("--out", required=True, help="folder for report.md, report.png, report.json (required)")
    p.add_argument("--labels", nargs="+", default=None, help="one arm label per run; runs with the same label "
                   "are seeds of one arm (default: each run's --label, else its folder name minus _sN)")
    p.add_argument("--paper", default=None, choices=sorted(PAPER_CHOICES), help="show the paper's published "
                   "numbers beside arms labelled like them (default: none)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    return cmd_report(ap.parse_args(argv))


if __name__ == "__main__":
    main()
