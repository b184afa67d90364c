# DistillBench: the pipeline is the method section.
#
#   data → tokenizer → teacher → student init (per seed) → distill {recipe} × {seed} → evaluate → publish
#
# Every rule runs one `distillbench` subcommand (harness/cli.py → harness/steps.py) and can be run by hand.
#   snakemake --cores all                                  # the tiny suite (config/tiny.yaml)
#   snakemake --cores all --configfile config/smoke.yaml   # another suite
#   snakemake -n                                           # the plan;   snakemake --report report.html
import hashlib
from pathlib import Path

import yaml

from harness.parallel import launch_prefix
from harness.suite import load_suite
from harness.validate import validate_plan

if not config:  # no --configfile: the embedded default suite
    config.update(yaml.safe_load(Path("config/tiny.yaml").read_text()))

# The resolved configuration (suite file + any --config overrides) is what every step reads; it is rewritten
# only when it changes, and its hash is a parameter of every rule, so editing the suite re-runs what it affects.
_name = config["suite"]
SUITE_FILE = Path(config.get("workdir") or f"work/{_name}") / "suite.resolved.yaml"
_text = yaml.safe_dump(dict(config), sort_keys=True)
SUITE_FILE.parent.mkdir(parents=True, exist_ok=True)
if not SUITE_FILE.exists() or SUITE_FILE.read_text() != _text:
    SUITE_FILE.write_text(_text)


def config_hash(*sections):
    """Hash of the config sections a rule depends on (a params change makes Snakemake re-run the rule)."""
    picked = {k: config.get(k) for k in sections}
    return hashlib.sha256(yaml.safe_dump(picked, sort_keys=True).encode()).hexdigest()[:12]


H_DATA = config_hash("data")
H_TOKENIZER = config_hash("data", "tokenizer")
H_TEACHER = config_hash("data", "tokenizer", "teacher", "training")
H_STUDENT = config_hash("tokenizer", "student")
H_DISTILL = config_hash("data", "tokenizer", "teacher", "student", "training", "teacher_cache")
H_EVAL = config_hash("data", "tokenizer", "teacher", "student", "training", "teacher_cache", "evaluation")

SUITE = load_suite(SUITE_FILE)
validate_plan(SUITE, check_data=True)  # a typo fails here, in seconds, before anything trains
RECIPES = SUITE.recipes()
SEEDS = SUITE.seeds
SETS = [s["name"] for s in SUITE.evaluation["sets"]]
W, R = SUITE.workdir, SUITE.results
CLI = f"distillbench --no-progress"
ARGS = f"--config {SUITE_FILE} --threads {SUITE.threads_per_job}"
GPU = 0 if SUITE.device == "cpu" else 1  # one GPU per job; constrain with --resources gpu=N
RESOURCES = dict(config.get("resources") or {})
# num_processes > 1: each distill run is started by `accelerate launch` (DDP; see harness/parallel.py)
LAUNCH = launch_prefix(SUITE.num_processes, SUITE.device) + " --no-progress" if SUITE.num_processes > 1 else CLI

wildcard_constraints:
    recipe="|".join(RECIPES) or "none",
    target="|".join([*RECIPES, "init"]),
    seed=r"\d+",


CACHE = SUITE.teacher_cache is not None


def teacher_inputs(wildcards):
    """Teacher files a run depends on: none for pure SFT; the shared teacher cache when the suite has one."""
    if not RECIPES[wildcards.recipe].uses_teacher:
        return []
    return [W / "teacher" / "teacher.json"] + ([SUITE.cache_path] if CACHE else [])


TARGETS = [(r, s) for r in RECIPES for s in SEEDS] + [("teacher", 0)] + [("init", s) for s in SEEDS]

rule all:
    input:
        R / "leaderboard.md",


rule data:
    output: [W / "data" / f"{split}.jsonl" for split in ("train", "valid", "test")] if SUITE.data["kind"] == "tiny" else [W / "data" / "train.jsonl"]
    params: h=H_DATA
    log: W / "logs" / "data.log"
    shell: "{CLI} data {ARGS} > {log} 2>&1"


rule tokenizer:
    input: W / "data" / "train.jsonl"
    output: W / "tokenizer" / "tokenizer.json"
    params: h=H_TOKENIZER
    log: W / "logs" / "tokenizer.log"
    shell: "{CLI} tokenizer {ARGS} > {log} 2>&1"


rule teacher:
    input: W / "tokenizer" / "tokenizer.json"
    output: W / "teacher" / "teacher.json"
    params: h=H_TEACHER
    threads: SUITE.threads_per_job  # tiny models: one thread is faster than two (measured)
    resources: gpu=GPU, **RESOURCES.get("teacher", {})
    log: W / "logs" / "teacher.log"
    benchmark: W / "benchmarks" / "teacher.tsv"
    shell: "{CLI} teacher {ARGS} > {log} 2>&1"


rule teacher_cache:
    input: W / "teacher" / "teacher.json"
    output: SUITE.cache_path
    params: h=H_DISTILL
    threads: SUITE.threads_per_job  # tiny models: one thread is faster than two (measured)
    resources: gpu=GPU, **RESOURCES.get("teacher", {})
    log: W / "logs" / "teacher_cache.log"
    benchmark: W / "benchmarks" / "teacher_cache.tsv"
    shell: "{CLI} teacher-cache {ARGS} > {log} 2>&1"


rule student_init:
    input: W / "tokenizer" / "tokenizer.json"
    output: W / "student_init" / "seed{seed}" / "config.json"
    params: h=H_STUDENT
    log: W / "logs" / "student_init_{seed}.log"
    shell: "{CLI} student-init {ARGS} --seed {wildcards.seed} > {log} 2>&1"


rule distill:
    input:
        teacher_inputs,
        W / "student_init" / "seed{seed}" / "config.json",
        recipe=lambda wc: RECIPES[wc.recipe].path,
    output: W / "runs" / "{recipe}" / "seed{seed}" / "run.json"
    threads: SUITE.threads_per_job * SUITE.num_processes
    resources: gpu=GPU * SUITE.num_processes, **RESOURCES.get("distill", {})
    log: W / "logs" / "distill_{recipe}_{seed}.log"
    benchmark: W / "benchmarks" / "distill_{recipe}_{seed}.tsv"
    params: h=H_DISTILL, launch=LAUNCH
    shell: "{params.launch} distill {ARGS} --recipe {wildcards.recipe} --seed {wildcards.seed} > {log} 2>&1"


def evaluate_inputs(wildcards):
    """One evaluate job per target covers all its seeds: the teacher and the data are loaded once."""
    t = wildcards.target
    if t == "init":
        return [W / "student_init" / f"seed{s}" / "config.json" for s in SEEDS] + [W / "teacher" / "teacher.json"]
    return [W / "runs" / t / f"seed{s}" / "run.json" for s in SEEDS] + [W / "teacher" / "teacher.json"]


rule evaluate:
    input: evaluate_inputs
    output: [W / "records" / "{target}" / f"seed{s}" / f"{x}.json" for s in SEEDS for x in SETS]
    params: h=H_EVAL, seeds=" ".join(f"--seed {s}" for s in SEEDS)
    threads: SUITE.threads_per_job
    resources: gpu=GPU, **RESOURCES.get("evaluate", {})
    log: W / "logs" / "evaluate_{target}.log"
    benchmark: W / "benchmarks" / "evaluate_{target}.tsv"
    shell: "{CLI} evaluate {ARGS} --target {wildcards.target} {params.seeds} > {log} 2>&1"


rule evaluate_teacher:
    input: W / "teacher" / "teacher.json"
    output: [W / "records" / "teacher" / "seed0" / f"{x}.json" for x in SETS]
    params: h=H_EVAL
    threads: SUITE.threads_per_job
    resources: gpu=GPU, **RESOURCES.get("evaluate", {})
    log: W / "logs" / "evaluate_teacher.log"
    benchmark: W / "benchmarks" / "evaluate_teacher.tsv"
    shell: "{CLI} evaluate {ARGS} --target teacher --seed 0 > {log} 2>&1"


rule publish:
    input: [W / "records" / t / f"seed{s}" / f"{x}.json" for t, s in TARGETS for x in SETS]
    output:
        report(R / "leaderboard.md", category="Leaderboard"),
        R / "leaderboard.csv",
        R / "leaderboard.html",
        R / "leaderboard.tex",
        report(R / "plots" / "scores.png", category="Plots"),
        report(R / "plots" / "pareto.png", category="Plots"),
        report(R / "plots" / "heatmap.png", category="Plots"),
        report(R / "plots" / "training_curves.png", category="Plots"),
    params: h=H_EVAL
    log: W / "logs" / "publish.log"
    shell: "{CLI} publish --config {SUITE_FILE} > {log} 2>&1"
