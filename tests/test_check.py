"""`mtjax train --check`, the token pre-check, and bad input that must end in one `error:` line.

Each case: the exit code, the exact stderr line, and nothing written.
"""

import ast
import json
import os

import numpy as np
import pytest

from conftest import DEMO, tiny_config
from mtjax import cli
from mtjax.errors import BadInputError


def _tree(root):
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _run(capsys, argv):
  code = cli.main(argv)
  out, err = capsys.readouterr()
  return code, out, err


def _one_error(err):
  assert err.endswith("\n") and len(err.splitlines()) == 1 and "Traceback" not in err, err
  return err.rstrip("\n")


@pytest.fixture
def quiet_dir(tmp_path, monkeypatch):
  """The working directory for a command that must write nothing (checked after it ran)."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / "keep.txt").write_text("x")
  before = _tree(tmp_path)
  yield tmp_path
  assert _tree(tmp_path) == before


# ----------------------------------------------------------------------------- item 1: --check


@pytest.mark.multidevice
def test_check_prints_valid_and_writes_nothing(quiet_dir, capsys):
  workdir = quiet_dir / "run"
  code, out, err = _run(capsys, ["train", "--check", "--config", f"{DEMO}:tiny",
                                 "--workdir", str(workdir), "--config.data.seq_len=32"])
  assert (code, err) == (0, "")
  lines = out.splitlines()
  assert lines[-1] == f"valid: {DEMO}:tiny"
  assert "  mesh: dcn=1, data=1, fsdp=8, tensor=1 on 8 cpu device(s) of this process" in lines
  assert any(line.startswith("  task reverse: weight 1; first 64 examples: prompt ") for line in lines)
  assert not workdir.exists()
  # Without a workdir too (only --check may omit it).
  code, out, err = _run(capsys, ["train", "--check", "--config", f"{DEMO}:tiny"])
  assert (code, err, out.splitlines()[-1]) == (0, "", f"valid: {DEMO}:tiny")


@pytest.mark.multidevice
def test_check_names_mesh_and_batch_problems(quiet_dir, capsys):
  code, _, err = _run(capsys, ["train", "--check", "--config", f"{DEMO}:tiny",
                               "--config.data.batch_size=4"])
  assert code == 2 and _one_error(err) == ("error: data.batch_size: 4 rows / grad_accum 1 must be "
                                           "divisible by mesh dcn*data*fsdp = 8")
  code, _, err = _run(capsys, ["train", "--check", "--config", f"{DEMO}:tiny",
                               "--config.mesh.tensor=8"])
  assert code == 2 and _one_error(err).startswith("error: model: parameter ")
  assert "is not divisible by mesh axes ('tensor',) (size 8)" in err
  code, _, err = _run(capsys, ["train", "--check", "--config", f"{DEMO}:tiny",
                               "--config.model.vocab_size=128"])
  assert code == 2 and _one_error(err) == (
      "error: model.vocab_size: 128 is smaller than the tokenizer's 259 tokens (byte); use 0 (the "
      "tokenizer's, rounded up to a multiple of 128) or at least that")


def test_train_without_workdir_or_check_is_a_usage_error(quiet_dir, capsys):
  code, _, err = _run(capsys, ["train", "--config", f"{DEMO}:tiny"])
  assert code == 2 and _one_error(err) == (
      "error: --workdir: required (only `mtjax train --check` runs without one)")


# ----------------------------------------------------------------------------- item 2: pre-check


def _spread(values):
  return f"{min(values)}/{float(np.median(values)):g}/{max(values)}"


def test_seq_len_8_on_the_demo_names_task_lengths_and_fix(quiet_dir, capsys):
  from mtjax import tasks
  # Reference: the byte tokenizer gives one token per UTF-8 byte.
  examples = tasks.get("reverse").source.load("train", 0).examples
  prompt = [len(examples[i].prompt.encode()) for i in range(64)]
  target = [len(examples[i].target.encode()) for i in range(64)]
  expected = (f"error: task 'reverse': no loss tokens at data.seq_len=8: its first 64 training "
              f"examples have prompts of {_spread(prompt)} tokens and targets of {_spread(target)} "
              "(min/median/max), and the loader cuts every example at seq_len (data.truncate=right), so no target token "
              f"is left; raise data.seq_len to at least {min(prompt) + 1} "
              f"({max(p + t for p, t in zip(prompt, target)) + 1} fits every sampled example whole)")
  code, out, err = _run(capsys, ["train", "--check", "--config", f"{DEMO}:tiny",
                                 "--config.data.seq_len=8", "--config.data.truncate=right"])
  assert (code, out) == (2, "") and _one_error(err) == expected

  from mtjax import check
  from mtjax import config as config_lib
  with pytest.raises(BadInputError) as e:
    check.require_loss_tokens(config_lib.load(f"{DEMO}:tiny", ["--config.data.seq_len=8",
                                                                 "--config.data.truncate=right"]))
  assert f"error: {e.value}" == expected
  # At the seq_len it names, the task keeps loss tokens.
  fixed = config_lib.load(f"{DEMO}:tiny", [f"--config.data.seq_len={min(prompt) + 1}",
                                           "--config.data.truncate=right",
                                           "--config.data.tasks=reverse",
                                           '--config.data.mixture={"reverse": 1.0}'])
  reverse = check.require_loss_tokens(fixed)[0]
  assert reverse.task == "reverse" and sum(map(bool, reverse.loss)) >= 1


def _jsonl_config(root, records, name="qa"):
  data = root / f"{name}.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  path = root / f"{name}_cfg.py"
  path.write_text(f'''
from mtjax import config as config_lib
from mtjax import tasks
from mtjax.tasks.sources import Fields, JsonlSource

tasks.register(tasks.Task({name!r}, JsonlSource({{"train": [{str(data)!r}]}},
                                                 Fields(prompt="question", target="answer")),
                          tasks.exact_match), replace=True)


def get_config():
  c = config_lib.load_raw({DEMO + ":tiny"!r})
  c.data.tasks = ({name!r}, "reverse")
  c.data.mixture = {{{name!r}: 1.0, "reverse": 1.0}}
  return c
''')
  return str(path)


def test_jsonl_task_longer_than_seq_len_fails_the_precheck(tmp_path, capsys):
  records = [{"question": "q" * n, "answer": "a" * k} for n, k in ((70, 3), (80, 5), (64, 2))]
  cfg = _jsonl_config(tmp_path, records)
  before = _tree(tmp_path)
  code, out, err = _run(capsys, ["train", "--check", "--config", cfg, "--config.data.truncate=right"])
  assert (code, out) == (2, "") and _one_error(err) == (
      "error: task 'qa': no loss tokens at data.seq_len=64: its first 3 training examples have "
      "prompts of 64/70/80 tokens and targets of 2/3/5 (min/median/max), and the loader cuts every "
      "example at seq_len (data.truncate=right), so no target token is left; raise data.seq_len to "
      "at least 65 (86 fits "
      "every sampled example whole)")
  assert _tree(tmp_path) == before
  # One token more than the shortest prompt: that example keeps exactly one loss token.
  code, out, _ = _run(capsys, ["train", "--check", "--config", cfg, "--config.data.seq_len=65",
                                "--config.data.truncate=right"])
  assert code == 0 and out.splitlines()[-1] == f"valid: {cfg}"
  assert "  task qa: weight 1; first 3 examples: prompt 64/70/80, target 2/3/5 tokens " \
         "(min/median/max); at seq_len 65 (right) 1 cut, 2 skipped as too long" in out.splitlines()
  # The default, prompt_left, keeps every target whole: all three examples train, cut.
  code, out, _ = _run(capsys, ["train", "--check", "--config", cfg])
  assert code == 0 and "(min/median/max); at seq_len 64 (prompt_left) 3 cut, 0 skipped as too " \
         "long" in out
  # skip drops all three: no loss tokens, named with the seq_len at which one fits whole (67).
  code, out, err = _run(capsys, ["train", "--check", "--config", cfg, "--config.data.truncate=skip"])
  assert code == 2 and "data.truncate=skip drops every example that does not fit whole; raise " \
         "data.seq_len to at least 67" in err


def test_loss_tokens_match_the_loader_s_loss_mask():
  from mtjax.data import loader, pipeline
  for p, t, seq_len in [(5, 3, 4), (5, 3, 5), (5, 3, 6), (5, 3, 9), (5, 3, 40), (0, 0, 1),
                        (10, 0, 11), (10, 0, 10), (1, 7, 3)]:
    tokens = np.arange(p + t + 2, dtype=np.int32)
    example = {"tokens": tokens, "target_start": 1 + p}
    out = loader.empty_batch(1, seq_len)
    n = min(len(tokens) - 1, seq_len)
    loader.place(out, 0, 0, n, example, task=0, segment=1)
    assert pipeline.loss_tokens(len(tokens), 1 + p, seq_len) == int(out["loss_mask"].sum()), (p, t)


def test_require_loss_tokens_returns_samples_for_a_good_config():
  from mtjax import check
  samples = check.require_loss_tokens(tiny_config())
  assert [s.task for s in samples] == ["reverse", "addition", "grammar"]
  assert all(len(s.loss) == 64 and all(s.loss) for s in samples)


# ----------------------------------------------------------------------------- item 3: finite


def test_non_finite_lr_in_a_file_and_an_override(tmp_path, capsys):
  path = tmp_path / "nan_lr.py"
  path.write_text("from mtjax import config as config_lib\n\n\ndef get_config():\n"
                  "  c = config_lib.defaults()\n  c.data.tasks = ('reverse',)\n"
                  "  c.optimizer.lr = float('nan')\n  return c\n")
  before = _tree(tmp_path)
  for config, overrides, shown in ((str(path), [], "nan"),
                                   (f"{DEMO}:tiny", ["--config.optimizer.lr=1e999"], "inf"),
                                   (f"{DEMO}:tiny", ["--config.optimizer.lr=-inf"], "-inf"),
                                   (f"{DEMO}:tiny", ["--config.optimizer.lr=nan"], "nan")):
    for check in (["--check"], ["--workdir", str(tmp_path / "w")]):
      code, out, err = _run(capsys, ["train", *check, "--config", config, *overrides])
      assert (code, out) == (2, "") and _one_error(err) == (
          f"error: optimizer.lr: expected a finite number, got {shown}")
  assert _tree(tmp_path) == before


# ----------------------------------------------------------------------------- item 4: one line


def test_workdir_that_is_a_file_or_not_writable(tmp_path, capsys, monkeypatch):
  file = tmp_path / "notes.txt"
  file.write_text("mine")
  before = _tree(tmp_path)
  code, out, err = _run(capsys, ["train", "--config", f"{DEMO}:tiny", "--workdir", str(file)])
  assert (code, out) == (2, "") and _one_error(err) == (
      f"error: --workdir: {file} is a file, expected a run directory")
  code, _, err = _run(capsys, ["train", "--config", f"{DEMO}:tiny", "--workdir", str(file / "run")])
  assert code == 2 and _one_error(err) == (
      f"error: --workdir: cannot create {file / 'run'}: {file} is not a directory")
  code, _, err = _run(capsys, ["train", "--check", "--config", f"{DEMO}:tiny", "--workdir", str(file)])
  assert code == 2 and _one_error(err) == (
      f"error: --workdir: {file} is a file, expected a run directory")

  locked = tmp_path / "locked"
  locked.mkdir()
  before = _tree(tmp_path)
  real = os.access
  monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(locked)
                      else real(p, mode, **kw))  # root ignores permission bits: say it is not
  code, _, err = _run(capsys, ["train", "--config", f"{DEMO}:tiny", "--workdir", str(locked)])
  assert code == 2 and _one_error(err) == f"error: --workdir: {locked} is not writable"
  code, _, err = _run(capsys, ["train", "--config", f"{DEMO}:tiny", "--workdir",
                               str(locked / "a" / "b")])
  assert code == 2 and _one_error(err) == (
      f"error: --workdir: cannot create {locked / 'a' / 'b'}: {locked} is not writable")
  assert _tree(tmp_path) == before and file.read_text() == "mine"
  from mtjax.check import check_workdir
  check_workdir("gs://bucket/run")  # object stores: left to the first write


def test_jsonl_path_that_is_a_directory(tmp_path, capsys):
  cfg = _jsonl_config(tmp_path, [{"question": "q", "answer": "a"}])
  (tmp_path / "qa.jsonl").unlink()
  (tmp_path / "qa.jsonl").mkdir()
  before = _tree(tmp_path)
  for argv in (["train", "--check", "--config", cfg],
               ["data", "preview", "--config", cfg, "--steps", "1"]):
    code, out, err = _run(capsys, argv)
    assert (code, out) == (2, "") and _one_error(err) == (
        f"error: {tmp_path / 'qa.jsonl'}: is a directory, expected a JSONL file")
  assert _tree(tmp_path) == before


@pytest.mark.parametrize("body,shown", [
    ("raise RuntimeError('boom')", "RuntimeError: boom"),
    ("raise AssertionError('two\\nlines')", "AssertionError: two lines"),
    ("return 1 / 0", "ZeroDivisionError: division by zero"),
    ("import nosuchmodule_xyz", "ModuleNotFoundError: No module named 'nosuchmodule_xyz'"),
])
def test_get_config_raising_anything(tmp_path, capsys, body, shown):
  path = tmp_path / "cfg.py"
  path.write_text(f"def get_config():\n  {body}\n")
  code, out, err = _run(capsys, ["train", "--check", "--config", str(path)])
  assert (code, out) == (2, "") and _one_error(err) == (
      f"error: {path}: get_config('') failed ({shown})")


@pytest.mark.parametrize("override,line", [
    ("--config.seed.x=1", "error: seed.x: seed is a value, not a group of settings"),
    ("--config.model.d_model.x.y=1", "error: model.d_model.x.y: model.d_model is a value, not a "
                                     "group of settings"),
    ("--config.data.mixture.reverse.x=1", "error: data.mixture.reverse.x: data.mixture.reverse "
                                          "is a value, not a group of settings"),
    ("--config..seed=1", "error: --config..seed=1: expected an override of the form "
                         "--config.a.b=value (a dotted name without empty parts)"),
    ("--config.model=3", "error: model: expected a group of settings (activation, attention, "
                         "d_model, dtype, embed_scale, head_dim, layer_types, lora, mlp_dim, norm_eps, "
                         "norm_plus_one, num_heads, num_kv_heads, num_layers, out_bias, "
                         "param_dtype, pinned, post_norms, pretrained, qk_norm, qkv_bias, "
                         "query_pre_attn_scalar, remat, rope_local_theta, rope_scaling, "
                         "rope_theta, rope_type, sliding_window, soft_prompt, svf, tie_embeddings, "
                         "vocab_size, z_loss), not one value, got '3'"),
    ("--config.seed=-1", "error: seed: expected an integer in [0, 2**31), got -1"),
    ("--config.checkpoint.every=100000000000000000000", "error: checkpoint.every: expected an "
     "integer that fits in 64 bits, got 100000000000000000000"),
    ("--config.optimizer.b2=1.0", "error: optimizer.b2: expected a decay rate in [0, 1), got 1.0"),
])
def test_override_below_a_leaf_and_other_bad_overrides(quiet_dir, capsys, override, line):
  code, out, err = _run(capsys, ["train", "--check", "--config", f"{DEMO}:tiny", override])
  assert (code, out) == (2, "") and _one_error(err) == line


def test_loader_state_of_the_wrong_shape_names_the_checkpoint_item():
  from mtjax.data.loader import MixtureLoader
  cfg = tiny_config()
  good = json.loads(json.dumps(MixtureLoader.from_config(cfg, prefetch=0).state))
  expected = ("(expected {'step', 'credits', 'cursors', 'truncated', 'skipped', 'feedback'} as "
              "this mtjax writes it)")
  bad = {
      "has no 'feedback'": {k: v for k, v in good.items() if k != "feedback"},
      "is a list, not a mapping": [1, 2],
      "'step' is -1, not a step number": dict(good, step=-1),
      "'credits' is not a list of 3 numbers (one per task)": dict(good, credits=[0.0]),
      "'cursors' is not a count per task of this run (['reverse', 'addition', 'grammar'])":
          dict(good, cursors={"reverse": 0}),
      "'skipped' is not a count per task of this run (['reverse', 'addition', 'grammar'])":
          dict(good, skipped={"reverse": 0, "addition": "1", "grammar": 0}),
      "'feedback' is not a list of [step, rates per task]": dict(good, feedback=[[3, [1.0]]]),
  }
  for what, state in bad.items():
    with pytest.raises(BadInputError) as e:
      MixtureLoader.from_config(cfg, prefetch=0, state=state)
    assert str(e.value) == f"checkpoint item 'loader': {what} {expected}"
  resumed = MixtureLoader.from_config(cfg, prefetch=0, state=dict(good, feedback=[[2, [1, 0, 0]]]))
  assert resumed.state["feedback"] == [[2, [1, 0, 0]]]
  next(resumed)


@pytest.mark.parametrize("content,line", [
    ("{not json", "is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                  "column 2 (char 1))"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"study": "efficiency"}', "has no 'config' (expected {\"study\": name, \"config\": {...}} "
                                "as `mtjax experiment` writes it)"),
    ('{"config": {}}', "has no 'study' (expected {\"study\": name, \"config\": {...}} as `mtjax "
                       "experiment` writes it)"),
    ('{"study": 3, "config": {}}', "'study' is 3, expected a study name"),
    ('{"study": "efficiency", "config": []}', "'config' is not a JSON object of settings"),
    ('{"study": "efficiency", "config": {"model": {"d_model": "x"}}}',
     "its config is not valid here (model.d_model: expected an integer, got 'x')"),
    ('{"study": "efficiency", "config": {}, "a.b": 1}',
     "its settings are not valid here (KeyError: 'a')"),
    ('{"study": "nope", "config": {}}',
     "unknown study 'nope' (known: efficiency, transfer, entropy, decomposition, instructions, "
     "weighting, rl_diversity, task_experts, expert_composition, fast_slow)"),
])
def test_report_on_a_bad_study_json(tmp_path, capsys, content, line):
  (tmp_path / "study.json").write_text(content)
  before = _tree(tmp_path)
  code, out, err = _run(capsys, ["report", str(tmp_path)])
  assert (code, out) == (2, "") and _one_error(err) == f"error: {tmp_path / 'study.json'}: {line}"
  assert _tree(tmp_path) == before


@pytest.mark.parametrize("body,line", [
    ("raise RuntimeError('no sweep')", "{path}: get_sweep('') failed (RuntimeError: no sweep)"),
    ("return 3", "get_sweep(): expected a non-empty list of dicts of dotted overrides "
                 "({'a.b': value, ...}), got int"),
    ("return {'seed': 1}", "get_sweep(): expected a non-empty list of dicts of dotted overrides "
                           "({'a.b': value, ...}), got dict"),
    ("return []", "get_sweep(): expected a non-empty list of dicts of dotted overrides "
                  "({'a.b': value, ...}), got none"),
    ("return [{'seed': 1}, 'seed=2']", "get_sweep()[1]: expected a non-empty list of dicts of "
                                       "dotted overrides ({'a.b': value, ...}), got 'seed=2'"),
    ("return (x for x in [{'seed': 1}, 1 / 0])",
     "{path}: get_sweep('') failed (ZeroDivisionError: division by zero)"),
])
def test_bad_get_sweep(tmp_path, capsys, body, line):
  path = tmp_path / "sw.py"
  path.write_text(f"from mtjax import config as config_lib\n\n\ndef get_config():\n"
                  f"  return config_lib.load_raw({DEMO + ':tiny'!r})\n\n\n"
                  f"def get_sweep():\n  {body}\n")
  before = _tree(tmp_path)
  for extra in (["--print"], []):
    code, out, err = _run(capsys, ["sweep", "--config", str(path), "--workdir",
                                   str(tmp_path / "out"), *extra])
    assert (code, out) == (2, "") and _one_error(err) == "error: " + line.replace("{path}", str(path))
  assert _tree(tmp_path) == before


def test_get_sweep_may_return_a_generator(tmp_path, capsys):
  path = tmp_path / "sw.py"
  path.write_text(f"from mtjax import config as config_lib\n\n\ndef get_config():\n"
                  f"  return config_lib.load_raw({DEMO + ':tiny'!r})\n\n\n"
                  "def get_sweep():\n  return ({'seed': s} for s in (0, 1))\n")
  code, out, err = _run(capsys, ["sweep", "--config", str(path), "--workdir", "o", "--print"])
  assert (code, err) == (0, "")
  assert [line.split()[-1] for line in out.splitlines()] == ["--config.seed=0", "--config.seed=1"]


@pytest.mark.parametrize("args,line", [
    (["--loader_seconds", "-1"], "error: --loader_seconds: expected a number of seconds > 0, got -1.0"),
    (["--loader_seconds", "nan"], "error: --loader_seconds: expected a number of seconds > 0, got nan"),
    (["--rounds", "0"], "error: --rounds: expected a positive integer, got 0"),
    (["--steps", "-2"], "error: --steps: expected a positive integer, got -2"),
    (["--torch_steps", "-1"], "error: --torch_steps: expected a count >= 0 (0: skip), got -1"),
    (["--out", "{tmp}"], "error: --out: {tmp} is a directory, expected the path of a JSON file"),
    (["--out", "{tmp}/f.txt/b.json"], "error: --out: cannot write {tmp}/f.txt/b.json: {tmp}/f.txt "
                                      "is not a writable directory"),
])
def test_bench_arguments_fail_before_it_runs(tmp_path, capsys, monkeypatch, args, line):
  from mtjax import bench
  monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
  (tmp_path / "f.txt").write_text("")
  before = _tree(tmp_path)
  args = [a.format(tmp=tmp_path) for a in args]
  argv = ["bench", "--out", str(tmp_path / "b.json"), *args]
  code, out, err = _run(capsys, argv)
  assert (code, out) == (2, "") and _one_error(err) == line.format(tmp=tmp_path)
  assert _tree(tmp_path) == before


# ----------------------------------------------------------------------------- item 5


@pytest.mark.parametrize("argv,line", [
    ([], "error: usage: the following arguments are required: command (see `mtjax --help`)"),
    (["train"], "error: usage: the following arguments are required: --config (see `mtjax train "
                "--help`)"),
    (["train", "--config", "x.py", "--bogus"], "error: usage: unrecognized arguments: --bogus "
                                               "(see `mtjax train --help`)"),
    (["experiment", "entropy", "--config", "x", "--workdir", "w", "-x"],
     "error: usage: unrecognized arguments: -x (see `mtjax experiment entropy --help`)"),
    (["experiment", "efficiency"], "error: usage: the following arguments are required: --config, "
                                   "--workdir (see `mtjax experiment efficiency --help`)"),
    (["data", "preview"], "error: usage: the following arguments are required: --config (see "
                          "`mtjax data preview --help`)"),
])
def test_usage_errors_name_the_command(capsys, argv, line):
  code, out, err = _run(capsys, argv)
  assert (code, out) == (2, "") and _one_error(err) == line


def test_bwt_schedule_config_is_valid_python_for_any_task_names(tmp_path):
  from mtjax import config as config_lib
  from mtjax.experiments import transfer
  names = ['three"""quotes', "back\\slash", "new\nline", "nul\x00byte", "it's", "tab\there",
           "sep\u2028arator", "end\"", "\u00fcml\u00e4ut"]
  base = tiny_config().replace(**{"data.tasks": tuple(names),
                                  "data.mixture": {n: 1.0 for n in names}})
  path = transfer.write_schedule_config(tmp_path / "bwt_guided_schedule.py", base, names[::-1], 5)
  source = path.read_text()
  doc = ast.get_docstring(ast.parse(source), clean=False)
  assert doc is not None and " -> ".join(names[::-1]) in doc
  cfg = config_lib.load(str(path))
  assert [next(iter(k for k, v in w.items() if v)) for _, w in cfg.data.stages] == names[::-1]
