"""Naive references, written for clarity, that the objectives are checked against."""

import torch


def fkl_reference(student_logits, teacher_logits, labels=None):
    """KL(p || q) per row from its definition, with 0 log 0 = 0."""
    p = torch.softmax(teacher_logits, dim=-1)
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    log_q = torch.log_softmax(student_logits, dim=-1)
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def rkl_reference(student_logits, teacher_logits, labels=None):
    """KL(q || p) per row from its definition."""
    return fkl_reference(teacher_logits, student_logits)


def kl_of_probs(a, b):
    """KL(a || b) per row for probability tensors, with 0 log 0 = 0."""
    return torch.where(a > 0, a * (torch.log(a) - torch.log(b)), torch.zeros_like(a)).sum(-1)


def log_space_reference(name, student_logits, teacher_logits, beta=0.5, alpha=0.1):
    """jsd/skl/srkl with the mixture taken in log space: for logits whose probabilities underflow float64."""
    log_p, log_q = torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1)

    def kl_log(log_a, log_b):
        return torch.where(log_a > -torch.inf, log_a.exp() * (log_a - log_b), 0.0).sum(-1)

    def mix(log_a, log_b, w):
        return torch.logaddexp(log_a + torch.log(torch.tensor(w, dtype=log_a.dtype)), log_b + torch.log1p(torch.tensor(-w, dtype=log_a.dtype)))
    if name == "jsd":
        log_m = mix(log_p, log_q, beta)
        return beta * kl_log(log_p, log_m) + (1 - beta) * kl_log(log_q, log_m)
    if name == "skl":
        return kl_log(log_p, mix(log_p, log_q, alpha))
    return kl_log(log_q, mix(log_q, log_p, alpha))


def jsd_reference(student_logits, teacher_logits, labels=None, beta=0.5):
    p, q = torch.softmax(teacher_logits, -1), torch.softmax(student_logits, -1)
    m = beta * p + (1 - beta) * q
    return beta * kl_of_probs(p, m) + (1 - beta) * kl_of_probs(q, m)


def skl_reference(student_logits, teacher_logits, labels=None, alpha=0.1):
    p, q = torch.softmax(teacher_logits, -1), torch.softmax(student_logits, -1)
    return kl_of_probs(p, alpha * p + (1 - alpha) * q)


def srkl_reference(student_logits, teacher_logits, labels=None, alpha=0.1):
    p, q = torch.softmax(teacher_logits, -1), torch.softmax(student_logits, -1)
    return kl_of_probs(q, (1 - alpha) * p + alpha * q)


def tvd_reference(student_logits, teacher_logits, labels=None):
    return 0.5 * (torch.softmax(teacher_logits, -1) - torch.softmax(student_logits, -1)).abs().sum(-1)


def ce_reference(student_logits, teacher_logits=None, labels=None, label_smoothing=0.0):
    """torch's own cross_entropy, an independent implementation."""
    return torch.nn.functional.cross_entropy(student_logits, labels, reduction="none", label_smoothing=label_smoothing)


def dpkd_token_reference(student_logits, teacher_logits, labels=None, beta=0.1, eps=0.0, loss_type="sigmoid"):
    """Token-level DPKD from SPEC section 3, spelled out with log-softmaxes."""
    log_q, log_p = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    rows = torch.arange(log_q.shape[0])
    chosen, rejected = log_p.argmax(-1), log_q.detach().argmax(-1)
    h = (log_q[rows, chosen] - log_q[rows, rejected]) - (log_p[rows, chosen] - log_p[rows, rejected])
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    logsigmoid = torch.nn.functional.logsigmoid
    return -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)


def abkd_reference(student_logits, teacher_logits, labels=None, alpha=0.5, beta=0.5):
    """The alpha-beta divergence of the ABKD paper per row, from probabilities."""
    p, q = torch.softmax(teacher_logits, -1), torch.softmax(student_logits, -1)
    s = alpha + beta
    return -(p ** alpha * q ** beta - alpha / s * p ** s - beta / s * q ** s).sum(-1) / (alpha * beta)


def akl_reference(student_logits, teacher_logits, labels=None, mu=0.5):
    """AKL per row: the tail the teacher's least probable entries whose cumulative mass is below mu (found by
    searchsorted on the ascending cumulative mass), the head the rest, the weights from the gaps on each side
    taken as constants."""
    p, q = torch.softmax(teacher_logits, -1), torch.softmax(student_logits, -1)
    ranked, order = p.detach().sort(-1)
    cumulative = ranked.cumsum(-1)
    first_head = torch.searchsorted(cumulative, torch.full((len(p), 1), mu, dtype=p.dtype))  # cum >= mu from here
    rank = torch.arange(p.shape[-1]).expand_as(p)
    gap = (ranked - q.detach().gather(-1, order)).abs()
    g_head = torch.where(rank >= first_head, gap, 0.0).sum(-1)
    g_tail = torch.where(rank < first_head, gap, 0.0).sum(-1)
    w = g_head / (g_head + g_tail)
    return w * fkl_reference(student_logits, teacher_logits) + (1 - w) * rkl_reference(student_logits, teacher_logits)


def taid_reference(student_logits, teacher_logits, labels=None, t_start=0.4):
    """TAID before any update (t = t_start): KL(p_t || q), p_t = softmax((1 - t) z_s + t z_t), the student's logits
    held constant in p_t."""
    t = t_start
    log_pt = torch.log_softmax((1 - t) * student_logits.detach() + t * teacher_logits, -1)
    log_q = torch.log_softmax(student_logits, -1)
    return torch.where(log_pt > -torch.inf, log_pt.exp() * (log_pt - log_q), 0.0).sum(-1)


REFERENCES = {
    "fkl": fkl_reference,
    "rkl": rkl_reference,
    "jsd": jsd_reference,
    "skl": skl_reference,
    "srkl": srkl_reference,
    "tvd": tvd_reference,
    "ce": ce_reference,
    "dpkd_token": dpkd_token_reference,
    "abkd": abkd_reference,
    "akl": akl_reference,
    "taid": taid_reference,
}


def reference_loss(name, student_logits, teacher_logits, labels, *, tau=1.0, vocab=None, ignore_index=-100,
                   reduction="mean", **params):
    """Whole-objective reference: truncate to the shared vocab, temperature, tau^2, mask, reduce."""
    vocab = vocab or min(student_logits.shape[-1], teacher_logits.shape[-1])
    valid = labels != ignore_index
    per_token = REFERENCES[name](student_logits[valid, :vocab] / tau, teacher_logits[valid, :vocab] / tau,
                                 labels[valid], **params) * tau**2
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / valid.sum().clamp(min=1)
    out = torch.zeros(labels.shape, dtype=per_token.dtype)
    out[valid] = per_token
    return out


def assert_trained_alike(a: dict, b: dict, lr: float, atol: float = 1e-5, share: float = 0.01) -> None:
    """Two state dicts trained by Adam on the same batches through differently grouped fp32 sums.

    The CPU head reduces each token's logits over vocab blocks whose summation order
    follows the chunk's width, and dW over chunks that differ between one process and
    two ranks (or a dense and a sparse teacher): rounding-level differences. Adam's step
    is about ``lr`` whatever the gradient's size, so for a weight whose gradient is
    itself at the rounding level (a vocab row no token touches) they become visible.
    So: every weight within 5% of ``lr``, and all but ``share`` of all weights within ``atol``.
    A wrong batch, teacher or reduction moves most weights by about ``lr``.
    """
    assert a.keys() == b.keys()
    beyond = total = 0
    for key in a:
        diff = (b[key].double() - a[key].double()).abs()
        assert float(diff.max()) <= 0.05 * lr, f"{key}: max |diff| {float(diff.max()):.3g} > 5% of lr {lr}"
        beyond, total = beyond + int((diff > atol).sum()), total + diff.numel()
    assert beyond <= share * total, f"{beyond} of {total} weights differ by more than {atol}"


def write_jsonl(path, records):
    """Records (dicts, or raw strings for malformed lines) as a JSONL file; returns the path."""
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def answer_length_judge(prompt_messages, response):
    """A stand-in LLM judge for tests: the reply's length in characters."""
    return float(len(response))


def naive_greedy(model, prompt, stop, max_new_tokens):
    """One prompt, no padding, no cache: the argmax of the full logits, token by token (a reference for decode)."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token == stop:
                break
            out.append(token)
            ids.append(token)
    return out


BUILD_LEFTOVERS = ("build", "dist", "*.egg-info", "__pycache__", ".venv", ".git", "runs", ".pytest_cache",
                   ".benchmarks")


def source_copy(package_dir, parent):
    """A copy of a source tree under ``parent``, so building it writes build/ and *.egg-info there, not in the
    checkout."""
    import shutil
    import tempfile
    from pathlib import Path

    dest = Path(tempfile.mkdtemp(dir=parent, prefix="src-")) / Path(package_dir).name
    shutil.copytree(package_dir, dest, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    return dest


def install_into(target, package_dir):
    """pip-install a package directory (no deps, no build isolation, no network) into ``target``; returns it.
    It is built from a copy beside ``target``, leaving the checkout clean."""
    import subprocess
    import sys
    from pathlib import Path

    def leftovers():
        return sorted(p.name for pattern in ("build", "*.egg-info") for p in Path(package_dir).glob(pattern))

    before = leftovers()
    source = source_copy(package_dir, Path(target).parent)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=600)
    assert leftovers() == before, f"installing {package_dir} wrote {leftovers()} into the checkout"
    return target


def run_installed(args, cwd, target):
    """``python ARGS`` with ``target`` on PYTHONPATH and every plugin allowed; its stdout (asserting exit 0)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DISTILLZOO_PLUGINS"}  # load every plugin
    env["PYTHONPATH"] = str(target)
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def add_distribution(root, dist, version, ep_name, module, source):
    """A throwaway installed distribution under ``root``: dist-info with a distillzoo entry point, and its module."""
    import textwrap

    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[distillzoo]\n{ep_name} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


def bhattacharyya_plugin(summary: str = "Bhattacharyya distance") -> str:
    """The source of a one-objective third-party plugin module (objective ``bhattacharyya``)."""
    return f'''
import distillzoo as dz

class Bhattacharyya(dz.LogitObjective):
    name = "bhattacharyya"
    def token_loss(self, student_logprobs, teacher_logprobs, labels):
        return -(0.5 * (student_logprobs + teacher_logprobs)).logsumexp(-1)

@dz.hookimpl
def register_objectives(register):
    register(Bhattacharyya, entry={{
        "kind": "logit", "summary": "{summary}", "formula": "-log sum_v sqrt(p_v q_v)",
        "params": {{}}, "inputs": ["student_logits", "teacher_logits", "labels"], "paper": {{}},
    }})
'''


def train_killed_at_checkpoint(cfg_path, run_dir, step: int, timeout: float = 180) -> None:
    """``distillzoo train CFG`` in a child process, SIGKILLed once its checkpoint of ``step`` is on disk (and
    before it finished: asserted)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    run_dir = Path(run_dir)
    child = subprocess.Popen([sys.executable, "-m", "distillzoo", "train", str(cfg_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (run_dir / "checkpoints" / f"step-{step:08d}").exists():
        assert child.poll() is None and time.time() < deadline, f"the child ended before its checkpoint of step {step}"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (run_dir / "final").exists(), "the run finished before it was killed; nothing would be resumed"
