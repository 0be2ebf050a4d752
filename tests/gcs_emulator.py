"""A local GCS for tests: gcp-storage-emulator, plus the generation headers tensorstore needs.

`python tests/gcs_emulator.py PORT BUCKET` serves http://127.0.0.1:PORT (loopback only) from memory,
with BUCKET created, until it is terminated.

Why a wrapper: gcp-storage-emulator (2026.7) answers media downloads without the
`x-goog-generation` and `x-goog-metageneration` headers that GCS sends. tensorstore (Orbax's
storage layer) then records generation 0 for what it read, and its next conditional read of that
object fails with "Malformed StorageGeneration" (seen intermittently while Orbax saved an OCDBT
checkpoint: `Error reading .../ocdbt.process_0/manifest.ocdbt: Malformed StorageGeneration`).
This adds the two headers to every successful download and changes nothing else.
"""

import http
import logging
import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status not in (http.HTTPStatus.OK, http.HTTPStatus.PARTIAL_CONTENT):
    return
  obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj["metageneration"])


objects.download = download  # objects.get (`?alt=media`) calls it by this name
for _, handlers in server.HANDLERS:  # the download routes hold the function itself
  for method, handler in list(handlers.items()):
    if handler is _download:
      handlers[method] = download


def main(port: int, bucket: str) -> None:
  logging.basicConfig(level=logging.CRITICAL)
  server.Server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
