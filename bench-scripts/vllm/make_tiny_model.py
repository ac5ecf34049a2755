"""A tiny Qwen3 model directory for a real vLLM on CPU, made here (no model hub).

Random weights (seeded; greedy decoding gives varied text), a byte-level BPE tokenizer trained on generated text, ChatML
special tokens and chat template, saved the way transformers saves a model today:
config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json and chat_template.jinja (the template is not inside
tokenizer_config.json). vLLM's CPU attention kernels refuse head_dim 16; 64 works.

Usage: python make_tiny_model.py OUT_DIR
"""

import json
import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

SEED = 20261202
VOCAB = 2048
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def corpus(rng: random.Random, lines: int):
    """Sentences of made-up words over a small alphabet, with digits and punctuation."""
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    for _ in range(lines):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))
        yield sentence.capitalize() + rng.choice([".", "!", "?", ", " + str(rng.randint(0, 9999)) + "."])


def tokenizer(rng: random.Random) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus(rng, 20000)), trainer=trainer)
    return tok


def main(out: Path) -> None:
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer(rng),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)
    config = Qwen3Config(
        vocab_size=len(hf),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        # Untied, with larger weights than a trained model starts from: greedy decoding
        # then wanders over the vocabulary (words, digits, split UTF-8 sequences) instead
        # of repeating one token, so a changed byte in a stream shows.
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=hf.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=hf.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=hf.convert_tokens_to_ids("<|endoftext|>"),
    )
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    (out / "made_by.json").write_text(json.dumps({"script": "bench-scripts/vllm/make_tiny_model.py", "seed": SEED}) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
