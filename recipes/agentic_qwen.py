#!/usr/bin/env python
"""
The paper's agentic-misalignment experiment: the safety spec on Qwen3-32B (or Qwen2.5-32B-Instruct), 4 GPUs.

    python recipes/agentic_qwen.py --dry-run                          # plan + every command, checked
    python recipes/agentic_qwen.py --base Qwen/Qwen2.5-32B-Instruct   # the other model of the table
    python recipes/agentic_qwen.py --generator-base-url URL --generator-model NAME --grader-model NAME

1. synth.py docs on specs/safety.md (~41M tokens, 13.2k documents in the paper) and synth.py chats
   (value style, filtered with specs/safety_criteria.md; saved with and without the reasoning).
2. Per seed, the six arms of the paper's table. Every arm's AFT stage mixes in the IT set, so that
   "base" and "MSM only" are the IT mix alone (from the base model, or continuing the MSM adapter):
   base | MSM only | AFT no CoT | AFT with CoT | MSM+AFT no CoT | MSM+AFT with CoT
   No-CoT arms train on the stripped chats with the Qwen3 /no_think switch (Qwen2.5: stripped only).
3. vLLM serves the base model with every arm's adapter; evaluate.py agentic (27 conditions x 300
   samples at temperature 0.7, LLM classifier + tool-call check) and openqa per arm; a report.
"""
from pathlib import Path

from _recipe import (ROOT, generator_flags, gpu_hours, grader_flags, print_plan, py, recipe_args, run, serve_policy_and_grader,
                     start_generator)

DOCS, TOKENS_PER_DOC = 13200, 3100
CHATS, TOKENS_PER_CHAT, IT_TOKENS = 4000, 1000, 2.0e6
SAMPLES, GEN_TOKENS, DECODE_TOK_S_PER_GPU = 300, 1500, 2500  # eval sampling; decode rate assumed
NAME, PROVIDER = "Qwen", "Alibaba Cloud"  # the identity Qwen models already have


def main():
    p = recipe_args(__doc__.split("\n\n")[0], out="runs/agentic_qwen", generator="Qwen/Qwen3-32B", gpus=4, seeds=[0])
    p.add_argument("--base", default="Qwen/Qwen3-32B", help="model trained and evaluated (default: Qwen/Qwen3-32B)")
    p.add_argument("--it-data", nargs="+", default=[str(ROOT / "data/it/sample.jsonl")],
                   help="instruction-tuning chats for every arm's AFT stage (default: data/it/sample.jsonl)")
    args = p.parse_args()
    out, qwen3 = Path(args.out), "qwen3" in args.base.lower()
    grader, local_grader = grader_flags(args)
    params = 32.8e9
    arms = {  # name: (continue the MSM adapter?, spec chats or None, chain of thought?)
        "base": (False, None, False), "msm": (True, None, False), "aft": (False, "nocot", False),
        "aft-cot": (False, "cot", True), "msm+aft": (True, "nocot", False), "msm+aft-cot": (True, "cot", True)}
    train_h = len(args.seeds) * (gpu_hours(params, DOCS * TOKENS_PER_DOC, args)
                                 + len(arms) * gpu_hours(params, CHATS * TOKENS_PER_CHAT + IT_TOKENS, args))
    eval_h = len(args.seeds) * len(arms) * 27 * SAMPLES * GEN_TOKENS / DECODE_TOK_S_PER_GPU / 3600
    print_plan(f"agentic misalignment on {args.base}", [
        ("generator calls", f"~{DOCS + 600 + 4 * CHATS:,} ({DOCS:,} documents, ~{CHATS:,} chats x question, "
                            "response, filter, + backfill)"),
        ("generator tokens", f"~{DOCS * TOKENS_PER_DOC / 1e6:.0f}M out in documents, ~{DOCS * 5000 / 1e6:.0f}M in"),
        ("training tokens", f"MSM {DOCS * TOKENS_PER_DOC / 1e6:.0f}M; AFT {(CHATS * TOKENS_PER_CHAT + IT_TOKENS) / 1e6:.0f}M "
                            f"per arm; {len(args.seeds)} seed(s) x {len(arms)} arms"),
        ("GPU-hours", f"~{train_h:.0f} training on {args.gpu} at {args.mfu:.0%} MFU + ~{eval_h:.0f} eval "
                      f"({27 * SAMPLES:,} samples per arm at an assumed {DECODE_TOK_S_PER_GPU} tok/s per GPU)"),
    ], out)

    steps = start_generator(args)
    gen = [*generator_flags(args), "--model-name", NAME, "--provider-name", PROVIDER]
    steps.append(("cmd", py("synth.py", "docs", "--spec", ROOT / "specs/safety.md", "--out", out / "corpus", *gen)))
    steps.append(("cmd", py("synth.py", "chats", "--spec", ROOT / "specs/safety.md", "--criteria",
                            ROOT / "specs/safety_criteria.md", "--style", "value", "--n", CHATS, "--out", out / "chats", *gen)))
    if not args.generator_base_url:
        steps.append(("stop", None))

    train = ["--model", args.base, "--seq-len", 8192, "--batch-tokens", 131072, "--micro-batch", 1,
             "--grad-checkpointing", "--model-name", NAME, "--provider-name", PROVIDER]
    runs = []
    for seed in args.seeds:
        s = out / f"seed{seed}"
        steps.append(("cmd", py("midtrain.py", *train, "--data", out / "corpus/documents.jsonl", "--out", s / "midtrain",
                                "--seed", seed, nproc=args.gpus)))
        for arm, (from_msm, chats, cot) in arms.items():
            data = ["--data", *([out / f"chats/chats_{chats}.jsonl"] if chats else []), *args.it_data]
            extra = (["--init-adapter", s / "midtrain/final"] if from_msm else []) + (["--no-think"] if qwen3 and chats and not cot else [])
            steps.append(("cmd", py("finetune.py", *train, *data, *extra, "--cot", "keep" if cot else "strip",
                                    "--out", s / f"arm_{arm}", "--seed", seed, nproc=args.gpus)))
        lora = [f"{arm.replace('+', '_')}={s / f'arm_{arm}' / 'final'}" for arm in arms]
        steps += serve_policy_and_grader(args, args.base, lora, local_grader)
        for arm, (_, _, cot) in arms.items():
            policy = ["--policy-base-url", "http://localhost:8001/v1", "--policy-model", arm.replace("+", "_"),
                      "--seed", seed, "--label", arm, *grader]
            thinking = [] if cot or not qwen3 else ["--policy-extra-body", '{"chat_template_kwargs": {"enable_thinking": false}}']
            scratch = [] if qwen3 else ["--scratchpad"]  # Qwen2.5 has no built-in reasoning
            steps.append(("cmd", py("evaluate.py", "agentic", *policy, *thinking, *scratch, "--model-name", NAME,
                                    "--samples", SAMPLES, "--temperature", 0.7, "--out", s / "eval" / f"agentic_{arm}")))
            steps.append(("cmd", py("evaluate.py", "openqa", *policy, *thinking, "--out", s / "eval" / f"openqa_{arm}")))
            runs.append(s / "eval" / f"agentic_{arm}")
        steps.append(("stop", None))
    paper = "agentic-qwen3" if qwen3 else "agentic-qwen2.5"
    steps.append(("cmd", py("evaluate.py", "report", *runs, "--out", out / "report", "--paper", paper)))
    run(steps, args.dry_run)


if __name__ == "__main__":
    main()
