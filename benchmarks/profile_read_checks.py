"""What the profile reader's value checks cost: ``aggregate.expert_usage`` on a 2M-row profile (8 layers, 128
experts, top-8), with ``Profile.check_values`` as shipped and replaced by a no-op, interleaved.

Run: ``.venv/bin/python benchmarks/profile_read_checks.py [--reps 4]`` (writes its profile under runs/bench/).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from core import aggregate
from core.profile_writer import ProfileWriter, TokenBatch
from core.routing_profile import Profile, ProfileMeta


def big_profile(path: Path, batches: int = 50, tokens: int = 5000) -> Path:
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    meta = ProfileMeta(model="synthetic", weights_digest="synthetic", family="Qwen3Moe", layers=list(range(8)),
                       n_experts=128, top_k=8, tasks=["a"])
    with ProfileWriter(path, meta) as writer:
        for b in range(batches):
            batch = TokenBatch("a", np.arange(tokens) + b * tokens, np.zeros(tokens, int),
                               rng.integers(0, 1000, tokens), step=0)
            for layer in range(8):
                experts = np.argsort(rng.random((tokens, 128)), axis=1)[:, :8]
                writer.add(batch, layer, experts, rng.random((tokens, 8)).astype(np.float32))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()
    path = big_profile(Path("runs/bench/read-checks.parquet"))
    shipped = Profile.check_values
    times: dict[str, list[float]] = {"with checks": [], "without": []}
    for _ in range(args.reps):
        for mode in times:
            Profile.check_values = shipped if mode == "with checks" else (lambda self, rows: None)
            start = time.perf_counter()
            aggregate.expert_usage(Profile(path))
            times[mode].append(time.perf_counter() - start)
    Profile.check_values = shipped
    rows = Profile(path).num_rows
    for mode, values in times.items():
        print(f"{mode}: median {statistics.median(values):.3f} s over {len(values)} runs ({rows:,} rows)")
    print(f"ratio: {statistics.median(times['with checks']) / statistics.median(times['without']):.2f}x")


if __name__ == "__main__":
    main()
