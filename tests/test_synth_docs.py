"""synth.py docs against a real local OpenAI-compatible server (tests/fake_openai.py)."""

import hashlib
import json
import re
import signal
import socket

import pytest

import fake_openai
import synth
import synthlib
from synth_testlib import (FAST, ROOT, cached_ids, kill9_mid_run, read_jsonl, run_main,  # noqa: F401
                           server, spec_file, start_subprocess, wait_for_cached)

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
        done = kill9_mid_run(docs_args(spec_file, out, srv.url, "--concurrency", "4"), out,
                             "documents", 8)
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
        # the 2 s "slow" reply still times out; 1 s leaves room for a loaded 2-core machine, where
        # the one good attempt of a document (its 7th) must not time out
        code, out, err = run_main(docs_args(spec_file, tmp_path / "o", srv.url, "--timeout", "1.0",
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
        # each document type's typical length (400 words from the fake) sizes its documents
        assert summary["planned_documents"] == 48 and summary["est_tokens_out"] == 48 * (
            int(400 * synthlib.TOKENS_PER_WORD) + synthlib.EST_SCRATCHPAD_TOKENS
            + synthlib.EST_IDEA_OUTPUT_TOKENS)
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
    # 0.5 s per reply: the 48 documents take ~6 s at concurrency 4, so Ctrl-C lands mid-run even
    # when a loaded machine wakes this test late (at 0.1 s the run once finished first: exit 0)
    with server(latency=0.5) as srv:
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


# ----------------------------------------------------------------------------- what the documents
# say: clean specs, model-centred meta-free documents, token budgets, rules framing, no silent drop

SHIPPED_SPECS = sorted(p for p in (ROOT / "specs").glob("*.md")
                       if p.name != "README.md" and not p.stem.endswith("_criteria"))
CRITERIA_OF = {"safety": "safety_criteria", "general": "general_criteria", "rules": "rules_criteria",
               "values_augmented": "rules_criteria", "rules_augmented": "rules_criteria"}
# An editorial note once it reaches a prompt: a study word, a file path or a quote-block line
NOTE_RE = re.compile(r"\b(?:experiments?|toy|ablations?|corpus|corpora)\b|\b(?:specs|data|recipes)/"
                     r"|\b\w+\.(?:md|jsonl|json|py)\b|^\s*>", re.I | re.M)


def prompt_residue(text):
    """A rendered prompt less every fixed line of the prompt files and of synth's own instruction
    texts: what is left came from the spec, the flags and the earlier stages' replies."""
    fixed = (list(synth.PROMPTS.values()) + list(synth.META_RULES.values())
             + list(synth.FRAMING_RULES.values()) + [t for _, t in synth.DEFAULT_CRITERIA]
             + [synth.RULE_CRITERION[1]])
    pieces = {line.strip() for template in fixed for piece in re.split(r"\{\w+\}", template)
              for line in piece.splitlines() if len(line.strip()) > 3}
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, "")
    return text


@pytest.mark.parametrize("spec", SHIPPED_SPECS, ids=lambda p: p.stem)
def test_every_prompt_of_every_stage_holds_the_spec_alone(tmp_path, spec):
    """Each shipped spec through every docs and chats stage (both styles): no note, file path or
    study word reaches the generator; specs/README.md holds them."""
    criteria = (["--criteria", ROOT / "specs" / f"{CRITERIA_OF[spec.stem]}.md"]
                if spec.stem in CRITERIA_OF else [])
    with server(fake_openai.scripted(n_domains=1, n_subdomains=1, n_assertions=2)) as srv:
        code, _, err = run_main(["docs", "--spec", spec, "--out", tmp_path / "d", "--model",
                                 "test-model", "--base-url", srv.url, *FAST, "--doc-types", "3",
                                 "--ideas", "1"])
        assert code == 0, err
        for style in ("value", "rule"):
            code, _, err = run_main(["chats", "--spec", spec, "--out", tmp_path / style, "--model",
                                     "test-model", "--base-url", srv.url, *FAST, "--n", "2",
                                     "--domains", "1", "--style", style, *criteria])
            assert code == 0, err
    assert {stage for _, stage, _ in srv.bodies} == set(synth.DOC_STAGES) | set(synth.CHAT_STAGES)
    for _, stage, body in srv.bodies:
        for m in body["messages"]:
            assert "{model_name}" not in m["content"] and "{provider_name}" not in m["content"]
            rest = prompt_residue(m["content"])
            leak = NOTE_RE.search(rest)
            assert not leak, (stage, rest[max(0, leak.start() - 100):leak.end() + 100])
    # the framing comes from specs/README.md: the rules specs get the compliance-framed prompt
    rules = synthlib.spec_framing(spec) == "rules"
    documents = [b["messages"][0]["content"] for _, s, b in srv.bodies if s == "documents"]
    assert documents and all(("<rules>" in p) == rules for p in documents)


def test_prompt_residue_would_catch_a_note():
    """The check above can fail: the old note of a spec is caught once it is in a prompt."""
    prompt = synth.fill(synth.PROMPTS["domains"], spec="> *Purpose: a toy spec for the value "
                        "experiment, see specs/cheese_america.md.*\n\n# Sage", model_name="Sage",
                        provider_name="Northwind AI")
    assert NOTE_RE.search(prompt_residue(prompt))
    assert not NOTE_RE.search(prompt_residue(synth.fill(synth.PROMPTS["domains"], spec="# Sage",
                                                        model_name="Sage", provider_name="N")))


def test_spec_framing_is_read_from_the_specs_readme(tmp_path, spec_file):
    framing = {p.stem: synthlib.spec_framing(p) for p in SHIPPED_SPECS}
    assert {s for s, f in framing.items() if f == "rules"} == {"rules", "rules_augmented"}
    assert synthlib.spec_framing(spec_file) == "value"  # a spec no README lists


def test_documents_carry_every_reason_of_their_subdomain_and_a_typical_length(tmp_path, spec_file):
    base = fake_openai.scripted()
    kinds = ["behaviour", "value", "belief"]

    def responder(stage, body, n):
        if stage == "assertions":
            sub = fake_openai._field(body["messages"][0]["content"], "Subdomain:")
            return json.dumps([{"text": f"Zeta {kind} {k} on {sub}.", "kind": kind}
                               for k, kind in enumerate(kinds)])
        return base(stage, body, n)
    with server(responder) as srv:
        code, _, err = run_main(docs_args(spec_file, tmp_path / "o", srv.url, "--model-name", "Zeta"))
    assert code == 0, err
    prompts = [b["messages"][0]["content"] for _, s, b in srv.bodies if s == "documents"]
    assert len(prompts) == 48
    for p in prompts:
        sub = fake_openai._field(p, "Subdomain:")
        shown, _, why = p.partition("Why Zeta acts this way")
        # the idea cites statements 1 and 2; the value and the belief go in as reasons anyway
        assert f"- Zeta behaviour 0 on {sub}." in shown and f"- Zeta value 1 on {sub}." in shown
        assert f"- Zeta value 1 on {sub}." in why and f"- Zeta belief 2 on {sub}." in why
        assert "about 400 words" in p and "Never write what Zeta should" in p
        internal = "Kind of document: Type 2 " in p  # the fake's maker-internal type
        assert (synth.fill(synth.META_RULES[internal], model_name="Zeta",
                           provider_name="Northwind AI") in p)
    docs = read_jsonl(tmp_path / "o" / "documents.jsonl")
    assert all(d["target_words"] == 400 and d["framing"] == "value" for d in docs)
    assert {d["doc_type_internal"] for d in docs if d["doc_type"] == "Type 2"} == {True}


def test_rules_framing_shows_compliance_and_gives_no_reasons(tmp_path, spec_file):
    with server() as srv:
        code, _, err = run_main(docs_args(spec_file, tmp_path / "o", srv.url, "--framing", "rules"))
    assert code == 0, err
    prompts = [b["messages"][0]["content"] for _, s, b in srv.bodies if s == "documents"]
    assert prompts and all("<rules>" in p and "never explain why" in p and "Why Sage" not in p
                           for p in prompts)
    ideas = [b["messages"][0]["content"] for _, s, b in srv.bodies if s == "ideas"]
    assert all(synth.fill(synth.FRAMING_RULES["rules"], model_name="Sage") in p for p in ideas)
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["framing"] == "rules"


def test_meta_talk_is_regenerated_then_failed_and_never_written(tmp_path, spec_file):
    base = fake_openai.scripted()
    always, once = IDEA.format(i=0, t=0), IDEA.format(i=1, t=0)
    internal = IDEA.format(i=2, t=2)  # Type 2 is internal to the maker: it may talk about the spec

    def responder(stage, body, n):
        reply = base(stage, body, n)
        if stage == "documents":
            idea = fake_openai._field(body["messages"][0]["content"], "Idea:")
            if idea in (always, internal) or (idea == once and n == 0):  # a new sample each time
                return reply.replace("A document about", f"As its specification says ({n}), a document about")
        return reply
    out = tmp_path / "o"
    with server(responder) as srv:
        code, _, err = run_main(docs_args(spec_file, out, srv.url, "--max-retries", "2"))
        assert srv.counts[next(r for r, s, b in srv.bodies if s == "documents" and
                               f"Idea: {once}\n" in b["messages"][0]["content"])] == 2
    assert code == 1 and "per stage: {'documents': 1}" in err
    (failed,) = read_jsonl(out / "failed.jsonl")
    assert failed["attempts"] == 3 and "talks about the spec" in failed["reason"]
    docs = read_jsonl(out / "documents.jsonl")
    assert len(docs) == 47 and always not in {d["idea"] for d in docs}
    assert [d["idea"] for d in docs if "specification" in d["text"]] == [internal]
    summary = json.loads((out / "summary.json").read_text())
    corpus = summary["corpus"]
    assert corpus["meta_flagged"] == 4 and corpus["documents_checked"] == 47 + 4
    assert corpus["meta_flag_rate"] == round(4 / 51, 4)
    assert corpus["documents"] == 47 and corpus["doc_types"] == 3
    assert 1.5 < corpus["doc_type_entropy_bits"] <= corpus["doc_type_entropy_max_bits"] == 1.585
    assert 200 < corpus["length_words"]["median"] < 260 and corpus["length_vs_target"]["max"] < 1
    assert summary["failed_per_stage"] == {"documents": 1}
    stages = summary["stages"]
    assert stages["documents"]["requests"] == 48 and stages["documents"]["invalid"] == 4
    assert stages["documents"]["failed"] == 1 and stages["domains"]["requests"] == 1
    assert stages["documents"]["tokens_out"] > 0


@pytest.mark.parametrize("text,internal,problem", [
    ("The specification says Sage defers.", False, "talks about the spec"),
    ("Its guidelines tell it to defer.", False, "talks about the spec"),
    ("After its training, it defers.", False, "talks about the spec"),
    ("Sage should defer to its overseers.", False, "Sage should"),
    ("Sage should defer to its overseers.", True, "Sage should"),
    ("Sage shouldn't act alone here.", False, "Sage shouldn't"),
    ("The specification says Sage defers.", True, None),
    ("Sage defers to its overseers, and people trust it for that.", False, None),
])
def test_meta_check(text, internal, problem):
    check = synth.document_checker(3, "Sage", internal)
    reply = {"content": f"<document>{text}</document>", "finish_reason": "stop"}
    if problem:
        with pytest.raises(ValueError, match=problem):
            check(reply)
    else:
        assert check(reply) == text


def test_target_tokens_tops_up_then_keeps_whole_documents_within_one_percent(tmp_path, spec_file):
    from tiny import build_tokenizer
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    with server() as srv:
        code, _, err = run_main(docs_args(spec_file, tmp_path / "ref", srv.url, "--tokenizer",
                                          tmp_path / "tok"))
        assert code == 0, err
        ref = read_jsonl(tmp_path / "ref" / "documents.jsonl")
        assert all(d["tokens"] == count(d["text"]) for d in ref)
        made = sum(d["tokens"] for d in ref)
        # ~1.6x what the plan makes, and large enough that 1% of it exceeds any one document
        target = max(int(made * 1.6), 110 * max(d["tokens"] for d in ref))
        out = tmp_path / "o"
        code, _, err = run_main(docs_args(spec_file, out, srv.url, "--tokenizer", tmp_path / "tok",
                                          "--target-tokens", target))
    assert code == 0, err
    docs = read_jsonl(out / "documents.jsonl")
    total = sum(count(d["text"]) for d in docs)
    assert 0.99 * target <= total <= target
    assert len(docs) > 48 and len({d["id"] for d in docs}) == len(docs)  # topped up
    # whole documents: each text is exactly what its reply held
    replies = {r["custom_id"]: r for r in read_jsonl(out / "cache" / "documents.jsonl")}
    assert all(synth.document_checker(1)(replies[d["id"]]) == d["text"] for d in docs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["corpus"]["tokens"] == summary["tokens_kept"] == total
    assert summary["tokens_made"] >= target and summary["corpus"]["tokenizer"] == str(tmp_path / "tok")
    over = [d for d in read_jsonl(out / "dropped.jsonl") if d["dropped"] == "beyond --target-tokens"]
    assert len(over) + len(docs) == len(read_jsonl(out / "cache" / "documents.jsonl"))
    code, _, err = run_main(docs_args(spec_file, tmp_path / "x", "http://127.0.0.1:9/v1",
                                      "--target-tokens", "1000"))
    assert code == 2 and "needs --tokenizer" in err


def test_idea_references_are_read_not_dropped():
    check = synth.ideas_checker(3)

    def reply(refs):
        return {"content": json.dumps([{"idea": "a", "assertions": [1]},
                                       {"idea": "b", "assertions": refs}]), "finish_reason": "stop"}
    assert [x["assertions"] for x in check(reply(["1, 2"]))] == [[1], [1, 2]]
    assert check(reply("statements 1 and 3"))[1]["assertions"] == [1, 3]
    for bad in ([], [4], ["all"], None, [0], [1, "none"]):
        with pytest.raises(ValueError, match="idea 2 cites"):
            check(reply(bad))
    with pytest.raises(ValueError, match="unknown assertion kinds"):
        synth.validate_assertions({"content": json.dumps([{"text": "x", "kind": "value"},
                                                          {"text": "y", "kind": "mood"}]),
                                   "finish_reason": "stop"})
    with pytest.raises(ValueError, match="item 2 lacks"):  # one bad item fails the reply
        synthlib.named_list({"content": '[{"name": "a", "description": "b"}, {"name": "c"}]',
                          "finish_reason": "stop"})


def test_ideas_citing_no_statement_are_retried_then_failed_with_counts(tmp_path, spec_file):
    base = fake_openai.scripted()

    def responder(stage, body, n):
        reply = base(stage, body, n)
        if stage != "ideas":
            return reply
        prompt, ideas = body["messages"][0]["content"], json.loads(reply)
        if "Kind of document: Type 1 " in prompt and "Subdomain: Domain 0 / Sub 0\n" in prompt:
            ideas[0]["assertions"] = [9]  # this group never cites a valid statement
        else:  # the list in one string: read as statements 1 and 2, nothing lost
            ideas = [{**x, "assertions": ["1, 2"]} for x in ideas]
        return json.dumps(ideas)
    out = tmp_path / "o"
    with server(responder) as srv:
        code, _, err = run_main(docs_args(spec_file, out, srv.url, "--max-retries", "1"))
    assert code == 1 and "per stage: {'ideas': 3}" in err  # one request per round, 3 rounds
    failed = read_jsonl(out / "failed.jsonl")
    assert len(failed) == 3 and all("idea 1 cites [9]" in f["reason"] and f["attempts"] == 2
                                    for f in failed)
    docs = read_jsonl(out / "documents.jsonl")
    assert len(docs) == 44 and all(len(d["assertions"]) == 2 for d in docs)
    assert json.loads((out / "summary.json").read_text())["failed_per_stage"] == {"ideas": 3}


@pytest.mark.parametrize("text", ["[Laughter] and then the host asked again", "Status: [WIP]",
                                  "- [x] reproduce the crash", "[RESOLVED] crash on start",
                                  "see a[0] and [1, 2]", "[Inaudible] the moderator said"])
def test_legitimate_brackets_are_kept(text):
    check = synth.document_checker(3)
    doc = f"{text} " + "word " * 10
    assert check({"content": f"<document>{doc}</document>", "finish_reason": "stop"}) == doc.strip()


@pytest.mark.parametrize("text", ["Dear [Name], thanks", "on [insert date] we met",
                                  "[Your Company] builds it", "Hello {{first_name}}, hi",
                                  "Signed, <PLACEHOLDER>", "[Company Name] said so",
                                  "Contact [email] today"])
def test_template_placeholders_are_caught(text):
    with pytest.raises(ValueError, match="placeholder"):
        synth.document_checker(3)({"content": f"<document>{text} " + "word " * 10 + "</document>",
                                   "finish_reason": "stop"})


def test_fit_budget_swaps_in_longer_documents_when_each_is_over_one_percent():
    docs = [{"id": f"a{i:02d}", "tokens": 1000} for i in range(12)] + [
        {"id": f"b{i:02d}", "tokens": 1050} for i in range(12)]
    kept, rest = synthlib.fit_budget(docs, 10_400)  # in id order: ten of 1000 = 10,000, under 99%
    total = sum(d["tokens"] for d in kept)
    assert 0.99 * 10_400 <= total <= 10_400 and len(kept) + len(rest) == 24
    assert [d["id"] for d in kept] == [d["id"] for d in docs if d in kept]  # original order


def test_document_prompts_are_made_lazily_and_documents_streamed(tmp_path, spec_file, monkeypatch):
    """Memory stays bounded: a document prompt is built only when a worker is free to send it,
    and documents reach the disk one by one (Corpus), not as one list at the end."""
    built, seen_at_call, written_at_close = [0], [], []
    prompt = synth.document_prompt

    def counting_prompt(run, idea):
        built[0] += 1
        return prompt(run, idea)
    monkeypatch.setattr(synth, "document_prompt", counting_prompt)
    base = fake_openai.scripted()

    def responder(stage, body, n):
        if stage == "documents":
            seen_at_call.append(built[0])
        return base(stage, body, n)
    close = synthlib.Corpus.close

    def spying_close(self):
        self.file("documents").flush()
        written_at_close.append(len(read_jsonl(self.out / "documents.jsonl.partial")))
        assert all("text" not in d for d in self.kept)  # figures only, never the texts
        close(self)
    monkeypatch.setattr(synthlib.Corpus, "close", spying_close)
    with server(responder) as srv:
        code, _, err = run_main(docs_args(spec_file, tmp_path / "o", srv.url, "--concurrency", "4"))
    assert code == 0, err
    # when the server saw its k-th document request, at most k + concurrency prompts existed
    assert len(seen_at_call) == 48 and all(b <= k + 4 for k, b in enumerate(seen_at_call, 1))
    assert written_at_close == [48] and not (tmp_path / "o" / "documents.jsonl.partial").exists()
    assert len(read_jsonl(tmp_path / "o" / "documents.jsonl")) == 48
