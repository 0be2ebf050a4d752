"""Load seconds and peak host RSS of pretrained.load_params: an HF checkpoint onto fsdp=8.

Writes a random HF checkpoint (bench/make_hf_checkpoint.py; Llama 3.2 1B's shape in bf16 by
default) unless --dir already holds one, then loads it in a fresh child process on 8 fake CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, mesh fsdp=8), so that the child's
VmHWM covers only jax's import, the mesh and the load. On CPU the 8 devices are host memory: the
loaded parameters themselves live in the RSS, so the loader's own cost is the overhead
peak RSS - (RSS before the load + parameter bytes resident after it), expected to be about one
HF tensor (the largest: the embedding). The child also checks a few shards against a direct read
of the safetensors file and every parameter's sharding against train.step.param_shardings.

  python bench/pretrained_load.py --preset tiny --out /tmp/pretrained_load_tiny.json
  python bench/pretrained_load.py --out docs/bench/pretrained_load_cpu.json             # 1B, ~2.5 GB
  python bench/pretrained_load.py --out ... --page_cache both   # also a load after dropping the cache
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8


def _status(key: str) -> int:
  """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(key + ":"):
      return int(line.split()[1]) * 1024
  raise KeyError(key)


def _files(directory: pathlib.Path) -> list[pathlib.Path]:
  return sorted(directory.glob("*.safetensors"))


def _cached_bytes(files: list[pathlib.Path]) -> int | None:
  """Bytes of `files` in the page cache (util-linux fincore), or None without it."""
  if not shutil.which("fincore"):
    return None
  out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                        *map(str, files)], capture_output=True, text=True, check=False)
  if out.returncode:
    return None
  return sum(int(x) for x in out.stdout.split())


def _drop_cache(files: list[pathlib.Path]) -> None:
  """Evicts the files' pages from the page cache (no root needed: fsync, then DONTNEED)."""
  for f in files:
    fd = os.open(f, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


# ----------------------------------------------------------------------------- the child


def child(directory: str, preset: str, result: str) -> int:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={DEVICES}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(REPO / "bench"))
  import jax
  import numpy as np

  from make_hf_checkpoint import spec_of  # pyright: ignore[reportMissingImports]
  from mtjax.config import MeshConfig
  from mtjax.model import pretrained, tensorfile
  from mtjax.parallel.mesh import make_mesh
  from mtjax.train.state import param_shardings

  spec = spec_of(preset)
  mesh = make_mesh(MeshConfig(fsdp=DEVICES), jax.devices())
  _, abstract, shardings = param_shardings(mesh, spec)
  rss_before, hwm_before = _status("VmRSS"), _status("VmHWM")

  start = time.perf_counter()
  params = pretrained.load_params(directory, spec, abstract, shardings, progress=False)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  hwm, rss_after = _status("VmHWM"), _status("VmRSS")

  flat, targets = pretrained._flat(params), pretrained._flat(shardings)
  resident = sum(s.data.nbytes for x in flat.values() for s in x.addressable_shards)
  logical = sum(x.nbytes for x in flat.values())

  # Every parameter carries param_shardings' NamedSharding (fsdp on its embed axis; norms replicate).
  wrong = [p for p, x in flat.items()
           if not x.sharding.is_equivalent_to(targets[p], x.ndim) or x.dtype != spec.param_dtype]
  assert not wrong, f"parameters with another sharding or dtype: {wrong[:5]}"
  on_fsdp = [p for p in flat if "fsdp" in jax.tree.leaves(tuple(targets[p].spec))]

  # A few shards against a direct read of the safetensors file.
  index = tensorfile.TensorIndex(directory)
  names = pretrained.layout(spec)
  dtype = np.dtype(spec.param_dtype)

  def compare(path: str, layer: int | None, rows: tuple[int, int]) -> int:
    hf_name, kind = names[path]
    hf_name = hf_name.format(i=layer)
    x = flat[path]
    shape = tuple(x.shape[1:]) if layer is not None else tuple(x.shape)
    block, offset = pretrained._from_hf_rows(kind, shape, index.file(hf_name).read(hf_name, rows),
                                             rows[0])
    block = np.asarray(block, dtype)
    checked = 0
    for s in x.addressable_shards:
      data, where = np.asarray(s.data), s.index
      if layer is not None:  # stacked layers: the layer axis is whole on every device
        data, where = data[layer], where[1:]
      lo = [max(i.start or 0, o) for i, o in zip(where, offset)]
      hi = [min(n if i.stop is None else i.stop, o + b)
            for i, o, b, n in zip(where, offset, block.shape, shape)]
      if any(h <= lo_ for lo_, h in zip(lo, hi)):
        continue
      got = data[tuple(slice(a - (i.start or 0), b - (i.start or 0))
                       for a, b, i in zip(lo, hi, where))]
      want = block[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))]
      assert got.shape == want.shape and got.tobytes() == want.tobytes(), (path, rows, s.device)
      checked += got.size
    assert checked, (path, rows)
    return checked

  last = spec.num_layers - 1
  checks = [("token_embed", None, (0, 8)),
            ("token_embed", None, (spec.vocab_size - 8, spec.vocab_size)),
            ("layers/attn/q", 0, (0, 2 * spec.head_dim)),
            ("layers/attn/k", last, (spec.head_dim, 2 * spec.head_dim)),
            ("layers/attn/o", last, (0, 16)), ("layers/mlp/down", 0, (0, 16)),
            ("layers/mlp/gate", 0, (spec.mlp_dim - 16, spec.mlp_dim)),
            ("final_norm/scale", None, (0, spec.d_model))]
  checked = {f"{p}{'' if i is None else f'[layer {i}]'}[{a}:{b}]": compare(p, i, (a, b))
             for p, i, (a, b) in checks}

  largest = max((int(np.prod(e["shape"])) * tf.dtype(n).itemsize, n)
                for tf in index.files.values() for n, e in tf.entries.items())
  overhead = hwm - (rss_before + resident)
  report = {
      "load_seconds": seconds,
      "rss_before_load_bytes": rss_before,
      "vmhwm_before_load_bytes": hwm_before,
      "peak_rss_bytes": hwm,
      "rss_after_load_bytes": rss_after,
      "param_bytes_resident": resident,
      "param_bytes_logical": logical,
      "loader_overhead_bytes": overhead,
      "largest_tensor": largest[1], "largest_tensor_bytes": largest[0],
      "overhead_over_largest_tensor": overhead / largest[0],
      "parameters": int(sum(x.size for x in flat.values())),
      "param_dtype": spec.param_dtype,
      "tensors": len(flat), "params_sharded_over_fsdp": len(on_fsdp),
      "params_replicated": len(flat) - len(on_fsdp),
      "sharding_check": "every parameter's sharding is param_shardings' (mesh fsdp=8)",
      "values_checked": checked,
      "jax": jax.__version__, "numpy": np.__version__, "backend": jax.default_backend(),
      "devices": jax.device_count(), "mesh": dict(mesh.shape),
  }
  pathlib.Path(result).write_text(json.dumps(report))
  return 0


# ----------------------------------------------------------------------------- the parent


def _load(directory: pathlib.Path, preset: str, page_cache: str) -> dict[str, Any]:
  files = _files(directory)
  if page_cache == "cold":
    _drop_cache(files)
  cached = _cached_bytes(files)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
  with tempfile.TemporaryDirectory() as tmp:
    result = pathlib.Path(tmp) / "result.json"
    load_avg = os.getloadavg()
    subprocess.run([sys.executable, __file__, "--child", "--dir", str(directory), "--preset",
                    preset, "--result", str(result)], env=env, check=True)
    report = json.loads(result.read_text())
  report["page_cache"] = page_cache
  report["page_cache_resident_bytes_before_load"] = cached
  report["load_average_before"] = list(load_avg)
  return report


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
  parser.add_argument("--out", required=False, default=None)
  parser.add_argument("--dir", default=None, help="checkpoint directory (default /tmp/llama-PRESET)")
  parser.add_argument("--preset", choices=("tiny", "1b"), default="1b")
  parser.add_argument("--page_cache", choices=("warm", "cold", "both"), default="warm",
                      help="warm: load what the write (or an earlier run) left in the page cache; "
                      "cold: evict the files first (fsync + POSIX_FADV_DONTNEED)")
  parser.add_argument("--keep", action="store_true",
                      help="keep a checkpoint this run wrote (default: delete it at the end)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--result", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  directory = pathlib.Path(args.dir or f"/tmp/llama-{args.preset}")
  if args.child:
    return child(str(directory), args.preset, args.result)
  if args.out is None:
    parser.error("--out is required")

  wrote = None
  if not directory.exists():
    sys.path.insert(0, str(REPO / "bench"))
    import make_hf_checkpoint  # pyright: ignore[reportMissingImports]
    wrote = make_hf_checkpoint.write(str(directory), args.preset)
    print(f"wrote {directory}: {wrote['parameters']:,} parameters, {wrote['bytes'] / 1e9:.2f} GB "
          f"in {wrote['seconds']:.1f}s", file=sys.stderr)
  checkpoint_bytes = sum(f.stat().st_size for f in _files(directory))
  try:
    modes = ("warm", "cold") if args.page_cache == "both" else (args.page_cache,)
    loads = {mode: _load(directory, args.preset, mode) for mode in modes}
  finally:
    if wrote is not None and not args.keep:
      shutil.rmtree(directory)

  first = loads[modes[0]]
  meminfo = pathlib.Path("/proc/meminfo").read_text().split()
  report = {
      "benchmark": "pretrained_load",
      "command": "python bench/pretrained_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
      "preset": args.preset, "checkpoint": str(directory),
      "checkpoint_bytes": checkpoint_bytes,
      "checkpoint_tensor_bytes": wrote["bytes"] if wrote else None,
      "checkpoint_written_by_this_run": wrote is not None,
      "checkpoint_write_seconds": wrote["seconds"] if wrote else None,
      "page_cache_note": ("warm: the checkpoint was just written (or read by an earlier run), "
                          "so its pages were in the page cache; the page cache is not in RSS"
                          if modes[0] == "warm" else "cold: evicted before the load"),
      **{k: first[k] for k in ("load_seconds", "peak_rss_bytes", "rss_before_load_bytes",
                               "param_bytes_resident", "loader_overhead_bytes",
                               "largest_tensor_bytes")},
      "loads": loads,
      "machine": {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                  "mem_total_bytes": int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024,
                  "platform": platform.platform(), "python": platform.python_version(),
                  "processor": platform.processor() or platform.machine()},
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2) + "\n")
  print(json.dumps({k: v for k, v in report.items() if k != "loads"}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
