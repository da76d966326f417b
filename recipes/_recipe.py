"""What every recipe shares: print the plan, then run (or, with --dry-run, argument-check) each command.

A recipe is a list of steps; a step is one command of the project's stage scripts (synth.py,
midtrain.py, finetune.py, evaluate.py), a server to start, or a shell command. In --dry-run every
stage command is parsed by its own script's argument parser, so a typo in a flag fails the dry run,
and nothing is trained, generated or served.
"""
import argparse
import importlib
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


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
