"""Byte, local HuggingFace and local SentencePiece tokenizers behind one interface."""

import numpy as np
import pytest

from conftest import tiny_config
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.data.loader import MixtureLoader
from mtjax.errors import BadInputError

TEXT = ["reverse: abcdef\n", "add: 12+30=42", "the quick fox sees a bird", "ünïcode ok"] * 50


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXT, trainer)
  path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
  tok.save(str(path))
  return str(path)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  import sentencepiece as spm
  d = tmp_path_factory.mktemp("spm")
  (d / "text.txt").write_text("\n".join(TEXT), encoding="utf-8")
  spm.SentencePieceTrainer.train(input=str(d / "text.txt"), model_prefix=str(d / "m"),
                                 vocab_size=36, pad_id=0, unk_id=3, bos_id=1, eos_id=2,
                                 character_coverage=1.0, minloglevel=2)
  return str(d / "m.model")


@pytest.mark.parametrize("kind", ["byte", "hf", "spm"])
def test_round_trip_and_specials(kind, hf_path, spm_path):
  name = {"byte": "byte", "hf": f"hf:{hf_path}", "spm": f"spm:{spm_path}"}[kind]
  tok = tokenizer_lib.get(name)
  for text in TEXT[:4]:
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) > 0
    assert tok.bos_id not in ids.tolist() and tok.eos_id not in ids.tolist()
    assert all(0 <= i < tok.vocab_size for i in ids.tolist())
    decoded = tok.decode(np.concatenate([ids, [tok.eos_id], ids]))  # stops at EOS
    if kind == "spm":  # SentencePiece normalizes whitespace (newlines included)
      assert "".join(decoded.split()) == "".join(text.split())
    else:
      assert decoded == text
  assert len({tok.bos_id, tok.eos_id}) == 2


def test_loader_uses_the_configured_tokenizer(hf_path):
  cfg = tiny_config(**{"data.tokenizer": f"hf:{hf_path}"})
  tok = tokenizer_lib.get(cfg.data.tokenizer)
  batch = next(MixtureLoader.from_config(cfg, prefetch=0)).arrays
  starts = (batch["segment_ids"] > 0) & (batch["positions"] == 0)
  assert (batch["inputs"][starts] == tok.bos_id).all()
  assert batch["inputs"].max() < tok.vocab_size


def test_bad_tokenizer_names_the_field(tmp_path):
  with pytest.raises(BadInputError, match="data.tokenizer: file not found"):
    tokenizer_lib.get("hf:/nope/tokenizer.json")
  with pytest.raises(BadInputError, match="expected byte, hf:<path> or spm:<path>"):
    tokenizer_lib.get("gpt2")
  junk = tmp_path / "junk.json"
  junk.write_text("{}")
  with pytest.raises(BadInputError, match="cannot load"):
    tokenizer_lib.get(f"hf:{junk}")


@pytest.mark.parametrize("kind", ["byte", "hf", "spm"])
def test_planned_lengths_equal_token_counts(kind, hf_path, spm_path):
  """The packing plan uses lengths without tokenizing: they must equal the real token counts."""
  from mtjax.data import pipeline
  name = {"byte": "byte", "hf": f"hf:{hf_path}", "spm": f"spm:{spm_path}"}[kind]
  for task in ("reverse", "grammar"):
    data = pipeline.task_dataset(task, 0, tokenizer_lib.get(name), seed=0)
    for i in range(40):
      assert data.lengths[i] == len(data.tokens[i]["tokens"])
