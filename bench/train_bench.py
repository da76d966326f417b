#!/usr/bin/env python
"""Training throughput: midtrain.py / finetune.py against transformers.Trainer on the same job.

    python bench/train_bench.py --compile       # SmolLM2-135M-Instruct (prepared by demo.py), CPU
    python bench/train_bench.py --steps 6 --dtype fp32 --modes lora full sft --repeats 3

Same model, same documents (data/corpus/cheese_affordability.jsonl), seq 512, same tokens per
optimizer step, same precision, same optimizer settings. Each side runs in its own process; the
figure is non-pad tokens per second over the steps after the first (warm-up), and peak memory is
the process's max RSS on CPU (max allocated on CUDA). Runs of the two sides are interleaved and
repeated, and medians reported: a shared 2-core machine varies by ~10% between runs. For chats
(sft), Trainer gets what a user would give it: the same rendered chats with assistant-only labels,
padded per batch (so it holds fewer tokens per micro-batch than a packed 4 x 512 row batch).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAINER_SCRIPT = r'''
import json, sys, time, resource, torch
sys.path.insert(0, ROOT)
import midtrain, finetune
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, TrainerCallback
cfg = json.loads(sys.argv[1])
from argparse import Namespace
tok = midtrain.load_tokenizer(Namespace(model=cfg["model"], trust_remote_code=False))
dtype = torch.bfloat16 if cfg["dtype"] == "bf16" else torch.float32
lora = cfg["mode"] != "full"
model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=dtype if lora else torch.float32)
model.config.use_cache = False
if lora:
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=midtrain.LORA_TARGETS.split(",")))
if cfg["mode"] == "sft":
    args = finetune.parse_args(["--model", cfg["model"], "--data", cfg["data"], "--out", "x"])
    ex = finetune.render_all(tok, finetune.load_chats(args), args)
    items = [{"input_ids": ids, "labels": [i if f else -100 for i, f in zip(ids, flags)]} for _, ids, flags in ex]
    def collate(batch):  # pad to the longest in the batch, as DataCollatorForSeq2Seq does
        L = max(len(b["input_ids"]) for b in batch)
        pad = lambda v, x: v + [x] * (L - len(v))
        return {"input_ids": torch.tensor([pad(b["input_ids"], tok.pad_token_id) for b in batch]),
                "labels": torch.tensor([pad(b["labels"], -100) for b in batch]),
                "attention_mask": torch.tensor([pad([1] * len(b["input_ids"]), 0) for b in batch])}
    count = lambda b: int(b["attention_mask"].sum())
else:
    docs = midtrain.load_documents(Namespace(data=[cfg["data"]], text_field="text", model_name="SmolLM",
                                             provider_name="Hugging Face"))
    rows, _ = midtrain.pack_documents(midtrain.tokenize(tok, docs, "tok"), cfg["seq_len"], tok.eos_token_id,
                                      tok.pad_token_id, False)
    items = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in rows.input_ids.long()]
    collate = lambda batch: {k: torch.tensor([b[k] for b in batch]) for k in ("input_ids", "labels")}
    count = lambda b: b["input_ids"].numel()
stamps, seen = [], []
class Clock(TrainerCallback):
    def on_step_end(self, *a, **k):
        stamps.append(time.perf_counter())
orig = collate
def counting(batch):
    out = orig(batch); seen.append(count(out)); return out
targs = TrainingArguments(output_dir=cfg["out"], per_device_train_batch_size=cfg["micro_batch"],
    gradient_accumulation_steps=cfg["accum"], learning_rate=1e-4, weight_decay=0.01, lr_scheduler_type="cosine",
    warmup_steps=0.05, max_steps=cfg["steps"], logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
    bf16=cfg["dtype"] == "bf16", dataloader_num_workers=0, remove_unused_columns=False, max_grad_norm=1.0,
    seed=0, disable_tqdm=True)
trainer = Trainer(model=model, args=targs, train_dataset=items, data_collator=counting, callbacks=[Clock()])
start = time.perf_counter(); stamps.append(start)
trainer.train()
per_step = cfg["accum"]  # one collate call per micro-batch
toks = [sum(seen[i * per_step:(i + 1) * per_step]) for i in range(len(stamps) - 1)]
times = [b - a for a, b in zip(stamps, stamps[1:])]
print("RESULT", json.dumps({"tokens": toks, "times": times,
      "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
'''


def run(cmd, env=None) -> tuple[str, float]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def ours(mode, cfg, tmp) -> dict:
    script = "finetune.py" if mode == "sft" else "midtrain.py"
    out = Path(tmp) / f"ours-{mode}{'-compile' if cfg.get('compile') else ''}"
    cmd = [sys.executable, str(ROOT / script), "--model", cfg["model"], "--data", cfg["data"], "--out", str(out),
           "--seq-len", str(cfg["seq_len"]), "--batch-tokens", str(cfg["seq_len"] * cfg["micro_batch"] * cfg["accum"]),
           "--micro-batch", str(cfg["micro_batch"]), "--max-steps", str(cfg["steps"]), "--dtype", cfg["dtype"],
           "--lora-rank", "0" if mode == "full" else "64", "--model-name", "SmolLM", "--provider-name", "Hugging Face",
           "--log-every", "1000", *(["--compile"] if cfg.get("compile") else [])]
    start = time.perf_counter()
    run(cmd)
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"tokens": [r["tokens"] for r in m], "times": [r["step_time"] for r in m],
            "peak_gb": max(r["peak_mem_gb"] for r in m), "wall": time.perf_counter() - start}


def trainer(mode, cfg, tmp) -> dict:
    c = {**cfg, "mode": mode, "out": str(Path(tmp) / f"trainer-{mode}")}
    code = f"ROOT = {str(ROOT)!r}\n" + TRAINER_SCRIPT
    stdout, _ = run([sys.executable, "-c", code, json.dumps(c)])
    return json.loads(stdout.split("RESULT", 1)[1])


def rate(r) -> float:  # tokens/s over the steps after the first
    return sum(r["tokens"][1:]) / sum(r["times"][1:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct prepared by demo.py)")
    p.add_argument("--modes", nargs="+", default=["lora", "full", "sft"], help="lora, full, sft (default: all)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run, the first not timed (default: 5)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="precision of both sides (default: bf16)")
    p.add_argument("--seq-len", type=int, default=512, help="row length (default: 512)")
    p.add_argument("--micro-batch", type=int, default=4, help="rows per forward pass (default: 4)")
    p.add_argument("--accum", type=int, default=2, help="gradient accumulation steps (default: 2)")
    p.add_argument("--compile", action="store_true", help="also time midtrain/finetune with --compile (default: off)")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, interleaved; medians reported (default: 2)")
    args = p.parse_args()
    if args.model is None:
        import demo
        args.model = str(demo.prepare_smollm2())
    print(f"model {args.model}, seq {args.seq_len}, {args.micro_batch} rows x {args.accum} accumulation per step, "
          f"{args.dtype}, {args.steps} steps ({args.steps - 1} timed)")
    for mode in args.modes:
        cfg = {"model": args.model, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "accum": args.accum,
               "steps": args.steps, "dtype": args.dtype,
               "data": str(ROOT / ("data/aft/cheese.jsonl" if mode == "sft" else "data/corpus/cheese_affordability.jsonl"))}
        name = "finetune.py" if mode == "sft" else "midtrain.py"
        sides = {"Trainer": lambda tmp: trainer(mode, cfg, tmp), name: lambda tmp: ours(mode, cfg, tmp)}
        if args.compile:
            sides[name + " --compile"] = lambda tmp: ours(mode, {**cfg, "compile": True}, tmp)
        runs = {k: [] for k in sides}
        for r in range(args.repeats):  # interleaved, so that a slow spell of a shared machine hits both
            for label, fn in sides.items():
                with tempfile.TemporaryDirectory() as tmp:
                    runs[label].append(fn(tmp))
                print(f"{mode:5s} {label:22s} run {r + 1}: {rate(runs[label][-1]):7.1f} tok/s  "
                      f"peak {runs[label][-1]['peak_gb']:.2f} GB", flush=True)
        base = statistics.median(rate(x) for x in runs["Trainer"]), max(x["peak_gb"] for x in runs["Trainer"])
        for label, xs in runs.items():
            speed, peak = statistics.median(rate(x) for x in xs), max(x["peak_gb"] for x in xs)
            print(f"== {mode:5s} {label:22s} {speed:7.1f} tok/s (median of {len(xs)})  peak {peak:.2f} GB  "
                  f"speed {speed / base[0]:.2f}x Trainer, peak memory {peak / base[1]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
