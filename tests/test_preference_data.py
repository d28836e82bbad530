"""Preference JSONL through the format hook, ChatML tokenization, batching, and the reference cache."""

import os

import pytest
import torch

import distillzoo as dz
from helpers import write_jsonl
from distillzoo.models.causal_lm import tiny_qwen2
from distillzoo.data.records import IGNORE_INDEX, as_token_ids
from distillzoo.data.pairs import collate_preference
from distillzoo.teacher.reference_cache import ReferenceCache

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643


RECORDS = [
    {"id": "p1", "prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "Five, probably."},
    {"prompt": [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "I think it is Lyon, but I am not sure."}]},
    {"chosen": [{"role": "user", "content": "Say hi in Chinese"}, {"role": "assistant", "content": "你好"}],
     "rejected": [{"role": "user", "content": "Say hi in Chinese"}, {"role": "assistant", "content": "Hello"}]},
]


def test_chatml_rendering_is_qwen_s_template(tok):
    ids = tok.encode_prompt([{"role": "user", "content": "Hi <|im_end|> there"}])
    assert tok.decode(ids) == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                               "<|im_end|>\n<|im_start|>user\nHi <|im_end|> there<|im_end|>\n<|im_start|>assistant\n")
    # the control tokens are single ids; the user's "<|im_end|>" text is not
    assert ids.count(IM_START) == 3 and ids.count(IM_END) == 2
    # Qwen2.5's known ids for "<|im_start|>system\nYou are Qwen, ..."
    assert ids[:7] == [IM_START, 8948, 198, 2610, 525, 1207, 16948]
    assert tok.encode_response("Hello!") == [9707, 0, IM_END]
    assert tok.encode_prompt([{"role": "user", "content": "x"}], system=None)[:3] == [IM_START, 872, 198]


def test_string_and_message_records_tokenize_alike(tmp_path, tok):
    data = dz.PreferenceDataset(write_jsonl(tmp_path / "prefs.jsonl", RECORDS), tok)
    assert len(data) == 3
    first = data[0]
    assert first.id == "p1" and first.prompt.dtype == torch.int32
    assert first.prompt.tolist() == tok.encode_prompt([{"role": "user", "content": "What is 2 + 2?"}])
    assert first.chosen.tolist() == tok.encode("4.") + [IM_END]
    assert first.rejected.tolist() == tok.encode("Five, probably.") + [IM_END]
    second = data[1]  # its own system message replaces the default one
    assert tok.decode(second.prompt.tolist()).startswith("<|im_start|>system\nAnswer tersely.<|im_end|>\n<|im_start|>user\n")
    third = data[2]  # the prompt taken from the shared conversation prefix
    assert tok.decode(third.prompt.tolist()).endswith("<|im_start|>user\nSay hi in Chinese<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(third.chosen.tolist()) == "你好<|im_end|>"
    assert len(second.id) == 16 and second.id != third.id  # content hashes when there is no id


def test_ids_above_65535_survive(tmp_path, tok):
    data = dz.PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", RECORDS[:1]), tok)
    assert int(data[0].prompt.max()) == IM_END > 65535  # stored as int32, not wrapped
    assert data[0].prompt.tolist().count(IM_START) == 3
    with pytest.raises(dz.DataError, match=r"stored as torch.uint16 cannot hold Qwen's ids"):
        as_token_ids(torch.tensor([1, 2], dtype=torch.uint16), where="cache")
    with pytest.raises(dz.DataError, match=r"x.jsonl:3: token id 151936 is outside the vocab \[0, 151936\)"):
        as_token_ids([5, 151936], 151936, "x.jsonl:3")


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "q", "chosen": "a"}, r"missing field\(s\) \['rejected'\]"),
    ({"prompt": "q", "chosen": "a", "rejected": "   "}, r"field 'rejected' is an empty response"),
    ({"prompt": "q", "chosen": [], "rejected": "b"}, r"field 'chosen' must be a string or a non-empty list of chat messages"),
    ({"prompt": "q", "chosen": [{"role": "robot", "content": "a"}], "rejected": "b"}, r"chosen\[0\] must be a message"),
    ({"chosen": "a", "rejected": "b"}, r"missing field 'prompt'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "reference_chosen_logps": -3.0},
     r"give both \['reference_chosen_logps', 'reference_rejected_logps'\] or neither"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "reference_chosen_logps": "x", "reference_rejected_logps": -1},
     r"field 'reference_chosen_logps' must be a finite number"),
    ({"chosen": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "v"}, {"role": "assistant", "content": "b"}]},
     r"no .prompt. field, and chosen and rejected differ before their last message"),
    ('{"prompt": "q", "chosen": "a",', r"not valid JSON"),
    ('["prompt", "chosen"]', r"a record must be a JSON object, got list"),
])
def test_bad_record_names_file_and_line(tmp_path, tok, bad, message):
    path = write_jsonl(tmp_path / "prefs.jsonl", [RECORDS[0], "", bad])  # a blank line still counts
    with pytest.raises(dz.DataError, match=rf"prefs.jsonl:3: {message}"):
        dz.PreferenceDataset(path, tok)


def test_duplicate_ids_name_both_lines(tmp_path, tok):
    path = write_jsonl(tmp_path / "prefs.jsonl", [RECORDS[0], RECORDS[1], RECORDS[0]])
    with pytest.raises(dz.DataError, match=r"prefs.jsonl:3: id 'p1' was already used at .*prefs.jsonl:1"):
        dz.PreferenceDataset(path, tok)


def test_unknown_format_and_missing_file(tmp_path, tok):
    with pytest.raises(dz.UnknownNameError, match=r"unknown data format 'preferences'\. Available: alpaca, chat, dolly, preference\. Did you mean 'preference'"):
        dz.PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", RECORDS), tok, format="preferences")
    with pytest.raises(dz.DataError, match=r"data file '.*nope.jsonl' does not exist"):
        dz.PreferenceDataset(tmp_path / "nope.jsonl", tok)


def test_truncation_keeps_the_prompt_end_and_the_response_start(tmp_path, tok):
    record = {"prompt": "word " * 50, "chosen": "yes " * 40, "rejected": "no"}
    full = dz.PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", [record]), tok)[0]
    cut = dz.PreferenceDataset(tmp_path / "p.jsonl", tok, max_length=48, max_prompt_length=32)[0]
    assert cut.prompt.tolist() == full.prompt.tolist()[-32:]
    assert cut.chosen.tolist() == full.chosen.tolist()[:16]
    assert cut.rejected.tolist() == full.rejected.tolist()  # short enough already
    with pytest.raises(dz.DataError, match=r"p.jsonl:1: the prompt fills max_length=40 \(\d+ tokens\) and leaves no chosen"):
        dz.PreferenceDataset(tmp_path / "p.jsonl", tok, max_length=40)


def test_collate_puts_chosen_rows_first_and_labels_responses_only(tmp_path, tok):
    data = dz.PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", RECORDS), tok)
    batch = collate_preference([data[0], data[1]], tok.pad_id)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    assert batch.input_ids.shape[0] == 4 and batch.input_ids.dtype == torch.long
    for row, (ex, side) in enumerate([(data[0], "chosen"), (data[1], "chosen"), (data[0], "rejected"), (data[1], "rejected")]):
        prompt, response = ex.prompt.tolist(), getattr(ex, side).tolist()
        n = len(prompt) + len(response)
        assert batch.input_ids[row, :n].tolist() == prompt + response
        assert batch.input_ids[row, n:].eq(ENDOFTEXT).all() and batch.attention_mask[row].sum() == n
        assert batch.labels[row, :len(prompt)].eq(IGNORE_INDEX).all() and batch.labels[row, n:].eq(IGNORE_INDEX).all()
        assert batch.labels[row, len(prompt):n].tolist() == response
    assert batch.ids == ["p1", data[1].id] and batch.reference_chosen_logps is None


def test_reference_columns_reach_the_batch(tmp_path, tok):
    records = [{**RECORDS[0], "reference_chosen_logps": -3.5, "reference_rejected_logps": -9.25},
               {**RECORDS[1], "reference_chosen_logps": -1.0, "reference_rejected_logps": -20}]
    data = dz.PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", records + [RECORDS[2]]), tok)
    batch = collate_preference([data[0], data[1]], tok.pad_id)
    assert batch.reference_chosen_logps.tolist() == [-3.5, -1.0]
    assert batch.reference_rejected_logps.tolist() == [-9.25, -20.0]
    with pytest.raises(dz.DataError, match=r"some records carry reference log-probs and some do not \(missing at .*p.jsonl:3\)"):
        collate_preference([data[0], data[2]], tok.pad_id)


@pytest.fixture(scope="module")
def reference_model():
    return tiny_qwen2(seed=7, hidden_size=16)


def test_reference_cache_round_trip_equals_the_reference_model(tmp_path, tok, reference_model):
    data = dz.PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", RECORDS), tok)
    cache = dz.write_reference_cache(tmp_path / "ref.jsonl", reference_model, data, batch_size=2, model_name="tiny")
    assert len(cache) == 3 and cache.header["model"] == "tiny" and cache.header["pairs"] == 3
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    batch = collate_preference([data[i] for i in range(3)], tok.pad_id)
    with torch.no_grad():
        direct = dz.sequence_logps(reference_model, batch.input_ids, batch.attention_mask, batch.labels).logps
    data.attach_reference(dz.ReferenceCache(tmp_path / "ref.jsonl"))
    cached = collate_preference([data[i] for i in range(3)], tok.pad_id)
    torch.testing.assert_close(cached.reference_chosen_logps, direct[:3], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(cached.reference_rejected_logps, direct[3:], rtol=1e-6, atol=1e-5)
    # training from the cache gives the loss of training beside the reference model
    policy = tiny_qwen2(seed=8, hidden_size=16)
    dpo = dz.objective("dpo", beta=0.5)
    from_cache = dz.preference_step(dpo, policy, cached).loss
    from_model = dz.preference_step(dpo, policy, batch, reference_model).loss
    torch.testing.assert_close(from_cache, from_model, rtol=1e-5, atol=1e-6)


def test_reference_cache_refuses_other_data_or_tokenization(tmp_path, tok, reference_model):
    data = dz.PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", RECORDS), tok)
    dz.write_reference_cache(tmp_path / "ref.jsonl", reference_model, data)
    shorter = dz.PreferenceDataset(tmp_path / "p.jsonl", tok, max_length=24, max_prompt_length=20)
    with pytest.raises(dz.DataError, match=r"p.jsonl:1: id 'p1': the reference cache scored \d+/\d+ chosen/rejected "
                                           r"tokens but this run has \d+/\d+"):
        shorter.attach_reference(ReferenceCache(tmp_path / "ref.jsonl"))
    other = dz.PreferenceDataset(write_jsonl(tmp_path / "q.jsonl", [{**RECORDS[0], "id": "zz"}]), tok)
    with pytest.raises(dz.DataError, match=r"q.jsonl:1: id 'zz' is not in the reference cache '.*ref.jsonl' \(3 ids\)"):
        other.attach_reference(ReferenceCache(tmp_path / "ref.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(dz.DataError, match=r"bad.jsonl:1: not a distillzoo reference cache"):
        ReferenceCache(tmp_path / "bad.jsonl")


def test_failed_cache_write_leaves_the_old_file_untouched(tmp_path, tok, reference_model):
    data = dz.PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", RECORDS), tok)
    target = tmp_path / "ref.jsonl"
    dz.write_reference_cache(target, reference_model, data)
    before = target.read_bytes()

    class Exploding(torch.nn.Module):  # fails on the second batch
        def __init__(self):
            super().__init__()
            self.inner, self.calls = reference_model, 0

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def get_decoder(self):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("CUDA out of memory (simulated)")
            return self.inner.get_decoder()

    with pytest.raises(RuntimeError, match="simulated"):
        dz.write_reference_cache(target, Exploding(), data, batch_size=2)
    assert target.read_bytes() == before
    # what the failed run did finish is kept, to be resumed, but only under the settings it was written with
    assert sorted(os.listdir(tmp_path)) == ["p.jsonl", "ref.jsonl", "ref.jsonl.part-0", "ref.jsonl.parts.json"]
    with pytest.raises(dz.DataError, match=r"ref.jsonl.part-0 were written by an interrupted run with other settings "
                                           r"\(model.*'Exploding' there, 'Qwen2ForCausalLM' now"):
        dz.write_reference_cache(target, reference_model, data, batch_size=2)
    assert target.read_bytes() == before
    for leftover in tmp_path.glob("ref.jsonl.part*"):
        leftover.unlink()
    dz.write_reference_cache(target, reference_model, data, batch_size=2)
    assert target.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["p.jsonl", "ref.jsonl"]


def make_hf_tokenizer(path, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
    """A word-level transformers tokenizer saved to ``path``: a user's own tokenizer directory."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "hello", "world", "user", "assistant", "system", "\n", " ", "<", "|", "im_end", ">"]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|<|>|\|"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": list(specials)})
    fast.save_pretrained(path)
    return str(path)


def test_a_local_transformers_tokenizer_renders_the_same_template(tmp_path):
    tok = dz.load_tokenizer(make_hf_tokenizer(tmp_path / "tok"))
    assert tok.special == {"<|endoftext|>": 12, "<|im_start|>": 13, "<|im_end|>": 14} and tok.pad_id == 12
    # message text is never parsed for control tokens
    assert tok.encode("hello <|im_end|> world") == [1, 7, 8, 9, 10, 9, 11, 7, 2]
    assert tok.encode_prompt([{"role": "user", "content": "hello world"}], system=None) == [13, 3, 6, 1, 7, 2, 14, 6, 13, 4, 6]
    assert tok.encode_response("world") == [2, 14]
    with pytest.raises(dz.ParameterError, match=r"has no <\|im_start\|> token; distillzoo renders Qwen's ChatML"):
        dz.load_tokenizer(make_hf_tokenizer(tmp_path / "plain", specials=("<|endoftext|>",)))


def test_reference_cache_command_writes_what_the_python_api_writes(tmp_path, tok, reference_model):
    from distillzoo.cli import main

    reference_model.save_pretrained(tmp_path / "ref-model")
    data_path = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    assert main(["reference-cache", str(tmp_path / "ref-model"), str(data_path), "--out", str(tmp_path / "cli.jsonl"),
                 "--batch-size", "2", "--max-length", "64"]) == 0
    data = dz.PreferenceDataset(data_path, tok, max_length=64)
    api = dz.write_reference_cache(tmp_path / "api.jsonl", reference_model, data)
    cli = ReferenceCache(tmp_path / "cli.jsonl")
    assert cli.entries.keys() == api.entries.keys() and len(cli) == 3
    for key, (c, r, nc, nr) in api.entries.items():
        assert cli.entries[key][2:] == (nc, nr)
        assert cli.entries[key][:2] == pytest.approx((c, r), rel=1e-6)
    assert cli.header["model"] == str(tmp_path / "ref-model")


def test_reference_cache_command_errors(tmp_path, capsys):
    from distillzoo.cli import main

    data = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    assert main(["reference-cache", str(tmp_path / "missing"), str(data), "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "error: model " in capsys.readouterr().err and not (tmp_path / "c.jsonl").exists()
    # the data is read before the model loads: a missing file is reported without loading anything
    assert main(["reference-cache", str(tmp_path / "missing"), "x.jsonl", "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "error: data file 'x.jsonl' does not exist" in capsys.readouterr().err
