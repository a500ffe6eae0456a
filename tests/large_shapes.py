"""Tiny random models at the shapes of real large MoE models, for the dashboard's browser tests: 24 MoE
layers × 128 experts top-8 (Qwen3-30B-A3B-like) and 8 × 256 top-8 with grouped routing (8 groups, 4 chosen;
DeepSeek-V3-like). Hidden size 64, so they build, save and profile in seconds. Each is saved with the
character tokenizer, and its dashboard home gets a small profile of the sample tasks (a few examples each)
recorded in advance, so the pages open without the dashboard's automatic 100-example profile."""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny_models import build, char_tokenizer

SHAPES = {
    "24x128": ("qwen3_moe", dict(num_hidden_layers=24, num_experts=128, num_experts_per_tok=8, hidden_size=64,
                                 moe_intermediate_size=16, intermediate_size=64)),
    "8x256": ("deepseek_v3", dict(num_hidden_layers=8, n_routed_experts=256, num_experts_per_tok=8, n_group=8,
                                  topk_group=4, hidden_size=64, moe_intermediate_size=16, intermediate_size=64)),
}
EXAMPLES_PER_TASK = 4


def _spread_routers(model, seed: int = 0) -> None:
    """Give every router distinct logits (random init leaves them near-uniform) so usage is uneven."""
    gen = torch.Generator().manual_seed(4321 + seed)
    for name, param in model.named_parameters():
        low = name.lower()
        if "gate" in low and "proj" not in low and param.dim() == 2 and param.shape[0] in (128, 256):
            param.data = torch.randn(param.shape, generator=gen)


def save_shape(shape: str, folder: Path) -> Path:
    """The tiny model of ``shape`` with the character tokenizer, saved under ``folder``."""
    model_type, overrides = SHAPES[shape]
    model = build(model_type, **overrides)
    _spread_routers(model)
    path = folder / f"tiny-{shape}"
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def dashboard_home_for(model_path: Path, home: Path) -> Path:
    """``home`` (a $MOESCOPE_HOME) holding the dashboard's default profile of ``model_path``: the sample tasks'
    first few validation examples."""
    from core.model import load_model
    from core.profiling import profile_texts
    from dashboard import state

    mm = load_model(str(model_path))
    texts = {state.task_label(t): state.texts_of(t, state.AUTO_PROFILE["split"], EXAMPLES_PER_TASK)
             for t in state.list_sample_tasks()}
    out = home / "dashboard" / "profiles" / f"{mm.weights_digest()[:16]}-sample-tasks.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    profile_texts(mm, texts, out, batch_size=16, progress=False)
    return home
