"""Merging profiles of disjoint shards of one run into one profile, row for row, refusing overlaps."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from .errors import MoEScopeError
from .outputs import check_output, output_lock
from .profile_writer import ProfileWriter
from .routing_profile import Profile, ProfileMeta, now_iso


def merge_profiles(paths: list[str | Path], out: str | Path, overwrite: bool = False) -> Path:
    """Concatenate profiles of disjoint shards of one run into one profile, row for row.

    ``out`` is checked (``core.outputs.check_output``) and locked for the merge; the inputs are never written.
    """
    if not paths:
        raise MoEScopeError("Give at least one profile to merge.")
    out = check_output(out, "profile", overwrite, sources=paths, source_label="input profile")
    with output_lock(out):
        return write_merged(paths, out)


def write_merged(paths: list[str | Path], out: str | Path) -> Path:
    """The merge itself, for a caller that already holds ``out``'s lock (a sharded job's rank 0)."""
    seen: dict[Path, Path] = {}
    for p in paths:
        key = Path(p).resolve()
        if key in seen:
            raise MoEScopeError(f"{p} is given twice; give each shard once.")
        seen[key] = Path(p)
    profiles = [Profile(p) for p in paths]
    first = profiles[0].meta
    for prof in profiles[1:]:
        for key in ("weights_digest", "layers", "n_experts", "top_k", "with_probs", "plan_digest"):
            if getattr(prof.meta, key) != getattr(first, key):
                raise MoEScopeError(f"{prof.path} was recorded with a different {key} than {profiles[0].path}; "
                                    f"only shards of one run can be merged.")
    _refuse_overlapping_examples(profiles)
    meta = ProfileMeta(**{**asdict(first), "rows": 0, "tokens": sum(p.meta.tokens for p in profiles),
                          "tasks": [], "created": now_iso(), "shards": [str(p.path) for p in profiles]})
    meta.tasks = list(dict.fromkeys(t for p in profiles for t in p.meta.tasks))
    if len({p.meta.fingerprint for p in profiles}) > 1:
        meta.fingerprint = ""  # shards of different runs: the merged rows have no single fingerprint
    with ProfileWriter(out, meta) as writer:
        for prof in profiles:
            for batch in prof.batches():
                writer.write_batch(batch)
    return Path(out)


def _refuse_overlapping_examples(profiles: list[Profile]) -> None:
    """Inputs must not hold the same row (task, example, step, position, layer) twice, as a shard given twice
    would. Cheap first pass over (task, example) pairs; rows are compared only for examples in several inputs."""
    owners: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, prof in enumerate(profiles):
        pairs = prof.table(columns=["task", "example"]).group_by(["task", "example"]).aggregate([])
        for pair in zip(pairs.column("task").to_pylist(), pairs.column("example").to_pylist()):
            owners[pair].append(i)
    shared = {pair for pair, where in owners.items() if len(where) > 1}
    if not shared:
        return
    seen: dict[tuple, Path] = {}
    key_columns = ["task", "example", "step", "position", "layer"]
    for prof in profiles:
        frame = prof.table(columns=key_columns).to_pandas()
        frame = frame[[pair in shared for pair in zip(frame.task, frame.example)]]
        for key in frame.itertuples(index=False, name=None):
            if key in seen:
                raise MoEScopeError(f"{prof.path} and {seen[key]} both hold the routing of example {key[1]} of task "
                                    f"{key[0]!r} (layer {key[4]}, position {key[3]}); merge only disjoint shards of "
                                    f"one run, each given once.")
            seen[key] = prof.path
