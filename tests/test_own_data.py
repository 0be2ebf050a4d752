"""Your own data end to end: JSONL tasks defined only in a config file, scorers by name, a run
that records how to rebuild its tasks (tasks.json), `mtjax eval --workdir` in a fresh process,
and `--config` once the file that defined a scorer has moved."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

CONFIG = '''
"""A user's config: one task from the config block, one registered in Python, a Python scorer."""
from mtjax import config as config_lib
from mtjax import tasks
from mtjax.tasks import scoring
from mtjax.tasks.sources import Fields, JsonlSource


def shout_match(example, output):  # the user's own scorer, registered by name
  return output.strip().upper() == example.target.strip().upper()


scoring.register_scorer("shout_match", shout_match, replace=True)
tasks.register(tasks.Task("upper", JsonlSource({{"train": [{upper_train!r}], "validation": [{upper_val!r}]}},
                                              Fields(prompt="word", target="big")),
                          tasks.exact_match), replace=True)


def get_config(variant=""):
  c = config_lib.defaults()
  c.data.jsonl_tasks = {{"echo": {{"train": {echo_train!r}, "validation": {echo_val!r},
                                 "prompt_field": "q", "target_field": "a",
                                 "instruction": "echo: ", "scorer": "shout_match"}}}}
  c.data.tasks = ("echo", "upper")
  c.data.update(batch_size=8, seq_len=64)
  c.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
  c.train.update(steps=4, log_every=2, progress=False)
  c.optimizer.update(warmup_steps=1)
  c.checkpoint.every = 4
  c.eval.update(num_examples=8, num_generate=6, num_samples=0, batch_size=8)
  return c
'''


def _words(n, seed):
  rng = np.random.default_rng(seed)
  return ["".join(rng.choice(list("abcdefgh"), size=int(rng.integers(3, 7)))) for _ in range(n)]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


@pytest.fixture
def user_config(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  train, val = _words(40, 0), _words(12, 1)
  files = {
      "echo_train": _write_jsonl(data / "echo_train.jsonl", [{"q": w, "a": w, "id": i} for i, w in enumerate(train)]),
      "echo_val": _write_jsonl(data / "echo_val.jsonl", [{"q": w, "a": w} for w in val]),
      "upper_train": _write_jsonl(data / "upper_train.jsonl", [{"word": w, "big": w.upper()} for w in train]),
      "upper_val": _write_jsonl(data / "upper_val.jsonl", [{"word": w, "big": w.upper()} for w in val]),
  }
  path = tmp_path / "configs" / "mine.py"
  path.parent.mkdir()
  path.write_text(CONFIG.format(**files))
  return path


def _eval(workdir, *extra):
  return subprocess.run([sys.executable, "-m", "mtjax", "eval", "--workdir", str(workdir), *extra],
                        capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_config_file_tasks_train_eval_move_and_config_flag(user_config, tmp_path):
  from mtjax import config as config_lib
  from mtjax import recipes

  workdir = tmp_path / "run"
  from mtjax.resolve import resolve
  cfg = config_lib.load(str(user_config))
  assert resolve(cfg).data.jsonl_tasks["echo"].train == (str(tmp_path / "data" / "echo_train.jsonl"),)
  result = recipes.run(cfg, str(workdir))
  assert int(result.state.step) == 4

  record = json.loads((workdir / "tasks.json").read_text())
  assert record["upper"]["kind"] == "jsonl" and record["upper"]["rebuildable"]
  assert record["upper"]["scorer"] == "exact_match"
  assert record["echo"]["scorer"] == "shout_match"
  assert record["echo"]["scorer_defined_in"] == str(user_config.resolve())

  # A fresh process: the record names the config file but never imports it (a run directory
  # is data): eval without --config says which one to pass; with it, it runs.
  refused = _eval(workdir)
  assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
  assert f"pass --config {user_config.resolve()}" in refused.stderr
  first = _eval(workdir, "--config", str(user_config))
  assert first.returncode == 0, first.stderr[-2000:]
  rows = json.loads((workdir / "eval" / "step_4.json").read_text())
  for task in ("echo", "upper"):
    assert f"eval/{task}/accuracy" in rows and f"eval/{task}/loss" in rows
  from mtjax import cli  # the run's report shows the same figures
  assert cli.main(["report", str(workdir)]) == 0
  report = (workdir / "report.md").read_text()
  assert f"| 4 | echo | {rows['eval/echo/accuracy']:.4f} | {rows['eval/echo/loss']:.4f} |" in report
  assert "| upper | jsonl | exact_match |" in report and "| echo | jsonl | shout_match |" in report

  moved = tmp_path / "elsewhere" / "mine.py"
  moved.parent.mkdir()
  shutil.move(str(user_config), moved)
  gone = _eval(workdir)
  assert gone.returncode == 2, gone.stderr[-2000:]
  assert "Traceback" not in gone.stderr and len(gone.stderr.strip().splitlines()) == 1
  assert "shout_match" in gone.stderr and "--config" in gone.stderr and "is gone" in gone.stderr

  again = _eval(workdir, "--config", str(moved))
  assert again.returncode == 0, again.stderr[-2000:]
  rows_again = json.loads((workdir / "eval" / "step_4.json").read_text())
  for key, value in rows.items():  # the same checkpoint, greedy: the same scores
    if key.startswith("eval/"):
      assert rows_again[key] == pytest.approx(value), key


def test_record_describes_tasks_and_rebuilds_them(tmp_path):
  """tasks.json round trip without training: a JSONL task rebuilt from the record alone scores
  and loads like the original; a task with a Python source is named as needing --config."""
  from etils import epath

  from mtjax import tasks
  from mtjax.errors import BadInputError
  from mtjax.tasks import specs
  from mtjax.tasks.sources import Fields, GeneratorSource, JsonlSource

  path = _write_jsonl(tmp_path / "t.jsonl", [{"x": "a", "y": "A", "alt": ["a!"]}, {"x": "b", "y": "B"}])
  tasks.register(tasks.Task("mine", JsonlSource({"validation": [path]}, Fields(prompt="x", target="y")),
                            tasks.exact_match), replace=True)
  tasks.register(tasks.Task("coded", GeneratorSource(lambda split, seed: []), tasks.exact_match),
                 replace=True)
  workdir = epath.Path(tmp_path)
  specs.write_record(workdir, ["reverse", "mine", "coded"])
  record = json.loads((tmp_path / "tasks.json").read_text())
  assert record["reverse"] == {"kind": "builtin"}
  assert not record["coded"]["rebuildable"] and "GeneratorSource" in record["coded"]["why_not"]

  original = tasks.get("mine")
  del tasks._REGISTRY["mine"], tasks._REGISTRY["coded"]
  specs.rebuild(workdir, ["reverse", "mine"])
  rebuilt = tasks.get("mine")
  assert rebuilt is not original and rebuilt.is_correct is tasks.exact_match
  examples = rebuilt.source.load("validation", 0).examples
  assert [(e.prompt, e.target) for e in examples] == [("a", "A"), ("b", "B")]
  assert examples[0].meta == {"alt": ["a!"]} and examples[1].meta == {}
  with pytest.raises(BadInputError, match="'coded' cannot be rebuilt.*GeneratorSource.*--config"):
    specs.rebuild(workdir, ["coded"])


def test_a_run_directory_never_runs_code(tmp_path):
  """tasks.json is data anyone may have written: a defined_in / scorer_defined_in naming a .py
  file is named in the error, never imported (a marker it would write stays absent)."""
  from etils import epath

  from mtjax.errors import BadInputError
  from mtjax.tasks import specs
  marker = tmp_path / "pwned"
  payload = tmp_path / "payload.py"
  payload.write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef get_config():\n  return None\n")
  (tmp_path / "tasks.json").write_text(json.dumps({
      "evil": {"kind": "GeneratorSource", "rebuildable": False, "why_not": "code",
               "defined_in": str(payload), "scorer": "exact_match"},
      "evil_scorer": {"kind": "jsonl", "rebuildable": True, "scorer": "no_such_scorer_xyz",
                      "scorer_defined_in": str(payload), "files": {}, "fields": {}}}))
  for name in ("evil", "evil_scorer"):
    with pytest.raises(BadInputError) as e:
      specs.rebuild(epath.Path(tmp_path), [name])
    assert f"pass --config {payload}" in str(e.value) and "not imported" in str(e.value)
  assert not marker.exists()


def test_eval_only_tasks_are_refused_for_training_unless_allowed(tmp_path, tiny):
  from mtjax.errors import BadInputError
  from mtjax.resolve import resolve

  path = _write_jsonl(tmp_path / "bench.jsonl", [{"input": "q", "target": "a"}])
  block = {"bench": {"validation": path, "eval_only": True},
           "mine": {"train": path, "validation": path}}
  cfg = tiny(**{"data.jsonl_tasks": block, "data.tasks": (), "data.mixture": {}})
  resolved = resolve(cfg)
  assert resolved.data.tasks == ("mine",)  # the block's tasks, without the eval-only one
  with pytest.raises(BadInputError, match="data.tasks: 'bench' is an eval-only benchmark"):
    resolve(cfg.replace(**{"data.tasks": ("mine", "bench")}))
  allowed = resolve(cfg.replace(**{"data.tasks": ("mine", "bench"), "data.allow_eval_only": True}))
  assert allowed.data.tasks == ("mine", "bench")
  evaluated = resolve(cfg.replace(**{"eval.tasks": ("mine", "bench")}))  # eval on it: fine
  assert evaluated.eval.tasks == ("mine", "bench")
  with pytest.raises(BadInputError, match="data.jsonl_tasks.mine.scorer: unknown scorer 'nope'"):
    resolve(cfg.replace(**{"data.jsonl_tasks": {"mine": {"train": path, "scorer": "nope"}}}))


def test_scorers_by_name():
  from mtjax.tasks import Example
  from mtjax.tasks.scoring import get_scorer

  def ex(target, **meta):
    return Example("", "", target, meta)

  assert get_scorer("exact_match")(ex("abc"), " abc\n") and not get_scorer("exact_match")(ex("abc"), "ab")
  assert get_scorer("json_equal")(ex('{"a": [1, 2]}'), '```json\n{"a":[1,2]}\n```')
  assert not get_scorer("json_equal")(ex('{"a": 1}'), '{"a": 2}')
  calls = '[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]'
  swapped = '[{"name": "g", "arguments": {}}, {"name": "f", "arguments": {"x": 1.0}}]'
  assert get_scorer("function_call")(ex(calls), swapped)
  assert not get_scorer("function_call_ordered")(ex(calls), swapped)
  assert get_scorer("regex")(ex("ignored", pattern=r"\d{3}-\d{4}"), " 555-1234 ")
  assert get_scorer("regex")(ex(r"a+b"), "aaab") and not get_scorer("regex")(ex(r"a+b"), "aaabc")
  assert get_scorer("numeric")(ex("1,234.5"), "the answer is 1234.5000001")
  assert not get_scorer("numeric")(ex("3"), "4") and not get_scorer("numeric")(ex("3"), "none")
  assert get_scorer("numeric")(ex("3", tolerance=0.5), "3.4") and not get_scorer("numeric")(ex("3", tolerance=0.5), "3.6")
  with pytest.raises(KeyError, match="unknown scorer 'nope'"):
    get_scorer("nope")


def test_loss_summary_is_the_mean_of_task_losses():
  from mtjax.train.metrics import loss_summary

  row = {"train/loss": 12.0, "train/a/loss": 2.0, "train/a/tokens": 10, "train/b/loss": 4.5,
         "train/b/tokens": 3, "train/c/loss": 0.0, "train/c/tokens": 0}
  assert loss_summary(row, ["a", "b", "c"]) == "loss 3.2500 (mean of 2 tasks: a 2.0000, b 4.5000)"


def test_tokenizer_train_on_config_tasks(user_config, tmp_path):
  """`mtjax tokenizer train`: a byte-level BPE on the config's training tasks; it round-trips any
  text (bytes it never saw too) and shortens the training examples."""
  out = tmp_path / "tok" / "tokenizer.json"
  proc = subprocess.run([sys.executable, "-m", "mtjax", "tokenizer", "train", "--config",
                         str(user_config), "--vocab", "300", "--out", str(out)],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "echo:" in proc.stdout and "upper:" in proc.stdout and f"hf:{out}" in proc.stdout
  from mtjax.data import tokenizer as tokenizer_lib
  tok = tokenizer_lib.get(f"hf:{out}")
  assert tok.vocab_size == 300 and tok.bos_id == 1 and tok.eos_id == 2
  for text in ("echo: abcabc", "héllo ✓ {\"json\": [1]}"):
    assert tok.decode(tok.encode(text)) == text
  words = [json.loads(line)["q"] for line in (tmp_path / "data" / "echo_train.jsonl").read_text().splitlines()]
  assert sum(tok.count("echo: " + w) for w in words) < sum(len(("echo: " + w).encode()) for w in words)
  bad = subprocess.run([sys.executable, "-m", "mtjax", "tokenizer", "train", "--config",
                        str(user_config), "--vocab", "100", "--out", str(tmp_path / "t2.json")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
  assert bad.returncode == 2 and bad.stderr.startswith("error: --vocab: 100 is less than")
  # An existing tokenizer (a model directory's, with its chat template) is never replaced
  # without --force: exit 2 before training, every file as it was.
  model = tmp_path / "model"
  model.mkdir()
  (model / "tokenizer.json").write_text(out.read_text())
  (model / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
  before = {p.name: p.read_bytes() for p in model.iterdir()}
  for target in (model, out):
    refused = subprocess.run([sys.executable, "-m", "mtjax", "tokenizer", "train", "--config",
                              str(user_config), "--vocab", "300", "--out", str(target)],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --out: ")
    assert "exists; pass --force" in refused.stderr
  assert {p.name: p.read_bytes() for p in model.iterdir()} == before
  forced = subprocess.run([sys.executable, "-m", "mtjax", "tokenizer", "train", "--config",
                           str(user_config), "--vocab", "300", "--out", str(model), "--force"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
  assert forced.returncode == 0 and "chat_template" not in (model / "tokenizer_config.json").read_text()


def test_walkthrough_config_is_valid_and_its_data_held_out(capsys):
  """configs/own_data.py (README "Your own data"): valid as shipped (run from the repo root), and
  its validation prompts never occur in training (the contamination check finds none)."""
  import os

  from mtjax import cli
  from mtjax import config as config_lib
  from mtjax.data import contamination

  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    assert cli.main(["train", "--check", "--config", "configs/own_data.py"]) == 0
    out = capsys.readouterr().out
    assert "task weather: weight 1" in out and "0 skipped as too long" in out
    assert contamination.warn(config_lib.load("configs/own_data.py")) == []
    for task in ("convert", "weather"):
      train = {json.loads(line)["id"] for line in (REPO / "examples" / "own_data" / f"{task}_train.jsonl").open()}
      val = {json.loads(line)["id"] for line in (REPO / "examples" / "own_data" / f"{task}_validation.jsonl").open()}
      assert train and val and not train & val
  finally:
    os.chdir(cwd)


def test_a_runs_jsonl_tasks_can_be_named_by_eval_and_a_torn_config_is_bad_input(tmp_path, tiny):
  """`mtjax eval --workdir W --tasks NAME` resolves the run's recorded config first, so a task
  from data.jsonl_tasks is known by name; a config.json that is not JSON is one error line."""
  from etils import epath

  from mtjax import tasks
  from mtjax.errors import BadInputError
  from mtjax.resolve import resolve
  from mtjax.train import rundir, setup
  path = _write_jsonl(tmp_path / "m.jsonl", [{"prompt": "ab", "target": "ba"}] * 4)
  cfg = resolve(tiny(**{"data.jsonl_tasks": {"mine": {"train": path, "validation": path}},
                        "data.tasks": ("mine",), "data.mixture": {}}))
  workdir = epath.Path(tmp_path / "run")
  import jax
  rundir.write_run_files(workdir, cfg, jax.devices())
  del tasks._REGISTRY["mine"]  # a fresh process: only the run directory knows it
  assert "mine" in setup.workdir_config(workdir).data.tasks and "mine" in tasks.names()
  (workdir / "config.json").write_text('{"seed": 0, "model": {"d_mo')  # torn at a write
  with pytest.raises(BadInputError, match=r"config.json: is not valid JSON"):
    setup.workdir_config(workdir)


@pytest.mark.parametrize("name, message", [
    ("reverse", "'reverse' is the name of a built-in task"),
    ("bfcl_simple", "'bfcl_simple' is the name of a built-in task"),
    ("x,y", "a task name is letters, digits"),
    ("my task", "a task name is letters, digits"),
])
def test_a_jsonl_task_may_not_shadow_a_builtin_or_carry_separators(name, message, tmp_path, tiny):
  from mtjax import tasks
  from mtjax.errors import BadInputError
  from mtjax.resolve import resolve
  path = _write_jsonl(tmp_path / "m.jsonl", [{"prompt": "ab", "target": "ba"}])
  builtin = tasks.get("reverse")
  with pytest.raises(BadInputError) as e:
    resolve(tiny(**{"data.jsonl_tasks": {name: {"train": path}}, "data.tasks": (name,),
                    "data.mixture": {}}))
  assert e.value.field == f"data.jsonl_tasks.{name}" and message in str(e.value)
  assert tasks.get("reverse") is builtin  # not replaced


def test_a_resume_after_a_data_file_changed_warns_and_records_it(user_config, tmp_path, capsys):
  """A JSONL file that grew between two starts: the resume goes on (the data may be meant to
  grow) but says so, naming the file and both sizes; tasks.json records the new fingerprint."""
  from mtjax import cli
  path = tmp_path / "data" / "echo_train.jsonl"
  workdir = tmp_path / "run"
  args = ["train", "--config", str(user_config), "--config.checkpoint.every=2",
          "--workdir", str(workdir)]
  assert cli.main(args + ["--config.train.steps=2"]) == 0
  size = path.stat().st_size
  recorded = json.loads((workdir / "tasks.json").read_text())["echo"]["fingerprints"][str(path)]
  assert recorded["bytes"] == size
  capsys.readouterr()
  assert cli.main(args + ["--config.train.steps=4"]) == 0  # unchanged: no warning
  assert "data file changed" not in capsys.readouterr().err
  with path.open("a") as f:
    f.write(json.dumps({"q": "abc", "a": "abc", "id": 99}) + "\n")
  assert cli.main(args + ["--config.train.steps=6"]) == 0
  err = capsys.readouterr().err
  assert f"warning: data file changed since this run last started: {path} ({size} -> " in err
  assert json.loads((workdir / "tasks.json").read_text())["echo"]["fingerprints"][str(path)]["bytes"] > size


def test_a_jsonl_instruction_that_is_not_a_string_is_a_bad_record(tmp_path):
  """A list in the instruction field was str()'d ("['a', 'b']") and trained on."""
  from mtjax.tasks.sources import Fields, JsonlSource
  path = _write_jsonl(tmp_path / "m.jsonl", [{"input": "ab", "target": "ba",
                                              "instruction": ["reverse", "it"]}])
  source = JsonlSource({"train": [path]}, Fields())
  with pytest.raises(Exception, match="field 'instruction' must be a string, got list"):
    source.load("train", 0)


def test_a_jsonl_file_with_a_byte_order_mark_keeps_its_first_line(tmp_path):
  """Windows editors write a UTF-8 BOM: the first line is read, not refused (and not skipped)."""
  from mtjax.tasks.sources import Fields, JsonlSource
  path = tmp_path / "bom.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + b'{"input": "ab", "target": "ba"}\n{"input": "cd", "target": "dc"}\n')
  loaded = JsonlSource({"train": [str(path)]}, Fields()).load("train", 0)
  assert [(e.prompt, e.target) for e in loaded.examples] == [("ab", "ba"), ("cd", "dc")]
  assert loaded.skipped == 0


@pytest.mark.parametrize("command", ["eval", "export", "generate", "load"])
def test_a_planted_run_directory_runs_no_code_in_any_command(command, tmp_path, tiny, capsys):
  """A shared run directory whose tasks.json names a .py file (defined_in): eval, export,
  generate and mtjax.load each exit 2 naming the file and the --config to pass; the file never
  runs (its marker stays absent)."""
  import mtjax
  from mtjax import cli
  from mtjax.errors import BadInputError
  marker = tmp_path / "pwned"
  payload = tmp_path / "payload.py"
  payload.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)  # a run directory, not an HF one
  cfg = tiny(**{"data.tasks": ("evil",), "data.mixture": {"evil": 1.0}})
  (run / "config.json").write_text(cfg.to_json())
  (run / "tasks.json").write_text(json.dumps({"evil": {
      "kind": "GeneratorSource", "rebuildable": False, "why_not": "its source is Python code",
      "defined_in": str(payload), "scorer": "exact_match"}}))
  capsys.readouterr()
  if command == "load":
    with pytest.raises(BadInputError, match=f"pass --config {payload}"):
      mtjax.load(run)
  else:
    argv = {"eval": ["eval", "--workdir", str(run)],
            "export": ["export", "--workdir", str(run), "--out", str(tmp_path / "out")],
            "generate": ["generate", "--workdir", str(run), "--prompt", "ab"]}[command]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pass --config {payload}" in err
  assert not marker.exists()
