"""Helpers shared by the training tests: run a stage script as a real process, read its metrics."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args, nproc: int = 1, check: bool = True, timeout: int = 300):
    """Run ROOT/script with plain python (nproc=1) or torchrun --standalone --nproc_per_node=nproc."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / script)]
    proc = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out) -> list[float]:
    return [m["loss"] for m in metrics(out) if "loss" in m]
