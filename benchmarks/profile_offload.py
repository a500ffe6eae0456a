"""Profiling a model that does not fit: accelerate's ``device_map="auto"`` with a CPU memory limit that forces
part of the model onto disk, against the same model resident. Reports whether the recorded routing is the same
(expert ids equal, gate weights within bf16 rounding) and tokens per second of both.

Builds a synthetic Mixtral-shaped checkpoint (random bf16 weights, a character tokenizer) in a temporary folder,
removed at the end.

    python benchmarks/profile_offload.py [--layers 6 --hidden 512 --ffn 1792 --cpu-fraction 0.5] [--json out.json]

Run it with MoEScope installed (``pip install -e .``; ``make setup`` does it), from the repository root.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.tiny_models (the character tokenizer)


def main() -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.export_memory import build_checkpoint
    from core.model import MoEModel
    from core.profiling import profile_texts
    from core.routing_profile import Profile
    from tests.tiny_models import char_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1792)
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--cpu-fraction", type=float, default=0.5, help="CPU memory limit, as a share of the model")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and"]
    texts = {"prose": [" ".join(rng.choice(words, 48)) for _ in range(args.texts)]}
    with tempfile.TemporaryDirectory(prefix="moescope-offload-bench-") as tmp:
        src = Path(tmp) / "model"
        build_checkpoint(src, args.layers, args.hidden, args.ffn, shard_mb=100, vocab=1024)
        char_tokenizer().save_pretrained(src)
        model_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        results = {"model_mb": model_bytes / 1e6}
        profiles = {}
        for name, kwargs in (("resident", {}),
                             ("offloaded", {"device_map": "auto", "offload_folder": str(Path(tmp) / "offload"),
                                            "max_memory": {"cpu": int(args.cpu_fraction * model_bytes)}})):
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, **kwargs).eval()
            mm = MoEModel(model, char_tokenizer(), source=str(src))
            placed = getattr(model, "hf_device_map", {}) or {}
            warm = {"prose": texts["prose"][:8]}  # first forwards pay one-time costs: not timed
            profile_texts(mm, warm, Path(tmp) / f"{name}-warm.parquet", batch_size=8, progress=False)
            start = time.perf_counter()
            path = profile_texts(mm, texts, Path(tmp) / f"{name}.parquet", batch_size=8, progress=False)
            seconds = time.perf_counter() - start
            profiles[name] = Profile(path).to_pandas()
            results[name] = {"seconds": seconds, "tokens_per_s": Profile(path).meta.tokens / seconds,
                             "on_disk": sorted(k for k, v in placed.items() if v == "disk")}
            del model, mm
        a, b = profiles["resident"], profiles["offloaded"]
        results["experts_equal"] = a["experts"].map(list).tolist() == b["experts"].map(list).tolist()
        results["max_weight_diff"] = float(max(np.abs(np.stack(a["weights"]) - np.stack(b["weights"])).max(), 0))
    r = results
    print(f"model {r['model_mb']:.0f} MB bf16; offloaded to disk: {', '.join(r['offloaded']['on_disk']) or 'nothing'}")
    print("| model | tokens/s | relative |\n|---|---|---|")
    for name in ("resident", "offloaded"):
        print(f"| {name} | {r[name]['tokens_per_s']:.0f} | {r[name]['tokens_per_s'] / r['resident']['tokens_per_s']:.2f}x |")
    print(f"routing recorded: expert ids equal {r['experts_equal']}, max gate weight difference {r['max_weight_diff']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
