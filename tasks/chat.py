"""Instruction rows as conversations, rendered into token ids with a loss mask (task `sft`).

A row becomes a conversation, a list of `{"role", "content"}` messages: the `messages-column`
as it is, or one user turn (the `prompt-column`, then a blank line and the `input-column`
where that is not empty) and one assistant turn (the `response-column`).

Rendering gives *segments*, `(text, trained)`: what the model reads and what it learns to
write. With the tokenizer's chat template (`tokenizer.chat_template`), assistant turn i is
the text that `apply_chat_template(messages[:i + 1])` adds to
`apply_chat_template(messages[:i], add_generation_prompt=True)`, so the loss covers exactly
what the template has the assistant write (its end-of-turn marker included). Without one,
the plain template (Alpaca's headers) is used:

    ### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}<eos>

(`### System:` for a system turn). EOS ends every assistant turn unless the template already
wrote it, so a fine-tuned model learns where to stop. Each segment is tokenized on its own
(the prompt as `generate` later sees it), so the mask is exact at token level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tasks.base import TaskConfig

Message = dict[str, str]
ASSISTANT = "assistant"
PLAIN_HEADERS = {
    "system": "### System:\n",
    "user": "### Instruction:\n",
    ASSISTANT: "### Response:\n",
}


def conversation(row: Mapping[str, Any], config: TaskConfig) -> list[Message]:
    """The messages of one dataset row."""
    if config.messages_column:
        messages = row[config.messages_column]
        if not isinstance(messages, Sequence) or isinstance(messages, str):
            raise ValueError(
                f"messages-column: {config.messages_column!r} holds {type(messages).__name__}, "
                'not a list of {"role", "content"} messages'
            )
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    prompt = str(row[config.prompt_column])
    extra = row.get(config.input_column) if config.input_column else None
    if extra is not None and str(extra).strip():
        prompt = f"{prompt}\n\n{extra}"
    return [
        {"role": "user", "content": prompt},
        {"role": ASSISTANT, "content": str(row[config.response_column])},
    ]


def has_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _plain(messages: Sequence[Message], eos: str) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    for m in messages:
        header = PLAIN_HEADERS.get(m["role"], f"### {m['role'].capitalize()}:\n")
        if m["role"] == ASSISTANT:
            segments += [(header, False), (m["content"] + eos, True)]
        else:
            segments.append((f"{header}{m['content']}\n\n", False))
    return segments


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=prompt
    )


def _templated(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]
) -> list[tuple[str, bool]]:
    """Segments from the chat template; every assistant turn is trained when the template
    renders each conversation prefix as a prefix of the next (most do), else only the last
    (templates that rewrite earlier turns, e.g. drop past reasoning)."""
    turns = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT]
    eos = tokenizer.eos_token or ""
    for trained in (turns, turns[-1:]):
        segments, done = [], ""
        for i in trained:
            prompt = _render(tokenizer, messages[:i], prompt=True)
            full = _render(tokenizer, messages[: i + 1], prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                break
            answer = full[len(prompt) :]
            if eos and not answer.rstrip().endswith(eos):
                answer += eos
            segments += [(prompt[len(done) :], False), (answer, True)]
            done = full
        else:
            return segments
    raise ValueError(
        "model-name: its chat template does not render a conversation's prompt as the start "
        "of the conversation, so the response tokens cannot be told apart"
    )


def segments(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]
) -> list[tuple[str, bool]]:
    """`(text, trained)` pieces of a conversation, up to its last assistant turn."""
    if not any(m["role"] == ASSISTANT for m in messages):
        return [(text, False) for text, _ in _plain(messages, "")]  # nothing to learn
    if has_template(tokenizer):
        return _templated(tokenizer, messages)
    return _plain(messages, tokenizer.eos_token or "")


def prompt_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> str:
    """What a model is given to write the last assistant turn (for generation)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == ASSISTANT)
    if has_template(tokenizer):
        return _render(tokenizer, messages[:last], prompt=True)
    return "".join(
        text for text, _ in _plain([*messages[:last], {"role": ASSISTANT, "content": ""}], "")
    )


def _leading_specials(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What the tokenizer puts before a text (Llama's BOS; nothing for GPT-2)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    return list(full[: full.index(bare[0])]) if bare and bare[0] in full else []


def encode_masked(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Sequence[Message]], seq_len: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(token ids, labels) per conversation, cut to `seq_len` from the right; labels are the
    ids on trained segments and -100 elsewhere. One batched tokenizer call. A plain-template
    row starts with the tokenizer's own leading special tokens (a BOS where the model uses
    one); a chat template writes its own."""
    pieces = [segments(tokenizer, c) for c in conversations]
    texts = [text for row in pieces for text, _ in row]
    flat = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    lead = [] if has_template(tokenizer) else _leading_specials(tokenizer)
    all_ids, all_labels = [], []
    for row in pieces:
        ids, labels = list(lead), [-100] * len(lead)
        for _, trained in row:
            chunk = list(next(flat))
            ids += chunk
            labels += chunk if trained else [-100] * len(chunk)
        all_ids.append(ids[:seq_len])
        all_labels.append(labels[:seq_len])
    return all_ids, all_labels
