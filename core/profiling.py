"""Profile a model over tasks' texts: batching, padding, progress, and the profile on disk."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import MoEScopeError
from .masking import masked
from .model import MoEModel
from .plan import Plan
from .profile import ProfileMeta, ProfileWriter
from .recorder import RouterRecorder

ProgressFn = Callable[[int, int, float], None]  # (tokens done, tokens total, tokens per second)


def profile_texts(mm: MoEModel, tasks: Mapping[str, Sequence[str]], out: str | Path, batch_size: int = 8,
                  max_length: int = 512, max_new_tokens: int = 0, with_probs: bool = False,
                  plan: Plan | None = None, progress: bool | ProgressFn = True) -> Path:
    """Record routing for every text of every task into the profile ``out`` (.parquet + .json).

    Texts are sorted by length inside a task so batches carry little padding; ``example`` in the profile
    is the text's index in its task's list. With ``max_new_tokens`` > 0 the model also generates and the
    decode steps are recorded (``step`` >= 1).
    """
    tok = mm.tokenizer
    if tok is None:
        raise MoEScopeError(f"{mm.source} has no tokenizer; profiling needs one to turn texts into tokens.")
    if not tasks or not any(len(texts) for texts in tasks.values()):
        raise MoEScopeError("No texts to profile; give at least one task with at least one example.")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    encoded = {name: [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
               for name, texts in tasks.items()}
    total = sum(len(ids) for seqs in encoded.values() for ids in seqs)
    meta = ProfileMeta(model=mm.source, weights_digest=mm.weights_digest(), family=mm.adapter.family,
                       layers=mm.layer_indices, n_experts=mm.n_experts,
                       top_k=plan.top_k if plan and plan.top_k else mm.top_k, tasks=list(tasks),
                       tokenizer=getattr(tok, "name_or_path", None), with_probs=with_probs,
                       weights_semantics=mm.adapter.weights_semantics,
                       plan_digest=plan.digest() if plan else None)
    bar = tqdm(total=total, unit="tok", desc="profiling", disable=progress is not True)
    device = next(mm.model.parameters()).device
    start, done = time.perf_counter(), 0
    tok.padding_side = "left" if max_new_tokens else "right"
    with ProfileWriter(out, meta) as writer, masked(mm, plan), RouterRecorder(mm, writer) as rec, \
            torch.inference_mode():
        for name, seqs in encoded.items():
            order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
            for lo in range(0, len(order), batch_size):
                ids = order[lo:lo + batch_size]
                batch = tok.pad({"input_ids": [seqs[i] for i in ids]}, return_tensors="pt").to(device)
                with rec.batch(name, ids):
                    if max_new_tokens:
                        mm.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=tok.pad_token_id)
                    else:
                        mm.model(**batch)
                n = sum(len(seqs[i]) for i in ids)
                done += n
                bar.update(n)
                if callable(progress):
                    progress(done, total, done / max(time.perf_counter() - start, 1e-9))
    bar.close()
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
    if path.suffix == ".txt":
        return name, [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix not in (".jsonl", ".json"):
        raise MoEScopeError(f"{path} is neither .txt nor .jsonl/.json; MoEScope cannot read texts from it.")
    try:
        raw = path.read_text()
        records = json.loads(raw) if path.suffix == ".json" else [json.loads(l) for l in raw.splitlines() if l.strip()]
    except json.JSONDecodeError as exc:
        raise MoEScopeError(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise MoEScopeError(f"{path} must hold JSON objects, one per text.")
    missing = [i for i, r in enumerate(records) if not isinstance(r.get(text_field), str)]
    if missing:
        columns = sorted(records[missing[0]])
        raise MoEScopeError(f"{path} record {missing[0]} has no string field {text_field!r} (fields: {columns}); "
                            f"pass --text-field with the right column.")
    return name, [r[text_field] for r in records]
