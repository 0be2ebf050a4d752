"""Every Colab notebook runs top to bottom (nbclient) at smoke size on the CPU, and shows what its
text says it shows: the numbers it prints agree with what the run wrote to its workdir."""

import ast
import importlib.util
import json
import math
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


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
  monkeypatch.setenv("MTJAX_SMOKE", "1")
  monkeypatch.setenv("MTJAX_NOTEBOOK_DIR", str(tmp_path))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device in the kernel, as on a Colab CPU runtime
  notebook = nbformat.read(path, as_version=4)
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
  setup = _stdout(notebook.cells[1])
  assert re.fullmatch(r"1 cpu device\(s\); smoke=True\n", setup), setup  # the setup cell saw the flags
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
    ({"COLAB_GPU": "0"}, [], "cpu"),
    ({}, [], "cpu"),
    ({"JAX_PLATFORMS": "cpu"}, ["/dev/nvidia0"], "cpu"),  # the user's choice wins
    ({"JAX_PLATFORMS": "cuda,cpu"}, [], "gpu"),
    ({"JAX_PLATFORMS": "tpu"}, [], "tpu"),
], ids=["colab_gpu", "nvidia0", "nvidiactl_only", "colab_tpu_addr", "tpu_env", "empty_tpu_env",
        "accel", "colab_gpu_0", "nothing", "jax_platforms_cpu", "jax_platforms_cuda", "jax_platforms_tpu"])
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
  assert re.search(r'^MTJAX_SOURCE = "[^"]+"  # @param \{type:"string"\}$', source, re.M)
  assert source.startswith("# @title ")


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
