"""llm.py and synth.py against a real OpenAI-compatible server: `transformers serve`, Hugging
Face's own, serving the tiny test model (tests/tiny.py) on CPU, offline. Every other endpoint
test talks to the project's fake server; this one checks that what synth.py and evaluate.py send
(every flag docs/synth.md recommends) is accepted by a server we did not write."""

import json
import socket
import time
import urllib.request

import pytest

import llm
from synth_testlib import read_jsonl, run_main, spec_file  # noqa: F401

EXTRA_BODY = {"chat_template_kwargs": {"enable_thinking": False}}  # the docs' --extra-body


@pytest.fixture(scope="module")
def served(tiny_model):
    """`transformers serve` on a free port -> its /v1 URL. It runs in this process, in a thread
    (its own `non_blocking` mode, made for tests), because torch and transformers are loaded here
    already: a separate process would spend its first ~10 s importing them again. It loads the
    folder named by a request's model on first use, and its /v1/models lists only models already
    loaded (none at start)."""
    from transformers.cli.serve import Serve
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()  # Serve sets it for the whole process; put it back
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = Serve(host="127.0.0.1", port=port, device="cpu", log_level="error", non_blocking=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if not serve._thread.is_alive() or time.time() > deadline:
                    pytest.fail("transformers serve did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        serve.kill_server()
        hf_logging.set_verbosity(verbosity)


def test_every_recommended_request_shape_is_accepted_and_cached(served, tiny_model, tmp_path, capsys):
    msgs = [{"role": "user", "content": "Say hello."}]
    shapes = [{"temperature": 1.0, "max_tokens": 8, **EXTRA_BODY},  # synth.py's default + --extra-body
              {"temperature": 0.7, "max_completion_tokens": 8},  # --token-field max_completion_tokens
              {"temperature": 0.0, "max_tokens": 8, "seed": 3}]  # evaluate.py's policy calls
    reqs = [llm.make_request("policy", tiny_model, msgs, s) for s in shapes]
    # its /v1/models starts empty: the model check refuses, and names the flag that copes
    ep = llm.open_endpoint(served, tiny_model)
    with pytest.raises(SystemExit) as exc:
        llm.probe_endpoint(ep)
    assert exc.value.code == 2 and "--no-model-check" in capsys.readouterr().err
    ep = llm.open_endpoint(served, tiny_model, check_model=False, timeout=60)
    res = llm.run_requests(ep, reqs, tmp_path / "c.jsonl", "policy", concurrency=2, max_retries=0,
                           failed_path=tmp_path / "failed.jsonl")
    assert not (tmp_path / "failed.jsonl").exists() and ep["stats"]["errors"] == 0
    assert len(res) == 3 and all(r["finish_reason"] in ("length", "stop") for r in res.values())
    cached = read_jsonl(tmp_path / "c.jsonl")
    assert sorted(r["custom_id"] for r in cached) == sorted(r["custom_id"] for r in reqs)
    assert all(r["usage"]["completion_tokens"] and isinstance(r["content"], str) for r in cached)


def test_a_model_too_small_for_the_format_fails_cleanly(served, tiny_model, spec_file, tmp_path):
    t0 = time.time()
    code, _, err = run_main(["docs", "--spec", spec_file, "--out", tmp_path / "o", "--model", tiny_model,
                             "--base-url", served, "--no-model-check", "--extra-body", json.dumps(EXTRA_BODY),
                             "--max-tokens", "domains=12", "--max-retries", "1", "--retry-base-delay", "0.01",
                             "--timeout", "60", "--concurrency", "2"])
    assert code == 1 and time.time() - t0 < 60, err
    failed = read_jsonl(tmp_path / "o" / "failed.jsonl")
    assert failed and all(f["reason"].startswith("invalid reply: ") and f["attempts"] == 2 for f in failed)
    assert "failed.jsonl" in err and "rerun the same command" in err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["failed"] == len(failed) and summary["errors"] == 0  # no HTTP error at all
