"""Tokenizer from the GGUF vocab (llama.cpp vocab_only), streaming decode, llguidance view."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import pytest

from pie_local.models.tokenizer import StreamDecoder, Tokenizer, TokenizerError

TEXTS = [
    "Hello",
    " Hello world!",
    "héllo 日本語 🎉",
    "  two  spaces\n\ttab\n\n",
    "def f(x):\n    return x ** 2  # square",
    "ꙮ 𝔘 𓀀 byte fallback",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "",
]


@pytest.fixture(scope="module")
def tok(starter_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(starter_gguf)


@pytest.fixture(scope="module")
def llama_vocab(starter_gguf: Path):
    import llama_cpp

    return llama_cpp.Llama(str(starter_gguf), vocab_only=True, verbose=False)


def write_vocab_gguf(path: Path, chat_template: str | None = None) -> Path:
    """A vocabulary-only GGUF (SentencePiece with byte fallback, no tensors) for small tests."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁hello", "▁world", "▁", "h", "e"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
        [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * 5
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-1.0, -1.0, -2.0, -3.0, -3.0])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_starter_vocab_facts(tok: Tokenizer) -> None:
    assert tok.n_vocab == 262144
    assert tok.bos_id == 2
    assert tok.add_bos is True and tok.add_eos is False
    assert tok.architecture == "gemma3"
    assert tok.chat_template is None  # base model: the built-in Gemma format is used
    # <eos>, <end_of_turn> and </s> all end generation.
    assert tok.eos_ids == frozenset({1, 106, 212})
    assert tok.eos_id == 1
    assert tok.piece(106) == b"<end_of_turn>"
    assert tok.is_special(106) and not tok.is_special(9259)
    assert tok.metadata("general.name") == "Gemma 3 270m"
    assert tok.metadata("no.such.key") is None


@pytest.mark.llama_cpp
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_llama_cpp_and_round_trips(tok: Tokenizer, llama_vocab, text: str) -> None:
    ids = tok.encode(text)
    assert ids == llama_vocab.tokenize(text.encode(), add_bos=False, special=True)
    assert tok.decode(ids) == text


@pytest.mark.llama_cpp
def test_add_special_and_parse_special(tok: Tokenizer, llama_vocab) -> None:
    assert tok.encode("Hi", add_special=True) == [2, *tok.encode("Hi")]
    assert tok.encode("Hi", add_special=True) == llama_vocab.tokenize(b"Hi", add_bos=True, special=True)
    assert tok.encode("<start_of_turn>") == [105]
    literal = tok.encode("<start_of_turn>", parse_special=False)
    assert 105 not in literal and len(literal) > 1
    assert tok.decode(literal) == "<start_of_turn>"
    assert tok.decode([105, 9259], special=False) == "Hello"


def test_long_text_grows_the_buffer(tok: Tokenizer) -> None:
    text = "ab" * 20000 + " 🎉" * 3000
    assert tok.decode(tok.encode(text)) == text


def test_stream_decoder_never_splits_a_character(tok: Tokenizer) -> None:
    text = "ꙮ says 𝔘 and 𓀀 — fin"
    ids = tok.encode(text)
    pieces = [tok.piece(i) for i in ids]
    assert any(_invalid_utf8(p) for p in pieces), "the test needs byte-fallback tokens"
    decoder = tok.stream_decoder()
    outputs = [decoder.push(i) for i in ids]
    assert all("\ufffd" not in out for out in outputs)
    assert "".join(outputs) + decoder.flush() == text
    # The three bytes of ꙮ are three tokens: nothing comes out until the last one.
    assert outputs[:3] == ["", "", "ꙮ"]


def test_stream_decoder_flushes_incomplete_bytes_as_replacement(tok: Tokenizer) -> None:
    first_byte_of_emoji = tok.encode("𓀀")[0]  # <0xF0>
    decoder = StreamDecoder(tok)
    assert decoder.push_many([9259, first_byte_of_emoji]) == "Hello"
    assert decoder.flush() == "\ufffd"


def test_stream_decoder_hides_control_tokens_unless_asked(tok: Tokenizer) -> None:
    ids = tok.encode("Hi<end_of_turn>")
    assert tok.stream_decoder().push_many(ids) == "Hi"
    assert tok.stream_decoder(special=True).push_many(ids) == "Hi<end_of_turn>"


def test_bad_token_ids_and_files(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([tok.n_vocab])
    with pytest.raises(TokenizerError, match="out of range"):
        tok.piece(-1)
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(TokenizerError, match="cannot read the vocabulary"):
        Tokenizer.from_gguf(junk)


def test_closed_tokenizer_raises(tmp_path: Path) -> None:
    t = Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "v.gguf"))
    assert t.decode(t.encode("hello world")) == "hello world"
    t.close()
    with pytest.raises(TokenizerError, match="closed"):
        t.encode("hello")


def test_small_vocab_gguf_with_template(tmp_path: Path) -> None:
    t = Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "v.gguf", chat_template="{{ messages }}"))
    assert t.n_vocab == 264
    assert t.eos_ids == frozenset({2})
    assert t.chat_template == "{{ messages }}"
    ids = t.encode("hello world")
    assert ids[0] == 261 and t.piece(262) == b"h"  # "▁" (space prefix), then pieces of the vocab
    assert t.decode(ids) == "hello world"
    assert t.encode("hi", add_special=True)[0] == 1
    assert t.token_text(t.bos_id) == "<s>"


def test_llama_logs_go_to_logging_not_stderr(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    path = write_vocab_gguf(tmp_path / "v.gguf")
    with caplog.at_level(logging.DEBUG, logger="pie_local.llama_cpp"):
        Tokenizer.from_gguf(path).close()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert any("vocab" in r.getMessage() for r in caplog.records if r.name == "pie_local.llama_cpp")


def test_llguidance_tokenizer(tok: Tokenizer) -> None:
    llg = tok.llguidance_tokenizer()
    assert llg is tok.llguidance_tokenizer()  # built once
    assert llg.vocab_size == tok.n_vocab
    assert sorted(llg.eos_tokens) == sorted(tok.eos_ids)
    text = "héllo 日本語 🎉"
    assert llg.tokenize_str(text) == tok.encode(text)
    assert llg.decode_bytes(tok.encode(text)) == text.encode()


def _invalid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
