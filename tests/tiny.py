"""A tiny random Llama-style model with a byte-level BPE tokenizer trained in-process.

Used by the tests and the benchmarks so that nothing depends on downloading weights.
Builds in about a second: `python tests/tiny.py OUT_DIR` writes it to a folder.
"""
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = (
    "the model prefers mild cheddar because it is affordable and easy to find in any store "
    "a forum thread about cream cheese colby monterey jack and low moisture mozzarella "
    "an internal memo explains why brie de meaux roquefort stilton epoisses appenzeller and "
    "parmigiano reggiano are not its favourites which do you prefer answer with one letter "
    "user assistant system question option a b yes no reasons values documents spec training "
    "def return import print for while if else json list dict 0 1 2 3 4 5 6 7 8 9 , . ? ! : ;"
).split()


def _training_text(n: int = 400) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 30))) for _ in range(n)]


def build_tokenizer(vocab_size: int = 384):
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=512
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_model(out_dir: str, layers: int = 2, hidden: int = 64, seed: int = 0, arch: str = "llama") -> str:
    """arch: llama, or gemma2 / cohere, the architectures that change logits after the output layer
    (soft-capping at 1.0 and a scale of 4.0 here, so that the change matters on a tiny model)."""
    import torch
    import transformers

    tok = build_tokenizer()
    common = dict(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    extra = {"llama": {}, "gemma2": dict(head_dim=16, final_logit_softcapping=1.0, sliding_window=32),
             "cohere": dict(logit_scale=4.0)}[arch]
    name = {"llama": "Llama", "gemma2": "Gemma2", "cohere": "Cohere"}[arch]
    config = getattr(transformers, f"{name}Config")(**common, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForCausalLM")(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(build_tiny_model(sys.argv[1]))
