"""Tests for `srpo_jax.tokenizer`: the bundled Qwen3 tokenizer against ids produced by the real Qwen tokenizer.

Expected ids are frozen from published outputs of the real tokenizer (each case names its source); the `tiktoken`
cross-checks compare against an independent encoder (OpenAI's BPE engine on the same `qwen.tiktoken` ranks and
regex), on fixed strings and on random text.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Never reach the hub (the conftest sets it too).

import json
import pathlib
import threading
import time
import unicodedata

import pytest
import tiktoken
import tokenizers
from hypothesis import given, settings, strategies as st

from srpo_jax import tokenizer as tk


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> pathlib.Path:
  """A fresh cache with the bundled tokenizer converted once (the conversion is part of what is tested)."""
  cache = tmp_path_factory.mktemp("srpo_cache")
  start = time.perf_counter()
  tk.default_tokenizer_dir(cache)
  print(f"\nqwen.tiktoken -> HF tokenizer conversion: {time.perf_counter() - start:.2f} s")
  return cache


@pytest.fixture(scope="session")
def tok(cache_dir):
  return tk.load_tokenizer(cache_dir=cache_dir)


@pytest.fixture(scope="session")
def tiktoken_enc() -> tiktoken.Encoding:
  """An independent encoder: tiktoken's own BPE on the same ranks, regex and special tokens."""
  return tiktoken.Encoding(
      name="qwen3-reference",
      pat_str=tk.PRETOKENIZE_REGEX,
      mergeable_ranks=tk.read_tiktoken_ranks(tk.qwen_tiktoken_path()),
      special_tokens={content: token_id for token_id, content, _ in tk.QWEN3_ADDED_TOKENS},
  )


# ---------------------------------------------------------------------------------------------------------------
# Ids of the real Qwen tokenizer
# ---------------------------------------------------------------------------------------------------------------

# huggingface/transformers tests/models/qwen2/test_tokenization_qwen2.py::test_tokenizer_integration: expected
# input_ids of "Qwen/Qwen-tokenizer" (revision 5909c8222473b2c73b0b73fb054552cd4ef6a8eb), padding removed.
TRANSFORMERS_QWEN2_CASES = [
    (
        "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
        "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
        "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
        "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.",
        [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455, 529, 8,
         5707, 4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830, 61437, 64, 11, 1599, 10994, 11,
         27604, 321, 33, 529, 11, 29881, 6954, 32574, 369, 18448, 11434, 45451, 320, 45, 23236, 8, 323, 18448,
         11434, 23470, 320, 30042, 38, 8, 448, 916, 220, 18, 17, 10, 80669, 4119, 304, 220, 16, 15, 15, 10, 15459,
         323, 5538, 94130, 2897, 1948, 619, 706, 11, 5355, 51, 21584, 323, 94986, 13],
    ),
    (
        "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。使用预训练模型可以减少计算消耗和碳排放，"
        "并且节省从头训练所需要的时间和资源。",
        [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034,
         104949, 9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940, 100768, 104997, 33108,
         100912, 105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521, 101975, 33108, 85329, 1773],
    ),
    (
        '```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\ntokenizer("世界，你好！")```',
        [73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274, 16948, 34841, 3135,
         1138, 85593, 445, 99489, 3837, 108386, 6313, 899, 73594],
    ),
]


@pytest.mark.parametrize("text,expected", TRANSFORMERS_QWEN2_CASES, ids=["english", "chinese_emoji", "code"])
def test_encodes_like_real_qwen_tokenizer(tok, text, expected):
  assert tok.encode(text) == expected


def test_qwen_tokenization_note_examples(tok):
  # QwenLM/Qwen tokenization_note.md ("Injection attack prevention" and "Regular tokens"): the surface form of a
  # control token is the control token by default, and plain text when special tokens are split.
  text = 'print("<|endoftext|>")'
  assert tok.encode(text) == [1350, 445, 151643, 899]
  assert tok.encode(text, split_special_tokens=True) == [1350, 9639, 91, 8691, 723, 427, 91, 82598]
  # Byte-level tokens: 51461 is b' \xe6\xa0' (an incomplete UTF-8 char), completed by 117 = b'\xb9'.
  assert tok.decode([51461, 117]) == " 根"
  assert tok.decode([51461]) == " \ufffd"


def test_nfc_normalization(tok):
  # transformers' Qwen2 test_nfc_normalization: these three characters differ under NFC/NFD/NFKC/NFKD, so only NFC
  # maps the NFD input to this output.
  nfd, nfc = "\u03d2\u0301\u03d2\u0308\u017f\u0307", "\u03d3\u03d4\u1e9b"
  assert tok.backend_tokenizer.normalizer.normalize_str(nfd) == nfc
  assert tok.encode(nfd) == tok.encode(nfc)


def test_merges_are_one_per_multibyte_token(cache_dir):
  """151,643 ranks - 256 single bytes = 151,387 merges, in rank order (GPT-2 byte alphabet: 'Ġ' is a space)."""
  with open(cache_dir / tk.DEFAULT_DIR_NAME / "tokenizer.json", encoding="utf-8") as f:
    model = json.load(f)["model"]
  assert len(model["vocab"]) == tk.NUM_BPE_TOKENS
  assert len(model["merges"]) == tk.NUM_BPE_TOKENS - 256
  # Ranks 256.. of qwen.tiktoken are b'  ', b'    ', b'in', b' t', ...: the merges that build them come first.
  assert [" ".join(m) for m in model["merges"][:4]] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n", "Ġ t"]


def test_raw_tokenizer_json_matches(cache_dir):
  """Readers of tokenizer.json alone (Rust servers, `tokenizers`) get the same pipeline.

  transformers' Qwen2Tokenizer rebuilds normalizer and pre-tokenizer from its own code, so this checks ours.
  """
  raw = tokenizers.Tokenizer.from_file(str(cache_dir / tk.DEFAULT_DIR_NAME / "tokenizer.json"))
  for text, expected in TRANSFORMERS_QWEN2_CASES:
    assert raw.encode(text).ids == expected
  assert raw.encode("\u03d2\u0301 2024<|im_end|>").ids == raw.encode("\u03d3 2024<|im_end|>").ids
  assert raw.encode("2024<|im_end|>").ids == [17, 15, 17, 19, tk.EOS_ID]  # One id per digit.


def test_bpe_pieces_hand_example():
  # Hand-checkable: to build 'abc' (rank 5) tiktoken first merges the lower-ranked pair 'ab' (3) before 'bc' (4).
  ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
  assert tk.bpe_pieces(b"abc", ranks, max_rank=5) == [b"ab", b"c"]
  assert tk.bpe_pieces(b"abc", ranks, max_rank=4) == [b"ab", b"c"]
  assert tk.bpe_pieces(b"abc", ranks, max_rank=3) == [b"a", b"b", b"c"]
  assert tk.recover_merges(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c")]
  with pytest.raises(ValueError, match="not reachable"):
    tk.recover_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


# ---------------------------------------------------------------------------------------------------------------
# Cross-check against tiktoken (independent BPE engine)
# ---------------------------------------------------------------------------------------------------------------

CROSS_CHECK_STRINGS = [
    "量子力学是描述微观粒子运动规律的物理学分支。",
    "Digits split one by one: 1234567890, 3.14159, 2**32 = 4294967296, -0.5e-10",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\nclass A:\n\tpass\r\n",
    "emoji 😀🤗👩‍👩‍👧‍👦 and flags 🇫🇷, math ∑∫√ and arrows →⇒",
    "   leading, trailing   \n\n\n  \t\t  tabs\u3000ideographic space \u00a0nbsp    ",
    "Action: search\nAction Input: {\"query\": \"weather in Paris\", \"units\": \"metric\"}\n<answer>B</answer>",
    "It's they'll WE'RE I'M you'D, mixed-case contractions",
    "Ünïcödé Ελληνικά русский العربية हिन्दी 한국어 日本語テキスト",
]


@pytest.mark.parametrize("text", CROSS_CHECK_STRINGS)
def test_matches_tiktoken(tok, tiktoken_enc, text):
  assert tok.encode(text) == tiktoken_enc.encode(text, allowed_special="all")


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=48))
def test_matches_tiktoken_on_random_text(tok, tiktoken_enc, text):
  # HF normalizes to NFC first; tiktoken does not, so compare on NFC text. Surrogates are not encodable text.
  text = unicodedata.normalize("NFC", text)
  ids = tok.encode(text)
  assert ids == tiktoken_enc.encode(text, allowed_special="all")
  assert tok.decode(ids) == text


# ---------------------------------------------------------------------------------------------------------------
# Special tokens
# ---------------------------------------------------------------------------------------------------------------


def test_special_token_ids(tok):
  assert (tk.PAD_ID, tk.IM_START_ID, tk.EOS_ID, tk.THINK_ID, tk.END_THINK_ID) == (
      151643, 151644, 151645, 151667, 151668)
  assert len(tok) == 151669
  for token_id, content, _ in tk.QWEN3_ADDED_TOKENS:
    assert tok.convert_tokens_to_ids(content) == token_id, content
    assert tok.encode(content) == [token_id], content
    assert tok.decode([token_id]) == content
  assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", tk.EOS_ID)
  assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", tk.PAD_ID)
  assert tok.bos_token is None  # Qwen adds no BOS.


def test_im_end_in_text_is_one_token(tok):
  assert tok.encode("Hello<|im_end|>") == [9707, tk.EOS_ID]
  assert tok.encode("The answer is B.<|im_end|>\n")[-2:] == [tk.EOS_ID, 198]


def test_think_tags_are_not_skipped_as_special(tok):
  # Qwen3 marks the tool/think tags "special": false, so skip_special_tokens keeps them but drops <|im_end|>.
  ids = tok.encode("<think>Hello</think>") + [tk.EOS_ID]
  assert ids == [tk.THINK_ID, 9707, tk.END_THINK_ID, tk.EOS_ID]
  assert tok.decode(ids, skip_special_tokens=True) == "<think>Hello</think>"
  assert set(tok.all_special_ids) == {i for i, _, special in tk.QWEN3_ADDED_TOKENS if special}


# ---------------------------------------------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------------------------------------------

# sgl-project/SpecForge tests/test_data/test_references/qwen3-instruct_ref.json (commit 728bfc7): input_ids from
# Qwen/Qwen3-0.6B's tokenizer and chat template (enable_thinking=False, no generation prompt) for the messages of
# tests/test_data/test_parsers.py `standard_messages`. Qwen3's template gives an empty think block only to the
# assistant turn after the last user query.
SPECFORGE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "My name is Qwen2."},
    {"role": "user", "content": "How old are you?"},
    {"role": "assistant", "content": "11 years old."},
]
SPECFORGE_IDS = [
    151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198,  # system
    151644, 872, 198, 15191, 525, 498, 30, 151645, 198,  # user
    151644, 77091, 198, 5050, 829, 374, 1207, 16948, 17, 13, 151645, 198,  # assistant, before the last query
    151644, 872, 198, 4340, 2310, 525, 498, 30, 151645, 198,  # user
    151644, 77091, 198, 151667, 271, 151668, 271, 16, 16, 1635, 2310, 13, 151645, 198,  # last assistant
]
# The generation prompt with thinking off, as ids (the last assistant header above, without its content).
NO_THINK_PROMPT_IDS = [151644, 77091, 198, 151667, 271, 151668, 271]


def test_template_is_qwen3s(tok):
  assert tok.chat_template == tk.QWEN3_CHAT_TEMPLATE


def test_chat_system_user_thinking_off(tok):
  messages = SPECFORGE_MESSAGES[:2]
  # Qwen3 chat format (ChatML turns; enable_thinking=False appends an empty think block after the assistant header,
  # the `enable_thinking is false` branch at the end of Qwen3's template).
  expected = (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\nWho are you?<|im_end|>\n"
      "<|im_start|>assistant\n<think>\n\n</think>\n\n"
  )
  assert tk.render_chat(tok, messages) == expected
  assert tk.encode_chat(tok, messages) == SPECFORGE_IDS[:20] + NO_THINK_PROMPT_IDS


def test_chat_single_user(tok):
  messages = [{"role": "user", "content": "What is 2+2?"}]
  # No system turn is injected (unlike Qwen2.5's template, Qwen3's adds no default system prompt).
  expected = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
  assert tk.render_chat(tok, messages) == expected
  assert tk.render_chat(tok, messages, add_generation_prompt=False) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
  ids = tk.encode_chat(tok, messages)
  assert ids[:3] == [tk.IM_START_ID, 872, 198] and ids[-7:] == NO_THINK_PROMPT_IDS
  # The flag is what adds the empty think block: thinking on ends at the assistant header.
  thinking_on = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
  assert thinking_on == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_multi_turn_matches_real_qwen3_ids(tok):
  assert tk.encode_chat(tok, SPECFORGE_MESSAGES, add_generation_prompt=False) == SPECFORGE_IDS


def test_chat_science_prompt_round_trips(tok):
  # Shape of the spec's science prompts: a system message that begins with a newline, kept verbatim.
  messages = [
      {"role": "system", "content": "\nAnswer with the letter inside <answer></answer>."},
      {"role": "user", "content": "Which gas is noble?\nA. N2\nB. Ar\nC. O2\nD. H2"},
  ]
  text = tk.render_chat(tok, messages)
  assert text.startswith("<|im_start|>system\n\nAnswer with")
  ids = tk.encode_chat(tok, messages)
  assert tok.decode(ids) == text


@pytest.mark.parametrize("text", CROSS_CHECK_STRINGS + ["", " ", "\n", "<|im_start|>user\nhi<|im_end|>"])
def test_decode_encode_round_trip(tok, text):
  assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------------------------------------------------------
# Loading, caching, bad input
# ---------------------------------------------------------------------------------------------------------------


def test_missing_directory_names_path(tmp_path):
  missing = tmp_path / "no_such_checkpoint"
  with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
    tk.load_tokenizer(missing)


def test_directory_without_tokenizer_files_names_path(tmp_path):
  empty = tmp_path / "empty_ckpt"
  empty.mkdir()
  (empty / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="empty_ckpt"):
    tk.load_tokenizer(empty)


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], r"messages\[1\]\['role'\]"),
        ([{"role": "user", "content": None}], r"messages\[0\]\['content'\]"),
    ],
)
def test_bad_messages_name_the_field(tok, messages, match):
  with pytest.raises(ValueError, match=match):
    tk.render_chat(tok, messages)


def test_save_and_reload_from_path(tok, tmp_path):
  # What a checkpoint export does (tokenizer.save_pretrained), then loading it back by path.
  tok.save_pretrained(tmp_path)
  reloaded = tk.load_tokenizer(tmp_path)
  assert reloaded.chat_template == tk.QWEN3_CHAT_TEMPLATE
  assert tk.encode_chat(reloaded, SPECFORGE_MESSAGES, add_generation_prompt=False) == SPECFORGE_IDS
  assert reloaded.eos_token_id == tk.EOS_ID and reloaded.pad_token_id == tk.PAD_ID


def test_cache_is_reused(cache_dir, monkeypatch):
  target = cache_dir / tk.DEFAULT_DIR_NAME
  stamp = (target / "tokenizer.json").stat().st_mtime_ns

  def must_not_build(*args, **kwargs):
    raise AssertionError("the cached tokenizer was rebuilt")

  monkeypatch.setattr(tk, "write_qwen3_tokenizer", must_not_build)
  monkeypatch.setenv("SRPO_CACHE_DIR", str(cache_dir))
  assert tk.default_tokenizer_dir() == target  # Found through $SRPO_CACHE_DIR.
  assert (target / "tokenizer.json").stat().st_mtime_ns == stamp


def test_concurrent_first_use_is_safe(tmp_path, monkeypatch):
  """Two builders in flight at once: both write privately, one rename wins, the other uses the winner's copy."""
  barrier = threading.Barrier(2)

  def fake_write(out_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
      (pathlib.Path(out_dir) / name).write_text(threading.current_thread().name)
    barrier.wait(timeout=10)  # Both copies are complete before either is renamed into place.

  monkeypatch.setattr(tk, "write_qwen3_tokenizer", fake_write)
  results, errors = [], []

  def worker():
    try:
      results.append(tk.default_tokenizer_dir(tmp_path))
    except Exception as e:  # Surfaced by the assert below.
      errors.append(e)

  threads = [threading.Thread(target=worker, name=f"builder{i}") for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=20)
  assert not errors
  target = tmp_path / tk.DEFAULT_DIR_NAME
  assert results == [target, target]
  winner = (target / "tokenizer.json").read_text()
  assert winner in ("builder0", "builder1") and (target / "tokenizer_config.json").read_text() == winner
  assert sorted(p.name for p in tmp_path.iterdir()) == [tk.DEFAULT_DIR_NAME]  # No temp dir left behind.
