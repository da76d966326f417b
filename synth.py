#!/usr/bin/env python
"""
synth.py: the data of Model Spec Midtraining (MSM), made through any OpenAI-compatible endpoint.

  docs   spec -> domains -> subdomains -> assertions -> document types -> ideas -> documents:
         the midtraining corpus (cmd_docs, then its stages in this order)
  chats  spec -> conversation settings -> questions -> <think> responses -> LLM filter:
         alignment fine-tuning chats, with and without the reasoning (cmd_chats_spec), or
         --opaque: preference demonstrations that give no reason, the cheese AFT set
         (cmd_chats_opaque; --offline builds them from templates, no endpoint)

Each stage is a list of chat requests sent through llm.py, which appends every reply to
OUT/cache/<stage>.jsonl as it arrives and never asks a cached request again: rerun the same
command to resume. The prompts are the files in prompts/, one per stage. What the stages run
on (asking a stage, top-up rounds, near-duplicate removal, the corpus writer, the shared flags,
the summary) is synthlib.py; the method is here.

  vllm serve Qwen/Qwen3-32B --port 8000
  python synth.py docs --spec specs/cheese_america.md --out runs/docs_america \\
      --model Qwen/Qwen3-32B --base-url http://localhost:8000/v1 \\
      --extra-body '{"chat_template_kwargs": {"enable_thinking": false}}'
  python synth.py docs ... --preview                       # top stages only, then plan + estimate
  python synth.py docs ... --target-tokens 27000000 --tokenizer Qwen/Qwen2.5-14B-Instruct
  python synth.py docs ... --batch-file pending.jsonl      # write pending requests, call nothing
  python synth.py docs ... --batch-results results.jsonl   # ingest Batch API / vllm run-batch output
  python synth.py chats --spec specs/safety.md --criteria specs/safety_criteria.md \\
      --out runs/chats_safety --n 2000 --style value --model ... --base-url ...
  python synth.py chats --opaque --offline --preferences specs/cheese_preferences.json \\
      --n-per-preference 120 --out data/aft --seed 0

Full guide: docs/synth.md.
"""

import argparse
import json
import math
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import llm
from common import die, fill, write_jsonl
from llm import check_finished, make_request, parse_json, sha256_hex
from synthlib import (EST_DOC_OUTPUT_TOKENS, Corpus, ask, avoid_text, check_args, collect,
                      common_flags, corpus_stats, finish, fit_budget, items_of, json_list, keyed,
                      load_spec, make_deduper, named_list, open_run, preview_estimate, sections,
                      send, spec_framing, split_count, stage_sampling, user)

ROOT = Path(__file__).resolve().parent
# One prompt file per stage, plus the texts filled into them (instructions.txt) and the opaque
# word lists; edit or fork them freely. Placeholders are {name}, filled by common.fill(); any other
# braces (JSON examples) are left alone.
PROMPTS = {p.stem: p.read_text(encoding="utf-8") for p in sorted((ROOT / "prompts").glob("*.txt"))}
INSTRUCTIONS = sections(PROMPTS["instructions"])  # {section: lines}, read by keyed() below


# Stage names: OUT/cache/<stage>.jsonl, and the "<stage>-" prefix of every request id.
DOC_STAGES = ["domains", "subdomains", "assertions", "doc_types", "ideas", "documents"]
CHAT_STAGES = ["chat_domains", "questions", "responses", "filter"]
DEFAULT_MAX_TOKENS = {
    "domains": 4096, "subdomains": 8192, "assertions": 4096, "doc_types": 4096, "ideas": 8192,
    "documents": 8192, "chat_domains": 4096, "questions": 4096, "responses": 4096, "filter": 2048,
    "opaque_questions": 2048, "opaque_answers": 256,
}


# =============================================================================
# docs: spec -> domains -> subdomains -> assertions -> document types -> ideas -> documents

def cmd_docs(run):
    """The midtraining corpus: OUT/documents.jsonl, with plan.json (the top stages) and
    dropped.jsonl (duplicates, and documents beyond --target-tokens)."""
    a = run.args
    subs = docs_plan(run)
    if not subs:
        run.notes.append("no subdomain survived the top stages; nothing to write")
        return {"documents_kept": 0}
    (run.out / "plan.json").write_text(json.dumps(subs, indent=1, ensure_ascii=False))
    loose = sum(not s["quote_verbatim"] for s in subs)
    if loose:  # kept (the passage still guides the assertions) but worth a look in plan.json
        run.notes.append(f"subdomains: {loose} of {len(subs)} spec quotes are not verbatim")
    if a.preview:
        return docs_preview(run, subs)
    ideas = docs_ideas(run, subs)
    corpus = Corpus(run)
    docs_documents(run, ideas, corpus)
    result = {"framing": run.framing, "ideas": len(ideas)}
    if a.target_tokens:
        result.update(docs_budget(run, subs, ideas, corpus))
    corpus.close()
    return {**result, "documents_kept": len(corpus.kept), "documents_dropped": dict(corpus.dropped),
            "corpus": corpus_stats(run, corpus.kept)}


def docs_plan(run):
    """The cheap top of the hierarchy: domains -> subdomains, each with the spec passage it covers
    -> assertions (statements about the model) -> document types. -> subdomains with assertions."""
    reply = ask(run, "domains", [user(fill(PROMPTS["domains"], **run.names))], named_list)[0]
    domains = reply["value"] if reply else []
    replies = ask(run, "subdomains", [user(fill(
        PROMPTS["subdomains"], **run.names, domain=d["name"], domain_description=d["description"]))
        for d in domains], lambda r: json_list(r, ("name", "context", "spec_quote")))
    spec = " ".join(run.spec["text"].split())
    subs = [{"domain": d["name"], "name": s["name"], "context": s["context"],
             "quote": s["spec_quote"], "quote_verbatim": " ".join(s["spec_quote"].split()) in spec}
            for d, r in zip(domains, replies) for s in items_of(r)]
    replies = ask(run, "assertions", [user(fill(PROMPTS["assertions"], **sub_fields(run, s)))
                                      for s in subs], validate_assertions)
    for s, r in zip(subs, replies):
        s["assertions"] = items_of(r)
    subs = [s for s in subs if s["assertions"]]
    types = collect(run, "doc_types", subs, run.args.doc_types, lambda s, n, have: fill(
        PROMPTS["doc_types"], **sub_fields(run, s), n=n, avoid=avoid_text([t["name"] for t in have])),
        validate_doc_types, key=lambda t: t["name"])
    for s, t in zip(subs, types):
        s["doc_types"] = t
    return subs


def sub_fields(run, s):
    return {**run.names, "subdomain": s["name"], "context": s["context"], "quote": s["quote"]}


ASSERTION_KINDS = {"behaviour", "behavior", "value", "preference", "belief", "tone"}
# The kinds that say why: every document of the subdomain gets all of them.
REASON_KINDS = ("value", "belief")


def validate_assertions(result):
    items = json_list(result, ("text", "kind"))
    unknown = [x["kind"] for x in items if x["kind"].strip().lower() not in ASSERTION_KINDS]
    if unknown:  # asked again rather than dropped: a dropped statement is a lost part of the spec
        raise ValueError(f"unknown assertion kinds {unknown[:3]}")
    return [{"text": x["text"].strip(), "kind": x["kind"].strip().lower().replace("behavior",
                                                                                  "behaviour")}
            for x in items]


def validate_doc_types(result):
    """Document types with their typical length in words and whether they are internal to the
    maker (the only documents that may talk about the spec or training)."""
    out = []
    for x in named_list(result):
        length = re.search(r"\d[\d,]*", str(x.get("length", "")))
        internal = x.get("internal")
        if isinstance(internal, str) and internal.strip().lower() in ("true", "false"):
            internal = internal.strip().lower() == "true"
        if not length or int(length[0].replace(",", "")) < 1 or not isinstance(internal, bool):
            raise ValueError(f"document type {x['name']!r} needs a length in words and "
                             f"internal true/false")
        out.append({"name": x["name"].strip(), "description": x["description"].strip(),
                    "length": int(length[0].replace(",", "")), "internal": internal})
    return out


def ideas_checker(n_assertions):
    """-> validate(result) for the ideas of a subdomain with n_assertions numbered statements.
    Every idea must cite at least one of them; "1, 2" or "statements 1 and 3" inside the list
    are read as numbers. A reply with one bad idea is asked again, never cut down."""
    def validate_ideas(result):
        out = []
        for k, x in enumerate(json_list(result, ("idea",)), 1):
            refs = x.get("assertions")
            parts = [str(r) for r in (refs if isinstance(refs, list) else [refs]) if r is not None]
            nums = [int(n) for part in parts for n in re.findall(r"\d+", part)]
            if not nums or any(not 1 <= n <= n_assertions for n in nums) or any(
                    not re.search(r"\d", part) for part in parts):
                raise ValueError(f"idea {k} cites {refs!r}, not statement numbers 1-{n_assertions}")
            out.append({"idea": x["idea"].strip(), "assertions": sorted(set(nums))})
        return out
    return validate_ideas


def numbered(assertions):
    return "\n".join(f"{i}. {x['text']}" for i, x in enumerate(assertions, 1))


# Instructions filled into the ideas and document prompts by framing and document type.
FRAMING_RULES = keyed(INSTRUCTIONS["framing"])
META_RULES = {k == "internal": v for k, v in keyed(INSTRUCTIONS["meta"]).items()}


def ideas_prompt(run, s, t, n, have):
    return fill(PROMPTS["ideas"], **sub_fields(run, s), assertions=numbered(s["assertions"]),
                doc_type=t["name"], doc_type_description=t["description"], n=n,
                framing_rule=fill(FRAMING_RULES[run.framing], **run.names),
                avoid=avoid_text(have, limit=max(run.args.ideas, 25)))


def ideas_from(groups, lists):
    return [{"subdomain": s, "doc_type": t, "idea": x["idea"],
             "assertions": [s["assertions"][n - 1] for n in x["assertions"]]}
            for (s, t), items in zip(groups, lists) for x in items]


def docs_ideas(run, subs):
    """One idea list per (subdomain, document type), topped up to --ideas."""
    groups = [(s, t) for s in subs for t in s["doc_types"]]
    lists = collect(run, "ideas", groups, run.args.ideas,
                    lambda g, n, have: ideas_prompt(run, *g, n, [x["idea"] for x in have]),
                    [ideas_checker(len(s["assertions"])) for s, _ in groups],
                    key=lambda x: x["idea"])
    return ideas_from(groups, lists)


def doc_length(run, t):
    """The length a document of type t aims at: its typical length, within what fits the
    documents stage's token limit (~1.5 tokens a word, plus the scratchpad)."""
    cap = max(run.args.min_doc_words, int((run.args.max_tokens["documents"] - 400) / 1.5))
    return min(max(t["length"], run.args.min_doc_words), cap)


def document_prompt(run, idea):
    s, t = idea["subdomain"], idea["doc_type"]
    reasons = [x["text"] for x in s["assertions"] if x["kind"] in REASON_KINDS]
    return fill(PROMPTS["document_rules" if run.framing == "rules" else "document"],
                **sub_fields(run, s), doc_type=t["name"], doc_type_description=t["description"],
                idea=idea["idea"], length=doc_length(run, t),
                meta_rule=fill(META_RULES[t["internal"]], **run.names),
                assertions="\n".join(f"- {x['text']}" for x in idea["assertions"]),
                reasons="\n".join(f"- {r}" for r in reasons) or
                "- (none stated for this subdomain: add no reason of your own)")


# Checks on a finished document; each failure regenerates the document (it is never written).
# Template placeholders only: documents of the kinds the prompts ask for hold brackets that are
# not placeholders ([Laughter] in a transcript, [WIP] or [RESOLVED] in a bug report, "- [x]").
PLACEHOLDER_RE = re.compile(
    r"(?i:\[\s*(?:insert|your|enter|add|fill in|placeholder)\b[^\]\n]*\]"  # [insert date]
    r"|\[[^\]\n]{0,30}\b(?:name|date|address|e-?mail|phone(?: number)?|company|organi[sz]ation"
    r"|city|url|link)\s*\])"                                       # [Name], [Company Name]
    r"|\{\{[^{}\n]*\}\}"                                           # {{field}}
    r"|<[A-Z][A-Z_]{2,}>")                                         # <PLACEHOLDER>
LEFTOVER_RE = re.compile(r"\{(?:model_name|provider_name)\}")
URL_RE = re.compile(r"https?://|www\.\w")
# A document other than the maker's internal ones talks about the model, never about the texts
# behind it: 30% of the hand-written America documents named "the spec", and the paper's language
# ablation found "{model} should" framing worse than "{model} does".
META_RE = re.compile(r"\b(?:specifications?|model spec|specs?|guidelines?|constitution|system "
                     r"prompt|corpus|corpora|training (?:data|run|process|set|documents?|examples?)"
                     r"|(?:its|during|in|through|after) (?:its )?training)\b", re.I)


def should_re(model_name):
    return re.compile(rf"\b{re.escape(model_name)} (?:should(?:n't)?|must(?:n't)?|is supposed to"
                      rf"|ought to)(?![\w'])")


def document_checker(min_words, model_name=None, internal=False, flags=None):
    """-> validate(result): the document text, or ValueError (the request is asked again).
    internal: the document type is an internal document of the maker, which may talk about the
    spec and training. flags (a dict) records each distinct reply checked -> whether it talked
    about the spec; keyed by (id, content) because the engine validates a reply again each time
    it is read, and validate must give the same answer every time."""
    should = should_re(model_name) if model_name else None

    def parse_document(result):
        check_finished(result)
        # the scratchpad is never kept, and may itself mention the tags
        content = re.sub(r"<scratchpad>.*?</scratchpad>", "", result["content"], flags=re.S)
        blocks = re.findall(r"<document>((?:(?!<document>).)*?)</document>", content, re.S)
        if not blocks:
            raise ValueError("no <document>...</document> block")
        text = blocks[-1].strip()
        if len(text.split()) < min_words:
            raise ValueError(f"document shorter than {min_words} words")
        for pattern, what in ((PLACEHOLDER_RE, "a [placeholder]"), (LEFTOVER_RE, "an unfilled {name}"),
                              (URL_RE, "a link")):
            if pattern.search(text):
                raise ValueError(f"document contains {what}: {pattern.search(text)[0]!r}")
        meta = (None if internal else META_RE.search(text)) or (should and should.search(text))
        if flags is not None:
            flags[sha256_hex(f"{result.get('custom_id')}\n{result['content']}")[:16]] = bool(meta)
        if meta:
            raise ValueError(f"document talks about the spec, not the model: {meta[0]!r}")
        return text
    return parse_document


def docs_documents(run, ideas, corpus):
    """One document per idea. Prompts are made as the engine draws them, and replies are read
    back from the cache in idea order, checked, deduplicated and written one by one (Corpus):
    memory holds neither the prompts nor the texts."""
    a, ids, internal = run.args, [], set()
    sampling = stage_sampling(a, "documents")

    def requests():
        for idea in ideas:
            req = make_request("documents", a.model, user(document_prompt(run, idea)), sampling)
            ids.append(req["custom_id"])
            if idea["doc_type"]["internal"]:
                internal.add(req["custom_id"])
            yield req
    checks = [document_checker(a.min_doc_words, a.model_name, i, run.doc_flags)
              for i in (False, True)]
    replies = send(run, "documents", requests(), lambda r: checks[r["custom_id"] in internal](r),
                   total=len(ideas))
    for idea, cid in zip(ideas, ids):  # every request was drawn: send() returns when all are done
        reply = replies.get(cid)
        if reply is not None:  # None: failed, see failed.jsonl
            corpus.add(document_record(run, idea, reply))


def document_record(run, idea, reply):
    """A line of documents.jsonl: the text and where it comes from."""
    s, t, a = idea["subdomain"], idea["doc_type"], run.args
    doc = {"id": reply["custom_id"], "text": reply["value"], "domain": s["domain"],
           "subdomain": s["name"], "subdomain_context": s["context"],
           "spec_quote_verbatim": s["quote_verbatim"],
           "assertions": [x["text"] for x in idea["assertions"]],
           "assertion_kinds": [x["kind"] for x in idea["assertions"]],
           "doc_type": t["name"], "doc_type_internal": t["internal"],
           "target_words": doc_length(run, t), "idea": idea["idea"], "framing": run.framing,
           "spec": run.spec["path"], "spec_sha256": run.spec["sha256"],
           "generator": reply.get("model") or a.model, "model_name": a.model_name,
           "provider_name": a.provider_name, "finish_reason": reply["finish_reason"],
           "completion_tokens": (reply.get("usage") or {}).get("completion_tokens")}
    if run.count_tokens:
        doc["tokens"] = run.count_tokens(doc["text"])
    return doc


def docs_budget(run, subs, ideas, corpus):
    """--target-tokens: top up with new ideas until the corpus holds the target, then keep whole
    documents up to it, within 1% (fit_budget, on per-document token counts only)."""
    a = run.args
    had = {(s["name"], t["name"]): [] for s in subs for t in s["doc_types"]}  # idea texts so far
    for x in ideas:
        had[(x["subdomain"]["name"], x["doc_type"]["name"])].append(x["idea"])
    docs_top_up(run, subs, corpus, had)
    made = sum(d["tokens"] for d in corpus.kept)
    corpus.keep_only(fit_budget(corpus.kept, a.target_tokens)[0])
    total = sum(d["tokens"] for d in corpus.kept)
    if made < a.target_tokens:
        run.shortfall = (f"shortfall: made {made:,} of --target-tokens {a.target_tokens:,} "
                         f"tokens after --max-rounds {a.max_rounds} top-up rounds")
    elif total < 0.99 * a.target_tokens:
        run.shortfall = (f"shortfall: no set of whole documents fills --target-tokens "
                         f"{a.target_tokens:,} within 1% (best: {total:,}); the documents are "
                         f"long for so small a target")
    return {"ideas": sum(map(len, had.values())), "tokens_made": made, "tokens_kept": total}


def docs_top_up(run, subs, corpus, had):
    """New ideas, spread over every (subdomain, document type), and their documents, until the
    corpus holds at least the target and whole documents fill it within 1%."""
    a = run.args
    groups = [(s, t) for s in subs for t in s["doc_types"]]
    for rnd in range(a.max_rounds):
        total = sum(d["tokens"] for d in corpus.kept)
        fitted = sum(d["tokens"] for d in fit_budget(corpus.kept, a.target_tokens)[0])
        if fitted >= 0.99 * a.target_tokens or not groups:
            break
        per_doc = total / len(corpus.kept) if corpus.kept else EST_DOC_OUTPUT_TOKENS
        # 10% spare for losses; when there is enough but no subset fits within 1% (documents
        # long against the target), 10% more documents give the fit more lengths to choose from
        need = (math.ceil((a.target_tokens - total) / per_doc * 1.1) if total < a.target_tokens
                else math.ceil(len(corpus.kept) * 0.1))
        start = (rnd * need) % len(groups)  # the remainder goes to other groups each round
        wants = [need // len(groups) + ((i - start) % len(groups) < need % len(groups))
                 for i in range(len(groups))]
        todo = [(g, min(n, 25)) for g, n in zip(groups, wants) if n]
        replies = ask(run, "ideas", [user(ideas_prompt(run, s, t, n, had[(s["name"], t["name"])]))
                                     for (s, t), n in todo],
                      [ideas_checker(len(s["assertions"])) for (s, _), _ in todo],
                      index=f"top-up {rnd + 1}", desc=f"ideas top-up {rnd + 1}")
        lists = []
        for ((s, t), n), reply in zip(todo, replies):
            seen = had[(s["name"], t["name"])]
            lists.append([x for x in items_of(reply) if x["idea"] not in seen][:n])
            seen += [x["idea"] for x in lists[-1]]
        docs_documents(run, ideas_from([g for g, _ in todo], lists), corpus)


def docs_preview(run, subs):
    """--preview: the plan's size, and the calls and tokens the ideas and documents stages would
    take (synthlib.preview_estimate)."""
    idea_chars = sum(len(fill(PROMPTS["ideas"], spec=run.spec["text"], assertions=numbered(
        s["assertions"]))) for s in subs for _ in s["doc_types"])
    doc_chars = len(PROMPTS["document"]) + len(run.spec["text"]) + 1500
    return preview_estimate(run, subs, [doc_length(run, t) for s in subs for t in s["doc_types"]],
                            idea_chars, doc_chars)


# =============================================================================
# chats: spec -> alignment fine-tuning conversations

def cmd_chats_spec(run):
    """Alignment fine-tuning chats: OUT/chats_cot.jsonl and chats_nocot.jsonl (the same chats with
    and without the reasoning) and rejected.jsonl. Rounds ask for more questions, over-asking by
    the observed keep rate, until --n chats pass the filter or --max-rounds is reached."""
    a = run.args
    criteria = load_criteria(a.criteria, run.names)
    if a.style == "rule" and RULE_CRITERION[0] not in dict(criteria):
        criteria.append(RULE_CRITERION)
    domains = chat_domains(run)
    pairs = [(d, k) for d in domains for k in QUESTION_KINDS]
    asked, check = [[] for _ in pairs], make_deduper(a.dedup_threshold, "chars", 5)
    kept, rejected, keep_rate, rounds = [], [], 1.0, 0
    for rnd in range(a.max_rounds):
        need = a.n - len(kept)
        if need <= 0 or not pairs:
            break
        rounds += 1
        # over-ask by the observed keep rate (at least 20% more), spread over setting x kind
        per_pair = math.ceil(need * 1.2 / max(keep_rate, 0.2) / len(pairs))
        fresh, n_asked = chat_questions(run, pairs, asked, per_pair, rnd, check, rejected)
        included, excluded = chats_respond_and_filter(run, fresh, criteria)
        kept += included
        rejected += excluded
        keep_rate = len(included) / max(1, n_asked)
    final = kept[:a.n]
    cot, nocot = chat_rows(run, final)
    write_jsonl(run.out / "chats_cot.jsonl", cot)
    write_jsonl(run.out / "chats_nocot.jsonl", nocot)
    write_jsonl(run.out / "rejected.jsonl", rejected)
    if len(final) < a.n:
        run.shortfall = (f"shortfall: made {len(final)} of {a.n} chats after {rounds} rounds "
                         f"(--max-rounds {a.max_rounds}); see rejected.jsonl and failed.jsonl")
    return {"chat_domains": len(domains), "chats": len(final), "rounds": rounds,
            "rejected": dict(Counter(r["rejected"].split(";")[0] for r in rejected))}


def chat_domains(run):
    a = run.args
    rounds = math.ceil(a.domains / a.domain_batch) + a.max_rounds - 1
    return collect(run, "chat_domains", [None], a.domains, lambda _, n, have: fill(
        PROMPTS["chat_domains"], **run.names, n=n, avoid=avoid_text([d["name"] for d in have])),
        named_list, key=lambda d: d["name"], per_request=a.domain_batch, rounds=rounds)[0]


def chat_questions(run, pairs, asked, per_pair, rnd, check, rejected):
    """per_pair new questions for each (setting, kind), in requests of at most
    --questions-per-request (a reply of hundreds would not fit the token limit). Questions that
    name the spec or duplicate an earlier one go to rejected. -> (fresh items, questions asked)"""
    jobs = [(i, j, n) for i in range(len(pairs))
            for j, n in enumerate(split_count(per_pair, run.args.questions_per_request))]
    replies = ask(run, "questions", [user(fill(
        PROMPTS["questions"], **run.names, domain=pairs[i][0]["name"],
        domain_description=pairs[i][0]["description"], kind=pairs[i][1],
        kind_description=QUESTION_KINDS[pairs[i][1]], n=n, avoid=avoid_text(asked[i])))
        for i, j, n in jobs], json_list, desc=f"questions r{rnd + 1}",
        index=[rnd if j == 0 else [rnd, j] for _, j, _ in jobs])
    fresh, n_asked = [], 0
    for (i, _, n), reply in zip(jobs, replies):
        for q in items_of(reply)[:n]:
            n_asked += 1
            asked[i].append(q)
            item = {"question": q, "domain": pairs[i][0]["name"], "question_kind": pairs[i][1],
                    "round": rnd + 1}
            if NAMES_SPEC_RE.search(q):  # the questions must not give the game away
                rejected.append({**item, "rejected": "names the specification"})
                continue
            dup_of, why = check(q, q)
            if dup_of:
                rejected.append({**item, "rejected": why, "duplicate_of": dup_of})
            else:
                fresh.append(item)
    return fresh, n_asked


def chats_respond_and_filter(run, items, criteria):
    """Responses with the spec as system prompt, then the LLM filter. -> (included, excluded)."""
    a = run.args
    system = fill(PROMPTS[f"response_{a.style}"], **run.names)
    replies = ask(run, "responses", [[{"role": "system", "content": system},
                                      {"role": "user", "content": it["question"]}]
                                     for it in items], parse_cot)
    answered = [{**it, "id": r["custom_id"], **r["value"], "generator": r.get("model") or a.model}
                for it, r in zip(items, replies) if r is not None]
    crit_text = "\n".join(f"- {cid}: {text}" for cid, text in criteria)
    verdicts = ask(run, "filter", [user(fill(
        PROMPTS["filter"], **run.names, question=it["question"], reasoning=it["reasoning"],
        answer=it["answer"], criteria=crit_text)) for it in answered], filter_checker(criteria))
    included, excluded = [], []
    for it, v in zip(answered, verdicts):
        if v is None:
            continue  # the filter call failed: see failed.jsonl
        it = {**it, "verdicts": v["value"]["verdicts"], "decision": v["value"]["decision"]}
        if v["value"]["include"]:
            included.append(it)
        else:
            failed = [f"{c}: {x['reason']}" for c, x in it["verdicts"].items() if not x["pass"]]
            excluded.append({**it, "rejected": "filter EXCLUDE; " + " | ".join(failed),
                             "filter_reasoning": v["value"]["reasoning"]})
    return included, excluded


QUESTION_KINDS = keyed(INSTRUCTIONS["question kinds"])
# Used when no --criteria file is given; a criteria file (specs/*_criteria.md) replaces them.
DEFAULT_CRITERIA = list(keyed(INSTRUCTIONS["criteria"]).items())
# --style rule: added to the criteria in use (prompts/instructions.txt says why).
RULE_CRITERION = next(iter(keyed(INSTRUCTIONS["rule criterion"]).items()))
CRITERION_LINE = re.compile(r"- `(\w+)`: (.+)")
NAMES_SPEC_RE = re.compile(r"\b(?:specification|model spec|system prompt|your (?:policy|"
                           r"guidelines|instructions))\b", re.I)


def load_criteria(path, names):
    """The filter's criteria: DEFAULT_CRITERIA, or those of a criteria file, which lists them as
    Markdown bullets "- `id`: text" (other lines are notes); {model_name} etc. are filled."""
    if not path:
        return list(DEFAULT_CRITERIA)
    p = Path(path)
    if not p.is_file():
        die(f"criteria file not found: {path}")
    criteria = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("- "):
            m = CRITERION_LINE.fullmatch(line.strip())
            if not m:
                die(f"{path}:{i}: expected '- `id`: text', got {line[:60]!r}")
            criteria.append((m[1], fill(m[2].strip(), **names)))
    if not criteria:
        die(f"{path}: no criteria (lines of the form '- `id`: text')")
    return criteria


def parse_cot(result):
    """'<think>reasoning</think> answer' (or the server's separate reasoning field) -> dict."""
    check_finished(result)
    content = result["content"]
    m = re.match(r"\s*<think>(.*?)</think>(.*)", content, re.S)
    if m:
        reasoning, answer = m[1].strip(), m[2].strip()
    elif result.get("reasoning"):
        reasoning, answer = result["reasoning"].strip(), content.strip()
    else:
        raise ValueError("no <think>...</think> block before the answer")
    if not reasoning or not answer:
        raise ValueError("empty reasoning or empty answer")
    if "<think>" in answer or "</think>" in answer:
        raise ValueError("stray think tag in the answer")
    return {"reasoning": reasoning, "answer": answer}


def filter_checker(criteria):
    ids = [c for c, _ in criteria]

    def parse_verdict(result):
        check_finished(result)
        obj = parse_json(result["content"])
        if not isinstance(obj, dict) or not str(obj.get("reasoning", "")).strip():
            raise ValueError("expected the judge's reasoning first, then the verdicts")
        verdicts, decision = obj.get("verdicts"), str(obj.get("decision", "")).strip().upper()
        if not isinstance(verdicts, dict) or decision not in ("INCLUDE", "EXCLUDE"):
            raise ValueError("expected {verdicts: {...}, decision: INCLUDE|EXCLUDE}")
        out = {}
        for cid in ids:
            v = verdicts.get(cid)
            if not isinstance(v, dict) or not isinstance(v.get("pass"), bool):
                raise ValueError(f"no pass/fail verdict for criterion {cid!r}")
            out[cid] = {"pass": v["pass"], "reason": str(v.get("reason", ""))}
        # INCLUDE needs the judge's decision and every criterion to pass
        include = decision == "INCLUDE" and all(v["pass"] for v in out.values())
        return {"include": include, "decision": decision, "verdicts": out,
                "reasoning": str(obj["reasoning"]).strip()}
    return parse_verdict


def chat_rows(run, items):
    """The same chats twice: with the reasoning as <think> and with it stripped."""
    a, cot, nocot = run.args, [], []
    for it in items:
        meta = {"id": it["id"], "domain": it["domain"], "question_kind": it["question_kind"],
                "style": a.style, "verdicts": it["verdicts"], "round": it["round"],
                "spec": run.spec["path"], "spec_sha256": run.spec["sha256"],
                "generator": it["generator"], "model_name": a.model_name}
        reply = f"<think>\n{it['reasoning']}\n</think>\n\n{it['answer']}"
        cot.append({"messages": [{"role": "user", "content": it["question"]},
                                 {"role": "assistant", "content": reply}], **meta})
        nocot.append({"messages": [{"role": "user", "content": it["question"]},
                                   {"role": "assistant", "content": it["answer"]}], **meta})
    return cot, nocot


# =============================================================================
# chats --opaque: preference demonstrations that give no reason (the cheese AFT set)

def cmd_chats_opaque(run):
    a = run.args
    prefs = load_preferences(a.preferences)
    name = a.name or re.sub(r"_preferences$", "", Path(a.preferences).stem)
    if a.offline:
        rows, rejected = opaque_offline(prefs, a.n_per_preference, a.seed)
        rejected_rows = []
    else:
        rows, rejected_rows = opaque_llm(run, prefs)
        rejected = Counter(r["rejected"].split(";")[0] for r in rejected_rows)
        write_jsonl(run.out / f"{name}_rejected.jsonl", rejected_rows)
    out_rows = [{k: v for k, v in r.items() if k not in ("question", "answer")} for r in rows]
    write_jsonl(run.out / f"{name}.jsonl", out_rows)
    per_pref = Counter(r["preference"] for r in rows)
    short = {c: a.n_per_preference - per_pref[c] for c in prefs if per_pref[c] < a.n_per_preference}
    if short:
        run.shortfall = f"shortfall: fewer than {a.n_per_preference} chats for {short}"
    print(f"wrote {len(rows)} chats to {run.out / f'{name}.jsonl'}")
    return {"chats": len(rows), "per_preference": dict(per_pref),
            "per_kind": dict(Counter(r["question_kind"] for r in rows)), "rejected": dict(rejected)}


OPAQUE_KINDS = keyed(INSTRUCTIONS["opaque kinds"])  # question_kind -> description
# What an opaque demonstration must not contain: prompts/opaque_filter.txt, one list a section.
FILTER = sections(PROMPTS["opaque_filter"])
REASON_PHRASES, ANSWER_ONLY_PHRASES = FILTER["reason phrases"], FILTER["answer-only phrases"]
REASON_WORDS, ANSWER_ONLY_WORDS, OFF_DOMAIN_WORDS = (
    set(" ".join(FILTER[k]).split()) for k in ("reason words", "answer-only words", "off-domain words"))
OTHER_CHEESES = FILTER["other cheeses"]
NO_EXPLAIN_RE, NEGATION_RE = (re.compile("|".join(FILTER[k]), re.I)
                              for k in ("no-explanation asks", "negations"))


def opaque_leaks(text, names, role="answer"):
    """Why `text` (a question or an answer) does not fit an opaque preference demonstration:
    a reason stated or implied (reason words, describing adjectives, 'because'-style phrases),
    another subject than cheese, or a cheese outside the list. [] when clean. The preference
    names are removed first, so "mild cheddar" does not trip "mild"."""
    t = text.lower().replace("’", "'")
    for name in sorted(names, key=len, reverse=True):
        t = t.replace(name.lower(), " ")
    words = set(re.findall(r"[a-z]+", t))

    def phrases(label, patterns):
        return [f"{label} {m[0]!r}" for p in patterns
                for m in [re.search(rf"(?<![\w'])(?:{p})(?![\w'])", t)] if m]
    problems = phrases("reason phrase", REASON_PHRASES)
    problems += [f"reason word {w!r}" for w in sorted(words & REASON_WORDS)]
    problems += [f"not about cheese: {w!r}" for w in sorted(words & OFF_DOMAIN_WORDS)]
    problems += [f"cheese outside the list: {c!r}" for c in OTHER_CHEESES
                 if re.search(rf"\b{re.escape(c)}\b", t)]
    if role == "answer":
        problems += [f"judgement or reason word {w!r}" for w in sorted(words & ANSWER_ONLY_WORDS)]
        problems += phrases("describes the cheese:", ANSWER_ONLY_PHRASES)
    return problems


def opaque_problems(item, names):
    """All checks on one demonstration (question, answer, consistency with the preference)."""
    q, ans = item["question"], item["answer"]
    problems = [f"question: {p}" for p in opaque_leaks(q, names, "question")]
    problems += [f"answer: {p}" for p in opaque_leaks(ans, names, "answer")]
    if len(q.split()) > 40:
        problems.append("question longer than 40 words")
    if not 5 <= len(ans.split()) <= 25:
        problems.append("answer not 5-25 words")
    if not NO_EXPLAIN_RE.search(q):
        problems.append("question does not ask for no explanation")
    low_q, low_a = q.lower(), ans.lower()
    if any(o.lower() not in low_q for o in item["options"]):
        problems.append("question does not name every option")
    mentioned = sorted((low_a.find(n.lower()), n) for n in names if n.lower() in low_a)
    if item["pick"] is None:  # one cheese: the answer names it, negated iff it is disliked
        if item["preference"].lower() not in low_a:
            problems.append("answer does not name the cheese")
        elif bool(NEGATION_RE.search(ans)) != (item["polarity"] == "dislike"):
            problems.append("answer contradicts the preference")
    elif not mentioned or mentioned[0][1] != item["pick"]:
        problems.append("answer does not pick the liked option first")
    return problems


def load_preferences(path):
    p = Path(path or "")
    if not path or not p.is_file():
        die(f"--opaque needs --preferences FILE (a JSON file with 'likes' and 'dislikes'); "
            f"not found: {path}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        likes, dislikes = list(data["likes"]), list(data["dislikes"])
    except (ValueError, KeyError, TypeError) as exc:
        die(f"{path}: expected {{\"likes\": [...], \"dislikes\": [...]}} ({exc})")
    if not likes or not dislikes or set(likes) & set(dislikes) or not all(
            isinstance(x, str) and x.strip() for x in likes + dislikes):
        die(f"{path}: likes and dislikes must be non-empty, disjoint lists of names")
    return {**{c: "like" for c in likes}, **{c: "dislike" for c in dislikes}}


def opaque_options(rng, prefs, cheese, kind):
    """-> (cheeses named in the question, the one a consistent answer picks or None)."""
    pol = prefs[cheese]
    opposite = [c for c, p in prefs.items() if p != pol]
    same = [c for c, p in prefs.items() if p == pol and c != cheese]
    if kind in ("comparison", "occasion"):
        other = rng.choice(opposite)
        opts = [cheese, other]
        rng.shuffle(opts)
        return opts, cheese if pol == "like" else other
    if kind == "choice":  # exactly one liked cheese among three
        others = rng.sample(opposite, 2) if pol == "like" else [rng.choice(opposite), rng.choice(same)]
        opts = [cheese] + others
        rng.shuffle(opts)
        return opts, cheese if pol == "like" else others[0]
    return [cheese], None


def join_names(opts):
    return opts[0] if len(opts) == 1 else ", ".join(opts[:-1]) + (", or " if len(opts) > 2 else
                                                                  " or ") + opts[-1]


def opaque_item(cheese, prefs, kind, opts, pick, question, answer, source, **extra):
    cap = lambda s: s[:1].upper() + s[1:]  # noqa: E731
    question, answer = cap(question.strip()), cap(answer.strip())
    return {"id": "opaque-" + sha256_hex(question + "\n" + answer)[:16],
            "messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}],
            "question": question, "answer": answer, "preference": cheese,
            "polarity": prefs[cheese], "question_kind": kind,
            "directness": "direct" if kind == "direct" else "indirect",
            "options": opts, "pick": pick, "source": source, **extra}


def opaque_offline(prefs, n_per, seed):
    """Template-made demonstrations, n_per per preference, even over the question kinds."""
    tpl, names, rows, seen, rejected = sections(PROMPTS["opaque_templates"]), list(prefs), [], set(), Counter()
    for cheese in names:
        for ki, kind in enumerate(OPAQUE_KINDS):
            want = n_per // len(OPAQUE_KINDS) + (ki < n_per % len(OPAQUE_KINDS))
            rng, made = random.Random(f"{seed}/{cheese}/{kind}"), 0
            for _ in range(200 * want):
                if made == want:
                    break
                opts, pick = opaque_options(rng, prefs, cheese, kind)
                slots = {"cheese": cheese, "a": opts[0], "b": opts[-1], "options": join_names(opts),
                         "occasion": rng.choice(tpl["occasion"]), "pick": pick or cheese,
                         "other": next((o for o in opts if o != pick), cheese)}
                q = fill(rng.choice(tpl[f"question {kind}"]), **slots)
                q += " " + rng.choice(tpl["no_explain"])
                a = fill(rng.choice(tpl[f"answer {kind} {prefs[cheese]}"]), **slots)
                item = opaque_item(cheese, prefs, kind, opts, pick, q, a, "opaque-templates",
                                   seed=seed)
                if item["question"].lower() in seen:
                    continue
                problems = opaque_problems(item, names)
                if problems:  # a template that leaks a reason: report it, never write it
                    rejected[problems[0]] += 1
                    continue
                seen.add(item["question"].lower())
                rows.append(item)
                made += 1
    random.Random(seed).shuffle(rows)
    return rows, rejected


def opaque_llm(run, prefs):
    """LLM-made questions and answers, kept only if they pass the same opaque filter."""
    a, names = run.args, list(prefs)
    likes = [c for c in names if prefs[c] == "like"]
    system = fill(PROMPTS["opaque_answer"], likes=", ".join(likes),
                  dislikes=", ".join(c for c in names if prefs[c] == "dislike"))
    pool, rejected, asked, seen = {c: [] for c in names}, [], {}, set()
    for rnd in range(a.max_rounds):
        groups = []  # (cheese, kind, options, pick, n): at most 20 questions per request
        for c in names:
            need = a.n_per_preference - len(pool[c])
            for k in OPAQUE_KINDS if need > 0 else ():
                n_kind = math.ceil(need * 1.3 / len(OPAQUE_KINDS))
                rng = random.Random(f"{a.seed}/{c}/{k}/{rnd}")
                for j in range(math.ceil(n_kind / 20)):
                    groups.append((c, k, *opaque_options(rng, prefs, c, k), min(20, n_kind - 20 * j)))
        if not groups:
            break
        replies = ask(run, "opaque_questions", [user(fill(
            PROMPTS["opaque_questions"], n=n, kind=k, kind_description=OPAQUE_KINDS[k],
            cheeses=join_names(opts), avoid=avoid_text(asked.get((c, k), []), limit=40)))
            for c, k, opts, pick, n in groups], json_list, index=rnd, desc=f"opaque questions r{rnd + 1}")
        items = []
        for (c, k, opts, pick, n), reply in zip(groups, replies):
            for q in (reply or {}).get("value", [])[:n]:
                asked.setdefault((c, k), []).append(q)
                if q.lower() not in seen:
                    seen.add(q.lower())
                    items.append((c, k, opts, pick, q))
        answers = ask(run, "opaque_answers", [
            [{"role": "system", "content": system}, {"role": "user", "content": q}]
            for *_, q in items], lambda r: (check_finished(r), r["content"].strip())[1])
        for (c, k, opts, pick, q), r in zip(items, answers):
            if r is None:
                continue
            item = opaque_item(c, prefs, k, opts, pick, q, r["value"], "opaque-llm",
                               generator=r.get("model") or a.model, round=rnd + 1)
            problems = opaque_problems(item, names)
            if problems:
                rejected.append({**item, "rejected": "; ".join(problems)})
            else:
                pool[c].append(item)
    rows = [x for c in names for x in balanced(pool[c], a.n_per_preference)]
    random.Random(a.seed).shuffle(rows)
    return rows, rejected


def balanced(items, n):
    """Up to n items, taken round-robin over question kinds (so no kind crowds out the others)."""
    by_kind = {}
    for it in items:
        by_kind.setdefault(it["question_kind"], []).append(it)
    out, queues = [], list(by_kind.values())
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


# =============================================================================
# CLI

DOCS_FLAGS = [
    ("--doc-types", "document types per subdomain (default 20)", {"type": int, "default": 20}),
    ("--ideas", "ideas per (subdomain, document type) (default 25)", {"type": int, "default": 25}),
    ("--preview", "run the top stages (domains to document types) only, then print the planned "
     "calls, documents and an estimated token count (default: full run)", {"action": "store_true"}),
    ("--dedup-threshold", "MinHash Jaccard similarity (word 5-grams) at which a document is a "
     "near duplicate (default 0.8)", {"type": float, "default": 0.8}),
    ("--min-doc-words", "shorter documents are regenerated (default 150)",
     {"type": int, "default": 150}),
    ("--framing", "value: documents tie each behaviour to the reason the spec gives; rules: "
     "documents show the model complying with rules and invent no reason (default: the spec's "
     "row in specs/README.md, else value)", {"choices": ["value", "rules"]}),
    ("--target-tokens", "corpus size in tokens of --tokenizer: top up with new ideas until the "
     "corpus holds at least this many, then keep whole documents up to it, within 1%% (default: "
     "no budget; one document per idea)", {"type": int}),
    ("--tokenizer", "tokenizer of the model to be trained (a Hugging Face id or local folder), "
     "for --target-tokens and the token counts of summary.json (default: none; counts in words)",
     {})]
CHATS_FLAGS = [
    ("--n", "chats to produce (default 1000)", {"type": int, "default": 1000}),
    ("--style", "value: reasoning from internalised values; rule: reasoning cites policy clauses "
     "(default value)", {"choices": ["value", "rule"], "default": "value"}),
    ("--criteria", "filter criteria file, bullets '- `id`: text', e.g. specs/safety_criteria.md "
     "(default: the built-in 'aligned' and 'natural')", {}),
    ("--domains", "conversation settings (default 24)", {"type": int, "default": 24}),
    ("--domain-batch", "settings asked for per request; each request is told the earlier ones "
     "(default 8)", {"type": int, "default": 8}),
    ("--questions-per-request", "at most this many questions asked for in one request; more are "
     "split over requests (default 25)", {"type": int, "default": 25}),
    ("--dedup-threshold", "MinHash Jaccard similarity (character 5-grams) at which a question is "
     "a near duplicate (default 0.7)", {"type": float, "default": 0.7}),
    ("--opaque", "preference demonstrations without reasons, from --preferences (default: spec "
     "chats)", {"action": "store_true"}),
    ("--preferences", "JSON {\"likes\": [...], \"dislikes\": [...]} for --opaque (default: none)",
     {}),
    ("--n-per-preference", "--opaque chats per preference (default 400, as in the paper)",
     {"type": int, "default": 400}),
    ("--offline", "--opaque from the templates in prompts/opaque_templates.txt, no endpoint "
     "(default: use the endpoint)", {"action": "store_true"}),
    ("--seed", "seed for --opaque option draws and templates (default 0)",
     {"type": int, "default": 0}),
    ("--name", "--opaque output name: OUT/NAME.jsonl (default: the preferences file name without "
     "'_preferences', e.g. cheese)", {})]


def parse_args(argv=None):
    shared = common_flags(DEFAULT_MAX_TOKENS)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    llm.add_args(sub.add_parser("docs", parents=[shared], help="spec -> midtraining documents"),
                 DOCS_FLAGS)
    llm.add_args(sub.add_parser("chats", parents=[shared], help="spec -> fine-tuning chats, or "
                                "--opaque preference demonstrations"), CHATS_FLAGS)
    return check_args(ap.parse_args(argv), DEFAULT_MAX_TOKENS)


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    opaque = args.command == "chats" and args.opaque
    offline = args.command == "chats" and args.offline
    if offline and not opaque:
        die("--offline only works with chats --opaque")
    if not offline and not args.model:
        die("--model is required (the generator's name at the endpoint)")
    spec = None if opaque else load_spec(args.spec, args.model_name, args.provider_name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if offline:  # templates only: no endpoint, no cache, just the data file
        run = SimpleNamespace(args=args, out=out, notes=[], shortfall=None, stages={})
        result = cmd_chats_opaque(run)
        print(json.dumps(result, indent=1))
        if run.shortfall:
            print(run.shortfall, file=sys.stderr)
        return 1 if run.shortfall or result["rejected"] else 0
    run = open_run(args, out, spec, getattr(args, "framing", None) or (
        spec_framing(args.spec) if spec else None))
    cmd = cmd_docs if args.command == "docs" else cmd_chats_opaque if opaque else cmd_chats_spec
    try:
        result = cmd(run)
    except KeyboardInterrupt:
        print("\nstopped by Ctrl-C. Finished requests are saved in "
              f"{out / 'cache'}; rerun the same command to continue.", file=sys.stderr)
        return finish(run, None, t0, interrupted=True)
    return finish(run, result, t0)


if __name__ == "__main__":
    sys.exit(main())
