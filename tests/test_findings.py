"""The README's study findings are generated from the committed summaries (docs/studies/): every
generated block equals its study's report rebuilt from summary.json, and a changed number in a
summary makes the README stale. Reference: each study's own report function."""

import json
import shutil

import pytest

from mtjax.errors import BadInputError
from mtjax.experiments import findings


def test_every_published_study_has_its_readme_block_and_the_readme_matches_it():
  names = findings.published()
  assert "efficiency_demo" in names  # the demo's numbers the README opens with
  assert findings.sync_readme(check=True) == []
  text = findings.README.read_text()
  for name in names:  # a block of the whole report or of a part (name:brief)
    assert any(findings.begin_marker(n) in text and findings.end_marker(n) in text
               for n in (name, f"{name}:brief")), name


def test_a_changed_summary_makes_the_readme_stale_and_sync_rewrites_it(tmp_path):
  docs = tmp_path / "docs"
  shutil.copytree(findings.DOCS / "efficiency_demo", docs / "efficiency_demo")
  name = "efficiency_demo"
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{findings.begin_marker(name)}\nold\n{findings.end_marker(name)}\nend\n")
  assert findings.sync_readme(readme, docs, check=True) == [name]
  assert "old" in readme.read_text()  # check never writes
  assert findings.sync_readme(readme, docs) == [name]
  assert findings.sync_readme(readme, docs, check=True) == []
  summary_path = docs / name / "summary.json"
  summary = json.loads(summary_path.read_text())
  summary["per_seed"][0]["ratio"] = 123.456
  summary_path.write_text(json.dumps(summary))
  assert findings.sync_readme(readme, docs, check=True) == [name]
  findings.sync_readme(readme, docs)
  assert "123.456" in readme.read_text()
  assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("end\n")


def test_blocks_and_published_studies_must_pair_up(tmp_path):
  docs = tmp_path / "docs"
  shutil.copytree(findings.DOCS / "efficiency_demo", docs / "efficiency_demo")
  readme = tmp_path / "README.md"
  readme.write_text("no blocks\n")
  with pytest.raises(BadInputError, match="no generated block"):
    findings.sync_readme(readme, docs, check=True)
  readme.write_text(f"{findings.begin_marker('gone')}\nx\n{findings.end_marker('gone')}\n"
                    f"{findings.begin_marker('efficiency_demo')}\n{findings.end_marker('efficiency_demo')}\n")
  with pytest.raises(BadInputError, match="docs/studies/gone"):
    findings.sync_readme(readme, docs, check=True)


def test_published_numbers_rest_on_three_seeds_and_200_held_out_examples_after_the_tuning_split():
  for name in findings.published():
    stored = json.loads((findings.DOCS / name / "study.json").read_text())
    config, study = stored["config"], stored["config"]["study"]
    ev = config["eval"]
    assert len(study["seeds"]) >= 3, name
    assert study["split"] == "report" and study["tuning_examples"] > 0, name  # not the tuning split
    assert ev["num_examples"] >= 200, name
    metrics = {study["metric"], *study["task_metrics"].values()}
    if "accuracy" in metrics:
      assert ev["num_generate"] >= 200, name
    if ev["num_samples"]:
      assert ev["sample_prompts"] >= 200, name
    # What the README shows is a spread over seeds (mean ± std), not one run.
    assert "±" in findings.render(name), name


def test_no_generated_block_states_a_direction_without_its_p_value():
  """Every directional sentence of the README's generated blocks carries its corrected p-value
  (or says there is no detectable difference): the sign-flip machinery writes them that way."""
  text = findings.README.read_text()
  blocks = list(findings._BLOCK.finditer(text))
  assert len(blocks) >= len(findings.published())
  for m in blocks:
    assert findings.unsupported_claims(m["body"]) == [], m["name"]
  # The scanner does flag a bare claim (and passes a tested one and a negated one).
  assert findings.unsupported_claims("`svf_per_task` higher on copy.") == [
      "`svf_per_task` higher on copy."]
  assert findings.unsupported_claims("M below 1 (Holm-corrected p = 0.0039, 10 seeds).") == []
  assert findings.unsupported_claims("no detectable difference at this power; lower bound.") == []


def test_no_published_report_states_a_direction_without_its_p_value():
  for name in findings.published():
    report = (findings.DOCS / name / "report.md").read_text()
    assert findings.unsupported_claims(report) == [], name
