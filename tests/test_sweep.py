"""Sweeps: variants run in order, an interrupted sweep resumes without redoing finished ones."""

import shlex
import types

import pytest

from conftest import REPO
from mtjax import recipes
from mtjax.experiments import sweep


@pytest.fixture
def sweep_config(tmp_path):
  path = tmp_path / "sweep_cfg.py"
  path.write_text(f'''
import importlib.util
spec = importlib.util.spec_from_file_location("demo", {str(REPO / "configs" / "demo.py")!r})
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)

def get_config():
  c = demo.get_config("tiny")
  c.train.steps = 2
  c.train.progress = False
  return c

def get_sweep():
  return [{{"seed": s, "data.mixture.grammar": w}} for w in (1.0, 3.0) for s in (0, 1)][:3]
''')
  return str(path)


def test_interrupted_sweep_resumes_without_redoing(sweep_config, tmp_path):
  calls = []

  def interrupted(cfg, workdir):
    if len(calls) == 2:
      raise KeyboardInterrupt  # the machine goes away during the third variant
    calls.append(workdir.name)
    return recipes.run(cfg, workdir)

  out = tmp_path / "sweep"
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(sweep_config, str(out), train_fn=interrupted)
  assert calls == ["000_seed=0_grammar=1.0", "001_seed=1_grammar=1.0"]
  again = []
  result = sweep.run_sweep(sweep_config, str(out),
                           train_fn=lambda c, w: again.append(w.name) or recipes.run(c, w))
  assert again == ["002_seed=0_grammar=3.0"] and result["skipped"] == calls
  csv_text = (out / "results.csv").read_text().splitlines()
  assert len(csv_text) == 4 and csv_text[0].startswith("variant,data.mixture.grammar,seed")
  md = (out / "results.md").read_text()
  assert '| `{"data.mixture.grammar": 1.0}` | 2 |' in md  # two seeds aggregated
  assert '| `{"data.mixture.grammar": 3.0}` | 1 |' in md and " ± " in md


def test_print_mode_gives_one_command_per_variant(sweep_config, tmp_path):
  commands = sweep.launch_commands(sweep_config, str(tmp_path / "s"))
  assert len(commands) == 3
  args = shlex.split(commands[2])
  assert args[:3] == ["mtjax", "train", "--config"]
  assert "--config.seed=0" in args and "--config.data.mixture.grammar=3.0" in args


def test_preempted_variant_is_not_done_and_stops_the_sweep(sweep_config, tmp_path, capsys,
                                                           monkeypatch):
  from mtjax import cli
  calls = []

  def preempted_second(cfg, workdir):
    calls.append(workdir.name)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text('{"step": 2, "train/loss": 1.5}\n\n')  # a blank line
    return types.SimpleNamespace(preempted=len(calls) == 2)  # a SIGTERM during the second

  monkeypatch.setattr(recipes, "run", preempted_second)
  out = tmp_path / "sweep"
  assert cli.main(["sweep", "--config", sweep_config, "--workdir", str(out)]) == cli.EXIT_PREEMPTED
  assert calls == ["000_seed=0_grammar=1.0", "001_seed=1_grammar=1.0"]  # the third never started
  assert (out / calls[0] / "DONE").exists() and not (out / calls[1] / "DONE").exists()
  assert "interrupted by a preemption signal" in capsys.readouterr().err
  again = []
  monkeypatch.setattr(recipes, "run", lambda c, w: again.append(w.name))  # finishes (None)
  for name in ("001_seed=1_grammar=1.0", "002_seed=0_grammar=3.0"):
    (out / name).mkdir(exist_ok=True)
    (out / name / "metrics.jsonl").write_text('{"step": 2, "train/loss": 0.5}\n')
  result = sweep.run_sweep(sweep_config, str(out))
  assert again == ["001_seed=1_grammar=1.0", "002_seed=0_grammar=3.0"]
  assert result["skipped"] == ["000_seed=0_grammar=1.0"]
  assert '"seed": 1' in (out / again[0] / "DONE").read_text()  # the DONE marker holds the variant
  csv_text = (out / "results.csv").read_text().splitlines()
  assert csv_text[1].startswith("000_seed=0_grammar=1.0,1.0,0,1.5")  # read past the blank line
