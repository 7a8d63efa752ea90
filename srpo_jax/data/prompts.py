"""Chat messages for a row and the rendered, tokenized prompts (spec "Prompts").

Science: the row's `system` field verbatim as the system message (it begins with a newline; kept), then the row's
`prompt` as the user message. Tool use: no system message (as SDPO), or, as an option, the SRPO tool-use system prompt.
Rendering uses Qwen3's chat template with thinking off (`srpo_jax.tokenizer.render_chat`), which ends the prompt with
`<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`. Prompts longer than the limit are dropped and counted, never cut.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from srpo_jax.data.benchmarks import Row

TOOLUSE_SYSTEM_PROMPT = (
    "You are a tool-use assistant. Solve each request by reasoning about the task and calling the provided tools when "
    "needed.\nUse only the tools provided in the user message.\nFollow the required response format exactly.")

Messages = list[dict[str, str]]


def build_messages(row: Row, tooluse_system_prompt: bool = False) -> Messages:
  """[system?, user] chat messages for one row.

  tooluse_system_prompt: for tool-use rows, prepend the SRPO tool-use system prompt (default False: no system
  message, as SDPO). Science rows always use their own `system` field, verbatim.
  """
  messages: Messages = []
  if row.kind == "tooluse":
    if tooluse_system_prompt:
      messages.append({"role": "system", "content": TOOLUSE_SYSTEM_PROMPT})
  elif row.system is not None:
    messages.append({"role": "system", "content": row.system})
  messages.append({"role": "user", "content": row.prompt})
  return messages


def encode_text(tokenizer: Any, text: str) -> list[int]:
  """Token ids of an already-rendered string: no BOS/EOS added (the chat template has its own special tokens)."""
  return list(tokenizer.encode(text, add_special_tokens=False))


def render_messages(tokenizer: Any, messages: Messages) -> str:
  """The chat-template string with thinking off and the generation prompt added."""
  from srpo_jax.tokenizer import render_chat  # Imported late: the data package must import without a tokenizer.
  return render_chat(tokenizer, messages, add_generation_prompt=True)


@dataclasses.dataclass(frozen=True)
class RenderedPrompts:
  """Prompts kept after the length filter.

  ids: per kept row, its [T_i] prompt token ids. rows: the kept rows, aligned with `ids`.
  dropped: how many rows were longer than the limit; dropped_idx: their `idx` values.
  """
  ids: list[list[int]]
  rows: list[Row]
  dropped: int
  dropped_idx: tuple[int, ...] = ()


def render_prompts(rows: Sequence[Row], tokenizer: Any, max_prompt_tokens: int = 2048,
                   tooluse_system_prompt: bool = False) -> RenderedPrompts:
  """Renders and tokenizes every row; drops (never truncates) rows with more than `max_prompt_tokens` tokens."""
  if max_prompt_tokens <= 0:
    raise ValueError(f"max_prompt_tokens must be > 0, got {max_prompt_tokens}")
  ids, kept, dropped = [], [], []
  for row in rows:
    text = render_messages(tokenizer, build_messages(row, tooluse_system_prompt=tooluse_system_prompt))
    row_ids = encode_text(tokenizer, text)
    if len(row_ids) > max_prompt_tokens:
      dropped.append(row.idx)
      continue
    ids.append(row_ids)
    kept.append(row)
  return RenderedPrompts(ids=ids, rows=kept, dropped=len(dropped), dropped_idx=tuple(dropped))
