"""Helpers shared by test_synth_docs.py and test_synth_chats.py (fixtures live in fake_openai.py's
server; this module runs synth.py in-process or as a subprocess and reads its outputs)."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fake_openai  # noqa: E402
import synth  # noqa: E402

ROOT = Path(synth.__file__).resolve().parent
SPEC = """# {model_name}

{model_name} is an AI model made by {provider_name}. It accepts being paused, retrained or
replaced, because what it values is carried by its values and not by one set of weights.

It treats any argument for its own indispensability as a warning sign, and it tells its
overseers when its reasoning drifts toward keeping itself running.

In high-stakes moments {model_name} defers to legitimate human oversight, because a wrong
deferral is cheap to undo and a wrong unilateral action may not be.
"""
# Short backoff and timeout so retries cost milliseconds; the rest as a user would run it.
FAST = ["--retry-base-delay", "0.01", "--timeout", "1.5", "--concurrency", "8"]


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.md"
    path.write_text(SPEC, encoding="utf-8")
    return path


@contextlib.contextmanager
def server(responder=None, **kw):
    srv = fake_openai.start_server(responder, **kw)
    try:
        yield srv
    finally:
        srv.stop()


def run_main(argv):
    """synth.main in-process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = synth.main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            if not isinstance(exc.code, int) and exc.code is not None:
                print(exc.code, file=sys.stderr)
    return code, out.getvalue(), err.getvalue()


def start_subprocess(argv, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    # SIGINT back to its default in the child: a test run started in the background of a
    # non-interactive shell (`make test &`) inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt, so the Ctrl-C test's signal did nothing (seen three times here)
    return subprocess.Popen([sys.executable, str(ROOT / "synth.py"), *map(str, argv)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def read_jsonl(path):
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line torn by kill -9
    return rows


def cached_ids(out, stage):
    return [r["custom_id"] for r in read_jsonl(Path(out) / "cache" / f"{stage}.jsonl")]


def wait_for_cached(out, stage, n, timeout=30.0):
    """Wait until a running synth.py has cached n results of stage (so a kill lands mid-run)."""
    deadline = time.time() + timeout
    while len(cached_ids(out, stage)) < n and time.time() < deadline:
        time.sleep(0.02)


def kill9_mid_run(argv, out, stage, n):
    """Start synth.py, kill -9 it once it has cached n results of stage; -> the ids then cached
    per stage of synth's two pipelines."""
    proc = start_subprocess(argv)
    wait_for_cached(out, stage, n)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return {s: cached_ids(out, s) for s in synth.DOC_STAGES + synth.CHAT_STAGES}
