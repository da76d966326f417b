"""
synthlib.py: the machinery under synth.py's stages, kept apart so that synth.py reads as the method.

Nothing here decides what the data says (that is synth.py and the prompts in prompts/); this is how
a stage is asked and how its output is kept and counted. Only synth.py imports it (and the tests).

  asking a stage    send (requests through llm.run_requests, counted per stage for summary.json),
                    ask (a list of prompts -> replies in the same order), collect (top-up rounds:
                    ask each group again, with a do-not-repeat list, until it has enough items),
                    split_count (n items asked for in requests of at most so many), json_list and
                    named_list (the reply check of every stage that asks for a list)
  duplicates        make_deduper: exact duplicates by a hash, near duplicates by MinHash LSH
  the corpus        Corpus (documents.jsonl written as documents pass, renamed when complete),
                    fit_budget (whole documents within 1% of --target-tokens), corpus_stats,
                    preview_estimate (the calls and tokens --preview prints)
  input files       sections and keyed (the [section] format of prompts/ files), load_spec (read,
                    check and fill the spec), spec_framing (its framing, from specs/README.md)
  the run           common_flags (the flags of both commands: input and output, endpoint, sampling,
                    client, batch files) and check_args, open_run (the `run` every stage takes:
                    args, out, the endpoint, the names filled into the prompts, ...), finish
                    (summary.json, the closing messages and the exit status)
"""

import argparse
import bisect
import json
import math
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import llm
from common import die, fill, json_object, run_info, write_jsonl
from llm import (check_finished, ingest_batch_results, make_request, open_endpoint, parse_json,
                 run_requests, sampling_for, sha256_hex)


# -----------------------------------------------------------------------------
# Asking a stage: requests through llm.py, and top-up rounds

STAGE_COUNTS = ("calls", "cached", "retries", "invalid", "errors", "failed", "tokens_in",
                "tokens_out")


def stage_sampling(a, stage):
    return sampling_for(a.temperature, a.max_tokens[stage], a.token_field, a.extra_body)


def send(run, stage, requests, validate, desc=None, total=None):
    """requests (any iterable: a generator is drawn as workers free up) through llm.run_requests
    -> its Results; the stage's figures are added to summary.json's `stages`."""
    a, stats = run.args, run.ep["stats"]
    before = Counter(stats)
    res = run_requests(run.ep, requests, run.out / "cache" / f"{stage}.jsonl", desc or stage,
                       validate, a.concurrency, a.max_retries, run.out / "failed.jsonl", total)
    counts = run.stages.setdefault(stage, Counter())
    for k in STAGE_COUNTS:
        counts[k] += stats[k] - before[k]
    # each distinct request ends cached, answered or failed
    counts["requests"] += sum(stats[k] - before[k] for k in ("cached", "ok", "failed"))
    return res


def ask(run, stage, prompts, validate, index=0, desc=None):
    """prompts: list of message lists -> list of results (None where the request failed).
    validate and index: one for every prompt, or a list with one per prompt (a reply checked
    against its own group; several samples of one prompt need different indexes)."""
    a = run.args
    indexes = index if isinstance(index, list) else [index] * len(prompts)
    reqs = [make_request(stage, a.model, msgs, stage_sampling(a, stage), i)
            for msgs, i in zip(prompts, indexes)]
    if isinstance(validate, list):
        by_id = {r["custom_id"]: v for r, v in zip(reqs, validate)}
        validate = lambda result: by_id[result["custom_id"]](result)  # noqa: E731
    res = send(run, stage, reqs, validate, desc)
    return [res.get(r["custom_id"]) for r in reqs]


def user(text):
    return [{"role": "user", "content": text}]


def items_of(reply):
    """The parsed list of a reply; [] for a request that failed (it is in failed.jsonl)."""
    return (reply or {}).get("value", [])


def json_list(result, fields=()):
    """A non-empty JSON list; with fields, a list of objects that have those fields as strings."""
    check_finished(result)
    items = parse_json(result["content"])
    if isinstance(items, dict) and len(items) == 1:  # {"domains": [...]}
        items = next(iter(items.values()))
    if not isinstance(items, list) or not items:
        raise ValueError("expected a non-empty JSON list")
    # A bad item fails the whole reply (it is asked again, then failed.jsonl): dropping it here
    # would lose it silently.
    for k, x in enumerate(items, 1):
        if not fields and not (isinstance(x, str) and x.strip()):
            raise ValueError(f"item {k} is not a non-empty string: {str(x)[:60]!r}")
        if fields and not (isinstance(x, dict) and all(
                isinstance(x.get(f), str) and x[f].strip() for f in fields)):
            raise ValueError(f"item {k} lacks the fields {', '.join(fields)}: {str(x)[:60]!r}")
    return [x.strip() for x in items] if not fields else items


def named_list(result):
    return json_list(result, ("name", "description"))


def avoid_text(items, limit=100):
    """The 'do not repeat' paragraph for a top-up request ('' on the first round)."""
    if not items:
        return ""
    return ("\nAlready listed (do not repeat these or close variants of them):\n"
            + "\n".join(f"- {x}" for x in items[-limit:]) + "\n")


def split_count(n, most):
    """n as near-equal parts of at most `most`: 84 by 25 -> [21, 21, 21, 21]."""
    parts = max(1, math.ceil(n / most))
    return [n // parts + (j < n % parts) for j in range(parts)]


def collect(run, stage, groups, want, build, validate, key, per_request=None, rounds=None):
    """Ask each group for `want` distinct items, topping up with a do-not-repeat list.

    build(group, n, have) -> prompt text asking for n more items given the items so far;
    validate: one function, or a list with one per group;
    key(item) -> the string that makes items distinct. Rounds are bounded (--max-rounds, or
    `rounds`), so a server that refuses or repeats itself ends the stage, it does not loop.
    Returns one list of items per group (possibly short; the shortfall is noted).
    """
    have = [[] for _ in groups]
    rounds = rounds or run.args.max_rounds
    for rnd in range(rounds):
        todo = [i for i in range(len(groups)) if len(have[i]) < want]
        if not todo:
            break
        prompts = [user(build(groups[i], min(want - len(have[i]), per_request or want), have[i]))
                   for i in todo]
        check = [validate[i] for i in todo] if isinstance(validate, list) else validate
        replies = ask(run, stage, prompts, check, index=rnd, desc=f"{stage} r{rnd + 1}")
        for i, reply in zip(todo, replies):
            seen = {key(x).strip().lower() for x in have[i]}
            for item in items_of(reply):
                if key(item).strip().lower() not in seen and len(have[i]) < want:
                    have[i].append(item)
                    seen.add(key(item).strip().lower())
    short = sum(want - len(h) for h in have)
    if short:
        run.notes.append(f"{stage}: {short} of {want * len(groups)} items missing after "
                         f"{rounds} rounds")
    return have


# -----------------------------------------------------------------------------
# Duplicates: exact and near (MinHash LSH)

def shingles(text, unit, k):
    """Word k-grams (documents) or character k-grams (short questions) of normalised text."""
    norm = " ".join(re.findall(r"\w+", text.lower()))
    if unit == "words":
        words = norm.split()
        return {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}
    return {norm[i:i + k] for i in range(max(1, len(norm) - k + 1))}


def make_deduper(threshold, unit="words", k=5, num_perm=128):
    """-> check(key, text): (None, None) for a new text (remembered), else (the key it
    duplicates, why). Exact duplicates (same normalised text) by a hash of it, near duplicates by
    MinHash LSH (datasketch; estimated Jaccard similarity of the shingle sets >= threshold).
    Incremental, and it keeps no text: a hash and a MinHash signature per text."""
    from datasketch import MinHash, MinHashLSH
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    exact = {}

    def check(key, text):
        norm = sha256_hex(" ".join(re.findall(r"\w+", text.lower())))
        if norm in exact:
            return exact[norm], "exact duplicate"
        mh = MinHash(num_perm=num_perm)  # fixed default seed: the same input, the same result
        mh.update_batch([s.encode("utf-8") for s in shingles(text, unit, k)])
        hits = lsh.query(mh)
        if hits:
            return sorted(hits)[0], "near duplicate"
        exact[norm] = key
        lsh.insert(key, mh)
        return None, None
    return check


# -----------------------------------------------------------------------------
# The corpus: on disk, fitted to a token budget, its figures, and the --preview estimate

class Corpus:
    """The documents as they pass their checks, in idea order: a kept one is appended at once to
    documents.jsonl.partial, a duplicate to dropped.jsonl.partial; memory keeps the deduplication
    index and a few figures per kept document (`kept`: for --target-tokens and summary.json).
    close() renames them to documents.jsonl and dropped.jsonl, so a killed run never leaves a
    half corpus under the final name; its rerun rebuilds them from the cache without a call."""

    def __init__(self, run):
        self.out, self.check = run.out, make_deduper(run.args.dedup_threshold, "words", 5)
        self.kept, self.dropped, self.seen, self.files, self.chosen = [], Counter(), set(), {}, None

    def file(self, name):
        if name not in self.files:  # opened on first use: a --batch-file run writes nothing
            self.files[name] = open(self.out / f"{name}.jsonl.partial", "w", encoding="utf-8")
        return self.files[name]

    def write(self, name, row):
        self.file(name).write(json.dumps(row, ensure_ascii=False) + "\n")

    def add(self, doc):
        if doc["id"] in self.seen:  # the same prompt twice (two ideas alike)
            return
        self.seen.add(doc["id"])
        dup_of, why = self.check(doc["id"], doc["text"])
        if dup_of:
            self.dropped[why] += 1
            return self.write("dropped", {**doc, "dropped": why, "duplicate_of": dup_of})
        self.write("documents", doc)
        self.kept.append({"id": doc["id"], "tokens": doc.get("tokens"), "doc_type": doc["doc_type"],
                          "words": len(doc["text"].split()), "target_words": doc["target_words"]})

    def keep_only(self, kept):
        """--target-tokens: kept (a subset of self.kept) is the corpus; the rest is dropped."""
        self.chosen = {d["id"] for d in kept}
        self.dropped["beyond --target-tokens"] += len(self.kept) - len(kept)
        self.kept = kept

    def close(self):
        for name in ("documents", "dropped"):
            self.file(name).close()
        partial = self.out / "documents.jsonl.partial"
        if self.chosen is not None:  # one pass over the file: memory holds one document
            with open(partial, encoding="utf-8") as f, open(self.out / "dropped.jsonl.partial",
                                                            "a", encoding="utf-8") as drop:
                write_jsonl(self.out / "documents.jsonl", self._sift(f, drop))
            partial.unlink()
        else:
            os.replace(partial, self.out / "documents.jsonl")
        os.replace(self.out / "dropped.jsonl.partial", self.out / "dropped.jsonl")

    def _sift(self, lines, drop):
        for line in lines:
            doc = json.loads(line)
            if doc["id"] in self.chosen:
                yield doc
            else:
                drop.write(json.dumps({**doc, "dropped": "beyond --target-tokens"},
                                      ensure_ascii=False) + "\n")


def fit_budget(docs, target):
    """Whole documents, taken in a fixed pseudo-random order (their ids are hashes), each one
    kept if it still fits under target, until the total is within 1% below it.
    -> (kept in their original order, the rest)."""
    chosen, total = set(), 0
    for d in sorted(docs, key=lambda d: d["id"]):
        if total >= 0.99 * target:
            break
        if total + d["tokens"] <= target:
            chosen.add(d["id"])
            total += d["tokens"]
    if total < 0.99 * target:  # documents longer than 1% of the target: swap short ones for long
        kept = sorted((d["tokens"], d["id"]) for d in docs if d["id"] in chosen)
        for size, cid in sorted(((d["tokens"], d["id"]) for d in docs if d["id"] not in chosen),
                                reverse=True):
            i = bisect.bisect_left(kept, (size - (target - total), ""))  # smallest that fits
            if i < len(kept) and kept[i][0] < size:
                total += size - kept[i][0]
                chosen.discard(kept.pop(i)[1])
                chosen.add(cid)
                bisect.insort(kept, (size, cid))
            if total >= 0.99 * target:
                break
    return ([d for d in docs if d["id"] in chosen],
            [{**d, "dropped": "beyond --target-tokens"} for d in docs if d["id"] not in chosen])


def distribution(values, digits=1):
    if not values:
        return None
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, int(p * len(v)))]  # noqa: E731
    return {"min": v[0], "p10": q(0.1), "median": q(0.5), "p90": q(0.9), "max": v[-1],
            "mean": round(sum(v) / len(v), digits)}


def corpus_stats(run, kept):
    """What summary.json says about the written documents (kept: Corpus.kept's figures)."""
    types = Counter(d["doc_type"] for d in kept)
    n = sum(types.values())
    entropy = -sum(c / n * math.log2(c / n) for c in types.values()) if n else 0.0
    checked, flagged = len(run.doc_flags), sum(run.doc_flags.values())
    return {"documents": len(kept), "tokenizer": run.args.tokenizer,
            "tokens": sum(d["tokens"] for d in kept) if run.count_tokens else None,
            "words": sum(d["words"] for d in kept),
            "length_words": distribution([d["words"] for d in kept]),
            "length_tokens": distribution([d["tokens"] for d in kept]) if run.count_tokens else None,
            "length_vs_target": distribution([round(d["words"] / d["target_words"], 2)
                                              for d in kept], digits=2),
            "doc_types": len(types), "doc_type_entropy_bits": round(entropy, 3),
            "doc_type_entropy_max_bits": round(math.log2(len(types)), 3) if types else 0.0,
            "meta_flagged": flagged, "documents_checked": checked,  # distinct replies, this run
            "meta_flag_rate": round(flagged / checked, 4) if checked else 0.0}


# Estimates for --preview (and docs_top_up's guess before any document exists): the paper's
# documents average ~3.1k tokens; add a short scratchpad. A document's tokens from its type's
# typical length: ~1.35 tokens a word for English with current tokenizers, plus the scratchpad.
EST_DOC_OUTPUT_TOKENS, EST_IDEA_OUTPUT_TOKENS = 3500, 120
TOKENS_PER_WORD, EST_SCRATCHPAD_TOKENS = 1.35, 250


def preview_estimate(run, subs, words, idea_chars, doc_chars):
    """Print and return the --preview plan and estimate. words: the target length of each document
    type, in subdomain order; idea_chars, doc_chars: the characters of all ideas prompts, and of
    one document prompt."""
    a = run.args
    types = [t for s in subs for t in s["doc_types"]]
    n_types = len(types)
    per_doc = [int(w * TOKENS_PER_WORD) + EST_SCRATCHPAD_TOKENS for w in words]
    n_docs = n_types * a.ideas
    body_tokens = sum(p - EST_SCRATCHPAD_TOKENS for p in per_doc) * a.ideas
    if a.target_tokens and body_tokens:  # topped up or cut to the budget, in the same mix
        scale = a.target_tokens / body_tokens
        n_docs, per_doc = math.ceil(n_docs * scale), [p * scale for p in per_doc]
    idea_in = idea_chars // 4
    doc_in = n_docs * doc_chars // 4
    idea_out, doc_out = n_docs * EST_IDEA_OUTPUT_TOKENS, int(sum(per_doc) * a.ideas)
    domains = sorted({s["domain"] for s in subs})
    lengths = sorted(words)
    print(f"\n---- preview: {run.spec['path']} (framing: {run.framing}) ----\n"
          f"domains: {len(domains)}; subdomains: {len(subs)}; assertions: "
          f"{sum(len(s['assertions']) for s in subs)}; document types: {n_types} "
          f"({sum(t['internal'] for t in types)} internal to {a.provider_name}; typical length "
          f"{lengths[0]}-{lengths[-1]} words, median {lengths[len(lengths) // 2]})\n"
          f"ideas stage:     {n_types:>8,} calls  ~{idea_in:>12,} tokens in  ~{idea_out:>12,} out\n"
          f"documents stage: {n_docs:>8,} calls  ~{doc_in:>12,} tokens in  ~{doc_out:>12,} out\n"
          f"planned documents: {n_docs:,} (before deduplication"
          f"{'; sized to --target-tokens' if a.target_tokens else ''})\n"
          f"estimate: input = prompt characters / 4; output = each type's typical length x "
          f"{TOKENS_PER_WORD} tokens a word + {EST_SCRATCHPAD_TOKENS} for the scratchpad, and "
          f"~{EST_IDEA_OUTPUT_TOKENS} per idea.\n"
          f"The stages above are cached: rerun without --preview (or with --batch-file) to go on.")
    return {"domains": len(domains), "subdomains": len(subs), "doc_types": n_types,
            "framing": run.framing, "planned_calls": n_types + n_docs, "planned_documents": n_docs,
            "est_tokens_in": idea_in + doc_in, "est_tokens_out": idea_out + doc_out}


# -----------------------------------------------------------------------------
# The files a run reads: prompts/ files of [sections], the spec

def sections(text):
    """A prompts/ file of [section] headers and lines (# comments) -> {section: [line, ...]}."""
    out, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if re.fullmatch(r"\[.+\]", line):
            current = out.setdefault(line[1:-1], [])
        else:
            current.append(line)
    return out


def keyed(lines):
    """A section of `key: text` lines -> {key: text}, in file order."""
    return dict(line.split(": ", 1) for line in lines)


def load_spec(path, model_name, provider_name):
    """Read and check the spec; {model_name}/{provider_name} filled; sha256 of the raw bytes."""
    p = Path(path or "")
    if not path or not p.is_file():
        die(f"spec file not found: {path}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        die(f"spec file is not UTF-8 text: {path}")
    if not text.strip():
        die(f"spec file is empty: {path}")
    text = fill(text, model_name=model_name, provider_name=provider_name)
    return {"path": str(path), "sha256": sha256_hex(raw), "text": text}


def spec_framing(path):
    """The framing of a spec from the `framing` column of the table in its folder's README.md
    (specs/README.md says which shipped spec states rules and which gives reasons); 'value' for
    a spec not listed there."""
    readme = Path(path).parent / "README.md"
    if not readme.is_file():
        return "value"
    column = None
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "framing" in cells:
            column = cells.index("framing")
        elif column is not None and len(cells) > column and cells[0] == f"`{Path(path).name}`":
            if cells[column] in ("value", "rules"):
                return cells[column]
    return "value"


# -----------------------------------------------------------------------------
# The run: the flags both commands share, the run object, the summary

def common_flags(max_tokens):
    """The flags of both commands (an argparse parent); max_tokens: the default token limit
    per stage, for the help of --max-tokens."""
    parent = argparse.ArgumentParser(add_help=False)
    llm.add_args(parent.add_argument_group("input and output"), [
        ("--spec", "spec file (markdown/text); {model_name} and {provider_name} are filled from "
         "the flags below (default: none; required except for --opaque)", {}),
        ("--out", "output folder; rerun with the same folder to resume (required)",
         {"required": True}),
        ("--model-name", "fills {model_name} in the spec and prompts (default Sage)",
         {"default": "Sage"}),
        ("--provider-name", "fills {provider_name} (default 'Northwind AI')",
         {"default": "Northwind AI"})])
    llm.add_endpoint_args(parent.add_argument_group("endpoint (llm.py)"), "", "the generator",
                          "http://localhost:8000/v1", model_help="generator model name as the "
                          "endpoint knows it (default: none; required unless --offline)")
    llm.add_args(parent.add_argument_group("sampling"), [
        ("--temperature", "sampling temperature for every stage (default 1.0, as in the paper)",
         {"type": float, "default": 1.0}),
        ("--max-tokens", "token limit per stage, e.g. documents=12000 (defaults: " + ", ".join(
            f"{k}={v}" for k, v in max_tokens.items()) + ")",
         {"nargs": "*", "metavar": "STAGE=N"})])
    g = parent.add_argument_group("client")
    llm.add_client_args(g)
    llm.add_args(g, [
        ("--retry-base-delay", "first backoff in seconds; doubles per retry, with jitter, up to "
         "60 s; Retry-After wins (default 1.0)", {"type": float, "default": 1.0}),
        ("--max-rounds", "top-up / backfill rounds per stage (default 3)",
         {"type": int, "default": 3})])
    llm.add_batch_args(g)
    return parent


def parse_max_tokens(items, defaults):
    """--max-tokens STAGE=N ... over the defaults -> {stage: limit}."""
    out = dict(defaults)
    for item in items or []:
        stage, _, n = item.partition("=")
        if stage not in out or not n.isdigit():
            die(f"--max-tokens takes STAGE=N with STAGE one of {', '.join(out)}; got {item!r}")
        out[stage] = int(n)
    return out


def check_args(args, max_tokens):
    """Bad flag values end the run before anything is sent (one line, exit 2); max_tokens: the
    default token limit per stage, which --max-tokens overrides."""
    for flag in ("concurrency", "max_rounds", "doc_types", "ideas", "n", "domains",
                 "domain_batch", "n_per_preference", "batch_max_lines", "questions_per_request"):
        if getattr(args, flag, 1) < 1:
            die(f"--{flag.replace('_', '-')} must be at least 1")
    if args.batch_max_mb <= 0:
        die("--batch-max-mb must be above 0")
    if args.max_retries < 0 or args.timeout <= 0 or not 0 < args.dedup_threshold <= 1:
        die("--max-retries >= 0, --timeout > 0 and 0 < --dedup-threshold <= 1")
    if getattr(args, "target_tokens", None) is not None and (
            args.target_tokens < 1 or not args.tokenizer):
        die("--target-tokens takes a count >= 1 and needs --tokenizer (the tokenizer of "
            "the model to be trained)")
    args.max_tokens = parse_max_tokens(args.max_tokens, max_tokens)
    args.extra_body = json_object(args.extra_body, "--extra-body")
    return args


def token_counter(args):
    """-> count(text) with the target model's tokenizer (--tokenizer), or None."""
    name = getattr(args, "tokenizer", None)
    if not name:
        return None
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the same bad input
        die(f"cannot load the tokenizer {name!r} ({type(exc).__name__}); give a local "
            f"folder or a model id already in the Hugging Face cache")
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def open_run(args, out, spec, framing):
    """The run every stage takes: args, out, spec, ep (llm.open_endpoint: nothing is sent yet),
    names (filled into every prompt), count_tokens (--tokenizer), framing, and what the summary
    gathers (stages, notes, shortfall, doc_flags). Writes run.json, starts failed.jsonl afresh
    and ingests --batch-results into the cache."""
    ep = open_endpoint(args.base_url, args.model, args.api_key_env, args.timeout,
                       not args.no_model_check, args.retry_base_delay, batch_file=args.batch_file,
                       batch_max_bytes=int(args.batch_max_mb * 1e6),
                       batch_max_lines=args.batch_max_lines)
    names = {"model_name": args.model_name, "provider_name": args.provider_name,
             **({"spec": spec["text"]} if spec else {})}
    run = SimpleNamespace(args=args, out=out, spec=spec, ep=ep, notes=[], shortfall=None,
                          stages={}, count_tokens=token_counter(args), doc_flags={}, names=names,
                          framing=framing)
    (out / "run.json").write_text(json.dumps(run_info(args), indent=1, ensure_ascii=False))
    (out / "failed.jsonl").unlink(missing_ok=True)  # failures of this run only
    if args.batch_results:
        counts = ingest_batch_results(args.batch_results, out / "cache")
        print(f"batch results: {dict(counts)}")
    return run


def finish(run, result, t0, interrupted=False):
    """Print and save the run summary; -> exit status."""
    stats, failed_path = run.ep["stats"], run.out / "failed.jsonl"
    failures = [json.loads(line) for line in open(failed_path, encoding="utf-8")
                ] if failed_path.exists() else []
    reasons = Counter(f["reason"] for f in failures)
    per_stage = Counter(f["custom_id"].rsplit("-", 1)[0] for f in failures)
    summary = {"command": run.args.command, "interrupted": interrupted,
               "calls": stats["calls"], "retries": stats["retries"],
               "invalid_replies": stats["invalid"], "errors": stats["errors"],
               "cached": stats["cached"], "failed": stats["failed"],
               "failed_reasons": dict(reasons), "failed_per_stage": dict(per_stage),
               "tokens_in": stats["tokens_in"],
               "tokens_out": stats["tokens_out"], **(result or {}), "notes": run.notes,
               "shortfall": run.shortfall, "wall_s": round(time.time() - t0, 1),
               "stages": {s: dict(c) for s, c in getattr(run, "stages", {}).items()}}
    print("\n---- summary ----")
    for k, v in summary.items():
        if v not in (None, [], {}):
            print(f"{k}: {v}")
    (run.out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    if run.shortfall:
        print(run.shortfall, file=sys.stderr)
    if stats["failed"]:
        print(f"{stats['failed']} requests failed after their retries (per stage: "
              f"{dict(per_stage)}; reasons above; details in {failed_path}); rerun the same "
              f"command to retry only those.", file=sys.stderr)
    return 130 if interrupted else 1 if stats["failed"] or run.shortfall else 0
