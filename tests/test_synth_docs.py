"""synth.py docs against a real local OpenAI-compatible server (tests/fake_openai.py)."""

import hashlib
import json
import os
import signal
import socket

import pytest

import fake_openai
import synth
from synth_testlib import (FAST, cached_ids, read_jsonl, run_main, server, spec_file,  # noqa: F401
                           start_subprocess, wait_for_cached)

# 2 domains x 2 subdomains x 3 doc types x 4 ideas = 48 documents; per_call=2 forces top-ups
SMALL = ["--doc-types", "3", "--ideas", "4"]
IDEA = "Idea {i} for Type {t} in Domain 0 / Sub 0"
DUPS = dict(same_doc={IDEA.format(i=1, t=0): IDEA.format(i=0, t=0)},
            near_doc={IDEA.format(i=2, t=0): IDEA.format(i=0, t=0)})


def docs_args(spec, out, url, *extra):
    return ["docs", "--spec", spec, "--out", out, "--model", "test-model", "--base-url", url,
            *FAST, *SMALL, *extra]


def doc_set(out):
    return {(d["id"], d["text"]) for d in read_jsonl(out / "documents.jsonl")}


def test_full_hierarchy(tmp_path, spec_file):
    with server(fake_openai.scripted(per_call=2, **DUPS)) as srv:
        code, out, err = run_main(docs_args(spec_file, tmp_path / "o", srv.url, "--model-name",
                                            "Zeta", "--provider-name", "Acme Labs"))
    assert code == 0, err
    docs = read_jsonl(tmp_path / "o" / "documents.jsonl")
    dropped = read_jsonl(tmp_path / "o" / "dropped.jsonl")
    assert len(docs) == 46 and len(dropped) == 2
    assert sorted(d["dropped"] for d in dropped) == ["exact duplicate", "near duplicate"]
    assert {d["duplicate_of"] for d in dropped} <= {d["id"] for d in docs}
    assert len({d["id"] for d in docs}) == len(docs)
    raw = spec_file.read_bytes()
    for d in docs:
        assert d["id"].startswith("documents-")
        assert d["domain"] and d["subdomain"] and d["doc_type"] and d["idea"] and d["assertions"]
        assert d["spec_sha256"] == hashlib.sha256(raw).hexdigest()
        assert d["generator"] == "test-model" and d["finish_reason"] == "stop"
        assert "scratchpad" not in d["text"].lower() and "<document>" not in d["text"]
    # every (subdomain, doc type) got its 4 ideas, although each reply held at most 2
    assert {(d["subdomain"], d["doc_type"]) for d in docs + dropped} == {
        (f"Domain {i} / Sub {j}", f"Type {t}") for i in range(2) for j in range(2) for t in range(3)}
    stages = [stage for _, stage, _ in srv.bodies]
    assert stages.count("doc_types") > 4 and stages.count("ideas") > 12  # top-up rounds ran
    prompts = [m["content"] for _, _, body in srv.bodies for m in body["messages"]]
    assert all("{model_name}" not in p and "{provider_name}" not in p for p in prompts)
    assert all("Zeta" in p for p in prompts) and any("Acme Labs" in p for p in prompts)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["documents_kept"] == 46 and summary["failed"] == 0
    assert summary["documents_dropped"] == {"exact duplicate": 1, "near duplicate": 1}
    assert "tokens_in: " in out and "wall_s: " in out


def test_rerun_makes_no_calls(tmp_path, spec_file):
    with server() as srv:
        argv = docs_args(spec_file, tmp_path / "o", srv.url)
        assert run_main(argv)[0] == 0
        first, posts = doc_set(tmp_path / "o"), srv.posts
        code, out, _ = run_main(argv)
        assert code == 0 and srv.posts == posts and doc_set(tmp_path / "o") == first
        assert "calls: 0" in out


def test_kill9_then_rerun(tmp_path, spec_file):
    with server() as srv:  # reference: one uninterrupted run
        assert run_main(docs_args(spec_file, tmp_path / "ref", srv.url))[0] == 0
    out = tmp_path / "o"
    with server(latency=0.1) as srv:
        proc = start_subprocess(docs_args(spec_file, out, srv.url, "--concurrency", "4"))
        wait_for_cached(out, "documents", 8)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        done = {s: cached_ids(out, s) for s in synth.DOC_STAGES}
        assert 8 <= len(done["documents"]) < 48, "the kill must land mid-run"
        srv.counts.clear()
        srv.latency = 0
        code, _, err = run_main(docs_args(spec_file, out, srv.url))
    assert code == 0, err
    completed = [cid for ids in done.values() for cid in ids]
    assert not [cid for cid in completed if srv.counts[cid]], "a completed request was asked again"
    assert doc_set(out) == doc_set(tmp_path / "ref")
    ids = cached_ids(out, "documents")
    assert len(ids) == len(set(ids)) == 48  # each document requested to completion once


def test_torn_cache_line_is_ignored_and_repaired(tmp_path, spec_file):
    with server() as srv:
        argv = docs_args(spec_file, tmp_path / "o", srv.url)
        assert run_main(argv)[0] == 0
        cache = tmp_path / "o" / "cache" / "documents.jsonl"
        lines = cache.read_text().splitlines(keepends=True)
        cache.write_text("".join(lines[:-1]) + lines[-1][:40])  # as if killed mid-write
        code, _, _ = run_main(argv)
        assert code == 0
        assert all(json.loads(x) for x in cache.read_text().splitlines()[:-2])
        assert len(read_jsonl(cache)) == 48 and len(read_jsonl(tmp_path / "o" / "documents.jsonl")) == 48


def test_faults_are_survived_and_nothing_truncated_is_written(tmp_path, spec_file):
    with server() as srv:
        assert run_main(docs_args(spec_file, tmp_path / "ref", srv.url))[0] == 0
    plan = {"domains": ["malformed"], "subdomains": ["badbody", "500"], "assertions": ["length"],
            "doc_types": ["429"], "ideas": ["malformed", "length"],
            "documents": ["429", "500", "slow", "notags", "length", "badbody"]}
    with server(fake_openai.with_faults(fake_openai.scripted(), plan, retry_after="0.3")) as srv:
        code, out, err = run_main(docs_args(spec_file, tmp_path / "o", srv.url, "--timeout", "0.5",
                                            "--max-retries", "6", "--concurrency", "48"))
    assert code == 0, err
    assert doc_set(tmp_path / "o") == doc_set(tmp_path / "ref")  # the clean text, every time
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["retries"] >= 48 * 6
    # Retry-After was honoured: no document was asked again sooner than 0.3 s after its 429
    times = {}
    for rid, stage, status, t in srv.log:
        times.setdefault(rid, []).append((t, status))
    gaps = [ts[1][0] - ts[0][0] for rid, ts in times.items()
            if rid.startswith("documents-") and ts[0][1] == 429]
    assert len(gaps) == 48 and min(gaps) >= 0.29


def test_failed_items_go_to_failed_jsonl_and_rerun_retries_only_them(tmp_path, spec_file):
    bad = IDEA.format(i=3, t=2)
    base = fake_openai.scripted()

    def responder(stage, body, n):
        prompt = body["messages"][0]["content"]
        if stage == "documents" and f"Idea: {bad}\n" in prompt:
            return {"content": "<document>never finished", "finish_reason": "length"}
        if stage == "documents" and "Idea: Idea 0 for Type 2 in Domain 1 / Sub 1\n" in prompt:
            return {"status": 400, "error": "context length exceeded"}
        return base(stage, body, n)
    out = tmp_path / "o"
    with server(responder) as srv:
        code, _, err = run_main(docs_args(spec_file, out, srv.url, "--max-retries", "2"))
    assert code == 1
    failed = read_jsonl(out / "failed.jsonl")
    reasons = sorted((f["reason"], f["attempts"]) for f in failed)
    assert reasons == [("HTTP 400: context length exceeded", 1),
                       ("invalid reply: cut by the token limit (finish_reason=length)", 3)]
    assert all(f["request"]["body"]["messages"] for f in failed)
    docs = read_jsonl(out / "documents.jsonl")
    assert len(docs) == 46 and all(d["idea"] != bad for d in docs)
    assert "never finished" not in (out / "documents.jsonl").read_text()
    assert "2 requests failed" in err
    with server() as srv:  # the server is fixed: only the two failures are asked again
        code, _, _ = run_main(docs_args(spec_file, out, srv.url))
        assert code == 0 and sum(srv.counts.values()) == 2
    assert len(read_jsonl(out / "documents.jsonl")) == 48 and not (out / "failed.jsonl").exists()


def answer_batch(batch_path, results_path, responder, error_ids=(), cut_ids=(), vllm_style=False):
    """What the OpenAI Batch API / vllm run-batch would return for a batch file."""
    with open(results_path, "w") as f:
        for i, line in enumerate(read_jsonl(batch_path)):
            body = line["body"]
            assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
            reply = responder(fake_openai.stage_of(body["messages"]), body, 0)
            finish = "stop"
            if line["custom_id"] in cut_ids:  # cut by the token limit
                reply, finish = reply[: len(reply) // 2], "length"
            completion = {"id": f"c{i}", "object": "chat.completion", "model": body["model"],
                          "choices": [{"index": 0, "finish_reason": finish, "message": {
                              "role": "assistant", "content": reply}}],
                          "usage": {"prompt_tokens": 10, "completion_tokens": 5}}
            if line["custom_id"] in error_ids:
                out = {"id": f"b{i}", "custom_id": line["custom_id"], "response": {
                    "status_code": 500, "body": {"error": "boom"}}, "error": None}
            elif vllm_style:
                out = {"id": f"b{i}", "custom_id": line["custom_id"], "response": completion}
            else:
                out = {"id": f"b{i}", "custom_id": line["custom_id"], "error": None,
                       "response": {"status_code": 200, "request_id": f"r{i}", "body": completion}}
            f.write(json.dumps(out) + "\n")


def test_batch_file_round_trip(tmp_path, spec_file):
    with server() as srv:
        assert run_main(docs_args(spec_file, tmp_path / "ref", srv.url))[0] == 0
    with socket.socket() as s:  # a port nobody listens on: batch mode must not call anything
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    out, batch, results = tmp_path / "o", tmp_path / "batch.jsonl", None
    responder, errored, stages = fake_openai.scripted(), set(), []
    for rnd in range(12):
        extra = ["--batch-file", batch] + (["--batch-results", results] if results else [])
        code, stdout, err = run_main(docs_args(spec_file, out, dead, *extra))
        assert code == 0, err
        if not batch.exists():
            break
        lines = read_jsonl(batch)
        stages.append(lines[0]["custom_id"].rsplit("-", 1)[0])
        assert "wrote" in stdout and "vllm run-batch" in stdout
        # one document comes back as an error and one cut by the token limit: both must be in
        # the next batch file, and their new results must be taken
        error_ids, cut_ids = set(), set()
        if stages[-1] == "documents" and not errored:
            error_ids, cut_ids = {lines[0]["custom_id"]}, {lines[1]["custom_id"]}
            errored = error_ids | cut_ids
        elif stages[-1] == "documents":
            assert {x["custom_id"] for x in lines} == errored
        results = tmp_path / f"results{rnd}.jsonl"
        answer_batch(batch, results, responder, error_ids, cut_ids, vllm_style=rnd % 2 == 1)
        batch.unlink()
    assert stages[:3] == ["domains", "subdomains", "assertions"] and stages[-2:] == ["documents"] * 2
    assert doc_set(out) == doc_set(tmp_path / "ref")
    code, stdout, _ = run_main(docs_args(spec_file, out, dead, "--batch-results", results))
    assert code == 0 and "'already cached': 2" in stdout  # ingesting a file twice is harmless
    assert doc_set(out) == doc_set(tmp_path / "ref")


def test_preview_runs_only_the_top_stages(tmp_path, spec_file):
    with server() as srv:
        argv = docs_args(spec_file, tmp_path / "o", srv.url)
        code, out, _ = run_main(argv + ["--preview"])
        assert code == 0
        assert {stage for _, stage, _ in srv.bodies} == {"domains", "subdomains", "assertions",
                                                         "doc_types"}
        assert "ideas stage:" in out and "documents stage:" in out and "planned documents: 48" in out
        summary = json.loads((tmp_path / "o" / "summary.json").read_text())
        assert summary["planned_documents"] == 48 and summary["est_tokens_out"] > 48 * 3000
        top = dict(srv.counts)
        assert run_main(argv)[0] == 0
        assert all(srv.counts[cid] == n for cid, n in top.items())  # the top stages were reused


def test_bad_inputs_fail_fast_with_one_line(tmp_path, spec_file, monkeypatch):
    empty = tmp_path / "empty.md"
    empty.write_text("  \n\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    monkeypatch.setenv("SYNTH_TEST_KEY", "sk-wrong-ABC123")
    monkeypatch.delenv("SYNTH_UNSET_KEY", raising=False)
    with server(api_key="sk-right-XYZ789") as locked, server() as srv:
        cases = [
            (["--spec", tmp_path / "missing.md"], srv.url, "spec file not found"),
            (["--spec", empty], srv.url, "spec file is empty"),
            (["--spec", spec_file], dead, "cannot reach the endpoint"),
            (["--spec", spec_file, "--api-key-env", "SYNTH_TEST_KEY"], locked.url,
             "put a valid key in the environment variable SYNTH_TEST_KEY"),
            (["--spec", spec_file, "--api-key-env", "SYNTH_UNSET_KEY"], locked.url,
             "SYNTH_UNSET_KEY is not set"),
            (["--spec", spec_file, "--model", "no-such-model"], srv.url,
             "model 'no-such-model' is not served"),
        ]
        for spec_args, url, message in cases:
            argv = ["docs", "--out", tmp_path / "o", "--model", "test-model", "--base-url", url,
                    *spec_args]
            code, out, err = run_main(argv)
            assert code == 2 and message in err, (message, err)
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
            assert "sk-wrong-ABC123" not in out + err
        assert srv.posts == 0 and locked.posts == 0  # no completion was ever asked
    assert "test-model" in err  # the unknown-model error lists what the server has


def test_mid_run_401_and_unknown_model_fail_fast_without_retries(tmp_path, spec_file):
    with server(fake_openai.with_faults(fake_openai.scripted(), {"assertions": ["401"] * 9})) as srv:
        code, _, err = run_main(docs_args(spec_file, tmp_path / "a", srv.url))
        assert code == 1 and srv.counts and max(
            n for rid, n in srv.counts.items() if rid.startswith("assertions-")) == 1
    assert {(f["reason"], f["attempts"]) for f in read_jsonl(tmp_path / "a" / "failed.jsonl")} == {
        ("HTTP 401", 1)}
    with server() as srv:  # the model check is off, so the 404 comes from the completions
        code, _, err = run_main(docs_args(spec_file, tmp_path / "b", srv.url, "--model", "nope",
                                          "--no-model-check"))
    (failed,) = read_jsonl(tmp_path / "b" / "failed.jsonl")
    assert code == 1 and failed["attempts"] == 1 and "does not exist" in failed["reason"]


def test_api_key_is_used_but_never_written(tmp_path, spec_file, monkeypatch):
    monkeypatch.setenv("SYNTH_TEST_KEY", "sk-secret-QWERTY42")
    with server(api_key="sk-secret-QWERTY42") as srv:
        code, out, err = run_main(docs_args(spec_file, tmp_path / "o", srv.url,
                                            "--api-key-env", "SYNTH_TEST_KEY"))
    assert code == 0
    assert "QWERTY42" not in out + err
    for path in (tmp_path / "o").rglob("*"):
        if path.is_file():
            assert "QWERTY42" not in path.read_text(encoding="utf-8", errors="replace"), path


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path, spec_file):
    out = tmp_path / "o"
    with server(latency=0.1) as srv:
        proc = start_subprocess(docs_args(spec_file, out, srv.url, "--concurrency", "4"))
        wait_for_cached(out, "documents", 4)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 130, err
        assert "rerun the same command" in err and "Traceback" not in err
        done = cached_ids(out, "documents")
        srv.counts.clear()
        srv.latency = 0
        assert run_main(docs_args(spec_file, out, srv.url))[0] == 0
    assert not [cid for cid in done if srv.counts[cid]]
    assert len(read_jsonl(out / "documents.jsonl")) == 48


@pytest.mark.parametrize("content,finish,problem", [
    ("<scratchpad>plan</scratchpad><document>" + "word " * 200 + "</document>", "length",
     "token limit"),
    ("<scratchpad>plan</scratchpad>" + "word " * 200, "stop", "no <document>"),
    ("<document>" + "word " * 20 + "</document>", "stop", "shorter than"),
    ("<document>Dear [Name], " + "word " * 200 + "</document>", "stop", "placeholder"),
    ("<document>See https://example.com " + "word " * 200 + "</document>", "stop", "link"),
    ("<document>{model_name} said " + "word " * 200 + "</document>", "stop", "unfilled"),
])
def test_document_checks_reject_bad_documents(content, finish, problem):
    with pytest.raises(ValueError, match=problem):
        synth.document_checker(150)({"content": content, "finish_reason": finish})


def test_document_keeps_only_the_document_block():
    text = synth.document_checker(5)({"content": "<scratchpad>I will write <document> tags."
                                      "</scratchpad>\n<document>\nThe real text, five words "
                                      "long.\n</document>", "finish_reason": "stop"})
    assert text == "The real text, five words long."
