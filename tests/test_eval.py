"""Decoding (KV cache vs full recompute, sampling) and scorers against independent references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtjax.config import MeshConfig, ModelConfig
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.eval import scorers
from mtjax.eval.decode import Generator
from mtjax.model import Decoder, ModelSpec
from mtjax.parallel.mesh import make_mesh

TOK = tokenizer_lib.get("byte")  # the vocabulary and special ids the models below use
EOS = TOK.eos_id


@pytest.fixture(scope="module")
def model():
  spec = ModelSpec.from_config(ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                           mlp_dim=64), TOK.vocab_size, "float32")
  graphdef, state = nnx.split(Decoder(spec, nnx.Rngs(3)))
  # Replicated on the tests' mesh, as a run's parameters live on its mesh (parameters on one
  # device would make a generator's first call also compile their resharding).
  mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
  on_mesh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return spec, graphdef, jax.device_put(nnx.to_pure_dict(state), on_mesh)


def naive_greedy(graphdef, params, prompt, max_new, width=64):
  """Recompute the whole sequence for every new token: no cache. (Right padding to a fixed
  width, which the causal mask makes irrelevant, keeps it to one compilation.)"""
  forward = jax.jit(lambda p, t, pos, seg: nnx.merge(graphdef, p)(t, pos, seg))
  seq = list(prompt)
  out = []
  for _ in range(max_new):
    n = len(seq)
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :n] = seq
    seg = (np.arange(width) < n).astype(np.int32)[None]
    logits = forward(params, tokens, np.arange(width)[None], seg)
    token = int(jnp.argmax(logits[0, n - 1]))
    if token == EOS:
      break
    out.append(token)
    seq.append(token)
  return out


@pytest.mark.multidevice
def test_kv_cache_greedy_equals_full_recompute(model):
  spec, graphdef, params = model
  mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
  gen = Generator(graphdef, spec, mesh, max_new_tokens=12, eos_id=EOS, batch_size=8,
                  buckets=(8, 32, 64))
  rng = np.random.default_rng(0)
  byte_ids = lambda n: rng.integers(TOK.offset, TOK.vocab_size, size=n)
  prompts = [np.concatenate([[TOK.bos_id], byte_ids(n - 1)]).astype(np.int32)
             for n in (5, 17, 40)]  # three lengths, three buckets
  got = gen(params, prompts)
  for prompt, samples in zip(prompts, got):
    assert samples[0].tokens.tolist() == naive_greedy(graphdef, params, prompt, 12)
  assert gen.compiles == {8: 1, 32: 1, 64: 1}  # once per bucket
  gen(params, [prompts[1][:10], prompts[1][:20]])  # other lengths, same bucket: no recompile
  assert gen.compiles == {8: 1, 32: 1, 64: 1}


@pytest.mark.multidevice
def test_sampling_is_seeded_and_temperature_zero_is_greedy(model):
  spec, graphdef, params = model
  mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
  gen = Generator(graphdef, spec, mesh, max_new_tokens=10, eos_id=EOS, batch_size=8, buckets=(16,))
  prompts = [np.array([1, 50, 60, 70], np.int32), np.array([1, 80, 90], np.int32)]
  a = gen(params, prompts, num_samples=3, seed=7, temperature=1.0)
  b = gen(params, prompts, num_samples=3, seed=7, temperature=1.0)
  c = gen(params, prompts, num_samples=3, seed=8, temperature=1.0)
  flat = lambda r: [s.tokens.tolist() for ss in r for s in ss]
  assert flat(a) == flat(b) and flat(a) != flat(c)
  assert len({tuple(t) for t in flat(a)}) > 1  # samples differ from one another
  greedy = gen(params, prompts)
  cold = gen(params, prompts, num_samples=2, seed=3, temperature=0.0)
  for g, cs in zip(greedy, cold):
    assert all(s.tokens.tolist() == g[0].tokens.tolist() for s in cs)
  top1 = gen(params, prompts, num_samples=2, seed=3, temperature=1.5, top_k=1)  # top-k 1 = greedy
  assert flat(top1) == [g[0].tokens.tolist() for g in greedy for _ in range(2)]
  assert gen.compiles == {16: 1}  # settings are arguments, not recompiles


def test_pass_at_k_matches_closed_form_and_distinct_k():
  for n, c, k in [(10, 3, 1), (10, 3, 5), (5, 0, 2), (5, 5, 3), (20, 7, 10)]:
    ref = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert scorers.pass_at_k(n, c, k) == pytest.approx(ref)
  assert scorers.pass_at_k(4, 1, 1) == pytest.approx(0.25)
  outs = ["a b", "a b", "c d", "x", "c d", "e f"]
  valid = [True, True, True, False, True, True]
  assert scorers.distinct_k(outs, valid, 6) == 3  # {"a b", "c d", "e f"}; "x" is invalid
  assert scorers.distinct_k(outs, valid, 2) == 1
  assert scorers.sequence_entropy([-1.0, -3.0]) == pytest.approx(2.0)


def test_eval_during_training_compiles_once_and_cli_eval(tmp_path, tmp_path_factory, capsys):
  import json
  from conftest import tiny_config
  from mtjax import cli, recipes
  from mtjax.data.tokenizer import ByteTokenizer
  from mtjax.eval.decode import DEFAULT_BUCKETS
  from mtjax import tasks
  from mtjax.tasks.sources import JsonlSource
  cfg = tiny_config(**{"eval.every": 5, "eval.num_examples": 12, "eval.num_generate": 6,
                       "eval.sample_prompts": 3, "eval.num_samples": 3, "checkpoint.every": 5})
  result = recipes.run(cfg, tmp_path)
  evals = [r for r in result.history if "eval/reverse/loss" in r]
  assert [r["step"] for r in evals] == [0, 5, 10]
  assert all(r["perf/eval_compiles"] == 1 for r in evals)  # 3 tasks, 3 evals: one compilation
  tok = ByteTokenizer()
  lengths = [1 + len(tok.encode(e.prompt)) for t in cfg.data.tasks
             for e in list(tasks.get(t).source.load("validation", 0).examples)[:6]]
  buckets = {min(b for b in DEFAULT_BUCKETS if b >= n) for n in lengths}
  assert evals[-1]["perf/generate_compiles"] == len(buckets)  # once per length bucket
  for t in cfg.data.tasks:
    for m in ("loss", "entropy", "token_accuracy", "accuracy", "pass@1", "pass@3", "distinct@3",
              "seq_entropy"):
      assert f"eval/{t}/{m}" in evals[-1]
  assert evals[0]["eval/reverse/loss"] > evals[-1]["eval/reverse/loss"]  # it learns
  assert "perf/eval_time_s" in evals[-1]

  # mtjax eval on the checkpoints: the same teacher-forced numbers as during training.
  assert cli.main(["eval", "--workdir", str(tmp_path), "--step", "5", "--tasks", "reverse"]) == 0
  out = capsys.readouterr().out
  assert "reverse" in out and "token_accuracy" in out
  saved = json.loads((tmp_path / "eval" / "step_5.json").read_text())
  assert saved["eval/reverse/loss"] == pytest.approx(evals[1]["eval/reverse/loss"], rel=1e-5)
  assert "eval/grammar/loss" not in saved
  # A registered task the run never trained on (an eval-only benchmark): evaluated after the
  # run's tasks, whose task ids (and numbers) stay as they were.
  data = tmp_path_factory.mktemp("extra") / "extra.jsonl"
  data.write_text('{"input": "abc", "target": "cba"}\n{"input": "hello", "target": "olleh"}\n')
  tasks.register(tasks.Task("extra_bench", JsonlSource({"validation": [str(data)]}),
                            tasks.exact_match, eval_only=True), replace=True)
  assert cli.main(["eval", "--workdir", str(tmp_path), "--step", "5", "--tasks",
                   "reverse,extra_bench"]) == 0
  assert "extra_bench" in capsys.readouterr().out
  saved = json.loads((tmp_path / "eval" / "step_5.json").read_text())
  assert saved["eval/reverse/loss"] == pytest.approx(evals[1]["eval/reverse/loss"], rel=1e-5)
  assert saved["eval/extra_bench/tokens"] == 4 + 6 and "eval/extra_bench/accuracy" in saved
  # Another subset of the same step adds to its file; what an earlier eval wrote stays.
  assert cli.main(["eval", "--workdir", str(tmp_path), "--step", "5", "--tasks", "extra_bench"]) == 0
  capsys.readouterr()
  again = json.loads((tmp_path / "eval" / "step_5.json").read_text())
  assert again["eval/reverse/loss"] == saved["eval/reverse/loss"]
  assert again["eval/extra_bench/tokens"] == saved["eval/extra_bench/tokens"]
  # The generations beside the scores: one record per scored prompt, their share correct equal
  # to the stored accuracy; a later subset replaces its own task's lines, keeps the others'.
  samples = [json.loads(line) for line in
             (tmp_path / "eval" / "step_5.samples.jsonl").read_text().splitlines()]
  for task in ("reverse", "extra_bench"):
    mine = [r for r in samples if r["task"] == task]
    assert mine and set(mine[0]) == {"task", "index", "prompt", "output", "reference", "correct"}
    assert np.mean([r["correct"] for r in mine]) == pytest.approx(again[f"eval/{task}/accuracy"])
  assert [r["reference"] for r in samples if r["task"] == "extra_bench"] == ["cba", "olleh"]
  assert cli.main(["report", str(tmp_path)]) == 0  # the run report shows a few of them
  report_md = (tmp_path / "report.md").read_text()
  assert "## Generations" in report_md and "step_5.samples.jsonl" in report_md
  row = next(line for line in report_md.splitlines() if line.startswith("| extra_bench | `abc` | "))
  assert row.split(" | ")[3] == "`cba`" and row.endswith(("| yes |", "| no |"))
  assert cli.main(["eval", "--workdir", str(tmp_path), "--tasks", "nosuch"]) == 2
  assert "--tasks: unknown task 'nosuch'" in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", str(tmp_path), "--step", "7"]) == 2
