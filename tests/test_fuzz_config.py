"""Fuzz: seeded random mutations of configs/demo.py:tiny through `mtjax train --check`, in process.

Every case (wrong types, out-of-range and non-finite numbers, unknown keys, missing or unusable
files, bad variants, bad override syntax, and combinations) must end either with exit 0 and
`valid: CONFIG`, or with exit 2 and exactly one stderr line starting with `error:`; never a
traceback or another exception. Deterministic (one seed); no model is built (~10 s).
"""

import dataclasses
import json
import random
import time
import typing

from conftest import DEMO
from mtjax import cli
from mtjax import config as config_lib

SEED = 1212
CASES = 240

# Raw override texts per kind of field; `{...}` placeholders are files made by the test.
INT_VALUES = ["-1", "0", "1", "2", "3", "7", "64", "2**31", "2147483648", "10**30",
              "100000000000000000000000000000", "-100000000000000000000", "1.5", "'x'", "wide",
              "True", "nan", "1e999", "[1]", "{}", "None", "", " ", "0x10", "1_000"]
FLOAT_VALUES = ["nan", "inf", "-inf", "1e999", "-1e999", "float('nan')", "-1.0", "0", "0.0", "1",
                "1e-300", "1e300", "0.5", "'x'", "True", "[]", "None", "", "(0.1, 0.2)", "1e309"]
BOOL_VALUES = ["true", "false", "True", "0", "1", "maybe", "None", ""]
STR_VALUES = ["", "nope", "float32", "bfloat16", "auto", "full", "dots", "stages", "linear",
              "explicit", "examples_proportional", "skip", "stop", "max", "min", "wsd", "cosine",
              "train/loss", "\u00fc", "hf:/nope.json", "spm:/nope.model", "hf:{dir}", "spm:{text}",
              "hf:{text}", "byte", "fc_granite", "synthetic", "open_ended"]
TUPLE_VALUES = ["reverse", "reverse,grammar", "reverse,reverse", "nosuch", "", "a/b",
                "addition,grammar,reverse", "[1, 2]", "(1,)", "{}", "3", "[]", "qa", "0,1",
                "((0, {'reverse': 1.0}),)", "((0, {'reverse': 1.0}), (5, {'grammar': 2.0}))",
                "((3, {'reverse': 1.0}),)", "((0, {'reverse': 0.0}),)", "((0, {'nosuch': 1.0}),)",
                "((0, 1.0),)", "[(0, {'reverse': float('nan')})]", "((-1, {}),)"]
MAPPING_VALUES = ["{}", "{'reverse': 2.0}", "{'reverse': -1.0}", "{'nosuch': 1.0}", "3", "[]",
                  "{'reverse': 'x'}", "{'reverse': 1e999}", "{'reverse': (0.1, 0.0)}",
                  "{'reverse': (1, 2, 3)}", "{'reverse': True}", "{'grammar': 0.0}",
                  "{'reverse': 'empty'}", "{'grammar': 'wrong'}", "{'addition': 'bogus'}",
                  "{'layers/.*': 0.0}", "{'(': 1.0}", "{1: 2}", "{'reverse': None}"]
MAPPING_ENTRY_VALUES = ["0", "1.0", "3", "-1", "nan", "inf", "'x'", "(0.1, 0.0)", "(1, 2, 3)",
                        "keep", "empty", "wrong", "other", "True", "[]", "{}"]
SYNTAX = ["--config.model.d_model", "--config.=3", "--config..model=3", "--config.model..x=1",
          "--config.seed.x=1", "--config.seed.x.y=1", "--config.model=3", "--config.data=x",
          "--config.data.mixture.reverse.x=1", "--config.model.d_model==3",
          "--config.data.tasks=[", "--config.model.d_model=(", "--config.model.d_model=1=2",
          "--config.optimizer.lr=1e", "--config.optimizer.lr=--1", "--config.train=None",
          "--config.model.d_model=\x00", "--config.model.dtype=\n", "--config.x", "--config.",
          "--config.data.tasks=reverse,", "--config.mesh.data=-0"]
CONFIG_PATHS = [f"{DEMO}:huge", f"{DEMO}:", f"{DEMO}:tiny:x", "nope.py", "{dir}", "{text}",
                "{syntax}", "{raises}", "{returns_int}", "{returns_bad_tree}", "{nan_lr}",
                "{jsonl_good}", "{jsonl_missing}", "{jsonl_dir}", "{jsonl_long}", "{jsonl_bad}",
                "{jsonl_empty}", "{no_get_config}"]
FILE_OVERRIDES = ["--config.data.tokenizer=hf:/nope.json", "--config.data.tokenizer=spm:/nope.model",
                  "--config.data.tokenizer=hf:{dir}", "--config.data.tokenizer=spm:{text}",
                  "--config.data.tokenizer=hf:{text}", "--config.data.tokenizer=hf:",
                  "--config.data.tokenizer=bpe:x", "--config.data.tasks=qa,reverse",
                  "--config.data.seq_len=8", "--config.data.seq_len=12", "--config.data.seq_len=20",
                  "--config.eval.every=5", "--config.data.on_bad_record=skip",
                  "--config.data.instructions.reverse=wrong"]
UNKNOWN_KEYS = ["--config.model.foo=1", "--config.foo=1", "--config.data.mixture_nam=x",
                "--config.optimizer.LR=0.1", "--config.mesh.pipeline=2", "--config.eval.tasks.x=1"]


def _fields(cls, prefix=""):
  """(dotted name, annotation) of every leaf of the config schema."""
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    hint, name = hints[f.name], f"{prefix}{f.name}"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
      yield from _fields(hint, name + ".")
    else:
      yield name, hint


def _values_for(hint):
  origin = typing.get_origin(hint)
  if hint is bool:
    return BOOL_VALUES
  if hint is int:
    return INT_VALUES
  if hint is float:
    return FLOAT_VALUES
  if hint is str:
    return STR_VALUES
  if origin is tuple:
    return TUPLE_VALUES
  return MAPPING_VALUES  # Mapping[...] fields


def _mutation(rng, fields):
  kind = rng.choice(["value", "value", "value", "value", "entry", "file", "unknown", "syntax"])
  if kind == "value":
    name, hint = rng.choice(fields)
    return [f"--config.{name}={rng.choice(_values_for(hint))}"]
  if kind == "entry":
    name = rng.choice([n for n, h in fields if typing.get_origin(h) in (typing.Mapping, dict) or
                       h is typing.Mapping or "Mapping" in str(h)])
    key = rng.choice(["reverse", "grammar", "addition", "nosuch", "qa", "layers/.*"])
    return [f"--config.{name}.{key}={rng.choice(MAPPING_ENTRY_VALUES)}"]
  if kind == "file":
    return [rng.choice(FILE_OVERRIDES)]
  if kind == "unknown":
    return [rng.choice(UNKNOWN_KEYS)]
  return [rng.choice(SYNTAX)]


def _cases():
  rng = random.Random(SEED)
  fields = list(_fields(config_lib.Config))
  cases = []
  for i in range(CASES):
    path = f"{DEMO}:tiny"
    other_file = i % 4 == 3
    if other_file:  # every one of them, in turn
      path = CONFIG_PATHS[(i // 4) % len(CONFIG_PATHS)]
    overrides = ["--config.train.progress=false"]
    if other_file:  # first each file as it is, then with mutations
      count = 0 if i // 4 < len(CONFIG_PATHS) else rng.choice([0, 1, 1, 2])
    else:
      count = rng.choice([1, 1, 1, 2, 3])
    for _ in range(count):
      overrides += _mutation(rng, fields)
    cases.append((path, overrides))
  return cases


def _files(root):
  """The files the cases name: configs that register a JSONL task, broken config files."""
  (root / "adir").mkdir()
  records = [{"question": f"capital of {c}?", "answer": c[:3]} for c in ("peru", "chad", "fiji")]
  (root / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  long = [{"question": "why? " * 40, "answer": "because"} for _ in range(5)]
  (root / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long))
  (root / "bad.jsonl").write_text('{"question": "broken\n')
  (root / "empty.jsonl").write_text("\n")

  def jsonl_config(name, data):
    path = root / f"{name}.py"
    path.write_text(f'''
from mtjax import config as config_lib
from mtjax import tasks
from mtjax.tasks.sources import Fields, JsonlSource

tasks.register(tasks.Task("qa", JsonlSource({{"train": [{str(data)!r}], "validation": [{str(data)!r}]}},
                                            Fields(prompt="question", target="answer")),
                          tasks.exact_match), replace=True)


def get_config():
  c = config_lib.load_raw({DEMO + ":tiny"!r})
  c.data.tasks = ("qa", "reverse")
  c.data.mixture = {{"qa": 1.0, "reverse": 1.0}}
  return c
''')
    return str(path)

  files = {"dir": str(root / "adir"), "text": str(root / "good.jsonl"),
           "jsonl_good": jsonl_config("jsonl_good", root / "good.jsonl"),
           "jsonl_missing": jsonl_config("jsonl_missing", root / "missing.jsonl"),
           "jsonl_dir": jsonl_config("jsonl_dir", root / "adir"),
           "jsonl_long": jsonl_config("jsonl_long", root / "long.jsonl"),
           "jsonl_bad": jsonl_config("jsonl_bad", root / "bad.jsonl"),
           "jsonl_empty": jsonl_config("jsonl_empty", root / "empty.jsonl")}
  for name, body in {
      "syntax": "def get_config(:\n",
      "raises": "def get_config():\n  raise RuntimeError('no\\nway')\n",
      "returns_int": "def get_config():\n  return 3\n",
      "returns_bad_tree": "def get_config():\n  return {'model': 3, 1: 2}\n",
      "nan_lr": f"from mtjax import config as config_lib\n\ndef get_config():\n"
                f"  c = config_lib.load_raw({DEMO + ':tiny'!r})\n  c.optimizer.lr = float('nan')\n"
                "  return c\n",
      "no_get_config": "X = 1\n"}.items():
    (root / f"{name}.py").write_text(body)
    files[name] = str(root / f"{name}.py")
  return files


def test_fuzzed_configs_exit_0_valid_or_2_one_error_line(tmp_path, capsys):
  files = _files(tmp_path)
  outcomes, failures = {0: 0, 2: 0}, []
  start = time.perf_counter()
  for i, (path, overrides) in enumerate(_cases()):
    for name, file in files.items():
      path = path.replace("{" + name + "}", file)
      overrides = [o.replace("{" + name + "}", file) for o in overrides]
    argv = ["train", "--check", "--config", path, *overrides]
    code = cli.main(argv)  # any exception escaping here fails the test with its traceback
    captured = capsys.readouterr()
    err = captured.err
    lines = err.splitlines()
    if code == 0:
      ok = captured.out.splitlines()[-1] == f"valid: {path}" and not err
    else:
      ok = code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and err.endswith("\n")
    ok = ok and "Traceback" not in err + captured.out
    if ok:
      outcomes[code] += 1
    else:
      failures.append(f"case {i}: {argv!r} -> exit {code}, stderr {err!r}")
  seconds = time.perf_counter() - start
  assert not failures, "\n".join(failures)
  assert outcomes[0] + outcomes[2] == CASES >= 200
  # The mutations reach both sides: some stay valid, most are refused.
  assert outcomes[0] >= 15 and outcomes[2] >= CASES // 2, outcomes
  assert seconds < 30, f"{CASES} checks took {seconds:.1f}s"
