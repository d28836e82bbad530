"""Built-in data formats: the readers that turn one decoded JSONL record into fields.

A reader takes the record (a dict) and returns the fields the data pipeline
tokenizes, or raises :class:`distillzoo.DataError` saying which field is wrong;
the pipeline adds ``file:line``.

Instruction formats return ``{"id", "messages"}``, a conversation whose
assistant turns carry the loss:

* ``dolly``: ``instruction``, optional ``context``, ``response`` (databricks-dolly-15k);
* ``alpaca``: ``instruction``, optional ``input``, ``output`` (Stanford Alpaca);
* ``chat``: ``messages``, a list of ``{"role", "content"}`` with at least one
  non-empty assistant turn (an optional system message first).

``preference``: ``{"prompt", "chosen", "rejected"}``. Each is a string or a
list of chat messages ``{"role", "content"}`` (TRL's conversational format);
the prompt may be left out when chosen and rejected are whole conversations
that share every message but the last. Optional: ``id`` (the key of a reference
cache; default a hash of the content) and precomputed ``reference_chosen_logps`` /
``reference_rejected_logps``. Fields out: ``id``, ``prompt`` (messages),
``chosen`` and ``rejected`` (the assistant replies' text), the two reference values.
"""

from __future__ import annotations

import hashlib
import json
import math

from distillzoo.errors import DataError
from distillzoo.hooks.hookspecs import hookimpl
from distillzoo.data.tokenizer import ROLES

REFERENCE_FIELDS = ("reference_chosen_logps", "reference_rejected_logps")


def _messages(value, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user" if field == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"field {field!r} must be a string or a non-empty list of chat messages, got "
                        f"{type(value).__name__} {json.dumps(value)[:60]}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or message.get("role") not in ROLES:
            raise DataError(f"{field}[{i}] must be a message {{\"role\": one of {list(ROLES)}, \"content\": a string}}, "
                            f"got {json.dumps(message)[:80]}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _reply(messages: list[dict], field: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(f"field {field!r} must be one assistant reply (a string or one assistant message) after the "
                        f"prompt, got roles {[m['role'] for m in messages]}")
    text = messages[0]["content"]
    if not text.strip():
        raise DataError(f"field {field!r} is an empty response; a preference pair needs two non-empty replies")
    return text


def _record_id(record: dict, content) -> str:
    """The record's ``id`` as a string, or a hash of its content (stable across file order)."""
    if record.get("id") is not None:  # a table's missing value is None: no id, as in JSONL without the field
        if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
            raise DataError(f"field 'id' must be a string or an integer, got {record['id']!r}")
        return str(record["id"])
    return hashlib.sha1(json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def read_preference(record: dict) -> dict:
    missing = [f for f in ("chosen", "rejected") if f not in record]
    if missing:
        raise DataError(f"missing field(s) {missing}; a preference record needs 'chosen' and 'rejected' (and 'prompt')")
    chosen, rejected = _messages(record["chosen"], "chosen"), _messages(record["rejected"], "rejected")
    if "prompt" in record:
        prompt = _messages(record["prompt"], "prompt")
    elif isinstance(record["chosen"], list) and len(chosen) > 1:
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        if _messages(record["rejected"], "rejected")[:-1] != prompt:
            raise DataError("no 'prompt' field, and chosen and rejected differ before their last message, so the "
                            "prompt cannot be taken from them")
    else:
        raise DataError("missing field 'prompt' (it may be left out only when chosen and rejected are conversations "
                        "that share all messages but the last)")
    if prompt[-1]["role"] == "assistant":
        raise DataError("the prompt ends with an assistant message; it must end with the turn the replies answer")
    fields = {"prompt": prompt, "chosen": _reply(chosen, "chosen"), "rejected": _reply(rejected, "rejected")}
    for name in REFERENCE_FIELDS:
        value = record.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise DataError(f"field {name!r} must be a finite number (a summed log-prob), got {value!r}")
        fields[name] = None if value is None else float(value)
    if (fields[REFERENCE_FIELDS[0]] is None) != (fields[REFERENCE_FIELDS[1]] is None):
        raise DataError(f"give both {list(REFERENCE_FIELDS)} or neither")
    fields["id"] = _record_id(record, [fields["prompt"], fields["chosen"], fields["rejected"]])
    return fields


def _text(record: dict, field: str, required: bool = True) -> str:
    value = record.get(field)
    if value is None and not required:
        return ""
    if field not in record:
        raise DataError(f"missing field {field!r}")
    if not isinstance(value, str):
        raise DataError(f"field {field!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"field {field!r} is empty")
    return value


def _with_id(record: dict, messages: list[dict]) -> dict:
    return {"id": _record_id(record, messages), "messages": messages}


def _instruction(record: dict, instruction: str, extra: str, answer: str) -> dict:
    prompt = _text(record, instruction)
    more = _text(record, extra, required=False)
    if more.strip():
        prompt = f"{prompt}\n\n{more}"
    return _with_id(record, [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": _text(record, answer)}])


def read_dolly(record: dict) -> dict:
    return _instruction(record, "instruction", "context", "response")


def read_alpaca(record: dict) -> dict:
    return _instruction(record, "instruction", "input", "output")


def read_chat(record: dict) -> dict:
    if "messages" not in record:
        raise DataError("missing field 'messages' (a list of {\"role\", \"content\"})")
    messages = _messages(record["messages"], "messages")
    replies = [m for m in messages if m["role"] == "assistant"]
    if not replies:
        raise DataError("field 'messages' has no assistant turn, so there is nothing to take the loss on")
    empty = [i for i, m in enumerate(messages) if m["role"] == "assistant" and not m["content"].strip()]
    if empty:
        raise DataError(f"messages[{empty[0]}] is an empty assistant turn")
    if any(m["role"] == "system" for m in messages[1:]):
        raise DataError("a system message may only come first in 'messages'")
    return _with_id(record, messages)


@hookimpl
def register_data_formats(register):
    register("dolly", read_dolly, records="instruction", summary="instruction, optional context, response (databricks-dolly-15k)")
    register("alpaca", read_alpaca, records="instruction", summary="instruction, optional input, output (Stanford Alpaca)")
    register("chat", read_chat, records="instruction", summary="messages: [{role, content}, ...]; the loss on assistant turns")
    register("preference", read_preference, records="preference",
             summary="prompt/chosen/rejected as strings or chat messages (TRL's formats); optional id and reference log-probs")
