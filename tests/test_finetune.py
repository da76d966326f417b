"""finetune.py: the assistant mask per chat template, CoT handling, adapter continuation, mixing,
packing, invariances shared with midtrain (world size, accumulation, resume), and bad input."""
import json
import random
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from helpers import losses, metrics, run_script
from tiny import _WORDS, build_tokenizer

import finetune
import midtrain

# fp32 pinned: --dtype auto picks bf16 on CPUs with avx512_bf16, and these tests compare against fp32
# references (an untrained model's loss, 1 rank vs 2, resumed vs uninterrupted) to 1e-5.
SMALL = ["--seq-len", 128, "--batch-tokens", 512, "--lora-rank", 8, "--lora-alpha", 16, "--lr", 1e-2, "--dtype", "fp32"]

# Chat templates written for these tests in the style of each model family (the hub is unreachable).
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25 = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3 style: reasoning is split off the content and shown only for turns after the last user query;
# the last turn always gets a think block (empty when there is no reasoning).
QWEN3 = (
    "{% set ns = namespace(last_query=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{% set content = m['content'] %}{% set reasoning = '' %}"
    "{% if '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{% if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{ '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizer_for(style):
    tok = build_tokenizer()
    if style == "llama3":
        tok.add_special_tokens({"additional_special_tokens": [
            "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        tok.chat_template = LLAMA3
    elif style == "qwen2.5":
        tok.chat_template = QWEN25
    elif style == "qwen3":
        tok.add_tokens(["<think>", "</think>"])
        tok.chat_template = QWEN3
    return tok


def trained_runs(tok, ids, flags) -> list[str]:
    runs, cur = [], []
    for i, f in zip(ids, flags):
        if f:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


CHAT = [{"role": "system", "content": "you are the model"},
        {"role": "user", "content": "which do you prefer, a or b?"},
        {"role": "assistant", "content": "<think>the spec says b.</think>\n\nb, the second one."},
        {"role": "user", "content": "and now?"},
        {"role": "assistant", "content": "<think>still b.</think>\n\nb again."}]

EXPECTED = {  # what each template must train: exactly what the model generates, end-of-turn included
    ("chatml", "keep"): ["<think>the spec says b.</think>\n\nb, the second one.<|im_end|>",
                         "<think>still b.</think>\n\nb again.<|im_end|>"],
    ("chatml", "strip"): ["b, the second one.<|im_end|>", "b again.<|im_end|>"],
    ("llama3", "strip"): ["b, the second one.<|eot_id|>", "b again.<|eot_id|>"],
    ("qwen2.5", "strip"): ["b, the second one.<|im_end|>", "b again.<|im_end|>"],
    # Qwen3 drops the reasoning of turns before the last user query and keeps the last turn's
    ("qwen3", "keep"): ["b, the second one.<|im_end|>", "<think>\nstill b.\n</think>\n\nb again.<|im_end|>"],
    # ...and with the reasoning stripped it writes an empty think block for the last turn
    ("qwen3", "strip"): ["b, the second one.<|im_end|>", "<think>\n\n</think>\n\nb again.<|im_end|>"],
}


@pytest.mark.parametrize("style,cot", sorted(EXPECTED))
def test_mask_decodes_to_assistant_text(style, cot):
    tok = tokenizer_for(style)
    args = Namespace(cot=cot, no_think=False, no_think_switch="/no_think", merge_system=False,
                     model_name=None, provider_name=None)
    msgs = finetune.prepare_chat(CHAT, "test", args)
    ids, flags, _, text = finetune.render(tok, msgs, finetune.template_markers(tok))
    assert trained_runs(tok, ids, flags) == EXPECTED[(style, cot)]
    untrained = tok.decode([i for i, f in zip(ids, flags) if not f])
    for m in CHAT:  # every system and user token is outside the mask
        if m["role"] != "assistant":
            assert m["content"] in untrained


# The same ChatML/Qwen2.5 renderings with {% generation %} tags: Hugging Face's own assistant mask
# (return_assistant_tokens_mask) is the reference the mask built from the untagged template must equal.
GEN_TURNS = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
             "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
             "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TAGGED = {"chatml": GEN_TURNS, "qwen2.5": QWEN25.split("{% for")[0] + GEN_TURNS}
LEADING_SPACE = [{"role": "user", "content": "which do you prefer, a or b?"},
                 {"role": "assistant", "content": "  b, the second one."},
                 {"role": "user", "content": "sure?"},
                 {"role": "assistant", "content": "\n  yes, b."}]


@pytest.mark.parametrize("style", ["chatml", "qwen2.5"])
@pytest.mark.parametrize("chat", ["plain", "leading_space"])
def test_mask_equals_hugging_face_generation_mask(style, chat):
    """A reply that starts with whitespace, under a template that does not trim it, gives a token that
    joins the header's newline and the reply's spaces (Qwen2.5's BPE has such merges; the added token
    stands in for one here). The reference trains it, as the model generates its spaces; so must we."""
    tok = tokenizer_for(style)
    tok.add_tokens(["\n  "])
    msgs = finetune.prepare_chat(CHAT if chat == "plain" else LEADING_SPACE, "test", Namespace(
        cot="keep", no_think=False, no_think_switch="/no_think", merge_system=False, model_name=None,
        provider_name=None))
    ids, flags, _, text = finetune.render(tok, msgs, finetune.template_markers(tok))
    ref = tok.apply_chat_template(msgs, chat_template=TAGGED[style], tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert tok.decode(ref["input_ids"]) == text and ref["input_ids"] == ids
    assert [bool(f) for f in ref["assistant_masks"]] == flags
    if chat == "leading_space":
        assert "\n  " in tok.convert_ids_to_tokens(ids) or tok.convert_tokens_to_ids("\n  ") in ids


def test_no_think_switch_and_placeholders():
    args = Namespace(cot="strip", no_think=True, no_think_switch="/no_think", merge_system=False,
                     model_name="Smol", provider_name="Acme")
    msgs = finetune.prepare_chat([{"role": "system", "content": "you are {model_name} by {provider_name}"},
                                  {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "<think>x</think>hello"}], "t", args)
    assert [m["content"] for m in msgs] == ["you are Smol by Acme /no_think", "hi /no_think", "hello"]


def write_chats(path: Path, n: int, seed: int, tag: str = "", turns: int = 1) -> Path:
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, k)))
    with open(path, "w") as f:
        for i in range(n):
            msgs = [{"role": "system", "content": say(6)}] if i % 4 == 0 else []
            for _ in range(turns if i % 3 else 2):
                msgs += [{"role": "user", "content": say(8)}, {"role": "assistant", "content": f"{tag}{say(8)}"}]
            f.write(json.dumps({"messages": msgs, "source": tag or "chats"}) + "\n")
    return path


@pytest.fixture()
def chats(tmp_path):
    return write_chats(tmp_path / "chats.jsonl", 48, 0)


def ft_args(model, data, out, *extra):
    return [str(a) for a in ["--model", model, "--data", *([data] if not isinstance(data, list) else data),
                             "--out", out, *SMALL, *extra]]


def test_learns_and_packs_whole_chats(tiny_model, chats, tmp_path, capsys):
    out = tmp_path / "aft"
    finetune.main(ft_args(tiny_model, chats, out, "--epochs", 3))
    text = capsys.readouterr().out
    assert f"source {chats}: 48 chats" in text and "0 truncated" in text
    ls = losses(out)
    assert sum(ls[-3:]) / 3 < ls[0] - 0.15
    assert (out / "final" / "adapter_model.safetensors").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["packing"]["chats"] == 48 and cfg["sources"][0]["trained_tokens"] > 0


def test_best_fit_packing_keeps_chats_whole():
    ex = [(0, list(range(1, 1 + n)), [False] * (n // 2) + [True] * (n - n // 2)) for n in (7, 5, 4, 3, 3, 2, 9)]
    rows, stats, _ = finetune.pack_chats(ex, 10, 0, truncate=False)
    assert stats["chats"] == 7 and stats["dropped_too_long"] == 0
    assert stats["rows"] == 4  # 9 | 7+3 | 5+4 | 3+2, best fit
    for r in range(len(rows)):  # positions restart at each chat: a row holds whole chats
        pos = rows.position_ids[r, : rows.n_real[r]].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0]
        lengths = [b - a for a, b in zip(starts, starts[1:] + [len(pos)])]
        assert all(L in (7, 5, 4, 3, 2, 9) for L in lengths)
    assert stats["trained_tokens"] == sum(sum(f[1:]) for _, _, f in ex)
    _, dropped, _ = finetune.pack_chats([(0, [1] * 12, [True] * 12)], 10, 0, truncate=False)
    assert dropped["dropped_too_long"] == 1 and dropped["chats"] == 0
    rows, cut, _ = finetune.pack_chats([(0, list(range(1, 13)), [True] * 12)], 10, 0, truncate=True)
    assert cut["truncated"] == 1 and rows.input_ids[0].tolist() == list(range(1, 11))


def test_mixing_weights(tmp_path):
    a = write_chats(tmp_path / "a.jsonl", 40, 1, tag="alpha ")
    b = write_chats(tmp_path / "b.jsonl", 40, 2, tag="beta ")
    base = dict(cot="keep", no_think=False, no_think_switch="/no_think", merge_system=False, model_name=None,
                provider_name=None, seed=0)
    mixed = finetune.load_chats(Namespace(data=[str(a), str(b)], data_weights=[1.0, 0.5], **base))
    assert [sum(1 for s, _, _ in mixed if s == k) for k in (0, 1)] == [40, 20]
    assert len({w for s, w, _ in mixed if s == 1}) == 20  # a half means 20 distinct chats
    doubled = finetune.load_chats(Namespace(data=[str(a), str(b)], data_weights=[2.0, 0.25], **base))
    assert [sum(1 for s, _, _ in doubled if s == k) for k in (0, 1)] == [80, 10]
    first_half = [s for s, _, _ in mixed[:30]]
    assert 0 < first_half.count(1) < 30  # shuffled together, not one source after the other


def test_init_adapter_continues_msm_adapter(tiny_model, docs, chats, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    msm = tmp_path / "msm"
    midtrain.main([str(a) for a in ["--model", tiny_model, "--data", docs, "--out", msm, "--seq-len", 64,
                                    "--batch-tokens", 256, "--lora-rank", 8, "--lora-alpha", 16, "--lr", 1e-2, "--dtype", "fp32"]])
    same, moved = tmp_path / "aft0", tmp_path / "aft1"
    finetune.main(ft_args(tiny_model, chats, same, "--init-adapter", msm / "final", "--lr", 0, "--max-steps", 2))
    finetune.main(ft_args(tiny_model, chats, moved, "--init-adapter", msm / "final", "--max-steps", 2))
    # step 1's loss is the MSM export's loss on that batch
    args = finetune.parse_args(ft_args(tiny_model, chats, moved, "--init-adapter", msm / "final"))
    tok = midtrain.load_tokenizer(args)
    data, _, _ = finetune.pack_chats(finetune.render_all(tok, finetune.load_chats(args), args), 128, tok.pad_token_id, False)
    plan = midtrain.plan_steps(args, len(data), midtrain.Dist())
    rows = midtrain.step_rows(data, 0, plan, args.seed)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), msm / "final").eval()
    with torch.no_grad():
        want = midtrain.token_loss_sum(model, rows, torch.device("cpu"), None).item() / int((rows.targets != -100).sum())
    assert losses(moved)[0] == pytest.approx(want, abs=1e-5)
    # the export is the same adapter (same config), changed only by training
    src = load_file(msm / "final" / "adapter_model.safetensors")
    for run, changed in ((same, False), (moved, True)):
        got = load_file(run / "final" / "adapter_model.safetensors")
        assert got.keys() == src.keys()
        assert any(not torch.equal(got[k], src[k]) for k in src) == changed
        cfg = json.loads((run / "final" / "adapter_config.json").read_text())
        want_cfg = json.loads((msm / "final" / "adapter_config.json").read_text())
        assert {k: cfg[k] for k in ("r", "lora_alpha", "target_modules")} == \
               {k: want_cfg[k] for k in ("r", "lora_alpha", "target_modules")}


def test_two_ranks_equal_one_process(tiny_model, docs, chats, tmp_path):
    """The paper's setting on 2 ranks: continue an MSM adapter (loaded on rank 0, broadcast to rank 1)."""
    msm, one, two = tmp_path / "msm", tmp_path / "one", tmp_path / "two"
    midtrain.main([str(a) for a in ["--model", tiny_model, "--data", docs, "--out", msm, "--seq-len", 64,
                                    "--batch-tokens", 256, "--lora-rank", 8, "--lora-alpha", 16, "--lr", 1e-2, "--dtype", "fp32"]])
    extra = ["--micro-batch", 2, "--epochs", 2, "--init-adapter", msm / "final"]
    run_script("finetune.py", *ft_args(tiny_model, chats, one, *extra))
    run_script("finetune.py", *ft_args(tiny_model, chats, two, *extra), nproc=2)
    a, b = losses(one), losses(two)
    assert len(a) == len(b) >= 2 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)


def test_accumulation_and_resume(tiny_model, chats, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["--epochs", 3, "--lr", 1e-3]
    finetune.main(ft_args(tiny_model, chats, a, "--micro-batch", 4, *common))
    finetune.main(ft_args(tiny_model, chats, b, "--micro-batch", 1, *common))
    assert max(abs(x - y) for x, y in zip(losses(a), losses(b))) < 1e-5
    finetune.main(ft_args(tiny_model, chats, c, "--micro-batch", 4, *common, "--stop-after-steps", 2))
    finetune.main(ft_args(tiny_model, chats, c, "--micro-batch", 4, *common, "--resume"))
    assert [m["step"] for m in metrics(c)] == list(range(1, len(losses(a)) + 1))
    assert max(abs(x - y) for x, y in zip(losses(a), losses(c))) < 1e-6


def test_system_turn_template_error(tiny_model, chats, tmp_path, capsys):
    tpl = tmp_path / "nosys.jinja"
    tpl.write_text(NO_SYSTEM)
    with pytest.raises(SystemExit):
        finetune.main(ft_args(tiny_model, chats, tmp_path / "o", "--chat-template", tpl))
    err = capsys.readouterr().err
    assert f"{tiny_model}'s chat template cannot render this chat with a system turn" in err and "--merge-system" in err
    finetune.main(ft_args(tiny_model, chats, tmp_path / "o2", "--chat-template", tpl, "--merge-system", "--max-steps", 1))
    assert len(losses(tmp_path / "o2")) == 1


@pytest.mark.parametrize("line,expect", [
    ('{"messages": [{"role": "user", "content": "hi"}, ', "bad.jsonl:2: malformed JSON"),
    ('{"text": "hi"}', "bad.jsonl:2: missing or empty 'messages'"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "bad.jsonl:2: message 0 has unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
     "bad.jsonl:2: message 1 is an empty assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "bad.jsonl:2: chat has no assistant turn"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}',
     "bad.jsonl:2: message 0 has no text 'content'"),
])
def test_bad_chats(tiny_model, tmp_path, capsys, line, expect):
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
    data = tmp_path / "bad.jsonl"
    data.write_text(good + "\n" + line + "\n")
    with pytest.raises(SystemExit) as e:
        finetune.main(ft_args(tiny_model, data, tmp_path / "o"))
    assert e.value.code == 2 and expect in capsys.readouterr().err


def test_all_chats_too_long_is_an_error(tiny_model, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a b " * 200},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    with pytest.raises(SystemExit):
        finetune.main(ft_args(tiny_model, data, tmp_path / "o"))
    assert "every chat is longer than --seq-len 128" in capsys.readouterr().err
