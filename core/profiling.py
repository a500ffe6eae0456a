"""Profile a model over tasks' texts: batching, padding, progress, and the profile on disk."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import note
from .errors import MoEScopeError
from .masking import masked
from .model import MoEModel
from .outputs import check_output, output_lock
from .plan import Plan
from .profile_merge import write_merged
from .profile_writer import ProfileWriter
from .recorder import RouterRecorder
from .routing_profile import Profile, ProfileMeta, tool_version

ProgressFn = Callable[[int, int, float], None]  # (tokens done, tokens total, tokens per second)


@dataclass(frozen=True)
class Batch:
    """One forward's worth of texts: a task and the indices of its texts (sorted by length)."""

    task: str
    examples: tuple[int, ...]


@dataclass(frozen=True)
class Sharding:
    """Which shards of the work this process records: shard ``c`` belongs to process ``c % world``.

    A shard is ``batches_per_shard`` consecutive batches of the single-process order, written to its own
    file ``<out>.parts/shard-<c>.parquet``; merging the shards in order gives the single-process profile
    row for row, and a rerun skips shards already complete on disk.
    """

    rank: int = 0
    world: int = 1
    batches_per_shard: int = 16

    @classmethod
    def from_env(cls, batches_per_shard: int = 16) -> "Sharding":
        """torchrun / accelerate launch set RANK and WORLD_SIZE; a Slurm array sets SLURM_ARRAY_*."""
        env = os.environ
        if "WORLD_SIZE" in env:
            return cls(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), batches_per_shard)
        if "SLURM_ARRAY_TASK_COUNT" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            return cls(int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"]), batches_per_shard)
        return cls(0, 1, batches_per_shard)


def plan_batches(encoded: Mapping[str, Sequence[Sequence[int]]], batch_size: int) -> list[Batch]:
    """The canonical batch order: tasks in order, texts sorted by length inside a task."""
    batches = []
    for name, seqs in encoded.items():
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        batches += [Batch(name, tuple(order[lo:lo + batch_size])) for lo in range(0, len(order), batch_size)]
    return batches


def parts_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".parts")


def run_fingerprint(mm: MoEModel, tasks: Mapping[str, Sequence[str]], **settings: object) -> str:
    """A digest of everything that determines a profile's rows: the model's weights and dtype, the task names
    and texts in order (so also the text field they came from), every setting (max length, batch size,
    batches per shard, plan digest, probs, max new tokens) and the tool version. Shards are reused only
    when it matches."""
    digest = hashlib.sha256()
    head = {"weights": mm.weights_digest(), "dtype": str(next(mm.model.parameters()).dtype),
            "tool": tool_version(), **settings}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name, texts in tasks.items():
        digest.update(json.dumps([name, len(texts)]).encode())
        for text in texts:
            digest.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    return digest.hexdigest()[:32]


def profile_texts(mm: MoEModel, tasks: Mapping[str, Sequence[str]], out: str | Path, batch_size: int = 8,
                  max_length: int = 512, max_new_tokens: int = 0, with_probs: bool = False,
                  plan: Plan | None = None, progress: bool | ProgressFn = True,
                  sharding: Sharding | None = None, overwrite: bool = False, keep_shards: bool = False) -> Path:
    """Record routing for every text of every task into the profile ``out`` (.parquet + .json).

    Texts are sorted by length inside a task so batches carry little padding; ``example`` in the profile
    is the text's index in its task's list. With ``max_new_tokens`` > 0 the model also generates and the
    decode steps are recorded (``step`` >= 1). With a ``sharding`` of several processes, this process
    records only its shards (see :class:`Sharding`); under torchrun the processes then wait for each other
    and rank 0 merges the shards into ``out``; otherwise run ``moescope merge-profiles`` afterwards.

    ``out`` must be new, or an earlier profile when ``overwrite`` (``core.outputs.check_output``); it is locked
    for the run (ranks of one sharded job share the lock). Shards are reused only when their fingerprint
    (:func:`run_fingerprint`) matches; others are removed. After a successful merge the shards are deleted
    unless ``keep_shards``.
    """
    if batch_size < 1 or max_length < 1 or max_new_tokens < 0:
        raise MoEScopeError(f"batch size ({batch_size}) and max length ({max_length}) must be at least 1, max new "
                            f"tokens ({max_new_tokens}) at least 0.")
    sharding = sharding or Sharding()
    if sharding.batches_per_shard < 1:
        raise MoEScopeError(f"batches per shard must be at least 1, not {sharding.batches_per_shard}.")
    source = Path(mm.source).expanduser()
    out = check_output(out, "profile", overwrite, sources=[source] if source.exists() else [])
    fingerprint = run_fingerprint(mm, tasks, max_length=max_length, batch_size=batch_size,
                                  batches_per_shard=sharding.batches_per_shard, with_probs=with_probs,
                                  max_new_tokens=max_new_tokens, plan=plan.digest() if plan else None)
    with output_lock(out, job=fingerprint if sharding.world > 1 else None):
        return _profile_locked(mm, tasks, out, batch_size, max_length, max_new_tokens, with_probs, plan, progress,
                               sharding, keep_shards, fingerprint)


def _profile_locked(mm: MoEModel, tasks: Mapping[str, Sequence[str]], out: Path, batch_size: int, max_length: int,
                    max_new_tokens: int, with_probs: bool, plan: Plan | None, progress: bool | ProgressFn,
                    sharding: Sharding, keep_shards: bool, fingerprint: str) -> Path:
    tok = mm.tokenizer
    if tok is None:
        raise MoEScopeError(f"{mm.source} has no tokenizer; profiling needs one to turn texts into tokens.")
    if not tasks or not any(len(texts) for texts in tasks.values()):
        raise MoEScopeError("No texts to profile; give at least one task with at least one example.")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    encoded = {name: [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
               for name, texts in tasks.items()}
    meta = ProfileMeta(model=mm.source, weights_digest=mm.weights_digest(), family=mm.adapter.family,
                       layers=mm.layer_indices, n_experts=mm.n_experts,
                       top_k=plan.top_k if plan and plan.top_k else mm.top_k, tasks=list(tasks),
                       tokenizer=getattr(tok, "name_or_path", None), with_probs=with_probs,
                       weights_semantics=mm.adapter.weights_semantics,
                       plan_digest=plan.digest() if plan else None, fingerprint=fingerprint)
    batches = plan_batches(encoded, batch_size)
    if sharding.world == 1 and sharding.batches_per_shard >= len(batches):
        jobs = [(Path(out), batches)]
    else:
        shards = [batches[lo:lo + sharding.batches_per_shard]
                  for lo in range(0, len(batches), sharding.batches_per_shard)]
        folder = parts_dir(out)
        mine = [(folder / f"shard-{c:05d}.parquet", shard) for c, shard in enumerate(shards)
                if c % sharding.world == sharding.rank]
        jobs = [(path, shard) for path, shard in mine if not _complete(path, fingerprint)]
    total = sum(len(encoded[b.task][i]) for _, job in jobs for b in job for i in b.examples)
    device = next(mm.model.parameters()).device
    start, done = time.perf_counter(), 0
    tok.padding_side = "left" if max_new_tokens else "right"
    # The bar closes (ends its line) on an error too, so the error message starts on a line of its own.
    with tqdm(total=total, unit="tok", desc="profiling", disable=progress is not True) as bar, \
            masked(mm, plan), torch.inference_mode():
        for path, job in jobs:
            with ProfileWriter(path, ProfileMeta(**{**asdict(meta), "tasks": list(tasks)})) as writer, \
                    RouterRecorder(mm, writer) as rec:
                for b in job:
                    seqs = encoded[b.task]
                    inputs = tok.pad({"input_ids": [seqs[i] for i in b.examples]}, return_tensors="pt").to(device)
                    with rec.batch(b.task, list(b.examples)):
                        if max_new_tokens:
                            mm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                              pad_token_id=tok.pad_token_id)
                        else:
                            mm.model(**inputs)
                    n = sum(len(seqs[i]) for i in b.examples)
                    done += n
                    bar.update(n)
                    if callable(progress):
                        progress(done, total, done / max(time.perf_counter() - start, 1e-9))
    if jobs and jobs[0][0] == Path(out):
        return Path(out)
    return _finish_shards(out, len(batches), sharding, keep_shards)


def _complete(path: Path, fingerprint: str) -> bool:
    """A shard left by an earlier run counts only if it is whole and has this run's fingerprint; any other
    shard file at that place is removed (with a note), never merged."""
    if not path.exists():
        return False
    try:
        if Profile(path).meta.fingerprint == fingerprint:
            return True
        why = "it is from another run (other texts, model or settings)"
    except MoEScopeError:
        why = "it is incomplete or unreadable"
    note(f"removing {path}: {why}")
    path.unlink(missing_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)
    return False


def _finish_shards(out: Path, n_batches: int, sharding: Sharding, keep_shards: bool) -> Path:
    """Merge the shards into ``out``: at once for a single process; under torch.distributed after every
    process is done, by rank 0; otherwise (a Slurm array) later, with ``moescope merge-profiles``. The lock
    on ``out`` is already held by this job. The shards go once merged, unless ``keep_shards``."""
    import torch.distributed as dist

    n_shards = -(-n_batches // sharding.batches_per_shard)
    shard_paths = [parts_dir(out) / f"shard-{c:05d}.parquet" for c in range(n_shards)]
    if sharding.world > 1 and not (dist.is_available() and dist.is_initialized()):
        return parts_dir(out)
    if sharding.world > 1:
        dist.barrier()
    if sharding.rank == 0:
        write_merged(shard_paths, out)
        if not keep_shards:
            shutil.rmtree(parts_dir(out), ignore_errors=True)
    if sharding.world > 1:
        dist.barrier()
    return Path(out)


def read_task_texts(arg: str, text_field: str = "text") -> tuple[str, list[str]]:
    """``[NAME=]PATH`` -> (task name, texts): a .txt file gives one text per non-empty line, a .jsonl /
    .json file one text per record's ``text_field``."""
    import json

    name, _, path_s = arg.rpartition("=") if "=" in arg else ("", "", arg)
    path = Path(path_s)
    name = name or path.stem
    if not path.is_file():
        raise MoEScopeError(f"No task file at {path}; give a .txt (one text per line) or .jsonl file.")
    if path.suffix not in (".txt", ".jsonl", ".json"):
        raise MoEScopeError(f"{path} is neither .txt nor .jsonl/.json; MoEScope cannot read texts from it.")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MoEScopeError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.") from None
    if path.suffix == ".txt":
        return name, [line for line in raw.splitlines() if line.strip()]
    try:
        records = json.loads(raw) if path.suffix == ".json" else [json.loads(l) for l in raw.splitlines() if l.strip()]
    except (json.JSONDecodeError, RecursionError) as exc:
        raise MoEScopeError(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise MoEScopeError(f"{path} must hold JSON objects, one per text.")
    missing = [i for i, r in enumerate(records) if not isinstance(r.get(text_field), str)]
    if missing:
        columns = sorted(records[missing[0]])
        raise MoEScopeError(f"{path} record {missing[0]} has no string field {text_field!r} (fields: {columns}); "
                            f"pass --text-field with the right column.")
    return name, [r[text_field] for r in records]
