"""The metrics log survives a torn last line; bad lines elsewhere are bad input; both layouts.

A torn last line (a crash or a full disk during a write) is skipped by readers and moved aside by
the next run; an undecodable line anywhere else is a BadInputError naming the file and line. The
object-store layout (metrics/NNNNNN.jsonl shards) is checked here on a local directory; on a
bucket in tests/test_gcs.py.
"""

import json

import pytest

from conftest import DEMO
from mtjax.errors import BadInputError
from mtjax.train import metrics
from mtjax.train import rundir


def _lines(rows):
  return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def _rows(steps):
  return [{"step": s, "train/loss": 1.0 / s} for s in steps]


def _steps(path):
  return [json.loads(l)["step"] for l in path.read_text().splitlines() if l.strip()]


@pytest.mark.parametrize("torn", [b'{"step": 4, "train/lo', b"\0\0\0\0\0\0", b'{"step": 4}}\n'])
def test_torn_last_line_is_skipped_then_moved_aside(tmp_path, capsys, torn):
  log = tmp_path / "metrics.jsonl"
  log.write_bytes(_lines(_rows([1, 2, 3])).encode() + torn)
  before = log.read_bytes()
  assert metrics.read_rows(tmp_path) == _rows([1, 2, 3])
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith(f"warning: {log}:4: the last line is not complete JSON")
  assert log.read_bytes() == before  # a reader never changes the log
  rundir.set_aside_metrics(tmp_path, after_step=3)
  err = capsys.readouterr().err.splitlines()
  side = list(tmp_path.glob("metrics.torn.*.jsonl"))
  assert len(side) == 1 and side[0].read_bytes() == torn.rstrip(b"\n") + b"\n"
  assert err == [f"warning: {log}:4: the last line was cut off (a crash or a full disk during a "
                 f"write); moved to {side[0]}"]
  assert log.read_text() == _lines(_rows([1, 2, 3]))
  assert not list(tmp_path.glob("metrics.after-*"))
  assert metrics.read_rows(log) == _rows([1, 2, 3]) and capsys.readouterr().err == ""


def test_torn_line_and_later_rows_both_kept_aside(tmp_path, capsys):
  log = tmp_path / "metrics.jsonl"
  log.write_text(_lines(_rows([1, 2, 3, 4, 5])) + '{"step": 6, "tr')
  rundir.set_aside_metrics(tmp_path, after_step=3)
  assert _steps(log) == [1, 2, 3]
  (after,) = tmp_path.glob("metrics.after-3.*.jsonl")
  assert _steps(after) == [1, 2, 3, 4, 5]  # the whole log as it was, the torn line apart
  (torn,) = tmp_path.glob("metrics.torn.*.jsonl")
  assert torn.read_text() == '{"step": 6, "tr\n'
  assert len(capsys.readouterr().err.splitlines()) == 1
  # A second trim in the same second gets its own side file: nothing is overwritten.
  log.write_text(_lines(_rows([1, 2, 3, 4])) + "{")
  rundir.set_aside_metrics(tmp_path, after_step=2)
  assert len(list(tmp_path.glob("metrics.torn.*.jsonl"))) == 2
  assert len(list(tmp_path.glob("metrics.after-*.jsonl"))) == 2
  assert _steps(log) == [1, 2]


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", '{"step": 2'])
def test_bad_line_in_the_middle_is_bad_input(tmp_path, bad):
  log = tmp_path / "metrics.jsonl"
  log.write_text(_lines(_rows([1])) + "\n" + bad + "\n" + _lines(_rows([3])))  # line 3 (a blank 2)
  before = log.read_bytes()
  for call in (lambda: metrics.read_rows(tmp_path), lambda: rundir.set_aside_metrics(tmp_path, 1)):
    with pytest.raises(BadInputError) as e:
      call()
    assert e.value.field == f"{log}:3" and "not a JSON object" in e.value.expected
  assert log.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_writer_keeps_a_complete_unterminated_row_apart(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}')  # the newline was cut off
  writer = metrics.MetricsWriter(tmp_path)
  writer.write({"step": 2, "train/loss": 0.5})
  writer.close()
  assert _steps(tmp_path / "metrics.jsonl") == [1, 2]


def test_shard_layout_writes_reads_and_trims(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(metrics, "ROWS_PER_SHARD", 4)
  shard_dir = tmp_path / "metrics"
  writer = metrics.MetricsWriter(tmp_path, sharded=True)
  assert writer.path == shard_dir
  for row in _rows(range(1, 11)):
    writer.write(row)
  writer.close()
  assert sorted(p.name for p in shard_dir.iterdir()) == ["000000.jsonl", "000001.jsonl", "000002.jsonl"]
  assert [_steps(shard_dir / f"00000{i}.jsonl") for i in range(3)] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
  assert not (tmp_path / "metrics.jsonl").exists()
  # A later writer (a resume) starts a new shard; an existing shard directory selects the layout.
  assert metrics.uses_shards(tmp_path) and metrics.log_path(tmp_path) == shard_dir
  writer = metrics.MetricsWriter(tmp_path)
  writer.write(_rows([11])[0])
  writer.close()
  assert _steps(shard_dir / "000003.jsonl") == [11]
  for where in (tmp_path, shard_dir):
    assert metrics.read_rows(where) == _rows(range(1, 12))
  # Numeric order, not name order, past six digits.
  (shard_dir / "1000000.jsonl").write_text(_lines(_rows([12])))
  assert [r["step"] for r in metrics.read_rows(tmp_path)][-2:] == [11, 12]
  (shard_dir / "1000000.jsonl").unlink()
  # Trim to step 6: shard 1 keeps 5-6, shards 2-3 are emptied; the whole log goes aside first.
  rundir.set_aside_metrics(tmp_path, after_step=6)
  assert metrics.read_rows(tmp_path) == _rows(range(1, 7))
  (after,) = tmp_path.glob("metrics.after-6.*.jsonl")
  assert _steps(after) == list(range(1, 12))
  # A bad line in an earlier shard names that shard; a torn last line of the last one is skipped.
  (shard_dir / "000003.jsonl").write_text('{"step": 7}\n{"step": 8')
  assert [r["step"] for r in metrics.read_rows(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]
  assert f"{shard_dir / '000003.jsonl'}:2" in capsys.readouterr().err
  (shard_dir / "000001.jsonl").write_text('{"step": 5}\n{"step": \n')
  with pytest.raises(BadInputError, match="000001.jsonl:2"):
    metrics.read_rows(tmp_path)


def test_resume_after_a_torn_line_and_refusal_of_a_bad_one(tmp_path, capsys):
  """The reported failure: a crash mid-write left a torn last line; every later resume failed
  with JSONDecodeError. Now the resume proceeds; a bad line in the middle exits 2, one line."""
  from mtjax import cli
  args = ["train", "--config", f"{DEMO}:tiny", "--workdir", str(tmp_path),
          "--config.checkpoint.every=2", "--config.train.progress=false"]
  assert cli.main(args + ["--config.train.steps=4"]) == 0
  log = tmp_path / "metrics.jsonl"
  with log.open("ab") as f:
    f.write(b'{"data/addition/rate": 0.33, "step": 5, "train/l')  # the write a crash cut off
  capsys.readouterr()
  assert cli.main(args + ["--config.train.steps=6"]) == 0
  err = capsys.readouterr().err
  (torn,) = tmp_path.glob("metrics.torn.*.jsonl")
  assert f"warning: {log}:5: the last line was cut off" in err and str(torn) in err
  assert torn.read_bytes() == b'{"data/addition/rate": 0.33, "step": 5, "train/l\n'
  assert _steps(log) == [1, 2, 3, 4, 5, 6]
  lines = log.read_text().splitlines()
  log.write_text("\n".join(lines[:2] + ["garbage"] + lines[2:]) + "\n")
  before = log.read_bytes()
  assert cli.main(args + ["--config.train.steps=8"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith(f"error: {log}:3: not a JSON object") and "Traceback" not in err, err
  assert log.read_bytes() == before


def test_object_stores_without_support_skip_tensorboard_and_say_so(capsys):
  assert metrics._tensorboard("memory://bucket/run/tensorboard") is None
  assert capsys.readouterr().err == ("note: no TensorBoard events in memory://bucket/run/tensorboard: "
                                     "tensorboardX cannot write memory://; the metrics log has the "
                                     "same scalars\n")


def test_gs_workdir_without_gcsfs_is_bad_input(monkeypatch):
  import importlib.util
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else find_spec(name, *a))
  with pytest.raises(BadInputError, match=r"gs://b/run: gs:// workdirs need gcsfs: pip install 'mtjax\[gcs\]'"):
    rundir.resolve("gs://b/run")
