"""data.format=chat: examples rendered through the tokenizer's chat template (issue 17, item 2)."""

import json
import pickle
import re

import jax
import numpy as np
import pytest

from conftest import DEMO, tiny_config
from mtjax import config as config_lib
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.errors import BadInputError

TEXT = ["reverse: abcdef\n", "add: 12+30=42", "the quick fox sees a bird", "Is this grammatical?",
        "You are a helpful assistant.", "user assistant system"] * 20

# Qwen 2.5 style: a default system turn, <|im_start|>role\n...<|im_end|>\n; no BOS.
QWEN = (r"""{%- if messages[0]['role'] == 'system' %}"""
        r"""{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"""
        r"""{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"""
        r"""{%- endif %}"""
        "\n"
        r"""{%- for message in messages %}{%- if message.role != 'system' %}"""
        r"""{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"""
        r"""{%- endif %}{%- endfor %}"""
        "\n"
        r"""{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}""" "\n")

# Llama 3 style: the template writes bos_token; content trimmed; turns end with <|eot_id|>.
LLAMA = r"""{{- bos_token }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

STYLES = {
    "qwen": {"specials": ["<|im_start|>", "<|im_end|>"], "eot": "<|im_end|>",
             "config": {"eos_token": "</s>", "pad_token": "<pad>", "chat_template": QWEN}},
    # The template in chat_template.jinja (as newer HF directories write it).
    "llama": {"specials": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>"], "eot": "<|eot_id|>", "jinja": LLAMA,
              "config": {"bos_token": "<|begin_of_text|>", "eos_token": "</s>",
                         "pad_token": "<pad>"}},
    "none": {"specials": [], "config": {"bos_token": "<s>", "eos_token": "</s>"}},
}


def _write_dir(path, style):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  s = STYLES[style]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # type: ignore[attr-defined]
  tok.decoder = decoders.ByteLevel()  # type: ignore[attr-defined]
  trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                special_tokens=["<pad>", "<s>", "</s>", *s["specials"]],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXT, trainer)
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 100_000,
            **s["config"]}
  (path / "tokenizer_config.json").write_text(json.dumps(config))
  if "jinja" in s:
    (path / "chat_template.jinja").write_text(s["jinja"])
  return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("chat")
  return {style: _write_dir(root / style, style) for style in STYLES}


def _hf(directory):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(directory)


def _hf_ids(hf, messages, **kwargs):
  """apply_chat_template's token ids (a list, or a BatchEncoding in newer transformers)."""
  out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
  if not isinstance(out, list):
    out = out["input_ids"]
  return [int(i) for i in out]


def _chat(directory):
  return tokenizer_lib.for_data(tiny_config(**{"data.tokenizer": f"hf:{directory}",
                                               "data.format": "chat"}).data)


@pytest.mark.parametrize("style", ["qwen", "llama"])
def test_rendering_equals_apply_chat_template(style, dirs):
  pytest.importorskip("transformers")
  tok, hf = _chat(dirs[style]), _hf(dirs[style])
  assert isinstance(tok, tokenizer_lib.ChatTokenizer)
  eot = hf.convert_tokens_to_ids(STYLES[style]["eot"])
  assert tok.eos_id == eot and tok.stop_ids[0] == eot
  for prompt, target in [("reverse: abc", "cba"), ("add: 12+30=", "42"),
                         ("Is this grammatical?\nthe fox sees", "yes"), ("x", "")]:
    user = [{"role": "user", "content": prompt}]
    full = user + [{"role": "assistant", "content": target}]
    prompt_ids, target_ids = tokenizer_lib.encode_example(tok, prompt, target)
    assert prompt_ids.tolist() == _hf_ids(hf, user, add_generation_prompt=True)
    assert prompt_ids.tolist() + target_ids.tolist() == _hf_ids(hf, full)
    assert target_ids.tolist().count(eot) == 1
    assert tokenizer_lib.prompt_count(tok, prompt) == len(prompt_ids) - 1
    assert tokenizer_lib.target_count(tok, target) == len(target_ids) - 1
    # Generation stops at the end-of-turn token: the tokens before it are what is generated.
    assert tokenizer_lib.generated_count(tok, target) == target_ids.tolist().index(eot)
    assert tok.decode(np.concatenate([target_ids, prompt_ids])) == target
  if style == "llama":  # the template writes the BOS itself: exactly one
    assert prompt_ids.tolist().count(tok.bos_id) == 1 and prompt_ids[0] == tok.bos_id
  else:
    assert tok.bos_id not in prompt_ids.tolist()
  again = pickle.loads(pickle.dumps(tok))  # loader workers receive it pickled
  assert again.prompt_ids("hi").tolist() == tok.prompt_ids("hi").tolist()


def test_loss_mask_covers_exactly_target_and_end_of_turn(dirs):
  pytest.importorskip("transformers")
  from conftest import host_batch
  hf = _hf(dirs["qwen"])
  eot_ids = hf.encode("<|im_end|>\n", add_special_tokens=False)
  cfg = tiny_config(**{"data.tokenizer": f"hf:{dirs['qwen']}", "data.format": "chat",
                       "data.seq_len": 192, "data.truncate": "skip"})
  batch = host_batch(cfg)
  pattern = re.compile(r"<\|im_start\|>system\nYou are a helpful assistant\.<\|im_end\|>\n"
                       r"<\|im_start\|>user\n(.*)<\|im_end\|>\n<\|im_start\|>assistant\n(.*)"
                       r"<\|im_end\|>\n", re.DOTALL)
  segments = 0
  for r in range(batch["inputs"].shape[0]):
    seg_ids = batch["segment_ids"][r]
    for s in set(seg_ids.tolist()) - {0}:
      idx = np.flatnonzero(seg_ids == s)
      tokens = batch["inputs"][r, idx].tolist() + [int(batch["targets"][r, idx[-1]])]
      match = pattern.fullmatch(hf.decode(tokens, skip_special_tokens=False))
      assert match, hf.decode(tokens, skip_special_tokens=False)
      user, target = match.groups()
      prompt = _hf_ids(hf, [{"role": "user", "content": user}], add_generation_prompt=True)
      assert tokens == _hf_ids(hf, [{"role": "user", "content": user},
                                    {"role": "assistant", "content": target}])
      mask = batch["loss_mask"][r, idx].astype(bool)
      # Pair t predicts token t + 1: the loss is on exactly the tokens after the prompt.
      assert mask.tolist() == [t + 1 >= len(prompt) for t in range(len(idx))]
      trained = batch["targets"][r, idx][mask].tolist()
      assert trained == tokens[len(prompt):] and trained[-len(eot_ids):] == eot_ids
      assert hf.decode(trained, skip_special_tokens=False) == target + "<|im_end|>\n"
      segments += 1
  assert segments >= batch["inputs"].shape[0]
  # Loader worker processes (the tokenizer sent to them pickled) make the same batch.
  workers = host_batch(cfg.replace(**{"data.workers": 1}))
  assert all(np.array_equal(batch[k], workers[k]) for k in batch)


def test_eval_renders_prompts_and_stops_at_end_of_turn(dirs):
  pytest.importorskip("transformers")
  from mtjax.check import generation_targets
  from mtjax.eval.evaluate import Evaluator
  from mtjax.model.llama import ModelSpec
  from mtjax.parallel.mesh import make_mesh
  hf = _hf(dirs["llama"])
  cfg = tiny_config(**{"data.tokenizer": f"hf:{dirs['llama']}", "data.format": "chat",
                       "data.seq_len": 192, "eval.num_examples": 3, "eval.num_generate": 3,
                       "eval.max_new_tokens": "auto"})
  tok = _chat(dirs["llama"])
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  evaluator = Evaluator(cfg, None, ModelSpec.from_config(cfg.model, tok.vocab_size, "float32"),
                        mesh, tok)
  eot = hf.convert_tokens_to_ids("<|eot_id|>")
  assert evaluator.generator.eos_id == eot and evaluator.generator.stop_ids[0] == eot
  generated = generation_targets(cfg)
  for name, examples in evaluator.examples.items():
    for ex, prompt in zip(examples, evaluator.prompts[name]):
      user = [{"role": "user", "content": ex.prompt}]
      assert prompt.tolist() == _hf_ids(hf, user, add_generation_prompt=True)
    counts = [tokenizer_lib.generated_count(tok, ex.target) for ex in examples]
    assert generated[name] == counts  # the start-of-run budget check counts the same
    assert evaluator.budgets[name] == min(max(counts) + 1, evaluator.length - 1)


def test_chat_without_a_template_is_bad_input(dirs):
  with pytest.raises(BadInputError, match="data.format"):
    config_lib.load(f"{DEMO}:tiny", ["--config.data.format=chat"])  # the byte tokenizer
  with pytest.raises(BadInputError, match="data.format"):
    config_lib.load(f"{DEMO}:tiny", ["--config.data.format=xml"])
  with pytest.raises(BadInputError, match="data.format.*no chat_template"):
    _chat(dirs["none"])
  with pytest.raises(BadInputError, match="data.format"):
    tokenizer_lib.ChatTokenizer(tokenizer_lib.get("byte"))
  from mtjax.check import require_loss_tokens
  cfg = tiny_config(**{"data.tokenizer": f"hf:{dirs['none']}", "data.format": "chat"})
  with pytest.raises(BadInputError, match="data.format"):
    require_loss_tokens(cfg)
  # plain stays as it was: [BOS] prompt target [EOS]
  plain = tokenizer_lib.for_data(tiny_config(**{"data.tokenizer": f"hf:{dirs['qwen']}"}).data)
  p, t = tokenizer_lib.encode_example(plain, "ab", "c")
  assert p[0] == plain.bos_id and t[-1] == plain.eos_id
  assert p[1:].tolist() == plain.encode("ab").tolist() and t[:-1].tolist() == plain.encode("c").tolist()


def test_export_keeps_a_chat_template_saved_as_jinja(dirs, tmp_path):
  """transformers 5 saves a chat template as chat_template.jinja (not in tokenizer_config.json):
  an export copies it, so the exported model keeps its chat format (same rendering)."""
  from flax import nnx

  from mtjax.config import ModelConfig
  from mtjax.data import tokenizer as tokenizer_lib
  from mtjax.model import Decoder, ModelSpec, pretrained
  source = tokenizer_lib.get(f"hf:{dirs['llama']}")
  spec = ModelSpec.from_config(ModelConfig(d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                           mlp_dim=32, vocab_size=512), 512, "float32")
  params = nnx.to_pure_dict(nnx.state(Decoder(spec, nnx.Rngs(0))))
  out = tmp_path / "export"
  files = pretrained.export(params, spec, out, config=pretrained.hf_config(spec),
                            tokenizer_dir=dirs["llama"], progress=False)
  assert "chat_template.jinja" in files
  exported = tokenizer_lib.get(f"hf:{out}")
  assert exported.chat_template == source.chat_template and exported.chat_template


def test_preview_in_chat_format_shows_the_users_prompt_and_the_target(dirs):
  """`mtjax data preview` under data.format=chat: the decoded prompt goes past the system turn's
  end-of-turn (decode() stops there, as generation must) to the user's words; the target shows
  the answer."""
  from mtjax.data.preview import preview
  cfg = tiny_config(**{"data.tokenizer": f"hf:{dirs['qwen']}", "data.format": "chat",
                       "data.tasks": ("reverse",), "data.mixture": {"reverse": 1.0},
                       "data.seq_len": 256})
  text = preview(cfg, 2, 1)
  examples = [line.strip() for line in text.splitlines() if line.strip().startswith("[reverse] ")]
  assert examples, text
  prompt, target = examples[0].removeprefix("[reverse] ").split(" -> ", 1)
  assert "reverse: " in prompt and " | " in prompt  # the user's turn, past the system's end
  word = prompt.split("reverse: ", 1)[1].split("\\n", 1)[0]
  assert target.startswith(repr(word[::-1])[:-1]) and not target.endswith("…")  # whole answer
