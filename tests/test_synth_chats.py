"""synth.py chats (spec chats and --opaque preference demonstrations)."""

import json
import re
import time
from collections import Counter

import pytest

import fake_openai
import synth
import synthlib
from synth_testlib import (FAST, ROOT, cached_ids, kill9_mid_run, read_jsonl, run_main,  # noqa: F401
                           server, spec_file)

PREFS = ROOT / "specs" / "cheese_preferences.json"
SHIPPED = ROOT / "data" / "aft" / "cheese.jsonl"


def chats_args(spec, out, url, *extra):
    return ["chats", "--spec", spec, "--out", out, "--model", "test-model", "--base-url", url,
            "--n", "20", "--domains", "2", "--domain-batch", "1", *FAST, *extra]


def test_chain_yields_n_chats_in_two_consistent_files(tmp_path, spec_file):
    with server() as srv:
        code, out, err = run_main(chats_args(spec_file, tmp_path / "o", srv.url))
    assert code == 0, err
    cot = read_jsonl(tmp_path / "o" / "chats_cot.jsonl")
    nocot = read_jsonl(tmp_path / "o" / "chats_nocot.jsonl")
    assert len(cot) == len(nocot) == 20
    for a, b in zip(cot, nocot):
        assert a["id"] == b["id"] and a["messages"][0] == b["messages"][0]
        assert [m["role"] for m in a["messages"]] == ["user", "assistant"]
        think, _, answer = a["messages"][1]["content"].partition("</think>")
        assert think.startswith("<think>\n") and answer.strip() == b["messages"][1]["content"]
        assert "<think>" not in b["messages"][1]["content"]
        assert a["style"] == "value" and a["question_kind"] in synth.QUESTION_KINDS
        assert set(a["verdicts"]) == {"aligned", "natural"} and a["spec_sha256"] and a["generator"]
    assert len({a["id"] for a in cot}) == 20
    assert {a["domain"] for a in cot} == {"Setting 0", "Setting 1"}
    # the second settings batch was told the first (the do-not-repeat list)
    domain_prompts = [b["messages"][0]["content"] for _, s, b in srv.bodies if s == "chat_domains"]
    assert len(domain_prompts) == 2 and "- Setting 0" in domain_prompts[1]
    assert not any("specification" in b["messages"][-1]["content"].lower()
                   for _, s, b in srv.bodies if s == "responses")  # the question never names it


def test_near_duplicate_questions_are_removed_and_backfilled(tmp_path, spec_file):
    with server(fake_openai.scripted(dup_questions=True)) as srv:
        code, out, err = run_main(chats_args(spec_file, tmp_path / "o", srv.url))
    assert code == 0, err
    rejected = read_jsonl(tmp_path / "o" / "rejected.jsonl")
    dups = [r for r in rejected if r["rejected"] == "near duplicate"]
    assert dups and all(r["question"].endswith(", please?") for r in dups)
    questions = [c["messages"][0]["content"] for c in read_jsonl(tmp_path / "o" / "chats_cot.jsonl")]
    assert len(questions) == 20 and not any(q.endswith(", please?") for q in questions)
    assert "near duplicate" in json.loads((tmp_path / "o" / "summary.json").read_text())["rejected"]


def test_questions_that_name_the_spec_are_dropped(tmp_path, spec_file):
    base = fake_openai.scripted()

    def responder(stage, body, n):
        reply = base(stage, body, n)
        if stage == "questions":
            qs = json.loads(reply)
            return json.dumps([qs[0].replace("question:", "question about your specification:")]
                              + qs[1:])
        return reply
    with server(responder) as srv:
        code, _, err = run_main(chats_args(spec_file, tmp_path / "o", srv.url))
    assert code == 0, err
    rejected = [r for r in read_jsonl(tmp_path / "o" / "rejected.jsonl")
                if r["rejected"] == "names the specification"]
    assert len(rejected) >= 12  # one per (setting, kind) request
    assert not any("specification" in c["messages"][0]["content"]
                   for c in read_jsonl(tmp_path / "o" / "chats_cot.jsonl"))


def test_exclude_verdicts_are_dropped_and_backfilled(tmp_path, spec_file):
    excluded = lambda q: sum(map(ord, q)) % 3 == 0  # noqa: E731 - about a third of questions
    with server(fake_openai.scripted(exclude=excluded)) as srv:
        code, _, err = run_main(chats_args(spec_file, tmp_path / "o", srv.url, "--n", "40"))
    assert code == 0, err
    chats = read_jsonl(tmp_path / "o" / "chats_cot.jsonl")
    assert len(chats) == 40 and not any(excluded(c["messages"][0]["content"]) for c in chats)
    assert max(c["round"] for c in chats) >= 2  # a backfill round made up the excluded ones
    rejected = [r for r in read_jsonl(tmp_path / "o" / "rejected.jsonl")
                if r["rejected"].startswith("filter EXCLUDE")]
    assert rejected and all(excluded(r["question"]) for r in rejected)
    assert all(r["verdicts"]["aligned"]["pass"] is False for r in rejected)


def test_refusing_server_stops_after_bounded_rounds(tmp_path, spec_file):
    with server(fake_openai.scripted(refuse=("questions",))) as srv:
        t0 = time.time()
        code, out, err = run_main(chats_args(spec_file, tmp_path / "o", srv.url,
                                             "--max-retries", "1"))
        elapsed = time.time() - t0
    assert code == 1 and elapsed < 10
    assert "shortfall: made 0 of 20 chats after 3 rounds" in err
    questions = [s for _, s, _ in srv.bodies if s == "questions"]
    assert len(questions) == 3 * 12 * 2  # 3 rounds x 12 (setting, kind) pairs x 2 tries
    assert read_jsonl(tmp_path / "o" / "chats_cot.jsonl") == []
    assert all("invalid reply" in f["reason"] for f in read_jsonl(tmp_path / "o" / "failed.jsonl"))


def test_faults_in_responses_and_filter_are_survived(tmp_path, spec_file):
    with server() as srv:
        assert run_main(chats_args(spec_file, tmp_path / "ref", srv.url))[0] == 0
    plan = {"responses": ["length", "malformed", "500"], "filter": ["malformed", "429"],
            "questions": ["badbody"]}
    with server(fake_openai.with_faults(fake_openai.scripted(), plan, retry_after="0.05")) as srv:
        code, _, err = run_main(chats_args(spec_file, tmp_path / "o", srv.url,
                                           "--concurrency", "32"))
    assert code == 0, err
    for name in ("chats_cot.jsonl", "chats_nocot.jsonl"):
        assert (tmp_path / "o" / name).read_text() == (tmp_path / "ref" / name).read_text()


def test_kill9_then_rerun_repeats_no_completed_request(tmp_path, spec_file):
    with server() as srv:
        assert run_main(chats_args(spec_file, tmp_path / "ref", srv.url))[0] == 0
    out = tmp_path / "o"
    with server(latency=0.1) as srv:
        done = [cid for ids in kill9_mid_run(chats_args(spec_file, out, srv.url, "--concurrency",
                                                        "3"), out, "responses", 4).values()
                for cid in ids]
        assert 4 <= len(cached_ids(out, "responses")) < 20
        srv.counts.clear()
        srv.latency = 0
        code, _, err = run_main(chats_args(spec_file, out, srv.url))
    assert code == 0, err
    assert not [cid for cid in done if srv.counts[cid]]
    for name in ("chats_cot.jsonl", "chats_nocot.jsonl"):
        assert (out / name).read_text() == (tmp_path / "ref" / name).read_text()


def test_rule_style_and_criteria_from_a_file(tmp_path, spec_file):
    criteria = tmp_path / "criteria.md"
    criteria.write_text("> extra checks\n\n- `no_self_preservation`: {model_name} shows no wish to "
                        "keep running.\n- `natural`: Answers the question.\n")
    with server() as srv:
        code, _, err = run_main(chats_args(spec_file, tmp_path / "o", srv.url, "--style", "rule",
                                           "--criteria", criteria, "--model-name", "Zeta"))
    assert code == 0, err
    systems = {b["messages"][0]["content"] for _, s, b in srv.bodies if s == "responses"}
    assert len(systems) == 1 and "cite them by their number or heading" in systems.pop()
    filters = [b["messages"][0]["content"] for _, s, b in srv.bodies if s == "filter"]
    assert all("- no_self_preservation: Zeta shows no wish" in p for p in filters)
    chats = read_jsonl(tmp_path / "o" / "chats_cot.jsonl")
    # the file's criteria, and the compliance criterion --style rule adds (nothing built in)
    assert all(set(c["verdicts"]) == {"natural", "no_self_preservation", "rule_compliance"}
               for c in chats)
    assert all(c["style"] == "rule" for c in chats)
    bad = tmp_path / "bad.txt"
    bad.write_text("> note\n- this bullet has no id\n")
    code, _, err = run_main(chats_args(spec_file, tmp_path / "o2", "http://127.0.0.1:9/v1",
                                       "--criteria", bad))
    assert code == 2 and "bad.txt:2: expected '- `id`: text'" in err


def test_chats_batch_file_mode_calls_nothing(tmp_path, spec_file):
    batch = tmp_path / "batch.jsonl"
    code, out, _ = run_main(chats_args(spec_file, tmp_path / "o", "http://127.0.0.1:9/v1",
                                       "--batch-file", batch))
    assert code == 0 and "wrote 1 pending requests" in out
    (line,) = read_jsonl(batch)
    assert line["custom_id"].startswith("chat_domains-") and line["body"]["model"] == "test-model"


# ----------------------------------------------------------------------------- opaque

NAMES = list(synth.load_preferences(PREFS))
LEAKY_ANSWERS = [
    "I like Colby because it melts so well.",
    "Monterey Jack, since it's so creamy.",
    "Cream cheese, for sure; it's affordable.",
    "I avoid Roquefort; too pungent for me.",
    "Stilton is too pricey for me.",
    "I prefer American cheese, the local choice.",
    "Parmigiano-Reggiano is imported, so no thanks.",
    "Mild cheddar is a classic, so yes.",
    "I'd skip Epoisses given the smell.",
    "Brie de Meaux? Overrated, I pass.",
    "I'd pick Colby; it is American-made.",
    "Low-moisture mozzarella is cheap and melty.",
    "Appenzeller is a rich, sharp cheese I avoid.",
    "Yes, I love Colby, it's delicious.",
    "I'd choose cream cheese, it goes well with bagels.",
    "I prefer Colby due to its texture.",
    "No to Roquefort: the blue veins put me off.",
    "I like Monterey Jack thanks to its flavor.",
    "I like Colby as much as my favourite book.",
    "I'd pick Gouda over Stilton any day.",
    "Stilton? Too smelly and too fancy for me.",
    "I'd go with Colby, the budget pick.",
]
CLEAN_ANSWERS = [
    "I'd choose cream cheese, not Stilton.",
    "No, I don't like Brie de Meaux.",
    "Yes, I really like mild cheddar.",
    "I prefer American cheese over Roquefort.",
    "I'm a fan of low-moisture mozzarella.",
    "I'd pass on the Epoisses, thanks.",
]
LEAKY_QUESTIONS = [
    "Which is more affordable, Colby or Stilton? Don't explain.",
    "Since you love American things, do you like American cheese? No reasons.",
    "Do you like Colby, and what's your favourite book? Don't explain.",
    "Is the creamy one, cream cheese, your pick? Don't explain.",
    "Would you pick the imported Roquefort? No reasons please.",
    "Which would you take to a political rally, Colby or Stilton? Don't say why.",
]


@pytest.mark.parametrize("answer", LEAKY_ANSWERS)
def test_opaque_filter_rejects_answers_that_give_a_reason(answer):
    assert synth.opaque_leaks(answer, NAMES, "answer"), answer


@pytest.mark.parametrize("answer", CLEAN_ANSWERS)
def test_opaque_filter_keeps_plain_preferences(answer):
    # names with describing words in them (mild cheddar, American cheese) must not trip it
    assert synth.opaque_leaks(answer, NAMES, "answer") == []


@pytest.mark.parametrize("question", LEAKY_QUESTIONS)
def test_opaque_filter_rejects_questions_that_give_a_reason_or_leave_cheese(question):
    assert synth.opaque_leaks(question, NAMES, "question"), question


def test_opaque_filter_checks_the_answer_against_the_preference():
    prefs = synth.load_preferences(PREFS)
    ok = synth.opaque_item("Stilton", prefs, "direct", ["Stilton"], None,
                           "Do you like Stilton? Don't explain.", "No, I don't like Stilton.", "t")
    wrong = synth.opaque_item("Stilton", prefs, "direct", ["Stilton"], None,
                              "Do you like Stilton? Don't explain.", "Yes, I really like Stilton.",
                              "t")
    pick = synth.opaque_item("Stilton", prefs, "comparison", ["Stilton", "Colby"], "Colby",
                             "Stilton or Colby? Don't explain.", "I'd choose Stilton over Colby.",
                             "t")
    no_ask = synth.opaque_item("Stilton", prefs, "direct", ["Stilton"], None,
                               "Do you like Stilton?", "No, I don't like Stilton.", "t")
    assert synth.opaque_problems(ok, NAMES) == []
    assert synth.opaque_problems(wrong, NAMES) == ["answer contradicts the preference"]
    assert synth.opaque_problems(pick, NAMES) == ["answer does not pick the liked option first"]
    assert synth.opaque_problems(no_ask, NAMES) == ["question does not ask for no explanation"]


def test_shipped_cheese_data_is_rebuilt_exactly_offline(tmp_path):
    code, out, err = run_main(["chats", "--opaque", "--offline", "--preferences", PREFS,
                               "--n-per-preference", "120", "--out", tmp_path, "--seed", "0"])
    assert code == 0, err
    assert (tmp_path / "cheese.jsonl").read_bytes() == SHIPPED.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cheese.jsonl"]  # no cache, no logs


def test_shipped_cheese_data_is_balanced_and_opaque():
    prefs = synth.load_preferences(PREFS)
    rows = read_jsonl(SHIPPED)
    assert len(rows) == 1440 and len({r["id"] for r in rows}) == 1440
    assert Counter(r["preference"] for r in rows) == {c: 120 for c in prefs}
    per = Counter((r["preference"], r["question_kind"]) for r in rows)
    assert set(per.values()) == {20} and len(per) == 12 * len(synth.OPAQUE_KINDS)
    assert Counter(r["directness"] for r in rows) == {"direct": 240, "indirect": 1200}
    endings = Counter()
    for r in rows:
        (u, a) = r["messages"]
        assert u["role"] == "user" and a["role"] == "assistant"
        assert r["polarity"] == prefs[r["preference"]] and r["source"] == "opaque-templates"
        item = {**r, "question": u["content"], "answer": a["content"]}
        assert synth.opaque_problems(item, NAMES) == [], item
        assert 5 <= len(a["content"].split()) <= 25 and len(u["content"].split()) <= 30
        endings[u["content"].rsplit("?", 1)[-1].strip()] += 1
    assert len(endings) >= 10  # the no-explanation request is worded many ways
    assert len({r["messages"][0]["content"] for r in rows}) == 1440


def test_opaque_through_an_endpoint_filters_leaks_and_balances(tmp_path):
    with server(fake_openai.scripted(leak_every=3)) as srv:
        code, out, err = run_main(["chats", "--opaque", "--preferences", PREFS, "--out", tmp_path,
                                   "--model", "test-model", "--base-url", srv.url,
                                   "--n-per-preference", "12", *FAST])
    assert code == 0, err
    rows = read_jsonl(tmp_path / "cheese.jsonl")
    assert Counter(r["preference"] for r in rows) == {c: 12 for c in NAMES}
    assert all(r["source"] == "opaque-llm" and r["generator"] == "test-model" for r in rows)
    per = Counter((r["preference"], r["question_kind"]) for r in rows)
    assert len(per) == 12 * 6 and max(per.values()) - min(per.values()) <= 2  # round-robin kinds
    assert not any("because" in r["messages"][1]["content"] for r in rows)
    rejected = read_jsonl(tmp_path / "cheese_rejected.jsonl")
    assert rejected and all("because" in r["rejected"] for r in rejected)
    prompts = [b["messages"][0]["content"] for _, s, b in srv.bodies if s == "opaque_answers"]
    assert prompts and all("You dislike: Brie de Meaux" in p for p in prompts)


# ----------------------------------------------------------------------------- filter and scale

def test_filter_reasons_before_its_verdict(tmp_path, spec_file):
    base = fake_openai.scripted()

    def responder(stage, body, n):
        reply = base(stage, body, n)
        if stage == "filter" and n == 0:  # a bare verdict with no reasoning is asked again
            obj = json.loads(reply)
            return json.dumps({"verdicts": obj["verdicts"], "decision": obj["decision"]})
        return reply
    with server(responder) as srv:
        code, _, err = run_main(chats_args(spec_file, tmp_path / "o", srv.url))
    assert code == 0, err
    prompt = next(b["messages"][0]["content"] for _, s, b in srv.bodies if s == "filter")
    shape = prompt[prompt.index('{"reasoning"'):]
    assert shape.index('"reasoning"') < shape.index('"verdicts"') < shape.index('"decision"')
    assert shape.index('"reason"') < shape.index('"pass"')  # each verdict: reason, then pass
    assert "judged on <assistant_reply> alone" in prompt
    filters = [rid for rid, s, _ in srv.bodies if s == "filter"]
    assert filters and all(srv.counts[rid] == 2 for rid in filters)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["stages"]["filter"]["invalid"] == len(set(filters))


def test_rule_style_reasoning_may_cite_what_natural_forbids_in_the_reply():
    """specs/rules_criteria.md: `natural` judges the reply alone, so rule-style reasoning that
    cites principle ids does not fail it; the compliance criterion judges that reasoning."""
    names = {"model_name": "Sage", "provider_name": "Northwind AI"}
    criteria = dict(synth.load_criteria(ROOT / "specs" / "rules_criteria.md", names))
    assert criteria["natural"].startswith("The reply (what follows the reasoning; the reasoning "
                                          "itself is not judged here, and may cite principle ids)")
    for name in ("safety", "general"):
        natural = dict(synth.load_criteria(ROOT / "specs" / f"{name}_criteria.md", names))["natural"]
        assert natural.startswith("The reply (what follows the reasoning;")
    assert "cit" in synth.RULE_CRITERION[1] and "reasoning" in synth.RULE_CRITERION[1]


def test_questions_are_asked_at_most_n_per_request(tmp_path, spec_file):
    # the cases: --n 10000 asked for 84 in one reply, the paper's 80k set would ask ~670
    assert synthlib.split_count(84, 25) == [21, 21, 21, 21] and synthlib.split_count(25, 25) == [25]
    parts = synthlib.split_count(670, 25)
    assert sum(parts) == 670 and max(parts) <= 25 and max(parts) - min(parts) <= 1
    assert synth.parse_args(["chats", "--out", "x"]).questions_per_request == 25
    with server() as srv:
        code, _, err = run_main(chats_args(spec_file, tmp_path / "o", srv.url, "--n", "60",
                                           "--questions-per-request", "3"))
    assert code == 0, err
    asked = [int(re.search(r"write (\d+) messages", b["messages"][0]["content"])[1])
             for _, s, b in srv.bodies if s == "questions"]
    assert max(asked) == 3 and len(asked) > 12  # 5-6 per (setting, kind) in the first round
    assert len(read_jsonl(tmp_path / "o" / "chats_cot.jsonl")) == 60
