"""``moescope``: a thin command line over the core engine. Errors print one line and exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .commands import (cmd_compare, cmd_dashboard, cmd_evaluate, cmd_export, cmd_info, cmd_merge_profiles,
                       cmd_profile, cmd_prune, cmd_report, cmd_sweep, cmd_train_sample)
from .errors import user_message


# ----- argument types: a bad value is refused by argparse with one line, before anything runs -------------
def _integer(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small; {what}")
        return value
    return parse


POSITIVE = _integer(1, "give 1 or more")
NON_NEGATIVE = _integer(0, "give 0 or more")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1); give the fraction of experts to remove")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1]; give a share of tokens such as 0.95")
    return value


def _shard_size(text: str) -> str:
    from .checkpoint_writer import parse_size
    from .errors import MoEScopeError

    try:
        parse_size(text)
    except MoEScopeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _list_of(parse, what: str):
    def parse_list(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"give at least one {what}, comma-separated")
        values = []
        for item in items:
            try:
                values.append(parse(item))
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"{what} {exc}") from None
        return values
    return parse_list


def _batch_size(text: str) -> int | str:
    return "auto" if text.strip() == "auto" else POSITIVE(text)


def _lm_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR",
                   help="a folder of lm-eval task YAMLs (e.g. over local JSONL files; see sample_data/lm_eval); "
                        "repeatable")
    p.add_argument("--num-fewshot", type=NON_NEGATIVE, help="lm-eval tasks: few-shot examples (default: the task's)")


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local model directory or hub id")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="'auto' spreads the model over the available devices (accelerate device_map)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with the checkpoint (off by default)")
    p.add_argument("--experts-implementation", choices=["grouped_mm", "eager", "batched_mm"],
                   help="how experts are computed (default grouped_mm; never batched_mm on CPU)")
    p.add_argument("--offload-folder", help="with --device auto: offload what fits nowhere else to this folder")


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (exit 2) like every other error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moescope", description=__doc__,
                                     epilog="Add --debug anywhere to see the traceback of an unexpected error.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="summarise a MoE model: family, MoE layers, experts, parameters")
    _model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("profile", help="record every token's routing into a Parquet profile")
    _model_args(p)
    p.add_argument("--task", action="append", required=True, metavar="[NAME=]FILE",
                   help=".txt (one text per line) or .jsonl with a text field; repeat for several tasks")
    p.add_argument("--text-field", default="text")
    p.add_argument("--out", required=True, help="profile path ending in .parquet (sidecar .json beside it)")
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument("--max-length", type=POSITIVE, default=512)
    p.add_argument("--max-new-tokens", type=NON_NEGATIVE, default=0, help="also generate and record decode steps")
    p.add_argument("--limit", type=NON_NEGATIVE, default=0, help="at most this many texts per task")
    p.add_argument("--probs", action="store_true", help="also store full router probabilities")
    p.add_argument("--plan", help="record under a pruning plan (masked experts)")
    p.add_argument("--batches-per-shard", type=POSITIVE, default=16,
                   help="shard size in batches when the work is split (torchrun, Slurm array) or resumed")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier MoEScope profile at --out")
    p.add_argument("--keep-shards", action="store_true",
                   help="keep OUT.parts/ (the per-shard files) after they are merged into --out")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("export", help="write a physically pruned checkpoint from a plan")
    _model_args(p)
    p.add_argument("--plan", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier MoEScope export at --out")
    p.add_argument("--max-shard-size", type=_shard_size, default="5GB",
                   help="largest safetensors file the export writes, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--min-router-agreement", type=_fraction, default=None,
                   help="a probs-mapped merging plan's fitted routers must agree with its top-k on at least this "
                        "share of held-out tokens (default 0.95)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="score tasks, optionally under a pruning plan, against the full model")
    _model_args(p)
    p.add_argument("--task", action="append", default=[],
                   help="a sample task name (qa, arithmetic, code, prose, qa_choice) or a task.json; repeatable")
    p.add_argument("--lm-eval", type=_names, default=[], metavar="TASKS",
                   help="lm-evaluation-harness tasks, comma-separated (arc_easy, or moescope_qa_choice with "
                        "--lm-eval-include sample_data/lm_eval); needs pip install 'moescope[lm-eval]'")
    _lm_eval_args(p)
    p.add_argument("--plan", help="evaluate with this plan's experts masked")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=NON_NEGATIVE, default=0, help="at most this many examples (0: all)")
    p.add_argument("--batch-size", type=_batch_size, default=None,
                   help="sequences per forward (default 32); lm-eval tasks also take 'auto' (their default)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("prune", help="make a pruning plan with one method")
    _model_args(p)
    p.add_argument("--method", required=True, help="random, frequency, soft_activation, reap, naee, "
                                                   "dynamic_skip, top_k, eep")
    p.add_argument("--ratio", type=_ratio, default=0.5, help="fraction of experts removed per layer (default 0.5)")
    p.add_argument("--keep", type=POSITIVE, help="experts kept per layer (instead of --ratio)")
    p.add_argument("--top-k", type=POSITIVE, help="route each token to this many experts")
    p.add_argument("--task", required=True, help="calibration task: a sample task name or a task.json")
    p.add_argument("--split", default="calibration")
    p.add_argument("--limit", type=NON_NEGATIVE, default=0, help="at most this many calibration examples")
    p.add_argument("--seed", type=NON_NEGATIVE)
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method parameter, e.g. --param generations=20 (repeatable)")
    p.add_argument("--state", help="EEP: save the search here each generation and resume from it")
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier MoEScope plan at --out")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("sweep", help="methods x ratios x tasks -> a CSV/Parquet table of metrics, size, speed")
    _model_args(p)
    p.add_argument("--methods", type=_list_of(str, "method"), default="random,frequency,soft_activation,eep",
                   help="comma-separated")
    p.add_argument("--ratios", type=_list_of(_ratio, "ratio"), default="0.25,0.5,0.75",
                   help="fractions of experts removed, comma-separated")
    p.add_argument("--tasks", type=_list_of(str, "task"), required=True,
                   help="evaluation tasks, comma-separated; lm_eval:NAME is an lm-evaluation-harness task")
    _lm_eval_args(p)
    p.add_argument("--calibration-tasks", type=_names, default="",
                   help="calibrate on these (each plan evaluated on every task); default: each task on itself")
    p.add_argument("--top-k", type=POSITIVE)
    p.add_argument("--seeds", type=_list_of(NON_NEGATIVE, "seed"), default="0",
                   help="seeds for random and EEP, comma-separated")
    p.add_argument("--limit", type=NON_NEGATIVE, default=0, help="at most this many test examples per task")
    p.add_argument("--calibration-limit", type=NON_NEGATIVE, default=0)
    p.add_argument("--out", required=True, help="table to write (.csv or .parquet)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier MoEScope sweep table at --out")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("train-sample", help="train the bundled sample MoE model on CPU (about 45 minutes)",
                       description="Options are passed on: --out DIR --minutes M --max-steps N --seed S "
                                   "--no-eval --quiet (see python sample_data/train_sample_model.py --help).")
    p.set_defaults(func=cmd_train_sample, options=[])

    p = sub.add_parser("merge-profiles", help="combine profiles of disjoint shards into one")
    p.add_argument("profiles", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier MoEScope profile at --out")
    p.set_defaults(func=cmd_merge_profiles)

    p = sub.add_parser("report", help="write a self-contained HTML report of a profile, plans and results")
    p.add_argument("--profile", required=True, help="routing profile (.parquet with its .json sidecar)")
    p.add_argument("--plan", action="append", default=[], help="a plan JSON to report on; repeatable")
    p.add_argument("--results", help="a sweep table (.csv or .parquet) of evaluated settings")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier MoEScope report at --out")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="compare two routing profiles: usage changes, per-layer divergence, flows")
    p.add_argument("a", help="profile A (.parquet), e.g. the full or base model")
    p.add_argument("b", help="profile B (.parquet), e.g. a fine-tune or the model recorded under --plan")
    p.add_argument("--task", help="compare this task alone (it must be in both profiles; default: all pooled)")
    p.add_argument("--plan", help="the plan B was recorded under: also write the re-routing flows (flows.csv)")
    p.add_argument("--out", help="folder for usage_diff.csv, divergence.csv (and flows.csv); default: print only")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier MoEScope compare folder at --out")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("dashboard", help="open the dashboard at http://127.0.0.1:PORT (this machine only)")
    p.add_argument("model", nargs="?", help="model directory or hub id (default: the bundled sample model)")
    p.add_argument("--port", type=_integer(1, "give a port from 1 to 65535"), default=8501)
    p.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input of any kind prints one ``error:`` line and returns 2; an unexpected error
    prints one line too (``--debug``, anywhere on the command line, shows its traceback) and returns 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.func is cmd_train_sample:  # its options belong to sample_data/train_sample_model.py
        args.options = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line; --debug shows the traceback
        if debug:
            raise
        message = user_message(exc)
        if message is None:
            first = str(exc).splitlines()[0] if str(exc) else ""
            print(f"error: unexpected {type(exc).__name__}: {first[:300]} (run with --debug for the traceback)",
                  file=sys.stderr)
            return 1
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
