"""``distillbench``: one subcommand per Snakemake rule, each calling one function of :mod:`harness.steps`.

    distillbench validate  --config config/tiny.yaml [--recipes recipes]
    distillbench data      --config config/tiny.yaml
    distillbench tokenizer --config config/tiny.yaml
    distillbench teacher   --config config/tiny.yaml
    distillbench student-init --config config/tiny.yaml --seed 1
    distillbench teacher-cache --config config/tiny.yaml
    distillbench distill   --config config/tiny.yaml --recipe fkl --seed 1 [--teacher-seed 1]
    distillbench tune      --config config/tiny.yaml --recipe fkl     (the learning-rate search, when the suite has one)
    distillbench evaluate  --config config/tiny.yaml --target fkl --seed 1     (target: a recipe, teacher or init)
    distillbench leaderboard --config config/tiny.yaml                          (→ work/<suite>/leaderboard)
    distillbench publish   --config config/tiny.yaml     (work/<suite>/leaderboard → results/<suite> + README table)
    distillbench check     --config config/tiny.yaml     (do the published results match the code and the last run?)
    distillbench status    --config config/tiny.yaml     (what ran, failed, is stale; the top of the leaderboard)
    distillbench objectives                                                     (list the registry)
    distillbench recipes                                     (every recipe's method card: paper, code, deviations)

Errors in the user's input (recipes, suite, data, models) print one line naming the file, key and fix and
exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .data.errors import DataError
from .schema import ConfigError

USER_ERRORS = (ConfigError, DataError)


def user_errors() -> tuple[type[Exception], ...]:
    """The errors reported in one line: bad input, and the model and objective errors of the modules a step
    loaded (looked up, not imported: those modules need torch, and only a step that loaded them can raise)."""
    loaded = [getattr(sys.modules.get(module), name, None)
              for module, name in (("harness.models", "ModelError"), ("harness.objectives", "ObjectiveError"))]
    return (*USER_ERRORS, *(e for e in loaded if e is not None))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distillbench", description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name, help_, *extra):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", required=name != "objectives", help="suite file, e.g. config/tiny.yaml")
        sp.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        for args, kwargs in extra:
            sp.add_argument(*args, **kwargs)
        return sp

    recipes = (("--recipes",), {"default": None, "help": "recipes directory (default: the suite's)"})
    tseed = (("--teacher-seed",), {"type": int, "default": None,
                                   "help": "which of the suite's teacher_seeds (default: the primary, the first)"})
    cmd("validate", "check a suite, its recipes and data paths without running anything", recipes)
    cmd("data", "write the suite's train/valid/test data")
    cmd("tokenizer", "train or save the suite's tokenizer")
    cmd("teacher", "pre-train the tiny teacher (or point to an existing one)", tseed)
    cmd("student-init", "build the initial student of a seed", (("--seed",), {"type": int, "required": True}))
    cmd("teacher-cache", "compute the teacher's outputs on the training data once", tseed)
    cmd("distill", "train students under one recipe, one run per seed (one process for all: start-up paid once)",
        (("--recipe",), {"required": True}),
        (("--seed",), {"type": int, "action": "append", "required": True, "help": "training seed; repeat for several"}),
        tseed)
    cmd("tune", "the equal hyperparameter search of one recipe (train at every grid value, score on validation)",
        (("--recipe",), {"required": True}))
    cmd("evaluate", "evaluate a trained student, the teacher or the untrained student",
        (("--target",), {"required": True, "help": "a recipe name, 'teacher' or 'init'"}),
        (("--seed",), {"type": int, "action": "append", "help": "training seed(s); repeat for several (default 0)"}),
        tseed)
    cmd("leaderboard", "aggregate the plan's records into leaderboards and plots under work/<suite>/leaderboard",
        (("--processes",), {"type": int, "default": 1,
                            "help": "draw the plots in up to this many processes (the files are the same; default 1)"}))
    cmd("publish", "copy work/<suite>/leaderboard into results/<suite> and regenerate the README's table")
    cmd("status", "what ran, failed or is stale in the work directory, and the top of the leaderboard")
    cmd("check", "say whether results/<suite> matches the current code, plan and last run (exit 1 if not)")
    sp = sub.add_parser("objectives", help="list the registered objectives with their parameters and ranges")
    sp.add_argument("--config", default=None)
    sp = sub.add_parser("recipes", help="list recipes with their method cards (reference, code, deviations)")
    sp.add_argument("--recipes", default="recipes", help="recipes directory (default: recipes)")
    return p


def _method_cards(recipes_dir: str) -> str:
    from .recipes import discover

    out = []
    for name, r in discover(recipes_dir).items():
        ref = r.reference
        devs = ref.get("deviations")
        out.append(f"{name}: {r.description}\n  loss: {r.summary()}; mode: {r.mode}; dropout: {r.dropout}\n"
                   f"  paper: {ref.get('paper') or '—'}\n  code: {ref.get('code') or '—'}\n  deviations: "
                   + ("none" if devs == [] else "not listed" if devs is None else "")
                   + "".join(f"\n    - {d}" for d in devs or []))
    return "\n".join(out)


def set_threads(n: int | None, command: str | None = None) -> None:
    """torch's CPU threads. A model step (or any step once torch is loaded) sets them on torch, as before; a
    step without models sets ``OMP_NUM_THREADS``, which torch reads if the step imports it later (reading
    recipes does), so a step that never needs torch does not import it for this."""
    if not n:
        return
    if command in _MODEL_STEPS or "torch" in sys.modules:
        import torch

        torch.set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)


#: what reading the suite's recipes imports (their objectives and modes are validated; both need torch today)
_RECIPES = ("harness.objectives", "harness.modes")
_TRAIN = ("torch", "harness.models", "harness.distill", "harness.objectives")
#: what each step imports before its first useful work (its code and libraries; the model steps add the
#: suite's model classes, see :func:`model_modules`). :func:`ready` imports them before the step runs.
STEP_MODULES: dict[str, tuple[str, ...]] = {
    "data": ("harness.data.tiny",),
    "tokenizer": ("harness.data.tokenizer", "transformers.tokenization_utils_fast"),
    "teacher": _TRAIN,
    "student-init": ("torch", "harness.models"),
    "teacher-cache": ("torch", "harness.models", "harness.teacher_cache"),
    "distill": (*_TRAIN, "harness.modes", "harness.teacher_cache"),
    "tune": (*_TRAIN, "harness.modes", "harness.evaluation.evaluate_run"),
    "evaluate": ("torch", "harness.models", "harness.evaluation.evaluate_run"),
    "leaderboard": ("harness.report", "harness.timings", *_RECIPES),
    "publish": ("harness.publishing",),
    "status": ("harness.status", *_RECIPES),
    "check": ("harness.publishing", *_RECIPES),
}
_MODEL_STEPS = ("teacher", "student-init", "teacher-cache", "distill", "tune", "evaluate")
_ARCH_MODULES = {"gpt2": "transformers.models.gpt2.modeling_gpt2", "llama": "transformers.models.llama.modeling_llama"}


def model_modules(suite) -> tuple[str, ...]:
    """The transformers modules of the suite's model classes: a tiny architecture's own module; an existing
    checkpoint's class is found from its config at load time, so only transformers' modeling core."""
    return tuple(dict.fromkeys(_ARCH_MODULES.get(entry.get("arch") or "", "transformers.modeling_utils")
                               if not (entry.get("path") or entry.get("hub")) else "transformers.modeling_utils"
                               for entry in (suite.teacher, suite.student)))


#: set by ``python -m harness.bench startup``: a step stops once ready and prints the time (start-up probe)
PROBE_ENV = "DISTILLBENCH_STARTUP_PROBE"


def ready(command: str, suite) -> bool:
    """Import what ``command`` needs (:data:`STEP_MODULES`); under the start-up probe print
    ``ready <unix time> torch=yes|no`` and return True (the caller then exits before the step's work)."""
    import importlib
    import time

    for module in STEP_MODULES.get(command, ()) + (model_modules(suite) if command in _MODEL_STEPS else ()):
        importlib.import_module(module)
    if os.environ.get(PROBE_ENV):
        print(f"ready {time.time():.6f} torch={'yes' if 'torch' in sys.modules else 'no'}", flush=True)
        return True
    return False


def run(args: argparse.Namespace) -> int:
    from .suite import load_suite

    if args.command == "objectives":
        from . import objectives

        for row in objectives.describe():
            params = ", ".join(f"{p['name']}={p['default']!r} {p['range']}".rstrip() for p in row["params"]) or "—"
            print(f"{row['id']:13s} {row['kind']:13s} sparse={'yes' if row['sparse_ok'] else 'no ':3s} "
                  f"[{params}] {row['summary']}")
        return 0
    if args.command == "recipes":
        print(_method_cards(args.recipes))
        return 0
    set_threads(args.threads, args.command)
    suite = load_suite(args.config).for_teacher(getattr(args, "teacher_seed", None))
    progress = not args.no_progress
    from .validate import validate_plan

    if args.command == "validate":
        report = validate_plan(suite, recipes_dir=args.recipes, check_data=True)
        print(report)
        return 0
    from . import steps

    recipe = None
    if args.command in ("distill", "tune"):
        validate_plan(suite, check_data=False)
        recipe = suite.recipes()[args.recipe]
    if ready(args.command, suite):
        return 0
    if args.command == "data":
        steps.prepare_data(suite)
    elif args.command == "tokenizer":
        steps.prepare_tokenizer(suite)
    elif args.command == "teacher":
        steps.prepare_teacher(suite, progress=progress)
    elif args.command == "student-init":
        steps.init_student(suite, args.seed)
    elif args.command == "teacher-cache":
        steps.build_teacher_cache(suite, progress=progress)
    elif args.command == "distill":
        for seed in args.seed:  # each seed is its own run: own run.json, checkpoint and fingerprint
            steps.distill(suite, recipe, seed, progress=progress)
    elif args.command == "tune":
        steps.tune(suite, recipe, progress=progress)
    elif args.command == "evaluate":
        steps.evaluate(suite, args.target, args.seed or [0], progress=progress)
    elif args.command == "leaderboard":
        steps.leaderboard(suite, processes=args.processes)
    elif args.command == "publish":
        from .publishing import publish

        print(f"published {publish(suite)}")
    elif args.command == "status":
        from .status import status

        print(status(suite))
    elif args.command == "check":
        from .publishing import check

        ok, lines = check(suite)
        print("\n".join(lines))
        return 0 if ok else 1
    return 0


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent process (a job's shell, Snakemake) dies, instead of running on and
    writing outputs after the job was marked failed."""
    if sys.platform != "linux":
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    if argv is None and os.environ.get("DISTILLBENCH_WORKER") == "1":  # cheap test before importing the client
        from .forkserver import run_in_worker, wanted  # a thin client: the warm worker runs the step

        if wanted(sys.argv[1:]):
            _die_with_parent()
            code = run_in_worker(sys.argv[1:])
            if code is not None:
                return code
    usage = os.environ.get("DISTILLBENCH_WORKER_USAGE")  # forkserver.USAGE_ENV (not imported on this path)
    if argv is None and usage:  # this process is the step: no worker usage to report
        Path(usage).unlink(missing_ok=True)
    args = _parser().parse_args(argv)
    if argv is None:
        _die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if args.no_progress:  # also the Hugging Face bars (loading/saving weights), so an error stays one line
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    try:
        return run(args)
    except Exception as exc:
        if args.debug or not isinstance(exc, user_errors()):
            raise
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # one line
        print(f"distillbench {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
