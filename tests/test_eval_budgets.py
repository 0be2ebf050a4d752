"""Eval lengths and budgets: prompt buckets up to the model's length, per-task generation budgets
(one compilation per bucket), skipped-and-counted prompts, truncation of teacher-forced examples
as in training, and eval tasks outside the run's. References: token counts computed by hand with
the tokenizer, a no-cache greedy decode, and a second evaluation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from mtjax import tasks
from mtjax.config import MeshConfig, ModelConfig
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.errors import BadInputError
from mtjax.eval import evaluate
from mtjax.eval.decode import Generator, buckets_for
from mtjax.model import Decoder, ModelSpec
from mtjax.parallel.mesh import make_mesh
from mtjax.tasks.sources import JsonlSource

TOK = tokenizer_lib.get("byte")  # one token per ASCII character
L = 64  # the tiny demo's data.seq_len: the model's length


@pytest.fixture(scope="module")
def run():
  """The tiny demo's model, randomly initialized, on its mesh (what an Evaluator gets)."""
  from mtjax.train import setup as setup_lib
  return setup_lib.build(tiny_config())


def register(tmp_path, name, records, *, eval_only=False, calls=None):
  """A JSONL task `name` whose validation split is `records` [(input, target)]; `calls`, if
  given, collects (example, output) of every scored output."""
  path = tmp_path / f"{name}.jsonl"
  path.write_text("".join(json.dumps({"input": i, "target": t}) + "\n" for i, t in records))

  def is_correct(example, output):
    if calls is not None:
      calls.append((example, output))
    return tasks.exact_match(example, output)

  tasks.register(tasks.Task(name, JsonlSource({"train": [str(path)], "validation": [str(path)]}),
                            is_correct, eval_only=eval_only), replace=True)


def evaluator_for(run, task_names, **dotted):
  cfg = tiny_config(**dotted)
  return evaluate.Evaluator(cfg, run.graphdef, run.spec, run.mesh, run.tokenizer, task_names)


class Recording:
  """A Generator that also keeps every call's prompts, budget and samples."""

  def __init__(self, generator):
    self.generator, self.calls = generator, []

  @property
  def compiles(self):
    return self.generator.compiles

  def __call__(self, params, prompts, **kwargs):
    out = self.generator(params, prompts, **kwargs)
    self.calls.append((list(prompts), kwargs.get("max_new_tokens"), out))
    return out


def test_buckets_stop_at_the_model_length():
  assert buckets_for(64) == (32, 64)
  assert buckets_for(100) == (32, 64, 100)
  assert buckets_for(2048) == (32, 64, 128, 256, 512, 1024, 2048)
  assert buckets_for(4096) == (32, 64, 128, 256, 512, 1024, 2048, 4096)
  assert buckets_for(16) == (16,)


def test_prompt_longer_than_the_largest_bucket_is_skipped_and_counted(run, tmp_path, capsys):
  calls = []
  records = [("a" * 100, "ok"),  # prompt > L: not generated; teacher-forced with its prompt cut
             ("abc", "cba"), ("hello", "olleh"), ("x" * 30, "y")]
  register(tmp_path, "longprompt", records, calls=calls)
  ev = evaluator_for(run, ("longprompt",), **{"eval.num_generate": 4, "eval.num_samples": 0,
                                              "eval.num_examples": 4})
  row = ev(run.state.params, 0)  # no exception
  assert row["eval/longprompt/skipped"] == 1
  assert row["eval/longprompt/truncated"] == 1  # prompt_left: its prompt cut, its target kept
  assert [ex.input for ex, _ in calls] == [r[0] for r in records[1:]]  # the other three, scored
  assert 0.0 <= row["eval/longprompt/accuracy"] <= 1.0
  # Teacher-forced: every target (and EOS) of the four, the long one's included.
  assert row["eval/longprompt/tokens"] == sum(len(TOK.encode(t)) + 1 for _, t in records)
  assert "warning" not in capsys.readouterr().err
  assert "skipped" in evaluate.table(row) and "max_new_tokens" in evaluate.table(row)


def test_a_task_with_every_example_too_long_is_skipped_not_an_error(run, tmp_path, capsys):
  register(tmp_path, "toolong", [("p" * 80, "t" * 70), ("q" * 90, "u" * 66)])
  ev = evaluator_for(run, ("toolong", "reverse"), **{"eval.num_generate": 2,
                                                      "eval.num_samples": 0, "eval.num_examples": 2})
  err = capsys.readouterr().err
  assert err.count("warning: eval task toolong") == 1 and "reverse" not in err
  row = ev(run.state.params, 0)
  assert row["eval/toolong/skipped"] == 2 and row["eval/toolong/tokens"] == 0
  for metric in ("loss", "entropy", "token_accuracy", "accuracy"):  # nothing scored: absent
    assert f"eval/toolong/{metric}" not in row
  assert "eval/reverse/accuracy" in row and "eval/reverse/loss" in row
  assert not any(isinstance(v, float) and np.isnan(v) for v in row.values())
  assert "toolong" in evaluate.table(row)


def test_auto_budget_is_the_longest_target_plus_eos(run, tmp_path):
  short = [("abc", "cba"), ("hello", "olleh"), ("hi", "ih"), ("x", "a much longer target")]
  long = [("q", "t" * 80), ("r", "s")]  # a target longer than the model: capped at L - 1
  register(tmp_path, "short", short)
  register(tmp_path, "long", long)
  ev = evaluator_for(run, ("short", "long"), **{"eval.num_generate": 3, "eval.num_samples": 0,
                                                "eval.num_examples": 0})
  # Over the examples generated for (the first 3), counted with the tokenizer itself.
  assert ev.budgets["short"] == max(len(TOK.encode(t)) for _, t in short[:3]) + 1 == 6
  assert ev.budgets["long"] == L - 1
  # Sampling prompts count too when sampling is on.
  ev = evaluator_for(run, ("short",), **{"eval.num_generate": 1, "eval.sample_prompts": 4,
                                         "eval.num_samples": 2, "eval.num_examples": 0})
  assert ev.budgets["short"] == len(TOK.encode("a much longer target")) + 1
  ev = evaluator_for(run, ("short",), **{"eval.max_new_tokens": 9, "eval.num_examples": 0})
  assert ev.budgets["short"] == 9  # a number: that for every task


@pytest.fixture(scope="module")
def byte_model():
  spec = ModelSpec.from_config(ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                           mlp_dim=64), TOK.vocab_size, "float32")
  graphdef, state = nnx.split(Decoder(spec, nnx.Rngs(5)))
  mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
  on_mesh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return spec, graphdef, jax.device_put(nnx.to_pure_dict(state), on_mesh), mesh


def naive_greedy(graphdef, params, prompt, max_new, width=L):
  """No cache: the whole sequence recomputed for every new token (right-padded to `width`)."""
  forward = jax.jit(lambda p, t, pos, seg: nnx.merge(graphdef, p)(t, pos, seg))
  seq, out = list(prompt), []
  for _ in range(max_new):
    n = len(seq)
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :n] = seq
    seg = (np.arange(width) < n).astype(np.int32)[None]
    token = int(jnp.argmax(forward(params, tokens, np.arange(width)[None], seg)[0, n - 1]))
    if token == TOK.eos_id:
      break
    out.append(token)
    seq.append(token)
  return out


@pytest.mark.multidevice
def test_per_prompt_budgets_equal_a_no_cache_decode_and_fit_the_model(byte_model):
  spec, graphdef, params, mesh = byte_model
  gen = Generator(graphdef, spec, mesh, max_new_tokens=12, eos_id=TOK.eos_id, batch_size=8,
                  buckets=buckets_for(L), max_len=L)
  rng = np.random.default_rng(1)
  prompts = [np.concatenate([[TOK.bos_id], rng.integers(TOK.offset, TOK.vocab_size, n - 1)])
             .astype(np.int32) for n in (5, 9, 20, 40, 60)]
  budgets = [3, 12, 7, 12, 12]  # the last prompt leaves room for 4 tokens only
  got = gen(params, prompts, max_new_tokens=budgets)
  for p, m, samples in zip(prompts, budgets, got):
    effective = min(m, L - len(p))
    assert samples[0].tokens.tolist() == naive_greedy(graphdef, params, p, effective)
    assert len(p) + len(samples[0].tokens) <= L
  assert gen.compiles == {32: 1, 64: 1}
  gen(params, prompts[:2], max_new_tokens=5)  # another budget: no recompile
  assert gen.compiles == {32: 1, 64: 1}
  assert gen.room(L) == 0 and gen.room(L + 1) == 0 and gen.room(L - 1) == 1
  with pytest.raises(ValueError, match="longer than the largest bucket"):
    gen(params, [np.ones(L + 5, np.int32)])


def test_task_budgets_compile_once_per_bucket_and_bound_outputs(run, tmp_path):
  register(tmp_path, "tiny_t", [("abc", "c"), ("abcd", "dc"), ("z" * 40, "q")])  # budget 3
  register(tmp_path, "wide_t", [("ab", "x" * 15), ("a" * 45, "y" * 5), ("b", "zz")])  # budget 16
  ev = evaluator_for(run, ("tiny_t", "wide_t"), **{"eval.num_generate": 3, "eval.sample_prompts": 2,
                                                   "eval.num_samples": 2, "eval.num_examples": 3})
  assert ev.budgets == {"tiny_t": 3, "wide_t": 16}
  ev.generator = Recording(ev.generator)
  row = ev(run.state.params, 0)
  assert row["eval/tiny_t/max_new_tokens"] == 3 and row["eval/wide_t/max_new_tokens"] == 16
  prompt_lengths = {len(p) for call in ev.generator.calls for p in call[0]}
  buckets = {min(b for b in buckets_for(L) if b >= n) for n in prompt_lengths}
  assert buckets == {32, 64}
  assert ev.generator.compiles == {b: 1 for b in buckets}  # two tasks, two budgets, sampling too
  assert row["perf/generate_compiles"] == 2
  for prompts, budget, outs in ev.generator.calls:
    for p, samples in zip(prompts, outs):
      for s in samples:
        assert len(s.tokens) <= min(budget, L - len(p))
  ev(run.state.params, 1)
  assert ev.generator.compiles == {b: 1 for b in buckets}


def test_teacher_forced_packing_fits_as_training_does(run, tmp_path):
  records = [("p" * 100, "0123456789"),  # prompt_left: prompt cut, the target's 10 + EOS kept
             ("q" * 10, "abcde"),  # fits whole
             ("r" * 5, "t" * 70)]  # the target alone is longer than the model: skipped
  register(tmp_path, "tf", records)

  def loss_targets(ev):
    """The target tokens under the loss, per packed example, read back from the batches."""
    out = []
    for b in ev.batches:
      for r in range(b["targets"].shape[0]):
        for seg in sorted(set(b["segment_ids"][r][b["segment_ids"][r] > 0])):
          where = (b["segment_ids"][r] == seg) & (b["loss_mask"][r] > 0)
          out.append(b["targets"][r][where].tolist())
    return out

  by_hand = lambda t: [*TOK.encode(t), TOK.eos_id]
  settings = {"eval.num_generate": 0, "eval.num_samples": 0, "eval.num_examples": 3}
  ev = evaluator_for(run, ("tf",), **settings)
  assert loss_targets(ev) == [by_hand(records[0][1]), by_hand(records[1][1])]
  assert ev.skipped["tf"] == 1 and ev.truncated["tf"] == 1
  row = ev(run.state.params, 0)
  assert row["eval/tf/tokens"] == len(by_hand(records[0][1])) + len(by_hand(records[1][1])) == 17
  first = ev.batches[0]
  assert first["inputs"][0, 0] == TOK.bos_id and first["positions"][0, L - 1] == L - 1  # cut after BOS

  ev = evaluator_for(run, ("tf",), **settings, **{"data.truncate": "skip"})
  assert loss_targets(ev) == [by_hand(records[1][1])]
  assert ev.skipped["tf"] == 2 and ev.truncated["tf"] == 0


def test_numeric_budget_without_room_for_a_prompt_is_bad_input(run):
  for budget in (L, L + 10):
    with pytest.raises(BadInputError) as info:
      evaluator_for(run, None, **{"eval.max_new_tokens": budget})
    assert info.value.field == "eval.max_new_tokens" and str(L) in str(info.value)
  assert tiny_config(**{"eval.max_new_tokens": L - 1}).eval.max_new_tokens == L - 1  # room for BOS
  assert tiny_config(**{"eval.max_new_tokens": "auto"}).eval.max_new_tokens == "auto"


def test_registered_task_outside_the_run_is_evaluated(run, tmp_path):
  register(tmp_path, "bench_x", [("abc", "cba"), ("hello", "olleh")], eval_only=True)
  settings = {"eval.num_generate": 2, "eval.num_samples": 0, "eval.num_examples": 8}
  ev = evaluator_for(run, ("reverse", "bench_x"), **settings)
  assert ev.task_ids == {"reverse": 0, "addition": 1, "grammar": 2, "bench_x": 3}
  assert ev.num_tasks == 4
  row = ev(run.state.params, 0)
  assert row["eval/bench_x/tokens"] == len("cba") + 1 + len("olleh") + 1
  assert {"eval/bench_x/loss", "eval/bench_x/accuracy"} <= set(row)
  alone = evaluator_for(run, ("reverse",), **settings)(run.state.params, 0)
  assert row["eval/reverse/loss"] == pytest.approx(alone["eval/reverse/loss"], rel=1e-6)
  assert row["eval/reverse/tokens"] == alone["eval/reverse/tokens"]
  with pytest.raises(BadInputError, match="unknown task 'nosuch'"):
    evaluator_for(run, ("reverse", "nosuch"), **settings)
