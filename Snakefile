# DistillBench: the pipeline is the method section.
#
#   data → tokenizer → teacher → [teacher cache] → student init (per seed) → distill {recipe} × {seed}
#        → evaluate → leaderboard (work/<suite>/leaderboard)
#
# Every rule runs one `distillbench` subcommand (harness/cli.py → harness/steps.py) with the interpreter that runs
# Snakemake, so no activated environment is needed, and can be run by hand.
#   snakemake --cores all                                  # the tiny suite (config/tiny.yaml)
#   snakemake --cores all --configfile config/smoke.yaml   # another suite
#   snakemake -n                                           # the plan;   snakemake --report report.html
# A run writes only under work/<suite>/; `distillbench publish` copies its leaderboard into results/<suite>.
import os
import sys
from pathlib import Path

import yaml

from harness.fingerprint import Fingerprints, digest, report_code_digest
from harness.models import resolve_device
from harness.parallel import launch_prefix
from harness.suite import load_suite
from harness.validate import plan_or_exit

from snakemake.utils import min_version

min_version("8.0")

if not config:  # no --configfile: the embedded default suite
    config.update(yaml.safe_load(Path("config/tiny.yaml").read_text()))
ORIGIN = str(workflow.configfiles[-1]) if workflow.configfiles else "config/tiny.yaml"

# The resolved configuration (suite file + any --config overrides) is what every step reads. Its file name is
# its content's hash, so a second invocation with another configuration never rewrites the file that running
# jobs read; `origin` lets errors name the user's file.
_resolved = {**dict(config), "origin": ORIGIN}
_text = yaml.safe_dump(_resolved, sort_keys=True)
SUITE_FILE = Path(config.get("workdir") or f"work/{config['suite']}") / "config" / f"suite-{digest(_resolved, 12)}.yaml"
if not SUITE_FILE.exists():
    SUITE_FILE.parent.mkdir(parents=True, exist_ok=True)
    _tmp = SUITE_FILE.with_suffix(".tmp")
    _tmp.write_text(_text)
    _tmp.replace(SUITE_FILE)

SUITE = plan_or_exit(SUITE_FILE)  # a bad value fails here, in seconds, in one line, before anything trains
RECIPES = SUITE.recipes()
FP = Fingerprints(SUITE, RECIPES)
SEEDS = SUITE.seeds
SETS = [s["name"] for s in SUITE.evaluation["sets"]]
W = SUITE.workdir
# exec: killing the job kills the step itself. On a CPU, steps run in a warm worker (harness/forkserver.py: torch,
# transformers and lm-eval imported once, a fork per step); DISTILLBENCH_WORKER=0 in the environment turns it off.
WORKER = "${DISTILLBENCH_WORKER:-1}" if resolve_device(SUITE.device) == "cpu" else "0"
CLI = f"DISTILLBENCH_WORKER={WORKER} exec {sys.executable} -m harness.cli --no-progress"
# under the worker the step is not in the job's process tree: the client writes its CPU time and peak RSS here
USAGE = "DISTILLBENCH_WORKER_USAGE={log}.usage.json"
ARGS = f"--config {SUITE_FILE} --threads {SUITE.threads_per_job}"
try:  # the cores this run was given (--cores); none when a cluster executor runs the jobs
    RUN_CORES = int(workflow.cores)
except Exception:
    RUN_CORES = 1
PLOT_PROCESSES = max(1, min(3, os.cpu_count() or 1, RUN_CORES))  # the leaderboard's (see the rule)
GPU = 0 if resolve_device(SUITE.device) == "cpu" else 1  # one GPU per job; constrain with --resources gpu=N
RESOURCES = dict(config.get("resources") or {})
# num_processes > 1: each distill run is started by `accelerate launch` (DDP; see harness/parallel.py)
LAUNCH = f"exec {launch_prefix(SUITE.num_processes, SUITE.device)} --no-progress" if SUITE.num_processes > 1 else CLI

wildcard_constraints:
    recipe="|".join(RECIPES) or "none",
    target="|".join([*RECIPES, "init"]),
    seed=r"\d+",


CACHE = SUITE.teacher_cache is not None
# teacher_seeds: one teacher per seed; every final run is repeated with each (the primary, the first, keeps the
# plain layout: teacher/, teacher_cache.pt, runs/, records/; another's outputs carry its seed)
VIEWS = SUITE.teachers()


def teacher_files(view):
    return [view.teacher_dir / "teacher.json"] + ([view.cache_path] if CACHE else [])


def teacher_inputs(view):
    """Teacher files a run depends on: none for pure SFT; the teacher (and its cache) otherwise; and, with a
    hyperparameter search in the suite, the search's choice for the recipe."""
    def inputs(wildcards):
        chosen = [SUITE.chosen_path(wildcards.recipe)] if SUITE.tuning else []
        return chosen + (teacher_files(view) if RECIPES[wildcards.recipe].uses_teacher else [])
    return inputs


def search_inputs(wildcards):
    """What the search of a recipe needs: the primary teacher (and cache), the initial students of its seeds."""
    teacher = teacher_files(SUITE) if RECIPES[wildcards.recipe].uses_teacher else []
    return teacher + [W / "student_init" / f"seed{s}" / "config.json" for s in SUITE.tuning["seeds"]]


def records_of(view):
    """Every record the leaderboard needs from one teacher (the untrained student: the primary's only)."""
    targets = [(r, s) for r in RECIPES for s in SEEDS] + [("teacher", 0)]
    targets += [("init", s) for s in SEEDS] if view.primary_teacher else []
    return [view.records_dir / t / f"seed{s}" / f"{x}.json" for t, s in targets for x in SETS]


rule all:
    input:
        SUITE.leaderboard_dir / "leaderboard.md",


rule data:
    output: [W / "data" / f"{split}.jsonl" for split in ("train", "valid", "test") if SUITE.data["kind"] == "tiny" or SUITE.data.get(split) is not None]
    params: fp=FP.data()
    log: W / "logs" / "data.log"
    benchmark: W / "benchmarks" / "data.tsv"
    shell: USAGE + " {CLI} data {ARGS} > {log} 2>&1"


rule tokenizer:
    input: W / "data" / "train.jsonl"
    output: [W / "tokenizer" / "tokenizer.json"] + ([SUITE.student_tokenizer_dir / "tokenizer.json"] if SUITE.cross_tokenizer else [])
    params: fp=FP.tokenizer(), student=digest(SUITE.student["tokenizer"])  # the student's own tokenizer, if any
    log: W / "logs" / "tokenizer.log"
    benchmark: W / "benchmarks" / "tokenizer.tsv"
    shell: USAGE + " {CLI} tokenizer {ARGS} > {log} 2>&1"


rule student_init:
    input: W / "tokenizer" / "tokenizer.json"
    output: W / "student_init" / "seed{seed}" / "config.json"
    params: fp=lambda wc: FP.student_init(int(wc.seed))
    log: W / "logs" / "student_init_{seed}.log"
    benchmark: W / "benchmarks" / "student_init_{seed}.tsv"
    shell: USAGE + " {CLI} student-init {ARGS} --seed {wildcards.seed} > {log} 2>&1"


if SUITE.tuning:
    rule tune:
        # the equal hyperparameter search: every recipe trained at every grid value with the same seeds, scored on
        # the validation split by the primary metric; one job per recipe (with the primary teacher)
        input:
            search_inputs,
            sources=lambda wc: RECIPES[wc.recipe].source_files(),
        output: W / "tuning" / "{recipe}" / "chosen.json"
        threads: SUITE.threads_per_job
        resources: gpu=GPU, **RESOURCES.get("distill", {})
        log: W / "logs" / "tune_{recipe}.log"
        benchmark: W / "benchmarks" / "tune_{recipe}.tsv"
        params: fp=lambda wc: digest(sorted(FP.tuning_records(wc.recipe).values()))
        shell: USAGE + " {CLI} tune {ARGS} --recipe {wildcards.recipe} > {log} 2>&1"


# the rules that depend on the teacher, once per teacher seed (rule names: teacher, teacher_1, distill_1, ...)
for VIEW in VIEWS:
    T = VIEW.teacher_seed
    SFX = "" if VIEW.primary_teacher else f"_{T}"
    TFP = FP.for_teacher(T)

    rule:
        name: f"teacher{SFX}"
        input: W / "tokenizer" / "tokenizer.json"
        output: VIEW.teacher_dir / "teacher.json"
        params: tseed=T, fp=TFP.teacher()
        threads: SUITE.threads_per_job  # tiny models: one thread is faster than two (measured)
        resources: gpu=GPU, **RESOURCES.get("teacher", {})
        log: W / "logs" / f"teacher{SFX}.log"
        benchmark: W / "benchmarks" / f"teacher{SFX}.tsv"
        shell: USAGE + " {CLI} teacher {ARGS} --teacher-seed {params.tseed} > {log} 2>&1"

    if CACHE:
        rule:
            name: f"teacher_cache{SFX}"
            input: VIEW.teacher_dir / "teacher.json"
            output: VIEW.cache_path
            params: tseed=T, fp=TFP.teacher_cache()
            threads: SUITE.threads_per_job
            resources: gpu=GPU, **RESOURCES.get("teacher", {})
            log: W / "logs" / f"teacher_cache{SFX}.log"
            benchmark: W / "benchmarks" / f"teacher_cache{SFX}.tsv"
            shell: USAGE + " {CLI} teacher-cache {ARGS} --teacher-seed {params.tseed} > {log} 2>&1"

    if SUITE.distill_jobs == "per_recipe":
        rule:
            # one job per recipe trains every seed (one process: start-up and loading paid once — small models);
            # each seed is still its own run with its own run.json, checkpoint and fingerprint
            name: f"distill{SFX}"
            input:
                teacher_inputs(VIEW),
                [W / "student_init" / f"seed{s}" / "config.json" for s in SEEDS],
                sources=lambda wc: RECIPES[wc.recipe].source_files(),  # the recipe and its user objective modules
            output: [VIEW.run_dir("{recipe}", s) / "run.json" for s in SEEDS]  # the view's layout (teacher users)
            threads: SUITE.threads_per_job * SUITE.num_processes
            resources: gpu=GPU * SUITE.num_processes, **RESOURCES.get("distill", {})
            log: W / "logs" / (f"distill{SFX}_" + "{recipe}.log")
            benchmark: W / "benchmarks" / (f"distill{SFX}_" + "{recipe}.tsv")
            params: tseed=T, fp=lambda wc, f=TFP: digest([f.run(wc.recipe, s) for s in SEEDS]), launch=LAUNCH,
                    seeds=" ".join(f"--seed {s}" for s in SEEDS)
            shell: USAGE + " {params.launch} distill {ARGS} --teacher-seed {params.tseed} --recipe {wildcards.recipe} {params.seeds} > {log} 2>&1"
    else:
        rule:
            # one job per (recipe, seed): runs in parallel on a cluster or several GPUs
            name: f"distill{SFX}"
            input:
                teacher_inputs(VIEW),
                W / "student_init" / "seed{seed}" / "config.json",
                sources=lambda wc: RECIPES[wc.recipe].source_files(),
            output: VIEW.run_dir("{recipe}", "{seed}") / "run.json"
            threads: SUITE.threads_per_job * SUITE.num_processes
            resources: gpu=GPU * SUITE.num_processes, **RESOURCES.get("distill", {})
            log: W / "logs" / (f"distill{SFX}_" + "{recipe}_{seed}.log")
            benchmark: W / "benchmarks" / (f"distill{SFX}_" + "{recipe}_{seed}.tsv")
            params: tseed=T, fp=lambda wc, f=TFP: f.run(wc.recipe, int(wc.seed)), launch=LAUNCH
            shell: USAGE + " {params.launch} distill {ARGS} --teacher-seed {params.tseed} --recipe {wildcards.recipe} --seed {wildcards.seed} > {log} 2>&1"

    def evaluate_inputs(wildcards, view=VIEW):
        """One evaluate job per target covers all its seeds: the teacher and the data are loaded once."""
        t = wildcards.target
        if t == "init":
            return [W / "student_init" / f"seed{s}" / "config.json" for s in SEEDS] + [view.teacher_dir / "teacher.json"]
        return [view.run_dir(t, s) / "run.json" for s in SEEDS] + [view.teacher_dir / "teacher.json"]

    rule:
        name: f"evaluate{SFX}"
        input: evaluate_inputs
        output: [VIEW.records_dir / "{target}" / f"seed{s}" / f"{x}.json" for s in SEEDS for x in SETS]
        params: tseed=T, fp=lambda wc, f=TFP: digest([f.record(wc.target, s) for s in SEEDS]),
                seeds=" ".join(f"--seed {s}" for s in SEEDS)
        threads: SUITE.threads_per_job
        resources: gpu=GPU, **RESOURCES.get("evaluate", {})
        log: W / "logs" / (f"evaluate{SFX}_" + "{target}.log")
        benchmark: W / "benchmarks" / (f"evaluate{SFX}_" + "{target}.tsv")
        shell: USAGE + " {CLI} evaluate {ARGS} --teacher-seed {params.tseed} --target {wildcards.target} {params.seeds} > {log} 2>&1"

    rule:
        name: f"evaluate_teacher{SFX}"
        input: VIEW.teacher_dir / "teacher.json"
        output: [VIEW.records_dir / "teacher" / "seed0" / f"{x}.json" for x in SETS]
        params: tseed=T, fp=TFP.record("teacher", 0)
        threads: SUITE.threads_per_job
        resources: gpu=GPU, **RESOURCES.get("evaluate", {})
        log: W / "logs" / f"evaluate_teacher{SFX}.log"
        benchmark: W / "benchmarks" / f"evaluate_teacher{SFX}.tsv"
        shell: USAGE + " {CLI} evaluate {ARGS} --teacher-seed {params.tseed} --target teacher --seed 0 > {log} 2>&1"


rule leaderboard:
    input:
        [path for view in VIEWS for path in records_of(view)],
        [SUITE.chosen_path(r) for r in RECIPES] if SUITE.tuning else [],
    output:
        report(SUITE.leaderboard_dir / "leaderboard.md", category="Leaderboard"),
        SUITE.leaderboard_dir / "leaderboard.csv",
        SUITE.leaderboard_dir / "scores.csv",
        SUITE.leaderboard_dir / "provenance.json",
        report(SUITE.leaderboard_dir / "plots" / "scores.png", category="Plots"),
    params: tseed=T, fp=FP.plan_digest()
    log: W / "logs" / "leaderboard.log"
    benchmark: W / "benchmarks" / "leaderboard.tsv"
    threads: SUITE.threads_per_job
    # the last job: nothing else can run beside it, so it draws its plots side by side on the cores the run was
    # given (harness/report/render_plots.py; the files are the same). Not as `threads:`: Snakemake would export
    # them as OMP_NUM_THREADS, and a job whose environment differs gets a warm worker of its own (seconds).
    # ({PLOT_PROCESSES} is filled in when the job runs: the rule's code stays the same whatever --cores is, so
    # another --cores never makes Snakemake re-run a finished leaderboard)
    shell: USAGE + " {CLI} leaderboard {ARGS} --processes {PLOT_PROCESSES} > {log} 2>&1"
