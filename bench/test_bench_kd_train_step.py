"""One logit-distillation training step (forward KL): ``distillzoo train`` against TRL's GKDTrainer and a plain loop.

A step: the student's forward and backward, the frozen teacher's forward, forward
KL(teacher || student) over the reply tokens (mean over scored tokens), gradient
clipping at 1.0 and a fused AdamW update. Student and teacher are Qwen2-architecture
models with the real vocab (151,936, tied embeddings as in Qwen2.5-0.5B/1.5B),
built from configs; the batch is ``B`` rows of ``T`` token ids, the first quarter
of each row a prompt (not scored).

* ``distillzoo-train-step``: the ``distill`` algorithm's micro-batch and loss inside
  :class:`distillzoo.training.algorithm.Models`, as ``distillzoo train``'s loop calls them
  (decoder hidden states and the fused ``from_hidden`` head: no ``[B, T, V]``
  logits), then the loop's normalisation, clipping and optimiser step.
* ``trl-gkd``: TRL's ``GKDTrainer`` (``trl.experimental.gkd``; 1.16 measured) with ``lmbda=0`` (off-policy, no
  generation), ``beta=0`` (forward KL), ``temperature=1``: its ``training_step``
  (both models' logits, ``generalized_jsd_loss``, backward through accelerate), then
  the same clipping and optimiser step its ``train`` loop applies.
* ``hf-loop``: a hand-written loop over the models' materialised logits: fp32
  log-softmax of both, forward KL, masked mean.

Every provider starts from the same weights and trains on the same batches. After
the timed rounds each runs ``CURVE_STEPS`` fresh steps from the initial weights and
the losses are checked against the plain loop's (fp32: relative 1e-4), so the three
train the same model. Peak memory is measured above the models, optimiser state and
batch, over one step after a warm-up step (Adam's moments exist by then). extra_info
holds s/step, tokens/s, the peak and the loss curve.
"""

import copy
import importlib.util

import pytest
import torch

import distillzoo as dz
from common import CUDA, DEVICE, PeakMemory, device_name, sync
from distillzoo.training.algorithm import Models, Run
from distillzoo.models.causal_lm import tiny_qwen2
from distillzoo.data.records import IGNORE_INDEX
from distillzoo.data.shards import collate_sft
from distillzoo.training.spec import build_algorithm

# (rows, tokens per row, student hidden, teacher hidden, layers)
SHAPES = ([(8, 1024, 896, 1536, 4), (8, 2048, 896, 1536, 4)] if CUDA
          else [(4, 128, 64, 128, 2), (4, 256, 128, 256, 2)])
TRL = importlib.util.find_spec("trl") is not None
PROVIDERS = ["distillzoo-train-step", "hf-loop"] + (["trl-gkd"] if TRL else [])
CURVE_STEPS = 3
LR = 1e-3  # large enough that the curves move over CURVE_STEPS


def make_models(shape):
    rows, width, hs, ht, layers = shape
    student = tiny_qwen2(hidden_size=hs, num_layers=layers, num_heads=max(hs // 64, 4), num_kv_heads=2,
                         tie_word_embeddings=True, seed=1).to(DEVICE).train()
    teacher = tiny_qwen2(hidden_size=ht, num_layers=layers, num_heads=max(ht // 64, 4), num_kv_heads=2,
                         tie_word_embeddings=True, seed=2).to(DEVICE).eval().requires_grad_(False)
    return student, teacher


def make_examples(shape, step, vocab):
    """The instruction examples of step ``step``: ``rows`` rows of ``width`` ids, a quarter of each a prompt."""
    rows, width = shape[:2]
    g = torch.Generator().manual_seed(1000 + step)
    examples = []
    for i in range(rows):
        ids = torch.randint(0, vocab, (width,), generator=g, dtype=torch.int32)
        mask = torch.arange(width) >= width // 4
        examples.append({"input_ids": ids, "loss_mask": mask, "id": f"s{step}-{i}"})
    return examples


def scored_tokens(examples):
    return sum(int(ex["loss_mask"][1:].sum()) for ex in examples)


def forward_kl(student_logits, teacher_logits, labels):
    """Mean over scored tokens of KL(teacher || student), logits ``[B, T, V]`` scoring ``labels[:, 1:]``."""
    mask = labels[:, 1:] != IGNORE_INDEX
    log_q = torch.log_softmax(student_logits[:, :-1].float(), -1)[mask]
    log_p = torch.log_softmax(teacher_logits[:, :-1].float(), -1)[mask]
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class DistillzooStep:
    def __init__(self, student, teacher, shape):
        cfg = dz.load_config({"objective": {"name": "fkl"}, "student": {"tiny": {}}, "teacher": {"tiny": {}},
                              "data": {"streams": []}})
        self.algorithm, _ = build_algorithm(cfg)
        self.algorithm.check(cfg, "bench")
        tok = dz.load_tokenizer()
        self.run = Run(cfg, "bench", tok, torch.device(DEVICE), 0, 1, [], student)
        self.models = Models(student, teacher, None, self.algorithm, CUDA)
        self.rows = shape[0]

    def loss(self, examples):
        [batch] = self.algorithm.micro_batches(self.run, examples, 0, self.rows)
        return self.models(batch).value / batch.count


class HFLoop:
    def __init__(self, student, teacher, shape):
        self.student, self.teacher = student, teacher

    def loss(self, examples):
        batch = {k: v.to(DEVICE) for k, v in collate_sft(examples, 0).items()}
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
            student_logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=batch["input_ids"],
                                              attention_mask=batch["attention_mask"]).logits
        return forward_kl(student_logits, teacher_logits, batch["labels"])


def word_tokenizer():
    """A stand-in transformers tokenizer for the trainer's constructor (the batches arrive as ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1},
                                                                                 unk_token="<unk>")),
                                   unk_token="<unk>", pad_token="<pad>")
    return fast


class TRLGKD:
    """GKDTrainer's own training_step; the batch is the collated ids (its ChatML collator is not timed)."""

    def __init__(self, student, teacher, shape, tmp):
        import datasets
        try:
            from trl.experimental.gkd import GKDConfig, GKDTrainer
        except ImportError:  # trl before GKD moved to experimental
            from trl import GKDConfig, GKDTrainer

        args = GKDConfig(output_dir=str(tmp), lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
                         per_device_train_batch_size=shape[0], max_length=shape[1], report_to=[],
                         bf16=CUDA, use_cpu=not CUDA, disable_dropout=True, learning_rate=LR, save_strategy="no",
                         logging_strategy="no")
        dummy = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "x"}]]})
        self.trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dummy,
                                  processing_class=word_tokenizer(), data_collator=lambda rows: rows)
        self.trainer.current_gradient_accumulation_steps = 1  # what its train() loop sets for one micro-batch
        self.student = self.trainer.model

    def step_loss(self, examples):
        batch = {k: v.to(DEVICE) for k, v in collate_sft(examples, 0).items()}
        return self.trainer.training_step(self.trainer.model, batch)  # forward, loss and backward


def build(provider, shape, tmp):
    student, teacher = make_models(shape)
    if provider == "distillzoo-train-step":
        runner = DistillzooStep(student, teacher, shape)
    elif provider == "hf-loop":
        runner = HFLoop(student, teacher, shape)
    else:
        runner = TRLGKD(student, teacher, shape, tmp)
        student = runner.student
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, fused=True)

    def step(examples):
        if isinstance(runner, TRLGKD):
            loss = runner.step_loss(examples)
        else:
            loss = runner.loss(examples)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return float(loss.detach())

    return student, step


_reference_curves = {}


def loss_curve(provider, shape, tmp):
    student, step = build(provider, shape, tmp)
    vocab = student.config.vocab_size
    return [step(make_examples(shape, i, vocab)) for i in range(CURVE_STEPS)]


# provider innermost: a shape's providers run one after the other, so their ratios are side by side
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-T{s[1]}-Hs{s[2]}-Ht{s[3]}-L{s[4]}-V151936")
def test_kd_train_step(benchmark, provider, shape, tmp_path):
    student, step = build(provider, shape, tmp_path / "timed")
    examples = make_examples(shape, 0, student.config.vocab_size)
    step(examples)  # warm-up: Adam's moments exist from here on
    memory = PeakMemory()
    memory.start()
    step(examples)
    peak = memory.peak_mib()
    benchmark.pedantic(lambda: step(examples), rounds=5, iterations=1)
    del student, step

    curve = loss_curve(provider, shape, tmp_path / "curve")
    key = tuple(shape)
    if key not in _reference_curves:
        _reference_curves[key] = curve if provider == "hf-loop" else loss_curve("hf-loop", shape, tmp_path / "ref")
    reference = _reference_curves[key]
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update({
        "device": device_name(),
        "dtype": "bf16 autocast" if CUDA else "fp32",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "scored_tokens": scored_tokens(examples),
        "tokens_per_s": round(shape[0] * shape[1] / mean, 1),
        "logits_mib_fp32": round(shape[0] * shape[1] * 151_936 * 4 / 2**20, 1),
        "peak_extra_mib": round(peak, 1),
        "loss_curve": [round(x, 6) for x in curve],
        "hf_loop_curve": [round(x, 6) for x in reference],
    })
    tolerance = 2e-2 if CUDA else 1e-4  # bf16 autocast on CUDA
    for got, want in zip(curve, reference):
        assert abs(got - want) <= tolerance * abs(want), (provider, curve, reference)
