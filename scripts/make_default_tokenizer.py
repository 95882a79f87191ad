"""Regenerate python/expertmesh/assets/default_tokenizer.json.

The built-in tiny model ships this tokenizer so that its output is reproducible everywhere:
a byte-level BPE trained on a short corpus of our own words (below). Run it only when the
corpus or vocabulary changes:

    .venv/bin/python scripts/make_default_tokenizer.py
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = """\
expertmesh serves mixture of experts language models. A request arrives over the network,
the scheduler picks the tokens that run in the next step, and the model computes them.
Each layer sends every token to a few experts chosen by the router; the experts are small
feed forward networks, and only the chosen ones do any work for a token. When the experts
live on several ranks, the tokens travel to the rank that holds their experts and come back
with the answer, weighted by the router. The key and value cache is split into blocks, and
blocks that hold the same prefix are shared between requests, so a long system prompt is
computed once. The scheduler runs decodes first, then chunks of new prompts, and when the
cache is full it pauses the newest request and computes it again later. Nothing is lost:
every request ends with a reason, and every block returns to the pool.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine,
thank you. What is the capital of France? The capital of France is Paris. Once upon a time
there was a small model that wanted to be large. It learned numbers: one, two, three, four,
five, six, seven, eight, nine, ten. It learned code: def main(): return 0, for i in range(10).
"""


def build() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeated lines give the pair counts some spread, so merges are not all ties.
    lines = [line for line in CORPUS.splitlines() for _ in range(1 + len(line) % 3)]
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "python/expertmesh/assets/default_tokenizer.json"
    build().save(str(out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
