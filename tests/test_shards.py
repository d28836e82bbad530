"""Instruction formats, `distillzoo prepare` shards (int32, atomic) and SFT batches."""

import os

import pytest
import torch

import distillzoo as dz
from helpers import write_jsonl
from distillzoo.cli import main
from distillzoo.data.records import IGNORE_INDEX, data_format
from distillzoo.data.shards import TokenShards, collate_sft, prepare_shards

IM_START, IM_END = 151644, 151645
CHAT = {"messages": [{"role": "user", "content": "把“你好世界”倒过来写。"}, {"role": "assistant", "content": "界世好你"}]}


def test_chinese_sample_round_trips_with_ids_above_65535(tmp_path, tok):
    source = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    assert main(["prepare", str(source), "--format", "chat", "--out", str(tmp_path / "shards")]) == 0
    shards = TokenShards(tmp_path / "shards")
    assert shards.meta["dtype"] == "int32" and shards.meta["examples"] == 1
    ex = shards[0]
    ids = ex["input_ids"].tolist()
    assert ex["input_ids"].dtype == torch.int32 and max(ids) == IM_END
    assert sum(i > 65_535 for i in ids) >= 8  # the control tokens and Chinese pieces above 16 bits
    assert ids == tok.encode_conversation(CHAT["messages"])[0]
    assert tok.decode(ids) == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                               "<|im_end|>\n<|im_start|>user\n把“你好世界”倒过来写。<|im_end|>\n<|im_start|>assistant\n"
                               "界世好你<|im_end|>\n")
    batch = collate_sft([ex, ex], tok.pad_id)
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != IGNORE_INDEX].tolist()) == "界世好你<|im_end|>"
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"][0].tolist() == ids


def test_dolly_and_alpaca_become_one_user_and_one_assistant_turn(tmp_path, tok):
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": "Add them.", "context": "2 and 3", "response": "5"}])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add them.", "input": "2 and 3", "output": "5"},
                                                      {"instruction": "Say hi.", "input": "", "output": "hi"}])
    a = prepare_shards(dolly, tmp_path / "a", format="dolly", tokenizer=tok, system=None)
    b = prepare_shards(alpaca, tmp_path / "b", format="alpaca", tokenizer=tok, system=None)
    expected = "<|im_start|>user\nAdd them.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    assert tok.decode(a[0]["input_ids"].tolist()) == expected == tok.decode(b[0]["input_ids"].tolist())
    assert tok.decode(b[1]["input_ids"].tolist()) == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"
    assert a[0]["loss_mask"].sum() == 2  # "5" and <|im_end|>


def test_uint16_is_refused_for_qwen_s_vocab(tmp_path, tok):
    source = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    with pytest.raises(dz.DataError, match=r"uint16 cannot store this vocab \(151,851 ids; Qwen's exceed 65,535"):
        prepare_shards(source, tmp_path / "s", format="chat", tokenizer=tok, dtype="uint16")
    assert not (tmp_path / "s").exists()


def test_uint16_works_for_a_small_vocab(tmp_path):
    from test_preference_data import make_hf_tokenizer

    small = dz.load_tokenizer(make_hf_tokenizer(tmp_path / "tok"))
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hello"},
                                                                 {"role": "assistant", "content": "world"}]}])
    shards = prepare_shards(source, tmp_path / "s", format="chat", tokenizer=small, dtype="uint16", system=None)
    assert os.path.getsize(tmp_path / "s" / "tokens.bin") == 2 * shards.meta["tokens"]
    assert shards[0]["input_ids"].tolist() == small.encode_conversation(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}], None)[0]


@pytest.mark.parametrize("bad, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', r"chat.jsonl:3: not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"chat.jsonl:3: field 'messages' has no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     r"chat.jsonl:3: messages\[1\] is an empty assistant turn"),
    ({"text": "hi"}, r"chat.jsonl:3: missing field 'messages'"),
])
def test_malformed_line_names_file_and_line_and_writes_nothing(tmp_path, tok, bad, message):
    source = write_jsonl(tmp_path / "chat.jsonl", [CHAT, CHAT, bad])
    with pytest.raises(dz.DataError, match=message):
        prepare_shards(source, tmp_path / "out", format="chat", tokenizer=tok)
    assert sorted(os.listdir(tmp_path)) == ["chat.jsonl"]


@pytest.mark.parametrize("fmt, record, message", [
    ("dolly", {"instruction": "x", "context": "y"}, r"missing field 'response'"),
    ("alpaca", {"instruction": "", "output": "y"}, r"field 'instruction' is empty"),
    ("dolly", {"instruction": "x", "response": 5}, r"field 'response' must be a string, got int"),
])
def test_instruction_format_errors(tmp_path, tok, fmt, record, message):
    source = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(dz.DataError, match=rf"d.jsonl:1: {message}"):
        prepare_shards(source, tmp_path / "out", format=fmt, tokenizer=tok)


def test_existing_output_is_kept_unless_overwritten(tmp_path, tok):
    source = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    prepare_shards(source, tmp_path / "s", format="chat", tokenizer=tok)
    with pytest.raises(dz.DataError, match=r"already exists; remove it or pass overwrite=True"):
        prepare_shards(source, tmp_path / "s", format="chat", tokenizer=tok)
    write_jsonl(source, [CHAT, CHAT])
    assert len(prepare_shards(source, tmp_path / "s", format="chat", tokenizer=tok, overwrite=True)) == 2
    assert sorted(os.listdir(tmp_path)) == ["chat.jsonl", "s"]


def test_examples_without_a_response_token_are_skipped_and_listed(tmp_path, tok):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}
    source = write_jsonl(tmp_path / "chat.jsonl", [CHAT, long_prompt])
    with pytest.warns(UserWarning, match=r"1 record\(s\) had no response token within max_length=60"):
        shards = prepare_shards(source, tmp_path / "s", format="chat", tokenizer=tok, max_length=60)
    assert len(shards) == 1 and shards.meta["skipped"] == [f"{source}:2"]
    assert len(shards[0]["input_ids"]) <= 60


def test_prepared_examples_carry_their_sample_ids(tmp_path, tok):
    """ids.json keys a teacher cache: the record's id, or a hash of its content that a rerun reproduces."""
    source = write_jsonl(tmp_path / "chat.jsonl", [{"id": 7, **CHAT}, CHAT])
    shards = prepare_shards(source, tmp_path / "a", format="chat", tokenizer=tok)
    again = prepare_shards(source, tmp_path / "b", format="chat", tokenizer=tok)
    assert shards[0]["id"] == "7"
    assert len(shards[1]["id"]) == 16 and shards[1]["id"] == again[1]["id"]
    assert shards[1]["id"] == data_format("chat")(CHAT)["id"]
    os.remove(tmp_path / "a" / "ids.json")  # a shard directory without ids.json reads, without ids
    assert "id" not in TokenShards(tmp_path / "a")[0]
