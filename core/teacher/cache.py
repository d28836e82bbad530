"""An offline top-k teacher: run the teacher once, train many students from disk.

``distillzoo cache-teacher`` stores, for every response token of every example
(the tokens the loss is taken on, in order), the teacher's top-k vocab ids and
their log-probs **of the full softmax** at the cache's temperature, plus the log
of the mass outside them (the tail), keyed by sample id::

    manifest.json        teacher, vocab size, k, temperature, dtype, tokenizer, data
    shard-00000/
        ids.json         sample ids of the shard, in order
        fingerprints.json  a hash of each sample's token ids and loss mask, in order
        index.npy        int64 token offsets [samples + 1]
        topk_ids.bin     int32 [tokens, k]
        logprobs.bin     float16 / bfloat16 / float32 [tokens, k]
        tail.bin         float32 [tokens]
    shard-00001/ ...

Each shard is written under a temporary name and renamed, so a killed run leaves
whole shards only; rerun with the same arguments, it checks the manifest and the
shards already there and writes the rest. The trainer reads the cache by sample
id (never by step or position: a shuffled or mixed stream still gets each
sample's own teacher), refuses one whose manifest disagrees with its config, and
refuses a sample whose tokens no longer match its fingerprint (data edited under
the same id), or whose stored values are not finite log-probs.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from distillzoo.atomic import sweep_temporaries, write_dir_atomically, write_text_atomically
from distillzoo.objectives.sparse import SparseTeacher
from distillzoo.models.causal_lm import final_hidden, lm_head_weight
from distillzoo.data.records import IGNORE_INDEX
from distillzoo.errors import ConfigError, DataError, ParameterError

FORMAT_VERSION = 2  # 2: per-sample token fingerprints
MANIFEST_FIELDS = ("teacher", "vocab_size", "k", "temperature", "dtype", "tokenizer", "samples")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_STORE = {torch.float16: np.float16, torch.bfloat16: np.int16, torch.float32: np.float32}  # bf16 stored as its bits


def token_fingerprint(example: dict) -> str:
    """A short hash of an example's token ids and loss mask: what the cached teacher was computed on."""
    ids = np.ascontiguousarray(example["input_ids"].numpy(), dtype=np.int32)
    mask = np.ascontiguousarray(example["loss_mask"].numpy(), dtype=np.uint8)
    return hashlib.sha1(ids.tobytes() + b"\0" + mask.tobytes()).hexdigest()[:16]


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).cpu().numpy()


@torch.no_grad()
def teacher_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, temperature: float = 1.0,
                 chunk_rows: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids [N, k] int32, logprobs [N, k] fp32, tail [N] fp32)`` of ``[N, H]`` hidden states.

    Log-probs are of the full softmax of ``hidden @ weight.T / temperature``; the
    tail is the log of the mass outside the top k (``-inf`` when k covers the vocab).
    """
    ids, logprobs, tails = [], [], []
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = (hidden[start:start + chunk_rows].float() @ weight.float().T) / temperature
        logp = torch.log_softmax(logits, dim=-1)
        top = logp.topk(k, dim=-1)
        rest = logp.scatter(-1, top.indices, float("-inf"))
        ids.append(top.indices.to(torch.int32))
        logprobs.append(top.values)
        tails.append(torch.logsumexp(rest, dim=-1))
    if not ids:
        return (torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k), torch.zeros(0))
    return torch.cat(ids), torch.cat(logprobs), torch.cat(tails)


def _same_manifest(path: Path, manifest: dict) -> None:
    old = json.loads(path.read_text(encoding="utf-8"))
    if old != manifest:
        diff = {key: (old.get(key), manifest[key]) for key in manifest if old.get(key) != manifest[key]}
        raise DataError(f"{path.parent} holds a cache built differently ("
                        + ", ".join(f"{key}: {a!r} there, {b!r} now" for key, (a, b) in diff.items())
                        + "); remove it or write to another directory")


def write_teacher_cache(out_dir: str | Path, teacher, dataset, *, k: int, temperature: float = 1.0,
                        dtype: str = "bfloat16", teacher_name: str, tokenizer_name: str, pad_id: int,
                        data_name: str = "", batch_size: int = 8, shard_size: int = 1024,
                        progress: bool = True, launch=None, vocab_size: int | None = None) -> "TeacherCache":
    """Cache ``teacher``'s top-k over the response tokens of ``dataset`` (items with ``id``); resumable.

    ``teacher``: a model, or a :class:`~distillzoo.teacher.served.ServedTeacher` whose server's top-k are stored
    as they come (temperature 1; ``vocab_size``, the teacher head's, goes in the manifest).

    Under torchrun (``launch``) rank ``r`` writes every ``world``-th shard, each computed
    as one process computes it, so the cache's bytes do not depend on the number of
    ranks; a rerun after any rank died writes the missing shards only.
    """
    from distillzoo.teacher.launch import Launch
    from distillzoo.data.shards import collate_sft

    launch = launch or Launch()

    if dtype not in DTYPES:
        raise ParameterError(f"cache dtype {dtype!r} is not one of {list(DTYPES)}")
    served = not isinstance(teacher, torch.nn.Module)  # a ServedTeacher: its top-k come from the server
    if served:
        wrong = ([f"vocab_size, the teacher head's (got {vocab_size})"] if vocab_size is None else []) + \
            ([f"temperature 1, as a server's log-probs are of the raw logits (got {temperature})"]
             if temperature != 1.0 else []) + \
            ([f"the client's top_k equal to k (got {teacher.top_k} and {k})"] if teacher.top_k != k else [])
        if wrong:
            raise ParameterError(f"a cache from the teacher server {teacher.url} needs {'; '.join(wrong)}")
        weight, vocab = None, int(vocab_size)
    else:
        weight = lm_head_weight(teacher)
        vocab = weight.shape[0]
    if not 1 <= k <= vocab:
        raise ParameterError(f"k={k} must be in [1, {vocab}] (the teacher's vocab)")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ParameterError(f"temperature must be > 0, got {temperature}")
    ids = getattr(dataset, "ids", None)  # TokenShards and ConversationDataset know them without reading items
    ids = list(ids) if ids is not None else [dataset[i].get("id") for i in range(len(dataset))]
    if len(ids) != len(dataset) or any(i is None for i in ids):
        raise DataError("the dataset's examples carry no sample ids (a directory from an older distillzoo prepare? "
                        "prepare it again); the cache is keyed by id")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"sample id {dup!r} occurs more than once; the cache is keyed by id")
    out = Path(out_dir)
    manifest = {"distillzoo_teacher_cache": FORMAT_VERSION, "teacher": teacher_name, "vocab_size": vocab, "k": k,
                "temperature": float(temperature), "dtype": dtype, "tokenizer": tokenizer_name, "data": data_name,
                "samples": len(ids), "shard_size": shard_size}
    manifest_path = out / "manifest.json"
    if launch.main:  # the other ranks wait, so that none sweeps away a shard another is writing
        if manifest_path.exists():
            _same_manifest(manifest_path, manifest)
        else:
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomically(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        sweep_temporaries(out, "shard-*")  # the shards a killed run was writing are written again below
    launch.barrier()
    _same_manifest(manifest_path, manifest)
    store = DTYPES[dtype]
    device = torch.device("cpu") if served else next(teacher.parameters()).device
    starts = list(range(0, len(ids), shard_size))
    mine = launch.mine(len(starts))
    bar = None
    if progress and launch.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(min(shard_size, len(ids) - starts[n]) for n in mine), desc="distillzoo cache-teacher")
    for n in mine:
        start = starts[n]
        shard_dir = out / f"shard-{n:05d}"
        members = list(range(start, min(start + shard_size, len(ids))))
        if shard_dir.exists():
            shard = _Shard(shard_dir, k, store)  # whole and readable, or a clear error
            if shard.ids != [ids[i] for i in members] \
                    or shard.fingerprints != [token_fingerprint(dataset[i]) for i in members]:
                raise DataError(f"{shard_dir} holds other samples than this data's {n}th shard; the data changed "
                                "since the cache was started: remove the cache or write to another directory")
            if bar is not None:
                bar.update(len(members))
            continue
        parts, counts, fingerprints = [], [], []
        for b in range(0, len(members), batch_size):
            items = [dataset[i] for i in members[b:b + batch_size]]
            fingerprints += [token_fingerprint(item) for item in items]
            batch = collate_sft(items, pad_id, device)
            targets = batch["targets"]
            valid = targets != IGNORE_INDEX
            if served:
                sparse = teacher.sparse_teacher(batch["input_ids"], batch["attention_mask"], targets, batch["ids"])
                parts.append((sparse.ids[valid].to(torch.int32), sparse.logprobs[valid], sparse.tail_logprob[valid]))
            else:
                hidden = final_hidden(teacher, batch["input_ids"], batch["attention_mask"])[:, :-1]
                parts.append(teacher_topk(hidden[valid], weight, k, temperature))
            counts.extend(valid.sum(-1).tolist())
            if bar is not None:
                bar.update(len(items))
        top_ids, top_logprobs, tail = (torch.cat(x) for x in zip(*parts))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        def write(tmp: Path, members=members, top_ids=top_ids, top_logprobs=top_logprobs, tail=tail, offsets=offsets,
                  fingerprints=fingerprints):
            (tmp / "ids.json").write_text(json.dumps([ids[i] for i in members], ensure_ascii=False), encoding="utf-8")
            (tmp / "fingerprints.json").write_text(json.dumps(fingerprints), encoding="utf-8")
            np.save(tmp / "index.npy", offsets)
            top_ids.cpu().numpy().astype(np.int32).tofile(tmp / "topk_ids.bin")
            _to_numpy(top_logprobs.to(store)).tofile(tmp / "logprobs.bin")
            tail.float().cpu().numpy().tofile(tmp / "tail.bin")

        write_dir_atomically(shard_dir, write)
    if bar is not None:
        bar.close()
    launch.barrier()
    return TeacherCache(out)


class _Shard:
    def __init__(self, path: Path, k: int, store: torch.dtype) -> None:
        self.path = path
        try:
            self.ids = json.loads((path / "ids.json").read_text(encoding="utf-8"))
            self.fingerprints = json.loads((path / "fingerprints.json").read_text(encoding="utf-8"))
            self.offsets = np.load(path / "index.npy")
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path}: unreadable cache shard ({type(e).__name__}: {e}); remove it and rerun "
                            "distillzoo cache-teacher") from None
        tokens = int(self.offsets[-1]) if len(self.offsets) else 0
        if len(self.offsets) != len(self.ids) + 1:
            raise DataError(f"{path}/index.npy has {len(self.offsets)} offsets for {len(self.ids)} ids")
        if not isinstance(self.fingerprints, list) or len(self.fingerprints) != len(self.ids):
            raise DataError(f"{path}/fingerprints.json does not hold one fingerprint per id ({len(self.ids)}); remove "
                            "the shard and rerun distillzoo cache-teacher")
        itemsize = torch.empty(0, dtype=store).element_size()
        arrays = {"topk_ids.bin": (np.int32, (tokens, k), 4 * tokens * k),
                  "logprobs.bin": (_STORE[store], (tokens, k), itemsize * tokens * k),
                  "tail.bin": (np.float32, (tokens,), 4 * tokens)}
        for name, (np_dtype, shape, size) in arrays.items():
            file = path / name
            actual = file.stat().st_size if file.exists() else -1
            if actual != size:
                raise DataError(f"{file} is {'missing' if actual < 0 else f'{actual:,} bytes'}; {size:,} expected "
                                f"for {tokens:,} tokens at k={k}: the shard is truncated or damaged. Remove it and "
                                "rerun distillzoo cache-teacher, which rewrites missing shards only")
            setattr(self, name.split(".")[0], np.memmap(file, dtype=np_dtype, mode="r", shape=shape) if size else
                    np.zeros(shape, np_dtype))
        self.store = store


class TeacherCache:
    """A cache directory, read by sample id. ``manifest`` is its manifest.json."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise DataError(f"{self.path} is not a teacher cache (no manifest.json); run distillzoo cache-teacher")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{manifest_path}: not valid JSON ({e}); the cache is damaged: remove it and rerun "
                            "distillzoo cache-teacher") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("distillzoo_teacher_cache") != FORMAT_VERSION:
            version = self.manifest.get("distillzoo_teacher_cache") if isinstance(self.manifest, dict) else None
            raise DataError(f"{manifest_path}: not a distillzoo teacher cache of format {FORMAT_VERSION}"
                            + (f" (format {version}, without token fingerprints: rebuild it)" if version else ""))
        missing = [f for f in MANIFEST_FIELDS if f not in self.manifest]
        if missing:
            raise DataError(f"{manifest_path}: missing field(s) {missing}; the cache is damaged: remove it and rerun "
                            "distillzoo cache-teacher")
        if self.manifest["dtype"] not in DTYPES:
            raise DataError(f"{manifest_path}: dtype {self.manifest['dtype']!r} is not one of {list(DTYPES)}")
        self.k = int(self.manifest["k"])
        self.store = DTYPES[self.manifest["dtype"]]
        self.shards = [_Shard(p, self.k, self.store) for p in sorted(self.path.glob("shard-*")) if p.is_dir()]
        self.where: dict[str, tuple[_Shard, int]] = {}
        for shard in self.shards:
            for j, sample_id in enumerate(shard.ids):
                self.where[str(sample_id)] = (shard, j)
        if len(self.where) != self.manifest["samples"]:
            raise DataError(f"{self.path}: {len(self.where)} of {self.manifest['samples']} samples cached; the run "
                            "was interrupted: rerun distillzoo cache-teacher with the same arguments to finish it")

    def __len__(self) -> int:
        return len(self.where)

    def check(self, where: str, *, vocab_size: int | None = None, k: int | None = None,
              temperature: float | None = None, tokenizer: str | None = None) -> None:
        """Refuse (ConfigError naming each field) a cache whose manifest disagrees with the run."""
        wanted = {"vocab_size": vocab_size, "k": k, "temperature": temperature, "tokenizer": tokenizer}
        bad = [f"{key}: {self.manifest[key]!r} in the cache, {value!r} in this run"
               for key, value in wanted.items() if value is not None and self.manifest[key] != value]
        if bad:
            raise ConfigError(f"{where}: teacher cache {self.path} does not match: {'; '.join(bad)}")

    def get(self, sample_id: str, fingerprint: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids [n, k] int64, logprobs [n, k] fp32, tail [n] fp32)`` of one sample's response tokens.

        With ``fingerprint`` (:func:`token_fingerprint` of the example being trained on)
        a sample whose tokens changed since the cache was built is refused.
        """
        try:
            shard, j = self.where[str(sample_id)]
        except KeyError:
            raise DataError(f"sample id {sample_id!r} is not in the teacher cache {self.path}; it was built from "
                            "other data") from None
        if fingerprint is not None and shard.fingerprints[j] != fingerprint:
            raise DataError(f"sample {sample_id!r}: its tokens differ from those the teacher cache {shard.path} was "
                            "built from (the data was edited under the same id, or tokenized differently); rebuild the "
                            "cache for this data")
        a, b = int(shard.offsets[j]), int(shard.offsets[j + 1])
        logprobs = torch.from_numpy(np.array(shard.logprobs[a:b]))
        if self.store == torch.bfloat16:
            logprobs = logprobs.view(torch.bfloat16)
        ids, logprobs, tail = (torch.from_numpy(np.array(shard.topk_ids[a:b])).long(), logprobs.float(),
                               torch.from_numpy(np.array(shard.tail[a:b])))
        # log-probs: no NaN, nothing above 0 (bf16 rounds within 1e-2), some mass left on every token
        bad = logprobs.isnan().any(-1) | (logprobs > 1e-2).any(-1) | tail.isnan() | (tail > 1e-2) \
            | ((logprobs == float("-inf")).all(-1) & (tail == float("-inf")))
        if bool(bad.any()):
            token = int(bad.nonzero()[0])
            raise DataError(f"{shard.path}: sample {sample_id!r}, response token {token}: the cached teacher is not a "
                            f"distribution (log-probs {logprobs[token, :4].tolist()}..., tail {float(tail[token])}); "
                            "the cache is damaged or was written from a non-finite teacher: rebuild it")
        return ids, logprobs, tail

    def sparse_teacher(self, sample_ids: Sequence[str], targets: torch.Tensor,
                       fingerprints: Sequence[str] | None = None) -> SparseTeacher:
        """A ``[B, T, k]`` SparseTeacher for a batch, its rows filled at the valid ``targets`` positions."""
        valid = targets != IGNORE_INDEX
        shape = (*targets.shape, self.k)
        # rows that are not scored are never read; they hold a valid uniform top-k all the same
        ids = torch.arange(self.k).expand(shape).clone()
        logprobs = torch.full(shape, -math.log(self.k))
        tail = torch.full(targets.shape, float("-inf"))
        for row, sample_id in enumerate(sample_ids):
            top_ids, top_logprobs, top_tail = self.get(sample_id, None if fingerprints is None else fingerprints[row])
            positions = valid[row].nonzero().flatten().cpu()
            if len(positions) != len(top_ids):
                raise DataError(f"sample {sample_id!r}: the cache holds {len(top_ids)} response tokens, the batch "
                                f"{len(positions)}; the cache was built from other data, tokenizer or max_length")
            ids[row, positions], logprobs[row, positions], tail[row, positions] = top_ids, top_logprobs, top_tail
        device = targets.device
        return SparseTeacher(ids.to(device), logprobs.to(device), tail.to(device))
