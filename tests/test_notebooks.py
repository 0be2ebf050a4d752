"""Every Colab notebook runs top to bottom (nbclient) at smoke size on the CPU, and shows what its
text says it shows: the numbers it prints agree with what the run wrote to its workdir."""

import ast
import importlib.util
import json
import math
import pathlib
import re
import subprocess
import sys
import tomllib

import nbformat
import pytest
from nbclient import NotebookClient

import run_contract
from conftest import REPO
from mtjax import colab

NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
VERDICTS = ("more efficient", "less efficient", "inconclusive")
# mtjax.train.metrics and mtjax.experiments.report call matplotlib.use("Agg") to write PNGs, which
# switches a notebook's inline backend off: a later plt.show() displays nothing.


def _cell(notebook, snippet):
  """The first code cell whose source contains snippet."""
  cells = [c for c in notebook.cells if c.cell_type == "code" and snippet in c.source]
  assert cells, f"no code cell contains {snippet!r}"
  return cells[0]


def _stdout(cell):
  return "".join(o.get("text", "") for o in cell.get("outputs", [])
                 if o.get("output_type") == "stream" and o.get("name") == "stdout")


def _data(cell, mime):
  """Every output of mime type (display_data or execute_result) of a cell."""
  return [o["data"][mime] for o in cell.get("outputs", [])
          if o.get("output_type") in ("display_data", "execute_result") and mime in o.get("data", {})]


def _floats(text):
  return [float(x) for x in re.findall(r"[-+]?(?:\d+\.\d*(?:e[-+]?\d+)?|nan|inf)", text)]


def _check_quickstart(notebook, work):
  out = _stdout(_cell(notebook, "recipes.run(cfg, workdir)"))
  compiles, final_step = map(int, re.search(r"compiles: (\d+) \| final step: (\d+)", out).groups())
  assert (compiles, final_step) == (1, 10)  # smoke: 10 steps, one compilation
  assert run_contract.check(work / "quickstart") == []
  rows = [json.loads(line) for line in (work / "quickstart" / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in rows if "train/loss" in r][-1]
  assert last["step"] == 10
  plot = _cell(notebook, "plt.show()")
  printed = ast.literal_eval(_stdout(plot).strip().splitlines()[-1])  # final per-task loss, accuracy
  assert set(printed) == {"reverse", "addition", "grammar"}
  for task, final in printed.items():
    assert set(final) == {"loss", "accuracy"}, task
    assert math.isfinite(final["loss"]) and final["loss"] == round(last[f"train/{task}/loss"], 3), task
    assert 0 <= final["accuracy"] <= 1 and final["accuracy"] == round(last[f"train/{task}/accuracy"], 3), task
  assert _data(plot, "image/png")  # the per-task curves are shown inline


def _check_multitask_vs_single(notebook, work):
  summary = json.loads((work / "efficiency" / "summary.json").read_text())
  out = _stdout(_cell(notebook, "efficiency.run("))
  for seed in summary["seeds"]:
    assert f"study: seed{seed}/multi" in out
    for task in summary["tasks"]:
      assert f"study: seed{seed}/single_{task}" in out
  ratios, verdict = re.search(r"ratios per seed: (\[.*\]) \| verdict: (.+)", out).groups()
  assert verdict.strip() in VERDICTS and verdict.strip() == summary["verdict"]
  assert len(_floats(ratios)) == len(summary["seeds"])
  assert _floats(ratios) == pytest.approx(summary["ratios"], nan_ok=True)
  report = _cell(notebook, "report.md")
  (markdown,) = _data(report, "text/markdown")
  assert markdown.startswith("# Efficiency study")
  for task in summary["tasks"]:
    assert f"| {task} |" in markdown  # a table row per task
  assert len(_data(report, "image/png")) == 1


def _check_entropy_and_order(notebook, work):
  preview = _stdout(_cell(notebook, "preview(staged")).split("token lengths")[0]  # the ranges
  first, second = preview.split("steps 20-39")
  assert "steps 0-19" in first

  def shares(block):  # task -> (rate, examples)
    found = re.findall(r"^\s+(structured_copy|open_ended_grammar)\s+([\d.]+)\s+(\d+)", block, re.M)
    return {t: (float(rate), int(n)) for t, rate, n in found}

  assert shares(first) == {"structured_copy": (1.0, shares(first)["structured_copy"][1]),
                           "open_ended_grammar": (0.0, 0)}  # stage 1: structured tasks only
  assert shares(first)["structured_copy"][1] > 0
  assert {t: rate for t, (rate, _) in shares(second).items()} == {"structured_copy": 0.5,
                                                                  "open_ended_grammar": 0.5}
  assert all(n > 0 for _, n in shares(second).values())  # stage 2 from step 20: both tasks
  summary = json.loads((work / "entropy" / "summary.json").read_text())
  (shown,) = _data(_cell(notebook, "entropy.run("), "text/plain")
  joint = ast.literal_eval(shown)  # the cell's value: findings["joint"]
  assert joint == summary["findings"]["joint"]  # repr and JSON both round-trip floats exactly
  assert set(joint) == {"structured_copy", "open_ended_grammar"}
  for task, values in joint.items():
    assert set(values) == {"final_entropy", "retained", "final_distinct", "final_pass1"}, task
    assert 0 < values["final_entropy"] < math.inf
  report = _cell(notebook, "report.md")
  (markdown,) = _data(report, "text/markdown")
  assert markdown.startswith("# Entropy study")
  assert len(_data(report, "image/png")) == 1


# A Qwen-style chat template without a default system turn (short rows for a 64-position model).
CHAT_TEMPLATE = (r"""{%- for message in messages %}"""
                 r"""{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"""
                 r"""{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}""")


def _tiny_chat_llama(directory):
  """A tiny random HF Llama (transformers' own classes, tests/hf_models.py) whose tokenizer has
  <|im_start|>/<|im_end|> and a chat template: what finetune_pretrained.ipynb's PRETRAINED names."""
  import hf_models
  from tokenizers import Tokenizer, decoders, models, trainers
  hf_models.make("llama", directory)  # then its tokenizer, replaced by one with the chat specials
  texts = [*hf_models.CORPUS, "user\n", "assistant\n", "reverse: abc\n", "add: 1+2=", "<|im_end|>\n"]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.decoder = decoders.Fuse()  # type: ignore[attr-defined]
  trainer = trainers.BpeTrainer(vocab_size=hf_models.VOCAB, show_progress=False,
                                special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=sorted({c for t in texts for c in t}))
  tok.train_from_iterator(texts, trainer)
  assert tok.get_vocab_size() <= hf_models.VOCAB
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
       "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64,
       "chat_template": CHAT_TEMPLATE}))
  return directory


def _check_finetune_pretrained(notebook, work):
  workdir = work / "finetune_pretrained"
  assert run_contract.check(workdir) == []
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["format"] == "chat" and config["data"]["tasks"] == ["reverse", "addition"]
  assert config["model"]["lora"]["targets"] == ["q", "v"]
  assert "final step: 4" in _stdout(_cell(notebook, "recipes.run(cfg, workdir)"))
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = {r["step"]: r for r in rows if "eval/reverse/loss" in r}
  assert sorted(evals) == [0, 4]  # before (the pretrained model) and after
  table = _stdout(_cell(notebook, "before, after"))
  for task in ("reverse", "addition"):
    for metric in ("loss", "token_accuracy", "accuracy"):
      (line,) = [x for x in table.splitlines() if x.split()[:2] == [task, metric]]
      key = f"eval/{task}/{metric}"
      assert _floats(line)[-2:] == [round(evals[0][key], 4), round(evals[4][key], 4)], line
  assert evals[4]["eval/reverse/loss"] != evals[0]["eval/reverse/loss"]  # the adapters trained
  generated = _stdout(_cell(notebook, "model.generate("))
  assert generated.count(" -> ") == 2
  assert sorted(p.name for p in (work / "finetune_adapter").iterdir()) == [
      "adapter_config.json", "adapter_model.safetensors"]
  merged = {p.name for p in (work / "finetune_merged").iterdir()}
  assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= merged
  assert any(n.endswith(".safetensors") for n in merged)
  exported = _stdout(_cell(notebook, "export_run("))
  assert "adapter: ['adapter_config.json', 'adapter_model.safetensors']" in exported


CHECKS = {"quickstart": _check_quickstart, "multitask_vs_single": _check_multitask_vs_single,
          "entropy_and_order": _check_entropy_and_order, "finetune_pretrained": _check_finetune_pretrained}


def test_there_are_four_notebooks():
  assert {p.stem for p in NOTEBOOKS} == set(CHECKS)


def _repo_zip(tmp_path, top_folder=""):
  """A zip of the working tree's tracked files, as a user would upload it."""
  import zipfile
  files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
  archive = tmp_path / "mtjax.zip"
  with zipfile.ZipFile(archive, "w") as z:
    for name in files:
      if (REPO / name).is_file() and not name.startswith("tests/data/"):
        z.write(REPO / name, top_folder + name)
  return archive


# Run before a notebook's setup cell: the kernel looks like a fresh Colab runtime (mtjax not
# found), and pip is recorded rather than run (this environment already has the dependencies), so
# the setup cell unpacks the zip and the notebook imports mtjax from the unpacked source.
FRESH_RUNTIME = """import importlib.util, subprocess
_find_spec, _run = importlib.util.find_spec, subprocess.run
importlib.util.find_spec = lambda name, *a: None if name == "mtjax" else _find_spec(name, *a)
def _pip_recorded(cmd, *args, **kwargs):
    if list(cmd[1:4]) == ["-m", "pip", "install"]:
        print("pip install", cmd[-1]); return subprocess.CompletedProcess(cmd, 0)
    return _run(cmd, *args, **kwargs)
subprocess.run = _pip_recorded"""


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
  """Each notebook top to bottom from a zip of the repository as MTJAX_SOURCE (a fresh runtime:
  the setup cell unpacks it, and every mtjax import comes from the unpacked source)."""
  monkeypatch.setenv("MTJAX_SMOKE", "1")
  monkeypatch.setenv("MTJAX_NOTEBOOK_DIR", str(tmp_path))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device in the kernel, as on a Colab CPU runtime
  unpacked = tmp_path / "unpacked"
  monkeypatch.setenv("MTJAX_SOURCE_DIR", str(unpacked))
  notebook = nbformat.read(path, as_version=4)
  setup = notebook.cells[1]
  setup.source = re.sub(r"^MTJAX_SOURCE = .*$", f"MTJAX_SOURCE = {str(_repo_zip(tmp_path))!r}",
                        setup.source, flags=re.M)
  notebook.cells.insert(1, nbformat.v4.new_code_cell(FRESH_RUNTIME))
  notebook.cells.append(nbformat.v4.new_code_cell("import mtjax; print(mtjax.__file__)"))
  if path.stem == "finetune_pretrained":  # the user's model: a tiny random HF Llama with a chat template
    pytest.importorskip("torch")
    model = _tiny_chat_llama(tmp_path / "tiny-llama")
    cell = _cell(notebook, "PRETRAINED = ")
    cell.source, n = re.subn(r'^PRETRAINED = "[^"]*"', f"PRETRAINED = {str(model)!r}", cell.source, flags=re.M)
    assert n == 1
  NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
  errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  setup = _stdout(notebook.cells[2])
  assert setup == f"pip install {unpacked}\n1 cpu device(s); smoke=True\n", setup  # saw the flags
  assert _stdout(notebook.cells[-1]).strip() == str(unpacked / "mtjax" / "__init__.py")
  CHECKS[path.stem](notebook, tmp_path)


# The setup cell: a Colab form field for the source, an install with the runtime's extra, and a
# platform check that stops a notebook JAX would otherwise run on the CPU of a GPU/TPU runtime.

@pytest.mark.parametrize("env, paths, expected", [
    ({"COLAB_GPU": "1"}, [], "gpu"),
    ({}, ["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"], "gpu"),
    ({}, ["/dev/nvidiactl", "/dev/nvidia-uvm"], "cpu"),  # driver nodes without a GPU
    ({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, [], "tpu"),
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-1"}, [], "tpu"),
    ({"TPU_WORKER_ID": ""}, [], "cpu"),  # an empty variable says nothing
    ({}, ["/dev/accel0"], "tpu"),
    ({}, ["/dev/vfio/0", "/dev/vfio/1"], "tpu"),  # v5e and later
    ({}, ["/dev/vfio/vfio"], "cpu"),  # the VFIO control node alone is no TPU
    ({"COLAB_GPU": "0"}, [], "cpu"),
    ({}, [], "cpu"),
    ({"JAX_PLATFORMS": "cpu"}, ["/dev/nvidia0"], "cpu"),  # the user's choice wins
    ({"JAX_PLATFORMS": "cuda,cpu"}, [], "gpu"),
    ({"JAX_PLATFORMS": "tpu"}, [], "tpu"),
], ids=["colab_gpu", "nvidia0", "nvidiactl_only", "colab_tpu_addr", "tpu_env", "empty_tpu_env",
        "accel", "vfio", "vfio_control_only", "colab_gpu_0", "nothing", "jax_platforms_cpu", "jax_platforms_cuda", "jax_platforms_tpu"])
def test_detect_runtime(env, paths, expected):
  assert colab.detect_runtime(env=env, paths=paths) == expected


def test_pip_target_names_extras_that_exist():
  extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  assert colab.pip_target("/content/mtjax", "gpu") == "/content/mtjax[cuda]"
  assert colab.pip_target("/content/mtjax", "tpu") == "/content/mtjax[tpu]"
  assert colab.pip_target("/content/mtjax", "cpu") == "/content/mtjax"
  assert {e for e in colab.EXTRAS.values() if e} <= set(extras)
  with pytest.raises(ValueError, match="runtime must be one of"):
    colab.pip_target("/content/mtjax", "cuda")
  readme = (REPO / "README.md").read_text()  # every extra the README names exists
  named = set(re.findall(r'"\.?\[([\w,]+)\]"', readme)) | set(re.findall(r"mtjax\[(\w+)\]", readme))
  assert named and {x for n in named for x in n.split(",")} <= set(extras), named


@pytest.mark.parametrize("expected, extra", [("gpu", "cuda"), ("tpu", "tpu")])
def test_check_platform_stops_on_a_mismatch(expected, extra):
  with pytest.raises(colab.PlatformMismatch) as raised:
    colab.check_platform(expected, actual="cpu")
  message = str(raised.value)
  assert f"this runtime has a {expected.upper()} but JAX computes on 'cpu'" in message
  assert f"pip install -e '<mtjax source>[{extra}]'" in message
  assert "Restart session" in message and "%env JAX_PLATFORMS=cpu" in message
  assert "jax " in message  # the installed versions, so a plugin/jaxlib mismatch is visible


def test_check_platform_accepts_a_match():
  assert colab.check_platform("gpu", actual="gpu") == "gpu"
  assert colab.check_platform("tpu", actual="tpu") == "tpu"
  assert colab.check_platform("cpu", actual="gpu") == "gpu"  # JAX found more than detection did
  assert colab.check_platform("cpu") == "cpu"  # the real jax.devices() of this test process
  with pytest.raises(ValueError, match="expected must be one of"):
    colab.check_platform("cuda", actual="gpu")


def test_colab_module_imports_only_the_standard_library():
  """The setup cell loads mtjax/colab.py by path before mtjax's dependencies are installed."""
  code = ("import importlib.util, sys\n"
          f"spec = importlib.util.spec_from_file_location('c', {str(REPO / 'mtjax' / 'colab.py')!r})\n"
          "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
          "print(sorted(n for n in ('jax', 'numpy', 'mtjax') if n in sys.modules))")
  out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def _setup_source(path):
  return nbformat.read(path, as_version=4).cells[1].source


def test_setup_cell_is_one_form_shared_by_all_notebooks():
  sources = {p.stem: _setup_source(p) for p in NOTEBOOKS}
  assert len(set(sources.values())) == 1, "the setup cells differ"
  source = sources["quickstart"]
  # No made-up default (the repository has no public URL): the cell asks for one.
  assert re.search(r'^MTJAX_SOURCE = ""  # @param \{type:"string"\}$', source, re.M)
  assert source.startswith("# @title ")
  assert "git clone" not in source.split("else:  # a git URL", 1)[0]  # cloned only for a URL


@pytest.mark.parametrize("jax_platforms, extra, stops", [("cpu", "", False), ("cuda", "[cuda]", True),
                                                         ("tpu", "[tpu]", True)])
def test_setup_cell_installs_the_runtimes_extra_and_checks_the_platform(
    jax_platforms, extra, stops, tmp_path, monkeypatch):
  """The install branch of the setup cell on a "fresh runtime" (mtjax not found), MTJAX_SOURCE a
  folder: pip gets the folder with the detected runtime's extra; then, JAX being on the CPU here,
  a GPU or TPU runtime stops the cell with PlatformMismatch."""
  source = re.sub(r"^MTJAX_SOURCE = .*$", f"MTJAX_SOURCE = {str(REPO)!r}", _setup_source(NOTEBOOKS[0]),
                  flags=re.M)
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "mtjax" else find_spec(name, *a))
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.setenv("JAX_PLATFORMS", jax_platforms)  # jax here is already on the CPU
  monkeypatch.setenv("MTJAX_NOTEBOOK_DIR", str(tmp_path))
  namespace = {}
  if stops:
    with pytest.raises(colab.PlatformMismatch, match="but JAX computes on 'cpu'"):
      exec(compile(source, "setup", "exec"), namespace)
  else:
    exec(compile(source, "setup", "exec"), namespace)
    assert namespace["PLATFORM"] == "cpu" and not namespace["ACCELERATOR"]
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-e", f"{REPO}{extra}"]]


def _fresh_runtime(monkeypatch, tmp_path):
  """A "fresh runtime" for the setup cell: mtjax not found, pip recorded instead of run."""
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "mtjax" else find_spec(name, *a))
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MTJAX_NOTEBOOK_DIR", str(tmp_path / "work"))
  monkeypatch.setenv("MTJAX_SOURCE_DIR", str(tmp_path / "unpacked"))
  return calls


def _with_source(value):
  return re.sub(r"^MTJAX_SOURCE = .*$", f"MTJAX_SOURCE = {value!r}", _setup_source(NOTEBOOKS[0]),
                flags=re.M)


@pytest.mark.parametrize("top_folder", ["mtjax-main/", ""])
def test_setup_cell_installs_from_a_zip_of_the_repository(top_folder, tmp_path, monkeypatch):
  """A zip of the working tree (GitHub's "Download ZIP" holds one top folder; `git archive` none)
  uploaded to the session: unpacked, and pip installs the unpacked folder."""
  archive = _repo_zip(tmp_path, top_folder)
  calls = _fresh_runtime(monkeypatch, tmp_path)
  namespace = {}
  exec(compile(_with_source(str(archive)), "setup", "exec"), namespace)
  unpacked = tmp_path / "unpacked" / top_folder.rstrip("/")
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-e", str(unpacked)]]
  assert (unpacked / "mtjax" / "colab.py").is_file() and (unpacked / "pyproject.toml").is_file()
  assert namespace["PLATFORM"] == "cpu"


@pytest.mark.parametrize("value, error, message", [
    ("", ValueError, "Set MTJAX_SOURCE"),
    ("/nonexistent/mtjax.zip", FileNotFoundError, "no file /nonexistent/mtjax.zip"),
    ("/nonexistent/dir", FileNotFoundError, "no folder /nonexistent/dir"),
])
def test_setup_cell_without_a_usable_source_says_what_to_set(value, error, message, tmp_path,
                                                             monkeypatch):
  calls = _fresh_runtime(monkeypatch, tmp_path)
  with pytest.raises(error, match=message):
    exec(compile(_with_source(value), "setup", "exec"), {})
  assert calls == []  # never a failing clone or install
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no mtjax source"):
    exec(compile(_with_source(str(tmp_path / "empty")), "setup", "exec"), {})


def test_notebooks_declare_their_colab_runtime():
  """Colab opens a notebook on the runtime its metadata names (accelerator, gpuType)."""
  meta = {p.stem: nbformat.read(p, as_version=4).metadata for p in NOTEBOOKS}
  assert meta["finetune_pretrained"]["accelerator"] == "GPU" and meta["finetune_pretrained"]["gpuType"] == "T4"
  assert all("accelerator" not in m for k, m in meta.items() if k != "finetune_pretrained")  # CPU


@pytest.mark.slow  # needs the package index (CI has it): a few seconds per resolution
@pytest.mark.parametrize("python", ["3.11", "3.13"])  # CI's, and Colab's since 2026-08
def test_the_install_cells_dependencies_resolve_to_wheels_on_colabs_pythons(python, tmp_path):
  """What the setup cell pip-installs (the source, with [cuda] on GPU runtimes, [tpu] on TPU)
  resolves to binary wheels for Colab's Linux (Ubuntu 22.04: glibc 2.35, x86_64) on that Python:
  a dependency without a wheel for it (a new CPython Colab moved to) fails here, not in a user's
  first cell. promise (needed by tensorflow-datasets) ships only a source distribution, which pip
  builds (pure Python)."""
  uv = pathlib.Path(sys.executable).parent / "uv"
  for extra in (None, "cuda", "tpu"):
    cmd = [str(uv), "pip", "compile", str(REPO / "pyproject.toml"), "--python-version", python,
           "--python-platform", "x86_64-manylinux_2_35", "--only-binary", ":all:", "--no-binary",
           "promise", "--quiet", "--output-file", str(tmp_path / f"{extra}.txt"),
           *(["--extra", extra] if extra else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (extra, proc.stderr[-3000:])
    pins = (tmp_path / f"{extra}.txt").read_text()
    assert re.search(r"^jax==", pins, re.M) and (extra is None or f"jax[{extra}" in pins
                                                   or re.search(r"^(jax-cuda|libtpu)", pins, re.M))
