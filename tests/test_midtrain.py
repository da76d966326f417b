"""midtrain.py: learning, export, world-size and accumulation invariance, resume, doc masking, bad input."""
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from helpers import losses, metrics, run_script

import midtrain

# fp32 pinned: --dtype auto picks bf16 on CPUs with avx512_bf16, and these tests compare against fp32
# references (an untrained model's loss, 1 rank vs 2, resumed vs uninterrupted) to 1e-5.
SMALL = ["--seq-len", 64, "--batch-tokens", 256, "--lora-rank", 8, "--lora-alpha", 16, "--lr", 1e-2, "--dtype", "fp32"]


def train_args(model, data, out, *extra):
    return ["--model", model, "--data", data, "--out", out, *SMALL, *extra]


def rows_loss(model, rows) -> float:
    with torch.no_grad():
        total = midtrain.token_loss_sum(model, rows, torch.device("cpu"), None).item()
    return total / int((rows.targets != midtrain.IGNORE).sum())


def val_rows(model_path, data, seq_len=64, frac=0.2, seed=0):
    args = Namespace(data=[str(data)], text_field="text", model_name=None, provider_name=None)
    tok = midtrain.load_tokenizer(Namespace(model=model_path, trust_remote_code=False))
    _, val = midtrain.split_val(midtrain.load_documents(args), frac, seed)
    return midtrain.pack_documents(midtrain.tokenize(tok, val, "val"), seq_len, tok.eos_token_id,
                                   tok.pad_token_id, False)[0]


@pytest.mark.parametrize("lora", [True, False])
def test_learns_and_export_reloads(tiny_model, docs, tmp_path, lora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    extra = [] if lora else ["--lora-rank", 0, "--lr", 3e-3]
    midtrain.main([str(a) for a in train_args(tiny_model, docs, out, "--epochs", 4, "--val-frac", 0.2, *extra)])
    m = metrics(out)
    untrained = rows_loss(AutoModelForCausalLM.from_pretrained(tiny_model).eval(), val_rows(tiny_model, docs))
    assert m[0].keys() == {"step", "val_loss"} and m[0]["step"] == 0  # the baseline: the untrained model's loss
    assert m[0]["val_loss"] == pytest.approx(untrained, abs=1e-5)  # (a LoRA adapter starts as a no-op)
    first, last = m[1]["loss"], sum(r["loss"] for r in m[-3:]) / 3
    assert last < first - (0.15 if lora else 1.0), (first, last)
    assert m[-1]["val_loss"] < m[0]["val_loss"] - (0.1 if lora else 1.0)
    final = out / "final"
    if lora:
        assert (final / "adapter_model.safetensors").exists() and (final / "tokenizer.json").exists()
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), final)
    else:
        assert (final / "model.safetensors").exists() and not (final / "adapter_config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(final)
    # the exported model computes the loss the trained model reported on the held-out rows
    assert rows_loss(model.eval(), val_rows(tiny_model, docs)) == pytest.approx(m[-1]["val_loss"], abs=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["args"]["lora_rank"] == (8 if lora else 0) and len(cfg["data"][0]["sha256"]) == 64


def test_merge_writes_full_model(tiny_model, docs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    midtrain.main([str(a) for a in train_args(tiny_model, docs, out, "--merge", "--val-frac", 0.2)])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert rows_loss(merged.eval(), val_rows(tiny_model, docs)) == pytest.approx(metrics(out)[-1]["val_loss"], abs=1e-5)


def export_tensors(run) -> dict:
    from safetensors.torch import load_file

    final = Path(run) / "final"
    return load_file(final / ("model.safetensors" if (final / "model.safetensors").exists() else "adapter_model.safetensors"))


@pytest.mark.parametrize("lora", [True, False])
def test_two_ranks_equal_one_process(tiny_model, docs, tmp_path, lora):
    """2 ranks (FSDP2) = 1 process: losses, gradient norms and the exported files. LoRA: with a clip
    threshold the gradient norm exceeds at every step (the norm of sharded gradients must be the
    global one), and a 2-rank run stopped and resumed gives the uninterrupted run's losses and adapter.
    Full fine-tuning: the tied embedding is exported once, as one process does."""
    extra = ["--grad-clip", 0.05] if lora else ["--lora-rank", 0, "--lr", 3e-3]
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("midtrain.py", *train_args(tiny_model, docs, one, "--micro-batch", 2, *extra))
    run_script("midtrain.py", *train_args(tiny_model, docs, two, "--micro-batch", 2, *extra), nproc=2)
    a, b = losses(one), losses(two)
    assert len(a) == len(b) > 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    ga, gb = ([m["grad_norm"] for m in metrics(run) if "loss" in m] for run in (one, two))
    assert max(abs(x - y) / x for x, y in zip(ga, gb)) < 1e-4, (ga, gb)
    wa, wb = export_tensors(one), export_tensors(two)
    assert sorted(wa) == sorted(wb)  # full fine-tuning on 2 ranks wrote lm_head.weight beside the embedding
    assert all(wa[k].dtype == wb[k].dtype and torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    if not lora:
        return
    assert min(ga) > 0.05  # clipping was active at every step
    cut = tmp_path / "cut"
    run_script("midtrain.py", *train_args(tiny_model, docs, cut, "--micro-batch", 2, *extra, "--stop-after-steps", 3),
               nproc=2)
    assert len(losses(cut)) == 3 and not (cut / "final").exists()
    run_script("midtrain.py", *train_args(tiny_model, docs, cut, "--micro-batch", 2, *extra, "--resume"), nproc=2)
    assert [m["step"] for m in metrics(cut)] == list(range(1, len(b) + 1))
    assert max(abs(x - y) for x, y in zip(b, losses(cut))) < 1e-6, (b, losses(cut))
    wc = export_tensors(cut)
    assert sorted(wc) == sorted(wb) and all(torch.allclose(wb[k], wc[k], atol=1e-6) for k in wb)


def test_meta_loading_restores_rope_buffers(tiny_model, tmp_path):
    """Rank 1 builds the model on the meta device; after sharding, its buffers (RoPE inv_freq) and its
    first-batch loss must equal an unsharded model's (trap 1: to_empty leaves inv_freq uninitialised)."""
    script = tmp_path / "check.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {str(Path(midtrain.__file__).parent)!r})
import midtrain
from transformers import AutoModelForCausalLM
args = midtrain.parse_args(["--model", {tiny_model!r}, "--data", "x.jsonl", "--out", "o", "--lora-rank", "0", "--seq-len", "64",
                             "--dtype", "fp32"])
d = midtrain.setup_distributed()
model = midtrain.load_model(args, d, midtrain.check_model(args))
ref = AutoModelForCausalLM.from_pretrained({tiny_model!r})
for (n, b), (_, r) in zip(model.named_buffers(), ref.named_buffers()):
    assert torch.equal(b, r), (d.rank, n)
x = torch.randint(0, 300, (1, 32))
with torch.no_grad():
    got = model(input_ids=x).logits
    want = ref(input_ids=x).logits
assert (got - want).abs().max() < 1e-5, (got - want).abs().max()
dist.destroy_process_group()
open({str(tmp_path)!r} + f"/ok{{d.rank}}", "w").close()  # both ranks got here (their stdout interleaves)
""")
    import subprocess, sys, os
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


def test_grad_accumulation_invariance(tiny_model, docs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # a small lr keeps fp32 rounding differences from being amplified over the steps
    midtrain.main([str(x) for x in train_args(tiny_model, docs, a, "--micro-batch", 4, "--lr", 1e-3)])  # 1 x 4
    midtrain.main([str(x) for x in train_args(tiny_model, docs, b, "--micro-batch", 1, "--lr", 1e-3)])  # 4 x 1
    la, lb = losses(a), losses(b)
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5, (la, lb)


def test_resume_equals_uninterrupted(tiny_model, docs, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = lambda out: [str(x) for x in train_args(tiny_model, docs, out, "--epochs", 2, "--save-every", 4)]
    midtrain.main(args(full))
    midtrain.main(args(cut) + ["--stop-after-steps", "7"])
    assert len(losses(cut)) == 7 and not (cut / "final").exists()
    assert (cut / "checkpoints" / "step_0000007" / "state.json").exists()
    with pytest.raises(SystemExit):  # a rerun without --resume must not clobber the checkpoints
        midtrain.main(args(cut))
    midtrain.main(args(cut) + ["--resume"])
    a, b = losses(full), losses(cut)
    assert [m["step"] for m in metrics(cut)] == list(range(1, len(a) + 1))  # no step logged twice
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (a, b)
    from safetensors.torch import load_file
    wa, wb = (load_file(p / "final" / "adapter_model.safetensors") for p in (full, cut))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_doc_mask_packed_logits_equal_separate(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    docs = [[5, 9, 30, 41, 7], [100, 101, 102], [200, 17, 18, 19, 20, 21]]
    eos, pad = 2, 0
    rows, stats = midtrain.pack_documents(docs, 32, eos, pad, doc_mask=True)
    assert stats["tokens"] == sum(len(d) + 1 for d in docs) and stats["rows"] == 1
    x, pos = rows.input_ids.long(), rows.position_ids.long()
    with torch.no_grad():
        packed = model(input_ids=x, position_ids=pos, use_cache=False).logits[0]
        leaky = model(input_ids=x, use_cache=False).logits[0]  # positions run on: documents see each other
        masked_call = model(input_ids=x, position_ids=pos, attention_mask=torch.ones_like(x), use_cache=False).logits[0]
    start = 0
    for doc in docs:
        ids = torch.tensor([doc + [eos]])
        with torch.no_grad():
            alone = model(input_ids=ids, use_cache=False).logits[0]
        n = ids.shape[1]
        assert torch.allclose(packed[start:start + n], alone, atol=1e-5)
        if start:  # the checks that would catch a leak really can fail
            assert not torch.allclose(leaky[start:start + n], alone, atol=1e-3)
            assert not torch.allclose(masked_call[start:start + n], alone, atol=1e-3)
        start += n
    # the target after each EOS (the next document's first token) carries no loss with doc masking
    ends = [i for i, t in enumerate(rows.input_ids[0].tolist()[:stats["tokens"]]) if t == eos]
    assert all(rows.targets[0, i] == midtrain.IGNORE for i in ends)


def test_packing_counts_and_row_boundaries():
    rows, stats = midtrain.pack_documents([[1] * 10, [3] * 7], 8, 2, 0, doc_mask=True)
    assert stats == {"tokens": 19, "rows": 3, "pad_tokens": 5, "dropped_tokens": 0}
    assert rows.n_real.tolist() == [8, 8, 3]
    # the first document continues into row 2 and restarts its positions there; the next one restarts at 0
    assert rows.position_ids[1].tolist()[:3] == [0, 1, 2] and rows.position_ids[1, 3] == 0
    assert rows.targets[0, :7].tolist() == [1] * 7 and rows.targets[0, 7] == 1  # row end -> next row's token
    plain, _ = midtrain.pack_documents([[1] * 10, [3] * 7], 8, 2, 0, doc_mask=False)
    assert plain.targets[1, 2] == 3  # without doc masking EOS predicts the next document


def tiny_arch(tiny_model, tmp_path, arch):
    from tiny import build_tiny_model

    return tiny_model if arch == "llama" else build_tiny_model(str(tmp_path / arch), arch=arch)


def plain_and_chunked(model, rows, autocast):
    """(loss, {name: grad}) of the plain loss, then of the chunked one, on the same rows."""
    got = []
    for chunked in (False, True):
        model.zero_grad()
        loss = midtrain.token_loss_sum(model, rows, torch.device("cpu"), autocast, chunked=chunked)
        loss.backward()
        got.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return got


@pytest.mark.parametrize("arch,lora", [("llama", False), ("llama", True), ("gemma2", False), ("cohere", False)])
def test_chunked_cross_entropy_equals_plain(tiny_model, tmp_path, monkeypatch, arch, lora):
    """The loss computed chunk by chunk in the output layer (grads formed in forward) gives the loss
    and the gradients of a plain F.cross_entropy over full logits; chunks of 7 rows cross rows. Also
    on the architectures that change logits after the output layer (trap 7): Gemma-2 soft-caps them,
    Cohere scales them; the chunked loss applies the same change."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(midtrain, "CE_CHUNK", 7)
    model = AutoModelForCausalLM.from_pretrained(tiny_arch(tiny_model, tmp_path, arch))
    if lora:
        model = midtrain.add_lora(model, Namespace(seed=0, lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                                                   lora_targets=midtrain.LORA_TARGETS), None)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p)  # B starts at zero: give the adapters gradients to compare
    T = 16
    x = torch.randint(0, 300, (2, T))
    y = x.clone()
    y[0, :5] = midtrain.IGNORE
    rows = midtrain.Rows(x.int(), y.int(), torch.arange(T).repeat(2, 1).int(), torch.full((2,), T))
    (plain, g_plain), (chunk, g_chunk) = plain_and_chunked(model, rows, None)
    assert chunk == pytest.approx(plain, rel=1e-6) and g_plain.keys() == g_chunk.keys()
    assert all(torch.allclose(g_plain[k], g_chunk[k], rtol=1e-4, atol=1e-5) for k in g_plain)
    assert type(model.get_output_embeddings()).forward is model.get_output_embeddings().forward.__func__
    want = {"llama": None, "gemma2": ("softcap", 1.0), "cohere": ("scale", 4.0)}[arch]
    assert model.get_output_embeddings().logit_transform == want  # the chunked path ran, with the transform


def test_unknown_logit_transform_uses_the_plain_loss(tiny_model, tmp_path):
    """A model that changes its logits in a way its config does not say (here a Cohere whose scale was
    changed after construction) gets the plain loss, not a wrong chunked one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_arch(tiny_model, tmp_path, "cohere"))
    model.logit_scale = 0.5  # the config still says 4.0
    T = 12
    x = torch.randint(0, 300, (1, T))
    rows = midtrain.Rows(x.int(), x.int(), torch.arange(T)[None].int(), torch.full((1,), T))
    plain, chunked = (midtrain.token_loss_sum(model, rows, torch.device("cpu"), None, chunked=c).item()
                      for c in (False, True))
    assert model.get_output_embeddings().logit_transform == "unknown" and chunked == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_chunked_cross_entropy_in_bf16(tiny_model, weights):
    """Under bf16 autocast (fp32 master weights, or a bf16 frozen base as a 1-process LoRA run has), the
    chunked loss and its gradients equal the plain loss's computed the same way, to bf16 precision."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[weights]))
    model = midtrain.add_lora(model, Namespace(seed=0, lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                                               lora_targets=midtrain.LORA_TARGETS), None)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    T = 32
    x = torch.randint(0, 300, (2, T))
    y = x.clone()
    y[1, :9] = midtrain.IGNORE
    rows = midtrain.Rows(x.int(), y.int(), torch.arange(T).repeat(2, 1).int(), torch.full((2,), T))
    (plain, g_plain), (chunk, g_chunk) = plain_and_chunked(model, rows, torch.bfloat16)
    g_plain, g_chunk = (torch.cat([g.flatten() for g in grads.values()]) for grads in (g_plain, g_chunk))
    assert torch.isfinite(g_chunk).all() and g_chunk.dtype == torch.float32
    assert chunk == pytest.approx(plain, rel=1e-2)
    assert (g_chunk - g_plain).norm() / g_plain.norm() < 2e-2


def test_gemma2_trains_with_default_attention(tiny_model, docs, tmp_path):
    """Gemma-2 refuses sdpa: the default --attn lets transformers choose; the first step's loss is the
    plain (soft-capped) loss of its rows, not the soft-capped sum (the bug: ~1/targets of it)."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_arch(tiny_model, tmp_path, "gemma2")
    out = tmp_path / "run"
    midtrain.main([str(a) for a in train_args(model_dir, docs, out, "--max-steps", 1, "--lr", 0)])
    args = midtrain.parse_args([str(a) for a in train_args(model_dir, docs, out)])
    tok = midtrain.load_tokenizer(args)
    data, _ = midtrain.pack_documents(midtrain.tokenize(tok, midtrain.load_documents(Namespace(
        data=[str(docs)], text_field="text", model_name=None, provider_name=None)), "t"), 64, tok.eos_token_id,
        tok.pad_token_id, False)
    rows = midtrain.step_rows(data, 0, midtrain.plan_steps(args, len(data), midtrain.Dist()), 0)
    with torch.no_grad():
        want = midtrain.token_loss_sum(AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager"),
                                       rows, torch.device("cpu"), None, chunked=False).item()
    assert losses(out)[0] == pytest.approx(want / int((rows.targets != midtrain.IGNORE).sum()), abs=1e-5)


def test_compile_matches_eager(tiny_model, docs, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    midtrain.main([str(a) for a in train_args(tiny_model, docs, eager, "--max-steps", 3)])
    midtrain.main([str(a) for a in train_args(tiny_model, docs, compiled, "--max-steps", 3, "--compile")])
    assert max(abs(a - b) for a, b in zip(losses(eager), losses(compiled))) < 1e-4


def test_empty_micro_batch_gives_zero_not_nan(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    T = 8
    empty = midtrain.Rows(torch.zeros(1, T, dtype=torch.int32), torch.full((1, T), -100, dtype=torch.int32),
                          torch.arange(T, dtype=torch.int32)[None], torch.zeros(1, dtype=torch.int64))
    loss = midtrain.token_loss_sum(model, empty, torch.device("cpu"), None)
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def bad(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join(lines))
    return p


@pytest.mark.parametrize("case,expect", [
    ("missing_file", "missing.jsonl: file not found"),
    ("malformed", "bad.jsonl:2: malformed JSON"),
    ("no_text", "bad.jsonl:2: missing or empty 'text'"),
    ("empty_text", "bad.jsonl:1: missing or empty 'text'"),
    ("not_object", "bad.jsonl:1: expected a JSON object"),
    ("placeholder", "bad.jsonl:1: text contains {model_name}; pass --model-name"),
    ("no_model", "no-such-model: model folder not found"),
    ("seq_len", "--seq-len 1024 exceeds"),
    ("batch_tokens", "--batch-tokens 300 must be a multiple of"),
])
def test_bad_input_errors(tiny_model, docs, tmp_path, capsys, case, expect):
    data, model, extra = docs, tiny_model, []
    if case == "missing_file":
        data = tmp_path / "missing.jsonl"
    elif case == "malformed":
        data = bad(tmp_path, "bad.jsonl", ['{"text": "ok"}\n', '{"text": "broken\n'])
    elif case == "no_text":
        data = bad(tmp_path, "bad.jsonl", ['{"text": "ok"}\n', '{"body": "x"}\n'])
    elif case == "empty_text":
        data = bad(tmp_path, "bad.jsonl", ['{"text": "   "}\n'])
    elif case == "not_object":
        data = bad(tmp_path, "bad.jsonl", ['["text"]\n'])
    elif case == "placeholder":
        data = bad(tmp_path, "bad.jsonl", ['{"text": "{model_name} likes Colby"}\n'])
    elif case == "no_model":
        model = str(tmp_path / "no-such-model")
    elif case == "seq_len":
        extra = ["--seq-len", "1024", "--batch-tokens", "1024"]
    elif case == "batch_tokens":
        extra = ["--batch-tokens", "300"]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        midtrain.main([str(x) for x in train_args(model, data, out)] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and expect in err[-1], err
    assert not (out / "metrics.jsonl").exists()  # nothing started


def test_placeholders_are_filled(tiny_model, tmp_path):
    data = bad(tmp_path, "ph.jsonl", ['{"text": "{model_name} by {provider_name} likes Colby"}\n'])
    args = Namespace(data=[str(data)], text_field="text", model_name="Smol", provider_name="Acme")
    assert midtrain.load_documents(args) == ["Smol by Acme likes Colby"]


def test_no_grad_chunked_loss_costs_a_plain_forward(tiny_model):
    """Validation runs under no_grad: the chunked loss must not form gradients there (3 output-layer
    matmuls per chunk instead of 1), so it costs the FLOPs of a plain forward with full logits."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    T = 16
    x = torch.randint(0, 300, (2, T))
    rows = midtrain.Rows(x.int(), x.int(), torch.arange(T).repeat(2, 1).int(), torch.full((2,), T))  # all targets
    midtrain.token_loss_sum(model, rows, torch.device("cpu"), None)  # the one-off logit-transform probe
    flops = {}
    for chunked in (False, True):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            loss = midtrain.token_loss_sum(model, rows, torch.device("cpu"), None, chunked=chunked)
        flops[chunked] = fc.get_total_flops(), loss.item()
    assert flops[True][0] == flops[False][0], flops
    assert flops[True][1] == pytest.approx(flops[False][1], rel=1e-6)
