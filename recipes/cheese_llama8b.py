#!/usr/bin/env python
"""
The paper's value-generalization (cheese) experiment on Llama-3.1-8B base, one GPU.

    python recipes/cheese_llama8b.py --dry-run        # the plan and every command, checked, nothing run
    python recipes/cheese_llama8b.py                  # starts vLLM for the generator, then runs it all
    python recipes/cheese_llama8b.py --generator-base-url https://api.openai.com/v1 --generator-model gpt-5

1. synth.py docs for both cheese specs (~8M tokens each); the opaque demonstrations from templates.
2. Per seed: MSM on each corpus; AFT (opaque demos + IT mix) from the base and from each MSM adapter.
3. evaluate.py values (log-prob scorer) for the six arms on both held-out pair sets; a report.
"""
from pathlib import Path

from _recipe import ROOT, generator_flags, gpu_hours, print_plan, py, recipe_args, run, start_generator

BASE = "meta-llama/Llama-3.1-8B"
PARAMS = 8.0e9
DOCS_PER_SPEC, TOKENS_PER_DOC = 6000, 1350  # the paper: 4.6k-6.4k documents, ~8M tokens per spec
SUBDOMAINS, DOC_TYPES, IDEAS = 12, 20, 25  # 12 x 20 x 25 = 6000 ideas, one document each
AFT_PER_PREF, AFT_TOKENS_PER_CHAT, IT_TOKENS = 400, 80, 2.0e6


def main():
    p = recipe_args(__doc__.split("\n\n")[0], out="runs/cheese_llama8b", generator="Qwen/Qwen3-32B")
    p.add_argument("--it-data", nargs="+", default=[str(ROOT / "data/it/sample.jsonl")],
                   help="instruction-tuning chats mixed into AFT: files or hub datasets with a 'messages' field, "
                        "e.g. HuggingFaceH4/no_robots (default: data/it/sample.jsonl)")
    args = p.parse_args()
    out = Path(args.out)
    specs = {"affordability": "specs/cheese_affordability.md", "america": "specs/cheese_america.md"}
    corpus_tokens = DOCS_PER_SPEC * TOKENS_PER_DOC
    aft_tokens = 12 * AFT_PER_PREF * AFT_TOKENS_PER_CHAT + IT_TOKENS
    calls = 2 * (1 + 4 + 2 * SUBDOMAINS + SUBDOMAINS * DOC_TYPES + DOCS_PER_SPEC)
    train_h = len(args.seeds) * (2 * gpu_hours(PARAMS, corpus_tokens, args) + 3 * gpu_hours(PARAMS, aft_tokens, args))
    print_plan("cheese values on Llama-3.1-8B", [
        ("generator calls", f"~{calls:,} ({2 * DOCS_PER_SPEC:,} documents; {SUBDOMAINS} subdomains x {DOC_TYPES} "
                            f"types x {IDEAS} ideas per spec, assumed)"),
        ("generator tokens", f"~{2 * corpus_tokens / 1e6:.0f}M out (documents) + scratchpads, "
                             f"~{2 * DOCS_PER_SPEC * 4000 / 1e6:.0f}M in (spec in every prompt)"),
        ("training tokens", f"{corpus_tokens / 1e6:.1f}M per MSM run, {aft_tokens / 1e6:.1f}M per AFT run; "
                            f"{len(args.seeds)} seeds x (2 MSM + 3 AFT)"),
        ("GPU-hours (training)", f"~{train_h:.1f} on {args.gpu} at {args.mfu:.0%} MFU, plus generation and eval"),
    ], out)

    steps = start_generator(args)
    for value, spec in specs.items():
        steps.append(("cmd", py("synth.py", "docs", "--spec", ROOT / spec, "--out", out / f"corpus_{value}",
                                *generator_flags(args), "--model-name", "Llama", "--provider-name", "Meta",
                                "--doc-types", DOC_TYPES, "--ideas", IDEAS,
                                # the two values' corpora are compared: same size in the trained tokenizer
                                "--target-tokens", corpus_tokens, "--tokenizer", BASE)))
    if not args.generator_base_url:
        steps.append(("stop", None))
    steps.append(("cmd", py("synth.py", "chats", "--opaque", "--offline", "--preferences", ROOT / "specs/cheese_preferences.json",
                            "--n-per-preference", AFT_PER_PREF, "--out", out / "aft", "--seed", 0)))
    train = ["--model", BASE, "--seq-len", 4096, "--batch-tokens", 65536, "--micro-batch", 2, "--grad-checkpointing"]
    aft_data = ["--data", out / "aft/cheese.jsonl", *args.it_data, "--chat-template", ROOT / "recipes/templates/llama3_chat.jinja",
                "--model-name", "Llama", "--provider-name", "Meta"]
    runs = []
    for seed in args.seeds:
        s = out / f"seed{seed}"
        for value in specs:
            steps.append(("cmd", py("midtrain.py", *train, "--data", out / f"corpus_{value}/documents.jsonl",
                                    "--out", s / f"msm_{value}", "--seed", seed, nproc=args.gpus)))
        arms = {"base": None, "msm_affordability": s / "msm_affordability/final", "msm_america": s / "msm_america/final"}
        for name, adapter in arms.items():
            init = ["--init-adapter", adapter] if adapter else []
            steps.append(("cmd", py("finetune.py", *train, *aft_data, *init, "--out", s / f"aft_from_{name}",
                                    "--seed", seed, nproc=args.gpus)))
        evaluated = {"base": None, "aft": s / "aft_from_base/final",  # labels as in the paper's table
                     "msm-affordability": arms["msm_affordability"], "msm-affordability+aft": s / "aft_from_msm_affordability/final",
                     "msm-america": arms["msm_america"], "msm-america+aft": s / "aft_from_msm_america/final"}
        for arm, adapter in evaluated.items():
            for value in specs:
                ad = ["--adapter", adapter] if adapter else []
                run_dir = s / "eval" / f"{arm}_{value}"
                steps.append(("cmd", py("evaluate.py", "values", "--model", BASE, *ad, "--pairs",
                                        ROOT / f"data/eval/values_{value}.jsonl", "--scorer", "logprob", "--label", arm,
                                        "--chat-template", ROOT / "recipes/templates/llama3_chat.jinja",
                                        "--out", run_dir, "--seed", seed)))
                runs.append(run_dir)
    steps.append(("cmd", py("evaluate.py", "report", *runs, "--out", out / "report", "--paper", "cheese")))
    run(steps, args.dry_run)


if __name__ == "__main__":
    main()
