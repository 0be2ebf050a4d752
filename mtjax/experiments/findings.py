"""The README's study findings, generated from committed study summaries (docs/studies/<name>/).

A study run's workdir is published with `publish(workdir, name)`: its study.json, summary.json,
report.md and plots are copied to docs/studies/<name>/ (the arms' runs are not: too large). The
README holds each published study's report between two markers,

  <!-- generated from docs/studies/<name> by `make findings`: do not edit -->
  ...
  <!-- end of generated docs/studies/<name> -->

and `sync_readme` rewrites those blocks from the summaries through each study's own report
function, so a README number can only come from a committed summary (tests/test_findings.py checks
the README matches them).

  .venv/bin/python -m mtjax.experiments.findings publish runs/efficiency efficiency
  .venv/bin/python -m mtjax.experiments.findings sync      # make findings
  .venv/bin/python -m mtjax.experiments.findings rerender  # reports from summaries, this code
  .venv/bin/python -m mtjax.experiments.findings check     # exit 1 if the README is stale
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtjax.errors import BadInputError
from mtjax.experiments import report

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "studies"
README = REPO / "README.md"
PUBLISHED = ("study.json", "summary.json", "report.md")
_BLOCK = re.compile(r"(<!-- generated from docs/studies/(?P<name>[\w.:-]+) by `make findings`: do "
                    r"not edit -->\n)(?P<body>.*?)(<!-- end of generated docs/studies/(?P=name) -->)",
                    re.DOTALL)


def begin_marker(name: str) -> str:
  return f"<!-- generated from docs/studies/{name} by `make findings`: do not edit -->"


def end_marker(name: str) -> str:
  return f"<!-- end of generated docs/studies/{name} -->"


def publish(workdir: str | Path, name: str, docs: Path = DOCS) -> Path:
  """Copies a finished study's record (study.json, summary.json, report.md, plots) to docs/studies/<name>."""
  src = Path(workdir)
  for f in ("study.json", "summary.json"):
    if not (src / f).is_file():
      raise BadInputError(str(src / f), "missing: expected a finished study's workdir")
  dst = docs / name
  if dst.exists():
    shutil.rmtree(dst)
  dst.mkdir(parents=True)
  for f in sorted(src.iterdir()):
    if f.name in PUBLISHED or f.suffix in (".png", ".py"):  # plots, generated configs
      shutil.copy2(f, dst / f.name)
  return dst


def _published(src: Path) -> tuple[Any, dict[str, Any]]:
  """(the study of the registry, its summary) of a published record docs/studies/<name>."""
  from mtjax.experiments.registry import STUDIES
  try:
    name = json.loads((src / "study.json").read_text())["study"]
    summary = json.loads((src / "summary.json").read_text())
  except (OSError, ValueError, KeyError) as e:
    raise BadInputError(str(src), f"expected a published study (study.json, summary.json): {e}") from None
  return STUDIES[name], summary


def rerender(name: str, docs: Path = DOCS) -> Path:
  """Rewrites docs/studies/<name>/report.md and its plots from the published summary.json with
  this version's report code (its tests and wording; the numbers are the run's): for records
  whose runs are gone. Returns report.md's path."""
  src = docs / name
  study, summary = _published(src)
  import os
  from etils import epath
  # Relative to the working directory, as a run's workdir is named (reports quote it).
  return Path(study.report(epath.Path(os.path.relpath(src)), summary))


def render(name: str, docs: Path = DOCS) -> str:
  """The README block of docs/studies/<name>: its study's report rebuilt from summary.json (the
  title dropped, plot links made relative to the repository root); `<name>:brief` keeps only the
  report's first and last tables and its verdict line."""
  name, _, part = name.partition(":")
  src = docs / name
  study, summary = _published(src)
  rel = src.relative_to(REPO) if src.is_relative_to(REPO) else src
  doc = study.describe(summary, rel)  # the report's blocks: nothing is drawn or written
  if part == "brief":
    text = report.brief(doc)
  elif part:
    raise BadInputError(f"docs/studies/{name}:{part}", "unknown part (known: brief)")
  else:
    text = doc.markdown(title=False)
  body = text.strip() + "\n"
  return re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", lambda m: f"![{m[1]}]({rel}/{m[2]})", body)


# Words a report uses to say one arm or run did better or worse than another (or than none).
_DIRECTIONAL = re.compile(
    r"\b(higher|lower|beats?|better|worse|more efficient|less efficient|above 1|below 1|"
    r"outperform\w*|lifted|improv(?:ed|es)|hurts?|raised|lowered|narrowed|wins?)\b", re.I)
_TESTED = re.compile(r"\bp = |\bp < ", re.I)
_NOT_A_CLAIM = re.compile(r"lower bound|upper bound|no detectable|not detectably|"
                          r"detectably better", re.I)


def unsupported_claims(text: str) -> list[str]:
  """The sentences (and table cells) of a generated block that state a direction without a
  p-value: a directional word (higher, beats, above 1, ...) in a sentence with no 'p = ' or
  'p < ' and no 'no detectable difference'."""
  out = []
  for line in text.splitlines():
    for part in re.split(r"(?<=[.;])\s+|\s\|\s", line):
      if (_DIRECTIONAL.search(part) and not _TESTED.search(part)
          and not _NOT_A_CLAIM.search(part)):
        out.append(part.strip())
  return out


def published(docs: Path = DOCS) -> list[str]:
  return sorted(p.name for p in docs.iterdir() if (p / "summary.json").is_file()) if docs.is_dir() else []


def sync_readme(readme: Path = README, docs: Path = DOCS, *, check: bool = False) -> list[str]:
  """Rewrites every generated block of the README from docs/studies (check: only compares).
  Returns the names of stale blocks (check) or rewritten ones; raises BadInputError for a block
  naming an unpublished study, or a published study with no block."""
  text = readme.read_text()
  names = published(docs)
  seen, changed = [], []

  def replace(m: re.Match[str]) -> str:
    name = m["name"].partition(":")[0]
    if name not in names:
      raise BadInputError(str(readme), f"a generated block names docs/studies/{name}, which has no "
                          "summary.json")
    seen.append(name)
    body = render(m["name"], docs)
    if body != m["body"]:
      changed.append(m["name"])
    return m[1] + body + m[4]

  new = _BLOCK.sub(replace, text)
  missing = [n for n in names if n not in seen]
  if missing:
    raise BadInputError(str(readme), f"no generated block for docs/studies/{', '.join(missing)} "
                        f"(add the markers {begin_marker(missing[0])!r} ... {end_marker(missing[0])!r})")
  if not check and new != text:
    readme.write_text(new)
  return changed


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mtjax.experiments.findings", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("publish", help="copy a finished study's record to docs/studies/NAME")
  p.add_argument("workdir")
  p.add_argument("name")
  p = sub.add_parser("rerender", help="rewrite docs/studies/NAME's report.md and plots from its "
                     "summary.json with this version's report code (all published: no NAME)")
  p.add_argument("names", nargs="*")
  sub.add_parser("sync", help="rewrite the README's generated blocks from docs/studies")
  sub.add_parser("check", help="exit 1 if a generated block differs from docs/studies")
  args = parser.parse_args(argv)
  try:
    if args.command == "publish":
      print(f"published {publish(args.workdir, args.name)}")
      return 0
    if args.command == "rerender":
      for name in args.names or published():
        print(f"rewrote {rerender(name)}")
      return 0
    changed = sync_readme(check=args.command == "check")
  except BadInputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.command == "check":
    if changed:
      print(f"README.md is stale for docs/studies/{', '.join(changed)}: run `make findings`",
            file=sys.stderr)
      return 1
    print("README.md matches docs/studies")
    return 0
  print(f"README.md: rewrote {', '.join(changed) or 'nothing (up to date)'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
