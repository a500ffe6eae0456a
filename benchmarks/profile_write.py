"""Profile write throughput: (token, layer) rows per second through ProfileWriter alone, from host arrays
shaped like a real recording (batch 16 x 512 tokens, 4 MoE layers, top-2), including the final close.

    python benchmarks/profile_write.py [--forwards 64]

Run it with MoEScope installed (``pip install -e .``; ``make setup`` does it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from core.profile_writer import ProfileWriter, TokenBatch
from core.routing_profile import ProfileMeta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forwards", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.batch * args.length
    layers = [0, 1, 2, 3]
    batches = [(TokenBatch("bench", np.repeat(np.arange(args.batch) + f * args.batch, args.length),
                           np.tile(np.arange(args.length), args.batch), rng.integers(0, 32000, n), step=0),
                [(rng.integers(0, 8, (n, 2)).astype(np.int16), rng.random((n, 2)).astype(np.float32)) for _ in layers])
               for f in range(args.forwards)]
    meta = ProfileMeta(model="bench", weights_digest="", family="Mixtral", layers=layers, n_experts=8, top_k=2)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.parquet"
        start = time.perf_counter()
        with ProfileWriter(path, meta) as writer:
            for tokens, per_layer in batches:
                for layer, (experts, weights) in zip(layers, per_layer):
                    writer.add(tokens, layer, experts, weights)
        seconds = time.perf_counter() - start
        rows = writer.meta.rows
        size = path.stat().st_size
    print(json.dumps({"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds),
                      "bytes_per_row": round(size / rows, 2)}))


if __name__ == "__main__":
    main()
