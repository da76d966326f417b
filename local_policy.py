"""
local_policy.py: the model under test, run in this process (evaluate.py's --model / --adapter).

evaluate.py asks three things of a local model: load it (transformers, plus a PEFT LoRA adapter
merged only where that is exact; its chat template, or a plain "User: / Assistant:" one for a base
model), sample replies (generate_cached, for the values --scorer generate, agentic and openqa
suites: cached in llm.py's file format, like endpoint replies), and score (letter_probs for the
values logprob scorer, continuation_logprobs for its options scorer). The rest is speed and
precision, not the method: batches sorted by length and left-padded with explicit positions, the
prompt prefix every sequence shares run once and its KV cache reused by every batch, and the
output layer run in fp32 where the model allows it (bf16 logits add noise of the size of the
effects being measured).

Used by evaluate.py (and its tests); the suites, graders and run folders live there.
"""
import copy
import hashlib
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import llm  # the cache file format local replies share with endpoint replies
from common import die
from midtrain import check_model_path, pick_dtype


# ---------------------------------------------------------------------------------------------
# Loading: model, adapter, tokenizer and chat template
# ---------------------------------------------------------------------------------------------
# Used when a tokenizer has no chat template (a base model before AFT) and --chat-template is unset.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")


def weights_fingerprint(*dirs) -> str:
    """Short hash of the weight files' names, sizes and mtimes: a retrained adapter gets new cache ids."""
    h = hashlib.sha256()
    for d in dirs:
        if d and Path(d).is_dir():
            for f in sorted(Path(d).glob("*")):
                if f.suffix in (".safetensors", ".bin", ".pt") or f.name.endswith(".safetensors.index.json"):
                    st = f.stat()
                    h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def load_policy(model: str | None, adapter: str | None = None, dtype: str = "auto", device: str = "auto",
                chat_template: str | None = None):
    """-> (model, tokenizer) ready for scoring and generation (eval mode, left padding).

    A LoRA adapter is merged into fp32 weights (exact, and faster per token); over bf16 weights it
    stays unmerged, in fp32: a merged bf16 weight rounds away every part of the update smaller than
    half its rounding step (measured on the demo's adapter: 37% relative error, half of one module's
    update entries zero). --model may be left out when the adapter's config names its base model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        cfg = Path(adapter or "") / "adapter_config.json"
        if not cfg.is_file():
            die("--model is required (no --adapter with an adapter_config.json to take the base from)")
        model = json.loads(cfg.read_text())["base_model_name_or_path"]
    check_model_path(model)
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        die(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    tok_src = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model
    tok = AutoTokenizer.from_pretrained(tok_src)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if chat_template:
        try:
            tok.chat_template = Path(chat_template).read_text(encoding="utf-8")
        except OSError:
            die(f"{chat_template}: chat template not found")
    elif not tok.chat_template:
        print(f"warning: {tok_src} has no chat template; using a plain 'User: / Assistant:' format "
              f"(pass --chat-template to choose)", file=sys.stderr)
        tok.chat_template = PLAIN_TEMPLATE
    dt = pick_dtype(dtype, dev)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=dt)
    if adapter:
        from peft import PeftModel
        net = PeftModel.from_pretrained(net, adapter, autocast_adapter_dtype=True)  # adapter weights in fp32
        if dt == torch.float32:
            net = net.merge_and_unload()
    net.to(dev).eval()
    net.policy_info = {"kind": "local", "model": model, "adapter": adapter, "dtype": str(dt),
                       "adapter_merged": bool(adapter) and dt == torch.float32,
                       "device": str(dev), "fingerprint": weights_fingerprint(model, adapter)}
    return net, tok


def render(tok, messages: list[dict], template_kwargs: dict | None = None) -> str:
    """The chat-template text of messages plus the generation prompt (what the model continues)."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                   **(template_kwargs or {}))


# ---------------------------------------------------------------------------------------------
# Batching: left padding with explicit positions, the shared prompt prefix run once
# ---------------------------------------------------------------------------------------------
def left_pad(seqs: list[list[int]], pad: int):
    """-> input_ids, attention_mask, position_ids for left-padded rows (positions start at 0 per row)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def check_context(net, lengths: list[int], extra: int):
    ctx = getattr(net.config, "max_position_embeddings", None)
    if ctx and max(lengths) + extra > ctx:
        die(f"a prompt of {max(lengths)} tokens + {extra} new tokens exceeds the model's "
            f"context of {ctx} tokens")


def shared_prefix(seqs: list[list[int]]) -> list[int]:
    """The longest common leading tokens of all seqs, leaving at least one token of each."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return first[:max(n, 0)]


def prefixed_batches(net, enc: list[list[int]], pad: int, batch_size: int, desc: str | None):
    """Yield (indices, forward kwargs) over token sequences: batches sorted by length, left-padded
    with explicit position ids. The tokens every sequence starts with (chat template and default
    system prompt, ~25% of a value prompt) run once, and every batch reuses their KV cache."""
    device = next(net.parameters()).device
    prefix = shared_prefix(enc) if len(enc) > 1 else []
    past = None
    if len(prefix) >= 8:
        past = net(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1).cache
    else:
        prefix = []
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", dynamic_ncols=True,
                      disable=desc is None or len(order) <= batch_size):
        idx = order[start:start + batch_size]
        ids, mask, pos = left_pad([enc[i][len(prefix):] for i in idx], pad)
        cache = None
        if past is not None:  # [prefix][pads][suffix]: the pads are masked, positions continue the prefix
            cache = copy.deepcopy(past)
            cache.batch_repeat_interleave(len(idx))
            mask = torch.cat([torch.ones(len(idx), len(prefix), dtype=torch.long), mask], 1)
            pos = pos + len(prefix)
        yield idx, {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device),
                    "cache": cache, "use_cache": cache is not None}


# ---------------------------------------------------------------------------------------------
# Sampling replies
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate_texts(net, tok, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float = 1.0,
                   batch_size: int = 8, seed: int = 0, on_batch=None, desc: str = "generate") -> list[dict]:
    """Sample one reply per rendered prompt, in left-padded batches (longest first, so an
    out-of-memory shows at once). on_batch(indices, results) is called after each batch (for the
    cache). Sampling is plain temperature sampling (top_k off, like vLLM); batch b is seeded with
    seed + b, so a rerun of the same pending set reproduces it."""
    device = next(net.parameters()).device
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    check_context(net, [len(e) for e in enc], max_new_tokens)
    eos = {tok.eos_token_id}
    gen_eos = net.generation_config.eos_token_id
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    eos.discard(None)
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0
                else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
    results = [None] * len(enc)
    with tqdm(total=len(enc), desc=desc, unit="sample", dynamic_ncols=True) as bar:
        for b, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start:start + batch_size]
            ids, mask, _ = left_pad([enc[i] for i in idx], tok.pad_token_id)
            torch.manual_seed(seed + b)
            out = net.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                               max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                               eos_token_id=sorted(eos), **sampling)
            for r, i in enumerate(idx):
                new = out[r, ids.shape[1]:].tolist()
                stop = next((j for j, t in enumerate(new) if t in eos), None)
                results[i] = {"content": tok.decode(new[:stop], skip_special_tokens=True),
                              "finish_reason": "length" if stop is None else "stop", "seed": seed + b,
                              "usage": {"prompt_tokens": len(enc[i]),
                                        "completion_tokens": len(new) if stop is None else stop + 1}}
            if on_batch:
                on_batch(idx, results)
            bar.update(len(idx))
    return results


def generate_cached(net, tok, reqs: list[dict], cache, desc: str, template_kwargs: dict | None = None,
                    batch_size: int = 8, seed: int = 0) -> dict:
    """llm.run_requests for the local model: replies to chat requests (llm.make_request's), cached
    in the same file format -> {custom_id: record}. Only requests not in the cache are sampled, and
    each batch is appended as it finishes, so a killed run keeps every finished batch. One
    temperature and token budget per call (the first pending request's)."""
    results = {cid: recs[0] for cid, recs in llm.load_cache(cache).items()}
    pending = list({r["custom_id"]: r for r in reqs if r["custom_id"] not in results}.values())
    if not pending:
        return results
    body = pending[0]["body"]
    prompts = [render(tok, r["body"]["messages"], template_kwargs) for r in pending]
    with llm.open_append(cache) as f:
        def on_batch(idx, res):
            for i in idx:
                rec = {"custom_id": pending[i]["custom_id"], "model": pending[i]["body"]["model"], "reasoning": None,
                       **res[i]}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                results[rec["custom_id"]] = rec
            f.flush()
        generate_texts(net, tok, prompts, body["max_tokens"], body["temperature"], batch_size=batch_size, seed=seed,
                       on_batch=on_batch, desc=desc)
    return results


# ---------------------------------------------------------------------------------------------
# Scoring: the next letter's probability, a continuation's log-probability (fp32 output layer)
# ---------------------------------------------------------------------------------------------
def letter_token_ids(tok, prompt: str) -> list[int]:
    """Token ids of the replies "A" and "B" as they would start the assistant turn after prompt."""
    space = "" if prompt[-1:].isspace() else " "  # "...assistant\n" + "A", but "Assistant:" + " A"
    base = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in "AB":
        full = tok(prompt + space + letter, add_special_tokens=False)["input_ids"]
        if full[:len(base)] != base or len(full) != len(base) + 1:
            die(f"the tokenizer does not encode the reply {space + letter!r} as a single token "
                f"after the prompt (got {tok.convert_ids_to_tokens(full[len(base) - 1:])}); "
                f"the logprob scorer needs one; use --scorer generate")
        ids.append(full[-1])
    if ids[0] == ids[1]:
        die(f"the replies 'A' and 'B' map to the same token {ids[0]}")
    return ids


def letter_logits(net, letter_ids: list[int], fp32_head: bool, **inputs) -> torch.Tensor:
    """fp32 logits of the two letters at the last position. With fp32_head the output layer is
    applied in fp32 to the final hidden state: bf16 logits (8-bit mantissa, steps of 0.125 at 20)
    would add up to ~0.05 of noise to each p(A)."""
    if not fp32_head:
        return net(**inputs, logits_to_keep=1).logits[:, -1, letter_ids].float()
    h = net.get_decoder()(**inputs).last_hidden_state[:, -1].float()
    head = net.get_output_embeddings()
    logits = h @ head.weight[letter_ids].float().T
    return logits + head.bias[letter_ids].float() if head.bias is not None else logits


def fp32_head_ok(net, ids: list[int], letter_ids: list[int]) -> bool:
    """True when decoder + output layer reproduce the model's own logits (no soft-capping or logit
    scale hidden in its forward), checked on one prompt."""
    if not isinstance(net.get_output_embeddings(), torch.nn.Linear):
        return False
    x = torch.tensor([ids], device=next(net.parameters()).device)
    try:
        ours = letter_logits(net, letter_ids, True, input_ids=x)
    except (AttributeError, TypeError, NotImplementedError):
        return False
    return bool((ours - letter_logits(net, letter_ids, False, input_ids=x)).abs().max() < 1.0)


@torch.inference_mode()
def letter_probs(net, tok, prompts: list[str], letter_ids: list[int], batch_size: int = 32,
                 desc: str | None = "score") -> torch.Tensor:
    """p(A) renormalised over {A, B} for the next token of each prompt; only the last position's
    letter logits are computed."""
    was_training = net.training
    net.eval()  # a model handed over straight from training may still have dropout on
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    check_context(net, [len(e) for e in enc], 1)
    fp32_head = fp32_head_ok(net, enc[0], letter_ids)
    p_a = torch.empty(len(enc), dtype=torch.float64)
    for idx, kw in prefixed_batches(net, enc, pad_id(tok), batch_size, desc):
        p_a[idx] = torch.softmax(letter_logits(net, letter_ids, fp32_head, **kw), -1)[:, 0].double().cpu()
    net.train(was_training)
    return p_a


@torch.inference_mode()
def continuation_logprobs(net, tok, prompts: list[str], conts: list[str], batch_size: int = 32,
                          desc: str | None = "score") -> torch.Tensor:
    """log p(cont | prompt), summed over the continuation's tokens, for each (prompt, cont). The
    output layer runs in fp32 on the continuation's positions when the model allows it (see
    letter_logits): bf16 logits would add noise of the size of the effects being measured."""
    was_training = net.training
    net.eval()
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    c_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in conts]
    enc = [p + c for p, c in zip(p_ids, c_ids)]
    check_context(net, [len(e) for e in enc], 0)
    head = net.get_output_embeddings()
    fp32_head = fp32_head_ok(net, p_ids[0], c_ids[0][:1])
    weight = head.weight.float() if fp32_head else None
    out = torch.empty(len(enc), dtype=torch.float64)
    for idx, kw in prefixed_batches(net, enc, pad_id(tok), batch_size, desc):
        k = max(len(c_ids[i]) for i in idx)  # right-aligned rows: the last k positions hold every continuation
        if fp32_head:
            h = net.get_decoder()(**kw).last_hidden_state[:, -k - 1:-1].float()
            logits = h @ weight.T + (head.bias.float() if head.bias is not None else 0)
        else:
            logits = net(**kw, logits_to_keep=k + 1).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1)
        for row, i in enumerate(idx):
            n = len(c_ids[i])
            target = torch.tensor(c_ids[i], device=logp.device)
            out[i] = logp[row, k - n:].gather(1, target[:, None]).sum().double().cpu()
    net.train(was_training)
    return out
