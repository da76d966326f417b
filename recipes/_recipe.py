"""What every recipe shares: print the plan, then run (or, with --dry-run, argument-check) each command.

A recipe is a list of steps; a step is one command of the project's stage scripts (synth.py,
midtrain.py, finetune.py, evaluate.py), a server to start, or a shell command. In --dry-run every
stage command is parsed by its own script's argument parser, so a typo in a flag fails the dry run,
and nothing is trained, generated or served.
"""
import argparse
import importlib
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from midtrain import PEAK_BF16  # noqa: E402 (after the sys.path line above)
# OpenAI's reasoning models (o1, o3, o4-mini, gpt-5, ...) refuse max_tokens (they want
# max_completion_tokens), take only the default temperature 1, and count their hidden reasoning
# inside that limit, so a limit sized for the visible reply ends in an empty, cut reply. OpenAI's
# reasoning guide suggests reserving about 25,000 tokens for reasoning when starting out.
HOSTED_REASONING = re.compile(r"^(?:openai/)?(?:o\d|gpt-5)", re.I)
REASONING_ROOM = 25_000
GRADER_MAX_TOKENS = 2048  # evaluate.py's --grader-max-tokens default


def recipe_args(doc: str, **defaults) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dry-run", action="store_true", help="print and argument-check every command; run nothing (default: off)")
    a("--out", default=defaults.get("out"), help=f"results folder (default: {defaults.get('out')})")
    a("--generator-base-url", default=None,
      help="OpenAI-compatible endpoint of the document generator; none = start vLLM locally (default: none)")
    a("--generator-model", default=defaults.get("generator"),
      help=f"generator model (default: {defaults.get('generator')})")
    a("--grader-base-url", default=None, help="endpoint of the grader; none = the generator's (default: none)")
    a("--grader-model", default=None, help="grader model; none = the generator model (default: none)")
    a("--api-key-env", default="OPENAI_API_KEY", help="variable holding a hosted API's key (default: OPENAI_API_KEY)")
    a("--seeds", type=int, nargs="+", default=defaults.get("seeds", [0, 1, 2, 3]),
      help=f"training seeds (default: {defaults.get('seeds', [0, 1, 2, 3])})")
    a("--gpus", type=int, default=defaults.get("gpus", 1), help=f"GPUs on this node (default: {defaults.get('gpus', 1)})")
    a("--gpu", default="H100", help="GPU kind for the time estimate: H100, H200 or A100 (default: H100)")
    a("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the estimate (default: 0.4)")
    return p


def gpu_hours(params: float, tokens: float, args, lora: bool = True) -> float:
    """Training GPU-hours: (4 if LoRA else 6) x params x tokens FLOPs at --mfu of the GPU's bf16 peak."""
    return (4 if lora else 6) * params * tokens / (args.mfu * PEAK_BF16[args.gpu]) / 3600


def print_plan(title: str, rows: list[tuple[str, str]], out: Path):
    print(f"== {title}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"  {'results land in':<{width}}  {out}")


def py(script: str, *args, nproc: int = 1) -> list[str]:
    launcher = [sys.executable] if nproc == 1 else ["torchrun", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, str(ROOT / script), *map(str, args)]


def start_generator(args) -> list:
    """vLLM serving the generator on port 8000, unless --generator-base-url names an endpoint."""
    if args.generator_base_url:
        return []
    return [("serve", ["vllm", "serve", args.generator_model, "--port", "8000", "--tensor-parallel-size",
                       str(args.gpus)], "http://localhost:8000/health")]


def generator_flags(args) -> list:
    """synth.py's endpoint flags for the generator (Qwen3 with its thinking off: documents have their
    own scratchpad)."""
    flags = ["--model", args.generator_model, "--base-url", args.generator_base_url or "http://localhost:8000/v1",
             "--api-key-env", args.api_key_env]
    if "Qwen3" in args.generator_model:
        flags += ["--extra-body", '{"chat_template_kwargs": {"enable_thinking": false}}']
    if HOSTED_REASONING.match(args.generator_model):
        from synth import DEFAULT_MAX_TOKENS
        flags += ["--token-field", "max_completion_tokens", "--max-tokens",
                  *(f"{stage}={n + REASONING_ROOM}" for stage, n in DEFAULT_MAX_TOKENS.items())]
    return flags


def grader_flags(args) -> tuple[list, bool]:
    """evaluate.py's grader flags, and whether the grader is served locally (the generator model,
    restarted beside the policy: serve_policy_and_grader)."""
    local = not (args.grader_base_url or args.generator_base_url)
    url = args.grader_base_url or args.generator_base_url or "http://localhost:8000/v1"
    model = args.grader_model or args.generator_model
    flags = ["--grader-base-url", url, "--grader-model", model, "--grader-api-key-env", args.api_key_env]
    if HOSTED_REASONING.match(model):  # vLLM serving the policy takes max_completion_tokens too
        flags += ["--token-field", "max_completion_tokens", "--grader-temperature", "1",
                  "--grader-max-tokens", str(GRADER_MAX_TOKENS + REASONING_ROOM)]
    return flags, local


def serve_policy_and_grader(args, base: str, lora_modules: list[str], local_grader: bool) -> list:
    """vLLM serving base with every adapter (NAME=DIR) on port 8001, and, when the grader is local,
    the grader on port 8000 beside it, each with half of the GPUs' memory."""
    share = ["--gpu-memory-utilization", "0.45"] if local_grader else []
    steps = []
    if local_grader:
        steps.append(("serve", ["vllm", "serve", args.grader_model or args.generator_model, "--port", "8000",
                                "--tensor-parallel-size", str(args.gpus), *share], "http://localhost:8000/health"))
    steps.append(("serve", ["vllm", "serve", base, "--port", "8001", "--tensor-parallel-size", str(args.gpus),
                            "--enable-lora", "--max-lora-rank", "64", *share, "--lora-modules", *lora_modules],
                  "http://localhost:8001/health"))
    return steps


def check(cmd: list[str]):
    """Parse a stage command with its script's own parser (argparse exits non-zero on a bad flag)."""
    script = next((Path(c).stem for c in cmd if c.endswith(".py")), None)
    if script not in ("synth", "midtrain", "finetune", "evaluate"):
        return
    argv = cmd[[i for i, c in enumerate(cmd) if c.endswith(".py")][0] + 1:]
    importlib.import_module(script).parse_args(argv)


def wait_for(url: str, timeout: float = 1800):
    start = time.time()
    while time.time() - start < timeout:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(10)
    sys.exit(f"server at {url} did not come up in {timeout:.0f} s")


def run(steps: list, dry_run: bool):
    """steps: ("cmd", argv) | ("serve", argv, health_url) | ("stop", None), which stops every server."""
    servers = []
    for i, step in enumerate(steps, 1):
        kind, cmd = step[0], step[1]
        if kind == "stop":
            print(f"[{i}/{len(steps)}] stop the servers")
            for server in servers:
                server.terminate()
                server.wait()
            servers = []
            continue
        print(f"[{i}/{len(steps)}] {'serve: ' if kind == 'serve' else ''}{shlex.join(cmd)}", flush=True)
        check(cmd)
        if dry_run:
            continue
        if kind == "serve":
            servers.append(subprocess.Popen(cmd))
            wait_for(step[2])
        else:
            subprocess.run(cmd, check=True)
    for server in servers:
        server.terminate()
