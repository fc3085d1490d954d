"""``iteris merge CONFIG --out DIR``, ``iteris methods``, ``iteris demo``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from .errors import IterisError, Terminated


def _cmd_merge(args) -> int:
    from .merge import merge

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    parameters = None
    if args.method:
        from .config import load_config

        if load_config(args.config).method != args.method:
            parameters = {}  # the config's parameters belong to its own method
    overrides = {
        "parameters": parameters,
        "device": args.device,
        "dtype": args.dtype,
        "rank": args.rank,
        "method": args.method,
        "merge_into_base": True if args.merge_into_base else None,
        "progress": False if args.quiet else None,
    }
    if args.dry_run:
        from .plan import plan_merge

        print(plan_merge(args.config, out=args.out, force=args.force, **overrides).describe())
        return 0
    result = merge(args.config, out=args.out, force=args.force, plot=args.plot, **overrides)
    if result.report.get("distributed") and int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 speaks for the run
    if parameters == {}:
        print(f"--method {args.method} ran with its default parameters (the config's were for another method).")
    print(result.summary)
    print(f"Written to {args.out}")
    return 0


def _cmd_methods(args) -> int:
    from .methods import REGISTRY

    for name, spec in sorted(REGISTRY.items()):
        tag = " [needs calibration data]" if spec.needs_calibration else ""
        print(f"{name}{tag}\n    {spec.summary}")
        for pname, default, help_text in spec.describe():
            print(f"    {pname} = {default}: {help_text}")
        print()
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import evaluate, format_table, load_eval_config, write_results

    from dataclasses import asdict

    from .placement import check_output_dir

    cfg = load_eval_config(args.config)
    overrides = {key: getattr(args, key) for key in ("device", "dtype") if getattr(args, key)}
    config_file = cfg.config_file
    cfg = load_eval_config({**asdict(cfg), **overrides, "progress": not args.quiet})
    cfg.config_file = config_file
    if args.plot and not args.out:
        raise IterisError("--plot writes scores.png beside results.json: give --out too")
    if args.out:
        check_output_dir(args.out, args.force, cfg.inputs())  # before any model loads
    if args.plot:
        from .plots import require_matplotlib

        require_matplotlib()
    results = evaluate(cfg)
    print(format_table(results))
    if args.out:
        write_results(results, args.out, args.force, cfg.inputs(), plot=args.plot)
        print(f"\nresults.json and results.md{' and scores.png' if args.plot else ''} written to {args.out}")
    if args.update_cards:
        from .evaluate import update_cards

        for path in update_cards(results, cfg):
            print(f"scores written into the model card {path}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, force=args.force, quiet=args.quiet, tiny=args.tiny, samples=args.samples, limit=args.limit)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iteris", description="Merge LoRA adapters into one (IterIS and baselines).")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge the adapters a YAML config names")
    m.add_argument("config", help="merge.yaml")
    m.add_argument("--out", required=True, help="output directory (a PEFT adapter, or a model with --merge-into-base)")
    m.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    m.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the config's, else cuda if available)")
    m.add_argument("--dtype", help="model dtype for the forward passes: float32, bfloat16, float16, auto")
    m.add_argument("--rank", type=int, help="compress the merged LoRA to this rank by SVD (error reported)")
    m.add_argument("--method", help="override the config's method")
    m.add_argument("--merge-into-base", action="store_true", help="save a full model instead of an adapter")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.add_argument("--plot", action="store_true",
                   help="also draw IterIS's per-round change and each layer's compression error (needs iteris[plot])")
    m.add_argument("--dry-run", action="store_true",
                   help="check everything and print the plan (targets, ranks, output size, memory and time "
                        "estimates) without merging or writing")
    m.set_defaults(func=_cmd_merge)

    ls = sub.add_parser("methods", help="list merge methods and their parameters")
    ls.set_defaults(func=_cmd_methods)

    e = sub.add_parser("eval", help="score the base model, each task's adapter and merged adapters on task files")
    e.add_argument("config", help="eval.yaml (base_model, tasks, models); see the README")
    e.add_argument("--out", help="write results.json and results.md here")
    e.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    e.add_argument("--device")
    e.add_argument("--dtype")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--plot", action="store_true", help="also draw the scores per task (scores.png; needs iteris[plot])")
    e.add_argument("--update-cards", action="store_true",
                   help="write each merged model's scores into the model card (README.md) iteris wrote beside it")
    e.set_defaults(func=_cmd_eval)

    d = sub.add_parser("demo", help="merge the shipped SmolLM2 task adapters with each method and score them (CPU)")
    d.add_argument("--out", default=None, help="where the merged adapters and results.json go (default: ./iteris-demo)")
    d.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    d.add_argument("--tiny", action="store_true", help="the same pipeline on a tiny model built on the spot (seconds)")
    d.add_argument("--samples", type=int, default=2, help="unlabeled calibration prompts per task")
    d.add_argument("--limit", type=int, default=8, help="held-out test examples scored per task")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_cmd_demo)
    return parser


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


def main(argv=None) -> int:
    """The command line; every problem a user can fix ends in one line on stderr and a non-zero exit:
    2 for bad input, 130 for Ctrl-C, 143 for SIGTERM (nothing half-written is left either way)."""
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        args = build_parser().parse_args(argv)
        _log_to_stderr()
        return args.func(args)
    except IterisError as exc:
        print(f"iteris: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("iteris: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("iteris: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _log_to_stderr() -> None:
    """What the library logs (a stale temporary removed, say) reaches the user as one line."""
    logger = logging.getLogger("iteris")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
        logger.setLevel(logging.INFO)


class _Stderr(logging.Handler):
    """Whatever ``sys.stderr`` is when a line is logged (not when the handler was made)."""

    def emit(self, record):
        print(f"iteris: {record.getMessage()}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
