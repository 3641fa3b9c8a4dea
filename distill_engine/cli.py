"""The ``distill-engine`` command.

Subcommands register in :data:`COMMANDS`: name → (help, add_arguments(parser), run(args) → exit code). Other
parts of the package add theirs with :func:`register` (or one entry in ``_builtin_commands``) without touching
the parser code. Training subcommands run under any launcher::

    distill-engine train --config examples/tiny_cpu.yaml                      # one process
    torchrun --nproc_per_node 2 -m distill_engine.cli train --config run.yaml  # 2 CPU processes (gloo)
    deepspeed --num_gpus 8 --module distill_engine.cli train --config run.yaml       # 8 GPUs
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

Command = Tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: Dict[str, Command] = {}


def register(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int]) -> None:
    COMMANDS[name] = (help, add_arguments, run)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML run config (schema: distill_engine/trainer/config.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-4 (repeatable; values parsed as YAML)")
    p.add_argument("--output-dir", default=None, help="shorthand for --set run.output_dir=DIR")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def _train_args(p: argparse.ArgumentParser) -> None:
    _add_run_args(p)
    p.add_argument("--resume", nargs="?", const="true", default=None, choices=["true", "auto"],
                   help="continue from output_dir/checkpoints/latest (auto: only when one exists)")
    p.add_argument("--teacher-ranks", type=int, default=None, metavar="R",
                   help="stream mode: the last R launched processes host the teacher")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although settings that change the data order or the loss differ from the "
                        "checkpoint's (run.allow_config_change)")


def _overrides(args) -> List[str]:
    ov = list(args.overrides)
    if args.output_dir:
        ov.append(f"run.output_dir={args.output_dir}")
    if getattr(args, "resume", None):
        ov.append(f"run.resume={args.resume}")
    if getattr(args, "allow_config_change", False):
        ov.append("run.allow_config_change=true")
    if getattr(args, "teacher_ranks", None) is not None:
        ov.append(f"teacher.ranks={args.teacher_ranks}")
        if args.teacher_ranks > 0:
            ov.append("teacher.source=stream")
    return ov


def _train_run(args) -> int:
    from .trainer import train

    summary = train(args.config, _overrides(args))
    if summary.get("role") == "student" and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, default=str))
    return 0


def _cache_args(p: argparse.ArgumentParser) -> None:
    _add_run_args(p)
    p.add_argument("--out", default=None, help="cache directory (default: teacher.cache_dir)")


def _cache_run(args) -> int:
    from .trainer import cache_teacher

    res = cache_teacher(args.config, _overrides(args), args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(res, default=str))
    return 0


def _builtin_commands() -> None:
    register("train", "distill a student (DeepSpeed ZeRO; teacher colocated / cache / stream / none)", _train_args,
             _train_run)
    register("cache-teacher", "run the teacher once over the data and write a packed target cache", _cache_args,
             _cache_run)
    # eval, generate, demo: defined in distill_engine/eval/cli.py
    from .eval.cli import COMMANDS as _EVAL_COMMANDS

    for name, (help_, add, run) in _EVAL_COMMANDS.items():
        register(name, help_, add, run)


_builtin_commands()

# Modules that contribute subcommands: each exposes COMMANDS = {name: (help, add_arguments, run)}.
EXTENSIONS = ["distill_engine.eval.cli"]


def _load_extensions() -> None:
    import importlib

    for mod in EXTENSIONS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # not written yet: its subcommands are simply absent
                continue
            raise
        for name, cmd in getattr(m, "COMMANDS", {}).items():
            COMMANDS.setdefault(name, cmd)


def build_parser() -> argparse.ArgumentParser:
    _load_extensions()
    parser = argparse.ArgumentParser(prog="distill-engine", description="Kernel-backed knowledge distillation for LLMs")
    # the deepspeed launcher puts --local_rank=N before the subcommand; LOCAL_RANK in the environment is what is used
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(_run=run)
    return parser


# Errors that come from what the user gave (config, paths, files, permissions): one line, exit 2.
_USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def main(argv: Optional[List[str]] = None) -> int:
    """Exit codes: 0 done; 2 a user error (one line on stderr; ``--debug`` adds the traceback); 3 training
    stopped on a non-finite loss or gradient norm; 143 stopped by SIGTERM/SIGINT after writing a checkpoint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the command line
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except BaseException as e:
        code = getattr(e, "exit_code", None)
        if code is None and not isinstance(e, _USER_ERRORS):
            raise  # a bug, or a crash we did not foresee: keep the full traceback
        if debug:
            import traceback

            traceback.print_exc()
        text = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
            text = f"{e.filename}: {text}"
        word = "stopped" if code == 143 else "error"
        sys.stderr.write(f"distill-engine {args.command}: {word}: {text}\n")
        sys.stderr.flush()
        return 2 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
