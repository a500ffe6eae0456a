"""The evaluation harness as a small package (see :mod:`.harness`):

- :mod:`.examples`: a task's examples as token ids fitted to the model's context, padding and batching;
- :mod:`.kinds`: one class per task kind (generative, multiple choice, language modelling);
- :mod:`.decoding`: greedy decoding on the KV cache (:mod:`.kv_cache`), :mod:`.fallback` with ``model.generate``;
- :mod:`.scoring`: log-likelihoods of sequences and of options on a shared prompt cache;
- :mod:`.agreement` and :mod:`.reference`: agreement with the unpruned model and its cached reference;
- :mod:`.result`: what an evaluation returns, and a plan's cost;
- :mod:`.harness`: :class:`Evaluator`, which runs a task and caches its results.
"""

from .harness import Evaluator, evaluate
from .result import EvalResult, ProgressFn, plan_cost

__all__ = ["EvalResult", "Evaluator", "ProgressFn", "evaluate", "plan_cost"]
