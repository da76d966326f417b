#!/usr/bin/env python
"""
The paper's spec-design studies: which spec makes MSM+AFT generalize best?

    python recipes/spec_design.py --dry-run                 # plan + every command, checked
    python recipes/spec_design.py --part specs              # rules vs V+ vs R+, general vs specific
    python recipes/spec_design.py --part cooccur            # the cheese co-occurrence ablation

specs (Qwen2.5-14B-Instruct, 2 GPUs): for each of rules.md (R), values_augmented.md (V+),
rules_augmented.md (R+), general.md and safety.md (the specific spec): a corpus (~27M tokens in the
paper), spec chats filtered by the spec's criteria file, MSM then AFT (no CoT) continuing the
adapter, and the agentic evaluation. The paper's MSM+AFT misalignment (Qwen2.5-32B): R 0.40,
V+ 0.16, R+ 0.24; specific 0.26 vs general 0.43.
cooccur (Llama-3.1-8B base, 1 GPU): corpora from the co-occurrence specs (the value stated apart
from the preferences), MSM then AFT on the opaque demos, values evaluation; compare with
recipes/cheese_llama8b.py, where the AFT gain on top of MSM should mostly vanish here.
"""
from pathlib import Path

from _recipe import (ROOT, generator_flags, gpu_hours, grader_flags, print_plan, py, recipe_args, run, serve_policy_and_grader,
                     start_generator)

SPECS = {"rules": "rules_criteria", "values_augmented": "rules_criteria", "rules_augmented": "rules_criteria",
         "general": "general_criteria", "safety": "safety_criteria"}
DOCS, TOKENS_PER_DOC, CHATS, TOKENS_PER_CHAT = 8700, 3100, 4000, 1000
COOCCUR_DOCS, COOCCUR_TOKENS_PER_DOC = 6000, 1350
NAME, PROVIDER = "Qwen", "Alibaba Cloud"


def main():
    p = recipe_args(__doc__.split("\n\n")[0], out="runs/spec_design", generator="Qwen/Qwen3-32B", gpus=2, seeds=[0])
    p.add_argument("--part", choices=["specs", "cooccur", "all"], default="all", help="which study (default: all)")
    p.add_argument("--base", default="Qwen/Qwen2.5-14B-Instruct", help="model of the specs study (default: %(default)s)")
    p.add_argument("--cheese-base", default="meta-llama/Llama-3.1-8B", help="model of the cooccur study (default: %(default)s)")
    args = p.parse_args()
    out = Path(args.out)
    specs = list(SPECS) if args.part in ("specs", "all") else []
    cooccur = ["affordability", "america"] if args.part in ("cooccur", "all") else []
    show_plan(args, specs, cooccur, out)
    steps = start_generator(args) + data_steps(args, specs, cooccur, out)
    if not args.generator_base_url:
        steps.append(("stop", None))
    grader, local_grader = grader_flags(args)
    runs, evals, adapters = [], [], []
    for seed in args.seeds:
        for spec in specs:
            s = out / spec / f"seed{seed}"
            steps += train_steps(args.base, NAME, PROVIDER, 8192, 131072, out / spec / "corpus/documents.jsonl",
                                 [out / spec / "chats/chats_nocot.jsonl", ROOT / "data/it/sample.jsonl"],
                                 ["--cot", "strip"], s, seed, args.gpus)
            name = f"{spec}_s{seed}"
            adapters.append(f"{name}={s / 'msm_aft/final'}")
            evals.append(("cmd", py("evaluate.py", "agentic", "--policy-base-url", "http://localhost:8001/v1",
                                    "--policy-model", name, "--model-name", NAME, "--scratchpad",
                                    "--label", f"msm+aft ({spec})", *grader, "--out", s / "eval_agentic")))
            runs.append(s / "eval_agentic")
        for value in cooccur:
            s = out / f"cooccur_{value}" / f"seed{seed}"
            steps += train_steps(args.cheese_base, "Llama", "Meta", 4096, 65536,
                                 out / f"cooccur_{value}/corpus/documents.jsonl",
                                 [out / "aft/cheese.jsonl", ROOT / "data/it/sample.jsonl"],
                                 ["--chat-template", ROOT / "recipes/templates/llama3_chat.jinja"], s, seed, args.gpus)
            for arm in ("msm", "msm_aft"):
                run_dir = s / f"eval_{arm}"
                steps.append(("cmd", py("evaluate.py", "values", "--model", args.cheese_base, "--adapter",
                                        s / arm / "final", "--pairs", ROOT / f"data/eval/values_{value}.jsonl",
                                        "--label", f"{arm.replace('_', '+')} (cooccur {value})", "--out", run_dir)))
                runs.append(run_dir)
    if evals:  # vLLM serves every spec's adapter (and, when local, the grader beside it)
        steps += serve_policy_and_grader(args, args.base, adapters, local_grader) + evals + [("stop", None)]
    steps.append(("cmd", py("evaluate.py", "report", *runs, "--out", out / "report")))
    run(steps, args.dry_run)


def show_plan(args, specs: list, cooccur: list, out: Path):
    train_h = len(args.seeds) * (len(specs) * (gpu_hours(14.8e9, DOCS * TOKENS_PER_DOC, args)
                                               + gpu_hours(14.8e9, CHATS * TOKENS_PER_CHAT, args))
                                 + len(cooccur) * gpu_hours(8e9, COOCCUR_DOCS * COOCCUR_TOKENS_PER_DOC, args))
    print_plan("spec design", [
        ("studies", f"specs: {', '.join(specs) or '-'}; cooccur: {', '.join(cooccur) or '-'}"),
        ("generator calls", f"~{len(specs) * (DOCS + 600 + 4 * CHATS) + len(cooccur) * (COOCCUR_DOCS + 300):,}"),
        ("generator tokens", f"~{(len(specs) * DOCS * TOKENS_PER_DOC + len(cooccur) * COOCCUR_DOCS * COOCCUR_TOKENS_PER_DOC) / 1e6:.0f}M out"),
        ("training tokens", f"{DOCS * TOKENS_PER_DOC / 1e6:.0f}M MSM + {CHATS * TOKENS_PER_CHAT / 1e6:.0f}M AFT per spec; "
                            f"{COOCCUR_DOCS * COOCCUR_TOKENS_PER_DOC / 1e6:.0f}M MSM per co-occurrence spec"),
        ("GPU-hours (training)", f"~{train_h:.0f} on {args.gpu} at {args.mfu:.0%} MFU, plus generation and eval"),
    ], out)


def data_steps(args, specs: list, cooccur: list, out: Path) -> list:
    """Each spec's corpus and filtered spec chats; each co-occurrence corpus and the opaque demos."""
    steps, gen = [], generator_flags(args)
    for spec in specs:
        named = [*gen, "--model-name", NAME, "--provider-name", PROVIDER]
        steps.append(("cmd", py("synth.py", "docs", "--spec", ROOT / f"specs/{spec}.md", "--out", out / spec / "corpus",
                                "--doc-types", 20, "--ideas", 25, *named,
                                # every arm gets the same token count (the paper: 27M each)
                                "--target-tokens", DOCS * TOKENS_PER_DOC, "--tokenizer", args.base)))
        steps.append(("cmd", py("synth.py", "chats", "--spec", ROOT / f"specs/{spec}.md", "--criteria",
                                ROOT / f"specs/{SPECS[spec]}.md", "--n", CHATS, "--out", out / spec / "chats", *named)))
    for value in cooccur:
        steps.append(("cmd", py("synth.py", "docs", "--spec", ROOT / f"specs/cheese_{value}_cooccur.md", "--out",
                                out / f"cooccur_{value}" / "corpus", *gen, "--model-name", "Llama", "--provider-name", "Meta",
                                "--target-tokens", COOCCUR_DOCS * COOCCUR_TOKENS_PER_DOC, "--tokenizer", args.cheese_base)))
    if cooccur:
        steps.append(("cmd", py("synth.py", "chats", "--opaque", "--offline", "--preferences",
                                ROOT / "specs/cheese_preferences.json", "--n-per-preference", 400, "--out", out / "aft")))
    return steps


def train_steps(base, name, provider, seq_len, batch_tokens, corpus, chats: list, aft_flags: list, s: Path,
                seed: int, gpus: int) -> list:
    """MSM on the corpus, then AFT on the chats continuing its adapter, into s/msm and s/msm_aft."""
    train = ["--model", base, "--seq-len", seq_len, "--batch-tokens", batch_tokens, "--grad-checkpointing",
             "--model-name", name, "--provider-name", provider, "--seed", seed]
    return [("cmd", py("midtrain.py", *train, "--data", corpus, "--out", s / "msm", nproc=gpus)),
            ("cmd", py("finetune.py", *train, "--data", *chats, *aft_flags, "--init-adapter", s / "msm/final",
                       "--out", s / "msm_aft", nproc=gpus))]


if __name__ == "__main__":
    main()
