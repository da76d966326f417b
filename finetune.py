#!/usr/bin/env python
"""
Alignment fine-tuning (AFT): supervised fine-tuning on chats with loss on assistant tokens only,
continuing the LoRA adapter trained by midtrain.py (the paper's setting).

One process:
    python finetune.py --model BASE --init-adapter runs/msm/final --data chats.jsonl --out runs/aft
Spec chats mixed with an instruction-tuning set (weights multiply each source's example count):
    python finetune.py --model BASE --init-adapter runs/msm/final \
        --data data/aft/cheese.jsonl data/it/sample.jsonl --data-weights 1 0.5 --out runs/aft
N GPUs: torchrun --standalone --nproc_per_node=8 finetune.py ... (as midtrain.py)
Look at what is trained before training: python finetune.py ... --show-mask 3

Everything but the chat data (distributed setup, model loading, the loop, checkpoints, resume,
export, metrics) is midtrain.py's. Chats are rendered with the model's own chat template; the
assistant mask is built here from the rendered text, since stock templates have no generation
tags. Chats are packed whole into rows (best fit), each attending only to itself.
"""
import argparse
import bisect
import re

import torch

import midtrain
from common import InputError, die, fill
from midtrain import IGNORE, Rows, print0

ROLES = {"system", "user", "assistant"}
THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    midtrain.add_training_args(p)
    a = p.add_argument
    a("--data-weights", type=float, nargs="+", default=None,
      help="one weight per --data source: its example count is multiplied by it (0.5 = a random half, "
           "2 = every example twice) (default: 1 each)")
    a("--init-adapter", default=None,
      help="LoRA adapter folder to continue training, e.g. midtrain.py's OUT/final (default: a new adapter)")
    a("--cot", choices=["keep", "strip"], default="keep",
      help="keep: train on <think>...</think> reasoning and answer; strip: remove the reasoning (default: keep)")
    a("--no-think", action="store_true", help="append --no-think-switch to system and user turns (default: off)")
    a("--no-think-switch", default="/no_think", help="the Qwen3 soft switch appended by --no-think (default: /no_think)")
    a("--show-mask", type=int, default=0, metavar="N",
      help="print N rendered examples with trained spans between ⟦ ⟧, then exit (default: 0)")
    a("--truncate", action="store_true",
      help="keep the first --seq-len tokens of a longer chat instead of dropping it (default: drop)")
    a("--chat-template", default=None,
      help="Jinja chat template file, for models without one (default: the tokenizer's)")
    a("--merge-system", action="store_true",
      help="prepend system text to the first user turn, for templates without a system role (default: off)")
    args = p.parse_args(argv)
    if args.data_weights is not None and len(args.data_weights) != len(args.data):
        p.error(f"--data-weights has {len(args.data_weights)} values for {len(args.data)} --data sources")
    return args


# ---------------------------------------------------------------------------------------------
# Reading and mixing chats
# ---------------------------------------------------------------------------------------------
def check_chat(rec, where: str) -> list[dict]:
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        die(f"{where}: missing or empty 'messages' list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            die(f"{where}: message {j} has unknown role {role!r} (expected system, user or assistant)")
        if not isinstance(m.get("content"), str):
            die(f"{where}: message {j} has no text 'content'")
        if m["role"] == "assistant" and not THINK.sub("", m["content"]).strip():
            die(f"{where}: message {j} is an empty assistant turn")
    if not any(m["role"] == "assistant" for m in msgs):
        die(f"{where}: chat has no assistant turn, so nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def prepare_chat(msgs: list[dict], where: str, args) -> list[dict]:
    out = []
    for m in msgs:
        text = fill(m["content"], where, model_name=args.model_name, provider_name=args.provider_name)
        if m["role"] == "assistant" and args.cot == "strip":
            text = THINK.sub("", text).strip()
        if m["role"] in ("system", "user") and args.no_think:
            text = f"{text} {args.no_think_switch}"
        out.append({"role": m["role"], "content": text})
    if args.merge_system and out[0]["role"] == "system":
        system, rest = out[0]["content"], out[1:]
        first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
        if first_user is not None:
            rest[first_user] = {"role": "user", "content": f"{system}\n\n{rest[first_user]['content']}"}
        out = rest
    return out


def load_chats(args) -> list[tuple[int, str, list[dict]]]:
    """All chats as (source index, where, messages), mixed by --data-weights and shuffled with --seed."""
    weights = args.data_weights or [1.0] * len(args.data)
    g = torch.Generator().manual_seed(args.seed)
    mixed = []
    for s, (source, w) in enumerate(zip(args.data, weights)):
        chats = [(s, where, prepare_chat(check_chat(rec, where), where, args))
                 for where, rec in midtrain.read_records(source)]
        if not chats:
            die(f"{source}: no chats")
        whole, frac = divmod(w, 1.0)
        picked = chats * int(whole)
        picked += [chats[i] for i in torch.randperm(len(chats), generator=g)[: round(frac * len(chats))].tolist()]
        mixed += picked
    order = torch.randperm(len(mixed), generator=g).tolist()
    return [mixed[i] for i in order]


# ---------------------------------------------------------------------------------------------
# Rendering and the assistant mask
# ---------------------------------------------------------------------------------------------
def template_markers(tok) -> tuple[str, str]:
    """(assistant header, end-of-turn marker) of a chat template, found by rendering a probe chat."""
    probe = [{"role": "user", "content": "PROBE-Q"}]
    bare = tok.apply_chat_template(probe, tokenize=False)
    with_prompt = tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    if not with_prompt.startswith(bare) or len(with_prompt) == len(bare):
        die("the chat template has no generation prompt; pass a usable one with --chat-template")
    header = with_prompt[len(bare):]
    full = tok.apply_chat_template(probe + [{"role": "assistant", "content": "PROBE-A"}], tokenize=False)
    after = full[full.index("PROBE-A") + len("PROBE-A"):]
    specials = sorted(set(tok.all_special_tokens) | set(tok.get_added_vocab()), key=len, reverse=True)
    hits = [(after.find(s), s) for s in specials if s and after.find(s) >= 0]
    if not hits:
        die("cannot find the chat template's end-of-turn token after an assistant turn")
    at, token = min(hits, key=lambda h: (h[0], -len(h[1])))
    # Qwen3-style templates render a think block inside the assistant turn: the header is the part
    # before it, which is what the model sees as the prompt; the block is trained as generated text.
    header = header.split("<think>")[0]
    return header, after[: at + len(token)]


def render(tok, msgs: list[dict], markers) -> tuple[list[int], list[bool], list[tuple[int, int]], str]:
    """Token ids, a per-token trained flag, and the trained character spans of a rendered chat.

    Each assistant turn is trained from the end of its header to the end of its end-of-turn marker:
    everything the model has to generate, including any think block the template writes itself
    (Qwen3 re-renders reasoning, or writes an empty block, and drops it from earlier turns).
    """
    header, eot = markers
    text = tok.apply_chat_template(msgs, tokenize=False)
    spans, cursor = [], 0
    for m in msgs:
        if m["role"] != "assistant":
            continue
        start = text.find(header, cursor)  # the first assistant header after the previous turn is this one's
        body = start + len(header)
        pos = text.find(m["content"].strip(), body) if start >= 0 else -1
        if pos < 0 and start >= 0:  # the template re-rendered the reasoning itself: find the answer part
            pos = text.find(THINK.sub("", m["content"]).strip(), body)
        if pos < 0:
            raise InputError("could not find an assistant turn in the rendered chat; the chat template "
                             "changes assistant text in a way this script does not support")
        end = text.find(eot, pos)
        if end < 0:
            raise InputError("an assistant turn is not closed by the end-of-turn token " + repr(eot))
        spans.append((body, end + len(eot)))
        cursor = end + len(eot)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    # A token is trained if any of its characters is (Hugging Face's generation-tag rule): a reply that
    # starts with spaces under a non-trimming template (ChatML, --cot keep) can share a token with the
    # header's newline, and the model generates that token.
    flags = [any(a < e and s < max(b, a + 1) for s, e in spans) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], flags, spans, text


def render_all(tok, chats, args):
    markers = template_markers(tok)
    out = []
    for s, where, msgs in chats:
        try:
            ids, flags, _, _ = render(tok, msgs, markers)
        except InputError as e:  # render's message, with the chat it is about
            die(f"{where}: {e}")
        except Exception as e:  # jinja errors, e.g. "System role not supported"
            if any(m["role"] == "system" for m in msgs):
                die(f"{where}: {args.model}'s chat template cannot render this chat with a system "
                    f"turn ({e}); pass --merge-system to fold system text into the first user "
                    "turn, or remove system messages")
            die(f"{where}: the chat template failed: {e}")
        out.append((s, ids, flags))
    return out


def show_mask(tok, chats, n: int):
    markers = template_markers(tok)
    for _, where, msgs in chats[:n]:
        try:
            _, _, spans, text = render(tok, msgs, markers)
        except InputError as e:
            die(f"{where}: {e}")
        marked, last = [], 0
        for s, e in spans:
            marked += [text[last:s], "⟦", text[s:e], "⟧"]
            last = e
        marked.append(text[last:])
        print(f"----- {where} (trained spans between ⟦ ⟧)\n{''.join(marked)}")


# ---------------------------------------------------------------------------------------------
# Packing chats whole into rows (best fit)
# ---------------------------------------------------------------------------------------------
def pack_chats(examples, seq_len: int, pad: int, truncate: bool):
    """Best-fit decreasing: each chat goes into the fullest row it still fits in. Positions restart
    for every chat and no attention mask is passed, so chats in one row never see each other."""
    kept, dropped, truncated = [], 0, 0
    for s, ids, flags in examples:
        if len(ids) > seq_len:
            if not truncate:
                dropped += 1
                continue
            ids, flags = ids[:seq_len], flags[:seq_len]
            truncated += 1
        kept.append((s, ids, flags))
    kept.sort(key=lambda e: -len(e[1]))
    rows: list[list] = []
    free: list[tuple[int, int]] = []  # (free space, row index), sorted
    for ex in kept:
        i = bisect.bisect_left(free, (len(ex[1]), -1))
        if i == len(free):
            rows.append([ex])
            bisect.insort(free, (seq_len - len(ex[1]), len(rows) - 1))
        else:
            space, r = free.pop(i)
            rows[r].append(ex)
            bisect.insort(free, (space - len(ex[1]), r))
    n = max(1, len(rows))
    x = torch.full((n, seq_len), pad, dtype=torch.int32)
    y = torch.full((n, seq_len), IGNORE, dtype=torch.int32)
    p = torch.arange(seq_len, dtype=torch.int32).repeat(n, 1)
    n_real = torch.zeros(n, dtype=torch.int64)
    for r, row in enumerate(rows):
        at = 0
        for _, ids, flags in row:
            L = len(ids)
            x[r, at: at + L] = torch.tensor(ids, dtype=torch.int32)
            tgt = torch.tensor(ids[1:] + [IGNORE], dtype=torch.int32)
            trained_next = torch.tensor(flags[1:] + [False])
            y[r, at: at + L] = torch.where(trained_next, tgt, torch.tensor(IGNORE, dtype=torch.int32))
            p[r, at: at + L] = torch.arange(L, dtype=torch.int32)
            at += L
        n_real[r] = at
        if at < seq_len:  # padding restarts positions too, so it is its own (ignored) sequence
            p[r, at:] = torch.arange(seq_len - at, dtype=torch.int32)
    stats = {"chats": len(kept), "dropped_too_long": dropped, "truncated": truncated, "rows": len(rows),
             "tokens": int(n_real.sum()), "trained_tokens": int((y != IGNORE).sum()),
             "pad_tokens": n * seq_len - int(n_real.sum())}
    return Rows(x, y, p, n_real), stats, kept


def source_report(args, kept) -> list[dict]:
    """Per --data source: the chats, tokens and trained tokens it put into the training rows."""
    report = []
    for s, source in enumerate(args.data):
        mine = [e for e in kept if e[0] == s]
        report.append({"source": source, "examples": len(mine), "tokens": sum(len(e[1]) for e in mine),
                       "trained_tokens": sum(sum(e[2]) for e in mine)})
    return report


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    d = midtrain.setup_distributed()
    config = midtrain.check_model(args)
    midtrain.check_out(args)
    tok = midtrain.load_tokenizer(args)
    if args.chat_template:
        tok.chat_template = open(args.chat_template).read()
    if not tok.chat_template:
        die(f"{args.model} has no chat template; pass one with --chat-template FILE")
    chats = load_chats(args)
    if args.show_mask:
        show_mask(tok, chats, args.show_mask)
        return
    examples = render_all(tok, chats, args)
    train_ex, val_ex = midtrain.split_val(examples, args.val_frac, args.seed)
    data, stats, kept = pack_chats(train_ex, args.seq_len, tok.pad_token_id, args.truncate)
    val = pack_chats(val_ex, args.seq_len, tok.pad_token_id, args.truncate)[0] if val_ex else None
    if stats["chats"] == 0:
        die(f"every chat is longer than --seq-len {args.seq_len}; raise it or pass --truncate")
    midtrain.plan_steps(args, len(data), d)
    sources = source_report(args, kept)
    for r in sources:
        print0(f"source {r['source']}: {r['examples']} chats, {r['tokens']:,} tokens, "
               f"{r['trained_tokens']:,} trained")
    if stats["dropped_too_long"]:
        print0(f"warning: dropped {stats['dropped_too_long']} chats longer than --seq-len {args.seq_len} "
               "(--truncate keeps their first tokens instead)")
    print0(f"packed {stats['chats']} chats into {stats['rows']} rows of {args.seq_len}: {stats['tokens']:,} "
           f"tokens, {stats['trained_tokens']:,} trained, {stats['pad_tokens']:,} pad, "
           f"{stats['truncated']} truncated")
    torch.manual_seed(args.seed)
    model = midtrain.load_model(args, d, config, init_adapter=args.init_adapter)
    midtrain.train(args, model, tok, data, val, d, {"packing": stats, "sources": sources})
    if d.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
