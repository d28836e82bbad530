"""What the model stages of a curation ask of a model: answers to chat prompts, and the log-probability of given
continuations of a prompt; from a model in process or from a server (``server: URL`` in its config section), the
same calls either way.

Answers are sampled per record id (:func:`distillzoo.models.generation.decode`, or one seeded request per prompt
to a server), so a record's answer depends on neither its shard nor the records around it, and a killed run
rerun writes the same rows.
"""

from __future__ import annotations

from typing import Sequence

import torch

from distillzoo.errors import ConfigError

ROLES = ("teacher", "student", "reference")


def require_role(cfg, role: str, where: str) -> None:
    """A ConfigError unless ``role`` is a model section the config fills: a path, a tiny model or a server."""
    if role not in ROLES:
        raise ConfigError(f"{where}: model: {role!r} is not one of {list(ROLES)} (the config section whose model "
                          "the stage uses)")
    section = None if cfg is None else cfg[role]
    if section is None or (section.server is None and section.path is None and section.tiny is None):
        raise ConfigError(f"{where}: reads the config's {role!r} model, and the config gives none ({role}.path, "
                          f"{role}.tiny or {role}.server)")


def load_role(cfg, role: str, tokenizer, where: str):
    """The model of the config's ``role`` section, on this process's device, or the client of its server."""
    from distillzoo.models.causal_lm import check_vocab, place_model
    from distillzoo.teacher.launch import Launch
    from distillzoo.teacher.served import served_client, served_roles

    require_role(cfg, role, where)
    section = cfg[role]
    if served_roles(cfg, (role,), where):
        return served_client(section, role, tokenizer, where)
    check_vocab(cfg, role, tokenizer.vocab_size, where)
    return place_model(section, role, Launch.from_env())


def generate(model, tokenizer, prompts: Sequence[list[dict]], ids: Sequence[str], sampling, *,
             system: str | None = None, batch_size: int = 8) -> list[str]:
    """The model's answer to each chat prompt (a list of messages), sampled per id."""
    from distillzoo.models.generation import decode

    tokens = [tokenizer.encode_prompt(messages, system) for messages in prompts]
    if isinstance(model, torch.nn.Module):
        answers = decode(model, tokenizer, tokens, sampling, ids=list(ids), batch_size=batch_size)
    else:  # a served model
        answers = model.generate(tokens, sampling, list(ids), [tokenizer.im_end_id])
    return [tokenizer.decode(answer).strip() for answer, _ in answers]


def continuation_logprobs(model, prompt: Sequence[int], continuations: Sequence[Sequence[int]], sample_id: str
                          ) -> list[float]:
    """``log p(c | prompt)`` for each continuation ``c`` (token ids): the sum of its tokens' log-probs, each
    given the prompt and the continuation's tokens before it."""
    sequences = [list(prompt) + list(c) for c in continuations]
    start = len(prompt)
    if not isinstance(model, torch.nn.Module):  # a served model: each sequence's own tokens' log-probs
        rows = model.token_logprobs(sequences, [f"{sample_id}/{k}" for k in range(len(sequences))],
                                    [start] * len(sequences))
        return [float(r[start - 1:].double().sum()) for r in rows]
    from distillzoo.models.causal_lm import final_hidden, lm_head_weight

    weight = lm_head_weight(model)
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for k, s in enumerate(sequences):  # right-padded: every sequence's positions are as they would be alone
        ids[k, :len(s)] = torch.tensor(s)
        mask[k, :len(s)] = 1
    longest = max(map(len, continuations))
    with torch.no_grad():  # the head over the continuations' positions alone: [labels, longest, V], not [.., T, V]
        hidden = final_hidden(model, ids.to(weight.device), mask.to(weight.device))[:, start - 1:start - 1 + longest]
        logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    out = []
    for k, c in enumerate(continuations):
        targets = torch.tensor(list(c), device=weight.device)
        out.append(float(logp[k, :len(c)].gather(-1, targets[:, None]).double().sum()))
    return out
