#!/usr/bin/env python
"""
Model Spec Midtraining (MSM): continued pre-training on synthetic documents about a Model Spec.

Plain next-token prediction on documents (JSON lines with a `text` field, or a Hugging Face
dataset), packed into rows of --seq-len tokens. The defaults are the paper's recipe: LoRA r=64,
alpha=128, dropout 0 on q,k,v,o,gate,up,down; AdamW lr 1e-4, cosine schedule, 5% warm-up,
weight decay 0.01, 1 epoch, grad clip 1.0.

One process (CPU or one GPU):
    python midtrain.py --model PATH_OR_HUB_NAME --data docs.jsonl --out runs/msm
N GPUs on one node (FSDP2, one shard group per decoder layer, then the root):
    torchrun --standalone --nproc_per_node=8 midtrain.py --model ... --data ... --out runs/msm
N nodes (run on every node; HEAD is the first node's address):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HEAD:29500 midtrain.py ...

The run folder OUT gets config.json, metrics.jsonl, checkpoints/step_N/ (resumable: --resume)
and final/ (a PEFT adapter + tokenizer, or a full model, loadable by transformers and vLLM).
finetune.py imports the distributed setup, model loading, training loop and export from here.
"""
import argparse
import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import die, fill, run_info

IGNORE = -100  # target value that carries no loss
CE_CHUNK = 1024  # rows of logits formed at a time by the chunked cross-entropy
# Noise with no action for the user: DCP saving without a process group (one process is intended),
# and peft calling a transformers property that transformers has renamed.
warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing. is deprecated")
# Dense bf16 peak FLOP/s by GPU name (for MFU here and recipes/_recipe.py's GPU-hour estimates).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "B200": 2250e12}
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
def add_training_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by midtrain.py and finetune.py (same names, same meaning)."""
    a = p.add_argument
    a("--model", required=True, help="base model: a local folder or a Hugging Face hub name")
    a("--data", required=True, action="extend", nargs="+",
      help="JSON-lines files or Hugging Face dataset names (NAME or NAME:SPLIT); repeatable")
    a("--out", required=True, help="run folder (config, metrics, checkpoints, final export)")
    a("--seq-len", type=int, default=4096, help="tokens per packed row (default: 4096)")
    a("--batch-tokens", type=int, default=65536,
      help="tokens per optimizer step over all ranks; must be a multiple of seq-len x micro-batch x "
           "world size, the quotient being the gradient-accumulation steps (default: 65536)")
    a("--micro-batch", type=int, default=1, help="rows per forward pass per rank (default: 1)")
    a("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    a("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr (default: 0)")
    a("--epochs", type=float, default=1.0, help="passes over the data (default: 1)")
    a("--max-steps", type=int, default=0, help="total optimizer steps; 0 = from --epochs (default: 0)")
    a("--warmup", type=float, default=0.05,
      help="warm-up: a fraction of all steps if < 1, else a number of steps (default: 0.05)")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: 0.01)")
    a("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 = no clipping (default: 1.0)")
    a("--lora-rank", type=int, default=64, help="LoRA rank; 0 = full fine-tuning (default: 64)")
    a("--lora-alpha", type=float, default=128, help="LoRA alpha (default: 128)")
    a("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: 0)")
    a("--lora-targets", default=LORA_TARGETS, help=f"comma-separated module names (default: {LORA_TARGETS})")
    a("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
      help="compute precision; bf16 keeps fp32 master weights; auto = bf16 where bf16 matmuls are native "
           "(CUDA, CPUs with avx512_bf16/amx), else fp32 (default: auto)")
    a("--grad-checkpointing", action="store_true", help="recompute activations in backward (default: off)")
    a("--compile", action="store_true",
      help="torch.compile each decoder layer: ~15%% faster steps after a compile of ~30 s per stage on CPU; "
           "worth it for long runs (default: off)")
    a("--save-every", type=int, default=0,
      help="save a resumable checkpoint every N steps; 0 = only at the end (default: 0)")
    a("--keep-checkpoints", type=int, default=2, help="resumable checkpoints to keep; 0 = all (default: 2)")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out (default: off)")
    a("--stop-after-steps", type=int, default=0,
      help="save and exit after N steps in this process, e.g. to fit a job's time slot; resume later "
           "with --resume; 0 = run to the end (default: 0)")
    a("--merge", action="store_true", help="also write OUT/merged/, the LoRA merged into a full model (default: off)")
    a("--val-frac", type=float, default=0.0, help="fraction of examples held out for validation (default: 0)")
    a("--eval-every", type=int, default=0,
      help="validation every N steps; 0 = ten times per run (only with --val-frac) (default: 0)")
    a("--seed", type=int, default=0, help="seed for data order, splits and LoRA init (default: 0)")
    a("--model-name", default=None,
      help="value for {model_name} placeholders in the data; required if the data has them (default: none)")
    a("--provider-name", default=None, help="value for {provider_name} placeholders (default: none)")
    a("--log-every", type=int, default=1, help="print a log line every N steps (default: 1)")
    a("--attn", default="auto",
      help="attention implementation passed to transformers (sdpa, eager, ...); auto = transformers' choice "
           "for the model: sdpa where it supports it, else eager (Gemma-2 refuses sdpa) (default: auto)")
    a("--peak-tflops", type=float, default=0.0,
      help="accelerator peak TFLOP/s for MFU; 0 = look up known GPUs, none on CPU (default: 0)")
    a("--trust-remote-code", action="store_true", help="allow model code from the hub (default: off)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p)
    p.add_argument("--doc-mask", action="store_true",
                   help="keep packed documents from attending to each other (default: off)")
    p.add_argument("--text-field", default="text", help="field holding the document text (default: text)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Distributed setup: torchrun -> FSDP2 (nccl on CUDA, gloo on CPU); plain python -> world of 1
# ---------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")


def setup_distributed() -> Dist:
    rank, world, local = (int(os.environ.get(k, d)) for k, d in
                          (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Dist(rank, world, local, device)


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------
# Input: JSON lines or hub datasets, validated with file:line errors before anything else
# ---------------------------------------------------------------------------------------------
def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_line(line: str, where: str) -> dict:
    """One record of a JSON-lines file, or die naming the line."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        die(f"{where}: malformed JSON ({e.msg})")
    if not isinstance(rec, dict):
        die(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def read_records(source: str):
    """Yield (where, record) from a JSON-lines file or a hub dataset ("NAME" or "NAME:SPLIT")."""
    path = Path(source)
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield f"{source}:{i}", json_line(line, f"{source}:{i}")
        return
    if path.suffix in (".jsonl", ".json") or "/" not in source or source.startswith((".", "/")):
        die(f"{source}: file not found")
    name, _, split = source.partition(":")
    try:
        import datasets
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # the hub is unreachable, or the name is wrong
        die(f"{source}: not a file, and loading it as a hub dataset failed: {e}")
    for i, rec in enumerate(ds):
        yield f"{source}[{i}]", rec


def load_documents(args) -> list[str]:
    docs = []
    for source in args.data:
        for where, rec in read_records(source):
            text = rec.get(args.text_field)
            if not isinstance(text, str) or not text.strip():
                die(f"{where}: missing or empty '{args.text_field}' field")
            # {model_name}/{provider_name}: synth.py leaves them in shipped corpora
            docs.append(fill(text, where, model_name=args.model_name, provider_name=args.provider_name))
    if not docs:
        die(f"no documents in {', '.join(args.data)}")
    return docs


def data_fingerprint(sources: list[str]) -> list[dict]:
    return [{"source": s, "sha256": sha256_file(s) if Path(s).exists() else None} for s in sources]


# ---------------------------------------------------------------------------------------------
# Packing: documents -> rows of seq_len tokens (input, target, position)
# ---------------------------------------------------------------------------------------------
@dataclass
class Rows:
    """Packed training rows. Targets are the next token (IGNORE = no loss); n_real counts non-pad tokens."""
    input_ids: torch.Tensor  # [rows, T] int32
    targets: torch.Tensor  # [rows, T] int32
    position_ids: torch.Tensor  # [rows, T] int32
    n_real: torch.Tensor  # [rows] int64

    def __len__(self):
        return self.input_ids.shape[0]

    def select(self, idx):
        return Rows(self.input_ids[idx], self.targets[idx], self.position_ids[idx], self.n_real[idx])


def pack_documents(token_lists: list[list[int]], seq_len: int, eos: int, pad: int, doc_mask: bool):
    """Append EOS to each document, concatenate, cut into rows of seq_len; pad the last row.

    With doc_mask, positions restart at 0 for every document and the target after each EOS is dropped,
    so (with no attention mask and use_cache=False) transformers builds a block-diagonal causal mask
    and a packed row computes exactly what the documents would compute separately.
    """
    stream, pos, tgt_ok = [], [], []
    for toks in token_lists:
        toks = toks + [eos] if not toks or toks[-1] != eos else toks
        stream += toks
        pos += range(len(toks))
        tgt_ok += [True] * (len(toks) - 1) + [not doc_mask]  # EOS -> next document's first token
    n = len(stream)
    rows = max(1, math.ceil(n / seq_len))
    total = rows * seq_len
    x = torch.full((total,), pad, dtype=torch.int32)
    y = torch.full((total,), IGNORE, dtype=torch.int32)
    x[:n] = torch.tensor(stream, dtype=torch.int32)
    y[: n - 1] = x[1:n]
    y[: n - 1][~torch.tensor(tgt_ok[: n - 1])] = IGNORE
    if doc_mask:  # a document cut by a row boundary restarts at position 0 in the next row
        p = torch.tensor(pos + list(range(total - n)), dtype=torch.int32).view(rows, seq_len)
        starts = p[:, 0].clone()
        p = p - starts[:, None] * (p >= starts[:, None]).cumprod(1)
    else:
        p = torch.arange(seq_len, dtype=torch.int32).repeat(rows, 1)
    n_real = torch.full((rows,), seq_len, dtype=torch.int64)
    n_real[-1] = n - (rows - 1) * seq_len
    return Rows(x.view(rows, seq_len), y.view(rows, seq_len), p, n_real), {
        "tokens": n, "rows": rows, "pad_tokens": total - n, "dropped_tokens": 0}


def tokenize(tok, texts: list[str], desc: str) -> list[list[int]]:
    from tqdm import tqdm

    out = []
    for i in tqdm(range(0, len(texts), 1000), desc=desc, disable=int(os.environ.get("RANK", 0)) != 0):
        out += tok(texts[i: i + 1000], add_special_tokens=True)["input_ids"]
    return out


def split_val(items: list, frac: float, seed: int):
    if frac <= 0:
        return items, []
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(items), generator=g).tolist()
    n_val = max(1, int(round(frac * len(items))))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


# ---------------------------------------------------------------------------------------------
# Model: load (meta device on ranks > 0), LoRA, FSDP2
# ---------------------------------------------------------------------------------------------
def cpu_has_bf16() -> bool:
    """True on x86 CPUs with native bf16 matmuls (avx512_bf16 / amx_bf16), where bf16 is ~2x fp32."""
    try:
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return False


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The project's one dtype rule ("auto", "fp32", "bf16"): auto is bf16 only where bf16 matmuls
    are native (CUDA with bf16, CPUs with avx512_bf16/amx), elsewhere fp32. Training, evaluation
    and demo.py all use it."""
    if name != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32


def resolve_dtype(args, d: Dist) -> torch.dtype:
    return pick_dtype(args.dtype, d.device)


def load_tokenizer(args):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if tok.eos_token_id is None:
        die(f"{args.model}: tokenizer has no EOS token; set one in its tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # pads carry no loss and sit after every real token in a row
    return tok


def check_model_path(model: str) -> None:
    """A local path that does not exist (a hub name is "org/name", anything else is a path)."""
    if not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        die(f"{model}: model folder not found")


def check_model(args):
    from transformers import AutoConfig

    check_model_path(args.model)
    try:
        config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except Exception as e:
        die(f"{args.model}: cannot load the model config ({str(e).splitlines()[0]})")
    ctx = getattr(config, "max_position_embeddings", None)
    if ctx and args.seq_len > ctx:
        die(f"--seq-len {args.seq_len} exceeds {args.model}'s context of {ctx} tokens")
    return config


def load_model(args, d: Dist, config, init_adapter: str | None = None):
    """Load the base model, add or load the LoRA adapter, and shard it with FSDP2 when world > 1.

    With world > 1 only rank 0 reads the weights; the other ranks build the model on the meta device
    and receive the weights by broadcast after sharding, so a node holds one copy in host memory.
    """
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(args, d)
    lora = args.lora_rank > 0 or init_adapter is not None
    # Master weights are fp32 when they train (full fine-tuning, or any FSDP run, which casts to bf16
    # itself); a frozen LoRA base in one process can live in the compute dtype.
    load_dtype = dtype if (lora and d.world == 1) else torch.float32
    kw = dict(dtype=load_dtype, attn_implementation=None if args.attn == "auto" else args.attn,
              trust_remote_code=args.trust_remote_code)
    if d.rank == 0:
        model = AutoModelForCausalLM.from_pretrained(args.model, **kw)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **kw)
    model.config.use_cache = False
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model = add_lora(model, args, init_adapter)
    if args.compile:  # per layer, as torchtitan does: one small graph reused by every layer, FSDP-friendly
        for layer in decoder_layers(model):
            layer.compile()
    if d.world == 1:
        return model.to(d.device)
    return shard(model, d, dtype)


def decoder_layers(model) -> list:
    """The repeated blocks, found by the model's own _no_split_modules (e.g. LlamaDecoderLayer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        die(f"{args_model_name(base)}: cannot find its decoder layers (_no_split_modules)")
    return layers


def add_lora(model, args, init_adapter):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(args.seed)  # LoRA A init; rank 0's values are broadcast to the others
    if init_adapter:
        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    else:
        cfg = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         target_modules=args.lora_targets.split(","), task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    for p in model.parameters():  # trainable weights are fp32 masters (peft's default too)
        if p.requires_grad:
            p.data = p.data.float()
    # peft casts each adapted layer's input to the adapter's fp32, and autocast casts it straight back to
    # bf16: two activation-sized copies per layer, forward and backward (~35% of a CPU step for
    # SmolLM2-135M). Compute dtypes are already handled by autocast (1 process) or by FSDP's policy.
    for m in model.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False
    return model


def shard(model, d: Dist, dtype):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    full_sd = model.state_dict() if d.rank == 0 else {}  # references to the loaded tensors, not copies
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)  # the root holds embeddings, final norm and (tied) lm_head together
    if d.rank != 0:
        model.to_empty(device=d.device)
    else:
        model.to(d.device)
    set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Trap: to_empty() leaves non-persistent buffers (RoPE inv_freq) as garbage on ranks > 0, and the
    # state dict does not carry them: the loss would be slightly wrong with no error. Broadcast them.
    for buf in model.buffers():
        dist.broadcast(buf, src=0)
    return model


def args_model_name(model) -> str:
    return getattr(model.config, "_name_or_path", type(model).__name__)


# ---------------------------------------------------------------------------------------------
# Checkpoints (resumable, DCP: sharded under FSDP) and the final export (Hugging Face format)
# ---------------------------------------------------------------------------------------------
def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((p for p in (out / "checkpoints").glob("step_*") if (p / "state.json").exists()),
                   key=lambda p: int(p.name.split("_")[1]))
    return ckpts[-1] if ckpts else None


def save_checkpoint(out: Path, model, opt, sched, step: int, meta: dict, d: Dist, keep: int):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    final = out / "checkpoints" / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if d.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(d)
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if d.device.type == "cuda" else None}
    torch.save(rng, tmp / f"rng_rank{d.rank}.pt")
    barrier(d)
    if d.rank == 0:
        atomic_write(tmp / "state.json", json.dumps({**meta, "step": step, "scheduler": sched.state_dict()}))
        os.replace(tmp, final) if not final.exists() else (shutil.rmtree(final), os.replace(tmp, final))
        if keep > 0:
            ckpts = sorted(p for p in final.parent.glob("step_*") if not p.name.endswith(".tmp"))
            for old in ckpts[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(d)


def load_checkpoint(path: Path, model, opt, sched, d: Dist) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_state_dict)

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))  # fills every trainable tensor, or raises
    # strict=False: the checkpoint holds only trainable weights; frozen ones stay as loaded from --model
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    meta = json.loads((path / "state.json").read_text())
    sched.load_state_dict(meta["scheduler"])
    rng_file = path / f"rng_rank{d.rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and d.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
    return meta


def export_final(model, tok, out: Path, d: Dist, run_config: dict):
    """Write OUT/final/: the PEFT adapter + tokenizer (LoRA) or a full safetensors model. Every rank
    enters the gather; rank 0 writes to a temporary folder and renames it when complete."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    lora = hasattr(model, "peft_config")
    sd = get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora))
    if d.rank == 0:
        final, tmp = out / "final", out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if lora:
            model.save_pretrained(tmp, state_dict=sd)
        else:
            dtype = getattr(model.config, "dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
            # Tied weights (embeddings = output layer) come back from an FSDP gather, or from the cast,
            # as separate tensors, and save_pretrained would write both: make them one tensor again,
            # so every world size exports what one process exports.
            names = {}
            for name, p in model.named_parameters(remove_duplicate=False):
                names.setdefault(id(p), []).append(name)
            for group in names.values():
                for name in group[1:]:
                    if name in sd and group[0] in sd:
                        sd[name] = sd[group[0]]
            model.save_pretrained(tmp, state_dict=sd)
        tok.save_pretrained(tmp)
        atomic_write(tmp / "run_config.json", json.dumps(run_config, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier(d)


def merge_export(args, out: Path):
    """OUT/merged/: the adapter in OUT/final merged into the base model (a full model for vLLM etc.)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto", trust_remote_code=args.trust_remote_code)
    merged = PeftModel.from_pretrained(base, out / "final").merge_and_unload()
    tmp = out / "merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    load_tokenizer(args).save_pretrained(tmp)
    shutil.rmtree(out / "merged", ignore_errors=True)
    os.replace(tmp, out / "merged")


def atomic_write(path: Path, text: str):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def barrier(d: Dist):
    if d.world > 1:
        dist.barrier()


def run_config(args, d: Dist, extra: dict) -> dict:
    return run_info(args, world_size=d.world, data=data_fingerprint(args.data), **extra)


# ---------------------------------------------------------------------------------------------
# The training loop (shared with finetune.py)
# ---------------------------------------------------------------------------------------------
def plan_steps(args, n_rows: int, d: Dist) -> dict:
    rows_per_step = args.batch_tokens // args.seq_len
    micro_rows = args.micro_batch * d.world
    if args.batch_tokens % (args.seq_len * micro_rows):
        unit = args.seq_len * micro_rows
        die(f"--batch-tokens {args.batch_tokens} must be a multiple of seq-len x micro-batch x "
            f"world size = {unit}; try {max(unit, args.batch_tokens // unit * unit)}")
    steps_per_epoch = math.ceil(n_rows / rows_per_step)
    total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(steps_per_epoch * args.epochs))
    return {"rows_per_step": rows_per_step, "accum": rows_per_step // micro_rows,
            "steps_per_epoch": steps_per_epoch, "total_steps": total}


def step_rows(data: Rows, step: int, plan: dict, seed: int) -> Rows:
    """The rows of one optimizer step: a seeded permutation per epoch, the tail padded with empty rows
    (no targets) so every rank runs the same number of micro-batches."""
    epoch, k = divmod(step, plan["steps_per_epoch"])
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(len(data), generator=g)[k * plan["rows_per_step"]: (k + 1) * plan["rows_per_step"]]
    rows = data.select(order)
    missing = plan["rows_per_step"] - len(rows)
    if missing:
        T = data.input_ids.shape[1]
        empty = Rows(torch.zeros(missing, T, dtype=torch.int32), torch.full((missing, T), IGNORE, dtype=torch.int32),
                     torch.arange(T, dtype=torch.int32).repeat(missing, 1), torch.zeros(missing, dtype=torch.int64))
        rows = Rows(*(torch.cat([a, b]) for a, b in zip(
            (rows.input_ids, rows.targets, rows.position_ids, rows.n_real),
            (empty.input_ids, empty.targets, empty.position_ids, empty.n_real))))
    return rows


def micro_batches(rows: Rows, mb: int, d: Dist):
    """This rank's micro-batches of a step: rank r takes rows r*mb.. of each group of world*mb rows."""
    group = mb * d.world
    for start in range(0, len(rows), group):
        idx = torch.arange(start + d.rank * mb, start + (d.rank + 1) * mb)
        yield rows.select(idx)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits = h @ w.T against targets y, a chunk of rows at a time, with
    the gradients formed on the way: the [tokens x vocab] logits never exist whole and nothing
    vocab-sized is kept for backward. At seq 8192 and a 152k vocabulary that is 5 GB of fp32 logits
    (and as much again for their gradient) per row that a plain F.cross_entropy would hold."""

    @staticmethod
    def forward(ctx, h, w, y, chunk: int, grads: bool, transform=None):
        """grads: form the gradients (False under no_grad, e.g. validation: the loss costs one matmul
        per chunk instead of three). Decided by the caller: grad mode is always off in here.
        transform: what the model does to the logits after the output layer (see logit_transform)."""
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if grads else None
        grad_w = torch.zeros_like(w, dtype=torch.float32) if grads and w.requires_grad else None
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s:s + chunk], y[s:s + chunk]
            logits = (hc @ w.T).float()  # in the autocast dtype when autocast is on, then fp32
            dz = None  # d(transformed logits) / d(logits), when the transform is not the identity
            if transform is not None and transform[0] == "scale":
                logits.mul_(transform[1])
                dz = transform[1]
            elif transform is not None:  # soft-capping: c * tanh(logits / c)
                t = logits.div_(transform[1]).tanh_()
                dz = 1 - t * t if grads else None
                logits = t.mul_(transform[1])
            top = logits.amax(-1, keepdim=True)
            picked = logits.gather(1, yc[:, None])
            z = logits.sub_(top).exp_().sum(-1, keepdim=True)  # in place: logsumexp was 8x slower on CPU
            loss += (z.log() + top - picked).sum()
            if not grads:
                continue
            g = logits.div_(z)  # softmax
            g[torch.arange(len(yc), device=g.device), yc] -= 1  # d loss / d logits
            if dz is not None:
                g.mul_(dz)
            dev = h.device.type
            g = g.to(torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(hc.dtype, w.dtype))
            grad_h[s:s + chunk] = (g @ w.to(g.dtype)).to(h.dtype)
            if grad_w is not None:
                grad_w += (g.T @ hc.to(g.dtype)).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # in place: the saved gradients are used once (no retain_graph)
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h.mul_(grad_loss), None if grad_w is None else grad_w.mul_(grad_loss).to(ctx.w_dtype),
                None, None, None, None)


def apply_transform(logits: torch.Tensor, transform) -> torch.Tensor:
    if transform is None:
        return logits
    kind, v = transform
    return logits * v if kind == "scale" else torch.tanh(logits / v) * v


def logit_transform(model, x, pos):
    """What the model's forward does to the output layer's logits: None (nothing: Llama, Qwen, Mistral,
    SmolLM...), ("softcap", c) (Gemma-2/3: c * tanh(logits / c)), ("scale", s) (Cohere's logit_scale,
    Granite's 1 / logits_scaling), or "unknown". Found once per model by a probe rather than assumed from
    the config: the output layer returns known values on a 2-token input and the model's logits are
    compared with each transform its config names, so an architecture that does something else gets the
    plain loss instead of a wrong chunked one (trap 7). Every rank runs it (an FSDP forward)."""
    head = model.get_output_embeddings()
    if hasattr(head, "logit_transform"):
        return head.logit_transform
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    candidates = [None]
    if getattr(cfg, "final_logit_softcapping", None):
        candidates.append(("softcap", float(cfg.final_logit_softcapping)))
    if getattr(cfg, "logit_scale", None) is not None:
        candidates.append(("scale", float(cfg.logit_scale)))
    if getattr(cfg, "logits_scaling", None):
        candidates.append(("scale", 1 / float(cfg.logits_scaling)))
    seen = {}

    def probe(h):
        n = h.shape[:-1].numel() * head.weight.shape[0]
        seen["p"] = torch.linspace(-40, 40, n, device=h.device).view(*h.shape[:-1], -1)
        return seen["p"]
    head.forward = probe
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            out = model(input_ids=x[:1, :2], position_ids=pos[:1, :2], use_cache=False).logits
    finally:
        del head.forward
    found = "unknown"
    for t in candidates:
        want = apply_transform(seen["p"], t)
        if out.shape == want.shape and torch.allclose(out.float(), want, rtol=1e-4, atol=1e-4):
            found = t
            break
    if found == "unknown":
        print0(f"note: {type(model).__name__} changes its logits after the output layer in a way the chunked "
               "loss does not know; using the plain loss (full logits: more memory)")
    head.logit_transform = found
    return found


def token_loss_sum(model, batch: Rows, device, autocast_dtype, chunked: bool = True) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's targets (0, not NaN, when it has none).

    chunked: for the forward pass the output layer computes the loss itself (ChunkedCrossEntropy on
    the rows that have a target, with the model's own logit transform applied inside) instead of the
    logits. Its forward is swapped on the instance for this call only, so parameters, state-dict keys
    and FSDP's unsharding of the root are untouched. A model whose transform is unknown gets the plain
    loss. What the model then does to the layer's output (soft-capping, scaling) must not reach the
    loss: the layer returns a zero tied to the loss, the model's output is added to the loss, so its
    value is the loss, its gradient the loss's, and FSDP's backward hooks on the output still fire.
    """
    x = batch.input_ids.to(device, torch.long)
    y = batch.targets.to(device, torch.long).flatten()
    pos = batch.position_ids.to(device, torch.long)
    head = model.get_output_embeddings()
    autocast = lambda: torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)  # noqa: E731
    with autocast():  # the probe runs the model as the loss does (a frozen bf16 base needs autocast)
        transform = logit_transform(model, x, pos) if chunked else None
    chunked = chunked and transform != "unknown"
    loss = {}
    if chunked:
        keep = y != IGNORE

        def head_forward(h):
            grads = torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad)
            loss["sum"] = ChunkedCrossEntropy.apply(h.flatten(0, 1)[keep], head.weight, y[keep], CE_CHUNK,
                                                    grads, transform)
            return (loss["sum"] * 0).view(1, 1, 1)  # every known transform maps 0 to 0
        head.forward = head_forward
    try:
        with autocast():
            out = model(input_ids=x, position_ids=pos, use_cache=False).logits
    finally:
        if chunked:
            del head.forward  # back to the class's forward
    if chunked:
        return loss["sum"] + out.float().sum()
    return F.cross_entropy(out.float().flatten(0, 1), y, ignore_index=IGNORE, reduction="sum")


def matmul_params(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def peak_flops(args, d: Dist) -> float | None:
    if args.peak_tflops > 0:
        return args.peak_tflops * 1e12
    if d.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(d.device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def peak_memory_gb(d: Dist) -> float:
    if d.device.type == "cuda":
        return torch.cuda.max_memory_allocated(d.device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@torch.no_grad()
def evaluate_loss(model, val: Rows, args, d: Dist, autocast_dtype) -> float:
    model.eval()
    group = args.micro_batch * d.world
    n_pad = (-len(val)) % group
    if n_pad:
        T = val.input_ids.shape[1]
        val = Rows(torch.cat([val.input_ids, torch.zeros(n_pad, T, dtype=torch.int32)]),
                   torch.cat([val.targets, torch.full((n_pad, T), IGNORE, dtype=torch.int32)]),
                   torch.cat([val.position_ids, torch.arange(T, dtype=torch.int32).repeat(n_pad, 1)]),
                   torch.cat([val.n_real, torch.zeros(n_pad, dtype=torch.int64)]))
    total = 0.0
    for batch in micro_batches(val, args.micro_batch, d):
        total += token_loss_sum(model, batch, d.device, autocast_dtype).item()
    model.train()
    total, count = all_reduce_sum([total, float((val.targets != IGNORE).sum())], d)
    return total / max(count, 1)


def make_optimizer(args, params: list, total: int):
    """AdamW (no weight decay on biases and norms) and its schedule: linear warm-up, then cosine
    down to min-lr-ratio at the last step. -> (opt, sched, warm-up steps)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999),
                            eps=1e-8, fused=True)  # one kernel for all tensors, on CPU too (3x faster there)
    warmup = int(args.warmup) if args.warmup >= 1 else math.ceil(args.warmup * total)

    def lr_lambda(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda), warmup


def resume_step(args, out: Path, model, opt, sched, meta: dict, d: Dist) -> int:
    """The step to start from: 0, or the latest checkpoint's with --resume (same data and plan only)."""
    if not args.resume:
        return 0
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        print0(f"--resume: no checkpoint in {out}/checkpoints, starting from step 0")
        return 0
    saved = load_checkpoint(ckpt, model, opt, sched, d)
    for key in ("plan", "data_rows", "data"):
        if saved[key] != meta[key]:
            die(f"{ckpt}: checkpoint has a different {key} ({saved[key]} vs {meta[key]}); "
                "resume with the same data and batch settings")
    print0(f"resumed from {ckpt} at step {saved['step']}")
    return saved["step"]


def start_run_folder(out: Path, config: dict, step: int, d: Dist) -> Path:
    """Write config.json and keep metrics.jsonl only up to the step resumed from. -> metrics path."""
    metrics_path = out / "metrics.jsonl"
    if d.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", json.dumps(config, indent=2))
        kept = [ln for ln in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
                if json.loads(ln).get("step", 0) <= step] if step else []
        atomic_write(metrics_path, "".join(ln + "\n" for ln in kept))  # drop steps after the checkpoint
    return metrics_path


def train_step(model, rows: Rows, args, d: Dist, params, opt, sched, autocast_dtype) -> dict:
    """One optimizer step on rows: loss = summed token losses / the step's target count."""
    n_targets = int((rows.targets != IGNORE).sum())
    loss_sum = 0.0
    for batch in micro_batches(rows, args.micro_batch, d):
        loss = token_loss_sum(model, batch, d.device, autocast_dtype)
        # FSDP averages gradients over ranks; scaling by world makes the result sum / global count.
        (loss * d.world / max(n_targets, 1)).backward()
        loss_sum += loss.item()
    gnorm = clip_grad(params, args.grad_clip)
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    (loss_sum,) = all_reduce_sum([loss_sum], d)
    return {"loss": loss_sum / max(n_targets, 1), "lr": lr, "grad_norm": gnorm, "targets": n_targets}


def train(args, model, tok, data: Rows, val: Rows | None, d: Dist, extra_config: dict):
    """Train on packed rows, checkpoint, resume and export. Returns the list of per-step metrics."""
    from tqdm import tqdm

    out = Path(args.out)
    plan = plan_steps(args, len(data), d)
    total = plan["total_steps"]
    dtype = resolve_dtype(args, d)
    autocast_dtype = dtype if (dtype != torch.float32 and d.world == 1) else None  # FSDP casts itself
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched, warmup = make_optimizer(args, params, total)
    meta = {"plan": plan, "data_rows": len(data), "data": data_fingerprint(args.data)}
    step = resume_step(args, out, model, opt, sched, meta, d)
    config = run_config(args, d, {"plan": plan, **extra_config})
    metrics_path = start_run_folder(out, config, step, d)
    print0(f"steps {total} (epoch = {plan['steps_per_epoch']} steps), rows/step {plan['rows_per_step']}, "
           f"grad accumulation {plan['accum']}, warm-up {warmup}, world {d.world}, dtype {dtype}")

    flops = flops_per_token(model, args)
    peak = peak_flops(args, d)
    eval_every = args.eval_every or max(1, total // 10)
    history, started = [], step
    bar = tqdm(total=total, initial=step, desc="train", disable=d.rank != 0, dynamic_ncols=True)
    model.train()
    with open(metrics_path, "a") if d.rank == 0 else open(os.devnull, "w") as mf:
        if val is not None and len(val) and step == 0:  # the baseline the run is measured against
            rec = {"step": 0, "val_loss": evaluate_loss(model, val, args, d, autocast_dtype)}
            print0(f"step 0 | val {rec['val_loss']:.4f}")
            mf.write(json.dumps(rec) + "\n")
        while step < total:
            t0 = time.perf_counter()
            rows = step_rows(data, step, plan, args.seed)
            r = train_step(model, rows, args, d, params, opt, sched, autocast_dtype)
            step += 1
            dt = time.perf_counter() - t0
            tokens = int(rows.n_real.sum())
            rec = {"step": step, "loss": r["loss"], "lr": r["lr"], "grad_norm": r["grad_norm"],
                   "tokens": tokens, "targets": r["targets"], "step_time": dt, "tokens_per_s": tokens / dt,
                   "mfu": flops * tokens / dt / (peak * d.world) if peak else None,
                   "peak_mem_gb": peak_memory_gb(d)}
            if val is not None and len(val) and (step % eval_every == 0 or step == total):
                rec["val_loss"] = evaluate_loss(model, val, args, d, autocast_dtype)
            history.append(rec)
            if d.rank == 0:
                log_step(rec, mf, bar, args.log_every, total)
            stop_now = args.stop_after_steps > 0 and step - started >= args.stop_after_steps
            if step == total or stop_now or (args.save_every > 0 and step % args.save_every == 0):
                save_checkpoint(out, model, opt, sched, step, meta, d, args.keep_checkpoints)
            if stop_now and step < total:
                print0(f"stopped after {args.stop_after_steps} steps at step {step}; continue with --resume")
                bar.close()
                return history
    bar.close()
    finish(args, model, tok, out, d, config)
    return history


def flops_per_token(model, args) -> float:
    """Training FLOPs per token for MFU: 6 x matmul weights for full training, 4x with LoRA (the
    frozen weights get no gradient), plus attention's 12 x layers x width x sequence."""
    n = (6 if args.lora_rank == 0 and not hasattr(model, "peft_config") else 4) * matmul_params(model)
    return n + 12 * model.config.num_hidden_layers * model.config.hidden_size * args.seq_len


def log_step(rec: dict, mf, bar, log_every: int, total: int):
    """Rank 0: the step's JSON line (flushed, so a kill loses nothing), the bar, a log line."""
    mf.write(json.dumps(rec) + "\n")
    mf.flush()
    bar.update(1)
    bar.set_postfix(loss=f"{rec['loss']:.4f}")
    if rec["step"] % log_every == 0 or rec["step"] == total:
        bar.write(format_log(rec, total))


def finish(args, model, tok, out: Path, d: Dist, config: dict):
    """The final export (every rank enters the gather), then the optional merged copy."""
    export_final(model, tok, out, d, config)
    if args.merge and d.rank == 0:
        if hasattr(model, "peft_config"):
            merge_export(args, out)
        else:
            print0("--merge: full fine-tuning already exported a full model in final/")
    barrier(d)
    print0(f"done: {out / 'final'}")


def clip_grad(params, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP2
    return float(norm)


def format_log(r: dict, total: int) -> str:
    s = (f"step {r['step']:>6}/{total} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | gnorm {r['grad_norm']:.3f} | "
         f"{r['step_time'] * 1000:.0f} ms | {r['tokens_per_s']:,.0f} tok/s")
    if r["mfu"] is not None:
        s += f" | mfu {100 * r['mfu']:.1f}%"
    s += f" | mem {r['peak_mem_gb']:.2f} GB"
    if "val_loss" in r:
        s += f" | val {r['val_loss']:.4f}"
    return s


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def check_out(args):
    ckpt = latest_checkpoint(Path(args.out))
    if ckpt is not None and not args.resume:
        die(f"{args.out} already has checkpoints ({ckpt.name}); pass --resume to continue it, "
            "or choose another --out")


def main(argv=None):
    args = parse_args(argv)
    d = setup_distributed()
    # bad input ends here, as one `error:` line and exit 2 (common.die), before the model loads
    config = check_model(args)
    check_out(args)
    docs = load_documents(args)
    tok = load_tokenizer(args)
    train_docs, val_docs = split_val(docs, args.val_frac, args.seed)
    data, stats = pack_documents(tokenize(tok, train_docs, "tokenize"), args.seq_len, tok.eos_token_id,
                                 tok.pad_token_id, args.doc_mask)
    val = pack_documents(tokenize(tok, val_docs, "tokenize val"), args.seq_len, tok.eos_token_id,
                         tok.pad_token_id, args.doc_mask)[0] if val_docs else None
    plan_steps(args, len(data), d)  # validate batch settings before loading the model
    print0(f"data: {len(train_docs)} documents, {stats['tokens']:,} tokens in {stats['rows']} rows of "
           f"{args.seq_len}; {stats['pad_tokens']:,} pad tokens ({100 * stats['pad_tokens'] / (stats['rows'] * args.seq_len):.1f}%), "
           f"{stats['dropped_tokens']} dropped" + (f"; validation: {len(val_docs)} documents" if val_docs else ""))
    torch.manual_seed(args.seed)
    model = load_model(args, d, config)
    train(args, model, tok, data, val, d, {"packing": stats})
    if d.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
