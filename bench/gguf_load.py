"""Load seconds and peak host RSS of a GGUF model: mtjax vs transformers' GGUF loader, side by side.

Each measurement runs in a fresh child process (its VmHWM covers only its own imports and load):

  transformers   AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) (dequantized, float32)
  mtjax_first    mtjax.load(FILE) with an empty conversion cache: convert (dequantize, un-permute,
                 write float32 safetensors and tokenizer files) then stream onto the device
  mtjax_cached   mtjax.load(FILE) again: the cached conversion is found by the file's sha256

Ratios are mtjax / transformers (the issue's bound: <= 2). The order alternates over --repeats
so that page-cache warmth favours neither side; the medians are reported.

  python bench/gguf_load.py --out docs/bench/gguf_load_cpu.json          # SmolLM2-135M (pkg:smollm2)
  python bench/gguf_load.py --file path/to/model.gguf --out /tmp/gguf_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import json, pathlib, sys, time
def hwm():
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024
kind, file = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if kind == "transformers":
  import torch
  from transformers import AutoModelForCausalLM
  p = pathlib.Path(file)
  model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
  params = sum(x.numel() for x in model.parameters())
else:
  import jax
  import mtjax
  loaded = mtjax.load(file)
  jax.block_until_ready(loaded.params)
  params = sum(x.size for x in jax.tree.leaves(loaded.params))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_bytes": hwm(),
                  "parameters": int(params)}))
"""


def _run(kind: str, file: str, cache: pathlib.Path) -> dict:
  env = {**os.environ, "MTJAX_GGUF_CACHE": str(cache), "JAX_PLATFORMS": "cpu",
         "TQDM_DISABLE": "1"}
  proc = subprocess.run([sys.executable, "-c", CHILD, kind, file], capture_output=True, text=True,
                        env=env, cwd=REPO, check=False)
  if proc.returncode != 0:
    raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--file", default="", help="a .gguf file (default: pkg:smollm2, fetched)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  sys.path.insert(0, str(REPO))
  from mtjax.model import gguf
  file = str(pathlib.Path(args.file).resolve()) if args.file else str(gguf.packaged_file("smollm2"))
  runs: dict[str, list[dict]] = {"transformers": [], "mtjax_first": [], "mtjax_cached": []}
  for i in range(args.repeats):
    cache = pathlib.Path(tempfile.mkdtemp(prefix="gguf_bench_"))
    try:
      order = ["transformers", "mtjax"] if i % 2 == 0 else ["mtjax", "transformers"]
      for kind in order:
        if kind == "transformers":
          runs["transformers"].append(_run("transformers", file, cache))
        else:
          runs["mtjax_first"].append(_run("mtjax", file, cache))
          runs["mtjax_cached"].append(_run("mtjax", file, cache))
      print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(
          f"{k} {v[-1]['seconds']:.1f} s" for k, v in runs.items()), file=sys.stderr)
    finally:
      shutil.rmtree(cache, ignore_errors=True)
  summary = {k: {"seconds_median": statistics.median(r["seconds"] for r in v),
                 "peak_rss_mb_median": statistics.median(r["peak_rss_bytes"] for r in v) / 2**20,
                 "parameters": v[0]["parameters"], "runs": v} for k, v in runs.items()}
  ref = summary["transformers"]["seconds_median"]
  result = {"file": file, "bytes": os.path.getsize(file), "repeats": args.repeats,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "ratio_first_over_transformers": summary["mtjax_first"]["seconds_median"] / ref,
            "ratio_cached_over_transformers": summary["mtjax_cached"]["seconds_median"] / ref,
            **summary}
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
  main()
