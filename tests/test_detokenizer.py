"""IncrementalDetokenizer: streaming text equals one full decode (also for random ids that split
multi-byte characters), stop strings across token boundaries, and deltas never retracted.

The tokenizers are built here: a byte-level BPE (GPT-2 / Qwen style, every byte is a token)
trained on a few sentences, and a Llama / Mixtral style SentencePiece BPE with byte fallback.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from expertmesh.engine.detokenizer import IncrementalDetokenizer
from expertmesh.sampling_params import SamplingParams

CORPUS = [
    "hello world, this is a test of the tokenizer",
    "the quick brown fox jumps over the lazy dog",
    "中文字符 和 日本語 のテキスト 🎉🚀 emoji ünïcödé",
    "stop here ### and there\n\nnew paragraph",
]


def _byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_tokens([AddedToken("<tool>", special=False)])  # added but not special: never skipped
    return tok


def _sentencepiece_like() -> Tokenizer:
    """Llama / Mixtral style: "▁" for spaces, <0xNN> byte-fallback tokens, and a decoder that
    strips the leading space of what it decodes. Vocabulary and merges are written by hand."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", *"abcehilmnort", "中", "é", "▁t", "▁a", "he", "▁the", "ll", "llo", "▁he", "▁hello"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("▁", "a"), ("h", "e"), ("▁t", "he"), ("l", "l"), ("ll", "o"), ("▁", "he"), ("▁he", "llo")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return tok


BYTE_LEVEL = _byte_level()
SENTENCEPIECE = _sentencepiece_like()
VOCAB = BYTE_LEVEL.get_vocab_size()
EOS = BYTE_LEVEL.token_to_id("</s>")
HYPOTHESIS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def stream(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int] | None = None) -> tuple[list[str], str | None]:
    """Feed ids in chunks of the given sizes (1 by default); flush at the end unless a stop
    string ended it. Returns the deltas and the stop string."""
    deltas, i, sizes = [], 0, iter(chunks or [])
    while i < len(ids):
        size = next(sizes, 1)
        delta, stop = detok.add_tokens(ids[i : i + size])
        deltas.append(delta)
        i += size
        if stop is not None:
            deltas.append(detok.flush())
            return deltas, stop
    deltas.append(detok.flush())
    return deltas, None


def byte_token(byte: int) -> int:
    """The byte-level token of one raw byte (GPT-2's printable byte alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    char = chr(byte) if byte in printable else chr(256 + extra.index(byte))
    token_id = BYTE_LEVEL.token_to_id(char)
    assert token_id is not None
    return token_id


@HYPOTHESIS
@given(
    prompt=st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=8),
    output=st.lists(st.integers(0, VOCAB - 1), max_size=40),
    chunks=st.lists(st.integers(1, 4), max_size=40),
    skip=st.booleans(),
)
def test_random_ids_stream_to_the_full_decode(prompt, output, chunks, skip):
    detok = IncrementalDetokenizer(BYTE_LEVEL, prompt, SamplingParams(skip_special_tokens=skip))
    deltas, stop = stream(detok, output, chunks)
    expected = BYTE_LEVEL.decode(output, skip_special_tokens=skip)
    assert stop is None
    assert "".join(deltas) == detok.output_text == expected
    assert detok.token_ids == output


@HYPOTHESIS
@given(text=st.text(alphabet="ab 中文🎉é\n", max_size=30), prompt=st.text(alphabet="ab中🎉", max_size=6))
def test_real_text_round_trips(text, prompt):
    ids = BYTE_LEVEL.encode(text).ids
    detok = IncrementalDetokenizer(BYTE_LEVEL, BYTE_LEVEL.encode(prompt).ids, SamplingParams())
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == text


def test_multibyte_character_is_held_until_complete():
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], SamplingParams())
    emoji = "🎉".encode()  # 4 bytes, fed one byte token at a time
    deltas = [detok.add_tokens([byte_token(b)]).text for b in emoji]
    assert deltas == ["", "", "", "🎉"]
    assert detok.add_tokens(BYTE_LEVEL.encode(" ok").ids).text == " ok"


def test_unfinished_character_comes_out_as_replacement_on_flush():
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], SamplingParams())
    assert detok.add_tokens([byte_token(b) for b in "中".encode()[:2]]).text == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""  # idempotent
    with pytest.raises(RuntimeError, match="already finished"):
        detok.add_tokens([1])


def test_prompt_ending_inside_a_character_is_not_used_as_context():
    prompt = BYTE_LEVEL.encode("hi").ids + [byte_token("中".encode()[0])]
    output = [byte_token(b) for b in "中".encode()[1:]]
    detok = IncrementalDetokenizer(BYTE_LEVEL, prompt, SamplingParams())
    deltas, _ = stream(detok, output)
    assert "".join(deltas) == BYTE_LEVEL.decode(output) == "\ufffd\ufffd"


SP_BYTE_TOKENS = {SENTENCEPIECE.token_to_id(f"<0x{b:02X}>") for b in range(256)}
SP_SPECIAL = {0, 1, 2}


def ends_in_byte_run(ids: list[int], skip: bool) -> bool:
    """Whether the last token that decodes to anything is a <0xNN> byte token."""
    visible = [t for t in ids if not (skip and t in SP_SPECIAL)]
    return bool(visible) and visible[-1] in SP_BYTE_TOKENS


def test_sentencepiece_style_keeps_the_first_leading_space_in_context():
    prompt, output = SENTENCEPIECE.encode("hello").ids, SENTENCEPIECE.encode("the hello").ids
    in_context = IncrementalDetokenizer(SENTENCEPIECE, prompt, SamplingParams())
    assert "".join(stream(in_context, output)[0]) == " the hello"  # prompt + text reads right
    alone = IncrementalDetokenizer(SENTENCEPIECE, prompt, SamplingParams(), prompt_context_tokens=0)
    assert "".join(stream(alone, output)[0]) == SENTENCEPIECE.decode(output) == "the hello"


@HYPOTHESIS
@given(
    prompt=st.lists(st.integers(0, SENTENCEPIECE.get_vocab_size() - 1), max_size=8),
    output=st.lists(st.integers(0, SENTENCEPIECE.get_vocab_size() - 1), max_size=30),
    chunks=st.lists(st.integers(1, 3), max_size=30),
    skip=st.booleans(),
)
def test_sentencepiece_style_random_ids(prompt, output, chunks, skip):
    params = SamplingParams(skip_special_tokens=skip)
    alone = IncrementalDetokenizer(SENTENCEPIECE, prompt, params, prompt_context_tokens=0)
    assert "".join(stream(alone, output, chunks)[0]) == SENTENCEPIECE.decode(output, skip_special_tokens=skip)
    # In context: the output's part of decoding the prompt's last 5 tokens and the output
    # together, after dropping a trailing run of byte tokens (the output's bytes must not
    # merge into it) and giving up on context that ends inside a character.
    context = prompt[-5:]
    while context and ends_in_byte_run(context, skip):
        context.pop()
    context_text = SENTENCEPIECE.decode(context, skip_special_tokens=skip)
    if context_text.endswith("\ufffd"):
        expected = SENTENCEPIECE.decode(output, skip_special_tokens=skip)
    else:
        expected = SENTENCEPIECE.decode(context + output, skip_special_tokens=skip)[len(context_text) :]
    in_context = IncrementalDetokenizer(SENTENCEPIECE, prompt, params)
    assert "".join(stream(in_context, output, chunks)[0]) == expected


def test_byte_fallback_run_is_held_until_closed():
    # "\n" is the byte token <0x0A>; a later invalid byte turns the whole run into U+FFFDs.
    newline, bad, a = (SENTENCEPIECE.token_to_id(t) for t in ("<0x0A>", "<0x80>", "a"))
    detok = IncrementalDetokenizer(SENTENCEPIECE, [], SamplingParams())
    assert detok.add_tokens([a]).text == "a"
    assert detok.add_tokens([newline]).text == ""  # held: the run is still open
    assert detok.add_tokens([bad]).text == ""
    assert detok.add_tokens([a]).text == "\ufffd\ufffda"
    assert detok.output_text == SENTENCEPIECE.decode([a, newline, bad, a])
    ok = IncrementalDetokenizer(SENTENCEPIECE, [], SamplingParams())
    assert [ok.add_tokens([t]).text for t in (a, newline, a)] == ["a", "", "\na"]


# ---- stop strings ------------------------------------------------------------------------


def test_stop_string_across_token_boundaries():
    text = "hello world, this is a test"
    ids = BYTE_LEVEL.encode(text).ids
    assert all("o w" not in BYTE_LEVEL.decode([i]) for i in ids)  # it spans "hello" + " world"
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], SamplingParams(stop=["o w"]))
    deltas, stop = stream(detok, ids)
    assert stop == "o w" and detok.stop_reason == "o w" and detok.finished
    assert "".join(deltas) == detok.output_text == "hell"


def test_stop_string_fed_byte_by_byte_inside_a_character():
    ids = [byte_token(b) for b in "ab中文cd".encode()]
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], SamplingParams(stop="文c", include_stop_str_in_output=True))
    deltas, stop = stream(detok, ids)
    assert stop == "文c" and "".join(deltas) == "ab中文c"


def test_include_stop_str_in_output_cuts_after_it():
    ids = BYTE_LEVEL.encode("stop here ### and there").ids
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], SamplingParams(stop=["###"], include_stop_str_in_output=True))
    deltas, stop = stream(detok, ids)
    assert stop == "###" and "".join(deltas) == "stop here ###"


def test_earliest_stop_wins_and_partial_matches_are_held_back():
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], SamplingParams(stop=["there", "e ###"]))
    seen = []
    for char in "stop here ### and there":
        delta, stop = detok.add_tokens(BYTE_LEVEL.encode(char).ids)
        seen.append(delta)
        if stop:
            break
    assert stop == "e ###"
    assert "".join(seen) == detok.output_text == "stop her"
    # While "e #" was pending nothing past "stop her" was shown.
    assert "".join(seen[: len("stop here #")]) == "stop her"


def test_a_partial_match_that_never_completes_is_released():
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], SamplingParams(stop=["the end"]))
    deltas, stop = stream(detok, BYTE_LEVEL.encode("so the en").ids)
    assert stop is None and deltas[-1].endswith("the en") and "".join(deltas) == "so the en"


@HYPOTHESIS
@given(
    text=st.text(alphabet="ab c中🎉", min_size=1, max_size=40),
    stops=st.lists(st.text(alphabet="ab c中🎉", min_size=1, max_size=4), min_size=1, max_size=3),
    include=st.booleans(),
    chunks=st.lists(st.integers(1, 3), max_size=40),
)
def test_stop_strings_never_shown_then_cut(text, stops, include, chunks):
    ids = BYTE_LEVEL.encode(text).ids
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], params)
    deltas, stop = stream(detok, ids, chunks)
    out = "".join(deltas)
    assert out == detok.output_text
    if stop is None:
        assert out == text and not any(s in text for s in stops)
        return
    before_stop = out[: len(out) - len(stop)] if include else out
    assert text.startswith(before_stop + stop)
    assert not any(s in before_stop for s in stops)  # it really was the first one


# ---- tokens that end the sequence --------------------------------------------------------


def test_eos_text_left_out_unless_stop_strings_are_included():
    ids = BYTE_LEVEL.encode("hello").ids + [EOS]
    visible = SamplingParams(skip_special_tokens=False)
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], visible)
    delta, stop = detok.add_tokens(ids, stop_terminated=True)
    assert (delta, stop, detok.finished) == ("hello", None, True)
    assert detok.token_ids == ids  # the token still counts
    kept = IncrementalDetokenizer(BYTE_LEVEL, [], SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True))
    assert kept.add_tokens(ids, stop_terminated=True).text == "hello</s>"
    # Without stop_terminated the caller decides: the token is text like any other.
    plain = IncrementalDetokenizer(BYTE_LEVEL, [], visible)
    assert "".join(stream(plain, ids)[0]) == "hello</s>"


def test_stop_terminated_flushes_held_text():
    detok = IncrementalDetokenizer(BYTE_LEVEL, [], SamplingParams(stop=["lo!"]))
    first = detok.add_tokens(BYTE_LEVEL.encode("hello").ids)
    assert first.text == "hel"  # "lo" could start "lo!"
    assert detok.add_tokens([EOS], stop_terminated=True).text == "lo"
    assert detok.output_text == "hello"
