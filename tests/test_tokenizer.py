"""The offline GPT-2 tokenizer: GPT-2's known ids, lossless round trips, derived HF files."""

import json
import subprocess
import sys

import pytest

from gpt2_jax.interop import tokenizer as tok
from gpt2_jax.interop.tokenizer import EOT_ID, get_tokenizer, hf_vocab_and_merges

ODD_UNICODE = [
    "",
    " ",
    "Hello world",
    "  leading and trailing  \n\n\n",
    "naïve café — “smart quotes” … ½ ∑ ∫ √",
    "日本語 中文 한국어 ไทย עברית العربية हिन्दी",
    "🤖🚀👨‍👩‍👧‍👦🏳️‍🌈 family + flags 🇫🇷🇯🇵",
    "\x00\x01\x7f control \u200b\u200d\ufeff zero-width \U0001F600",
    "tabs\tand\r\nwindows\rnewlines\u2028\u2029",
    "a" * 300 + " " + "ß" * 50,
]


def test_known_ids():
    enc = get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.eot_token == EOT_ID == 50256
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.encode(" the") == [262]


@pytest.mark.parametrize("text", ODD_UNICODE)
def test_decode_encode_round_trip(text):
    enc = get_tokenizer()
    assert enc.decode(enc.encode(text)) == text


def test_special_token_in_text_is_refused_unless_allowed():
    with pytest.raises(ValueError):
        get_tokenizer().encode("a <|endoftext|> b")


def test_hf_vocab_and_merges_cover_the_vocabulary():
    vocab, merges = hf_vocab_and_merges()
    assert len(vocab) == 50257 and sorted(vocab.values()) == list(range(50257))
    assert vocab["<|endoftext|>"] == 50256 and vocab["Ġthe"] == 262 and vocab["!"] == 0
    assert len(merges) == 50000
    assert merges[0] == "Ġ t"  # GPT-2's first merge
    for merge in merges[:1000]:
        a, b = merge.split(" ")
        assert a + b in vocab


def test_corrupted_ranks_file_is_detected(monkeypatch):
    monkeypatch.setattr(tok, "_RANKS_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="corrupted"):
        tok._read_ranks_bytes()


def test_importing_the_package_is_side_effect_free():
    code = (
        "import sys, gpt2_jax; "
        "print(json.dumps(sorted(m for m in ('jax', 'flax', 'tiktoken', 'torch') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
    code = "from gpt2_jax import GPT2Config, GPT2, load_hf, save_hf, get_tokenizer; print(get_tokenizer().encode('hi'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[5303]"
