"""One HTTP/1.1 request with an overall deadline and a stop flag, on a raw socket: the SGLang client's transport.

urllib's `timeout` bounds each socket operation, not the request: a server that trickles one byte a second keeps a
urllib call alive forever, and a call blocked in `recv` cannot be interrupted by a flag. Here every wait (connect,
send, each receive) is a `poll` of at most `poll_s`, after which the overall deadline and the `stop` callable are
checked again, so a request ends within `deadline_s + poll_s` whatever the server does (or does not) send, and within
`poll_s` of a stop request.

Only what the SGLang client needs: one request per connection (`Connection: close`), JSON bodies, answers framed by
Content-Length, chunked transfer encoding or the end of the connection; no TLS, redirects or proxies (the server is
on the trainer's own network). Name resolution (`getaddrinfo`) is the one wait not bounded here: use an IP address
or a name the resolver answers at once.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import time
import urllib.parse
from typing import Callable

POLL_S = 0.25  # The longest a single wait lasts before the deadline and the stop flag are checked again.
MAX_RESPONSE_BYTES = 1 << 30  # A /generate answer of 256 × 8,192 tokens is ~100 MB of JSON; more is not an answer.


class HTTPFailure(Exception):
  """No complete answer: the connection was refused / reset / closed early, or the overall deadline passed."""

  def __init__(self, msg: str, *, server_gone: bool = False, deadline: bool = False):
    super().__init__(msg)
    self.server_gone = server_gone  # Nothing listens (refused, or closed before a single byte): a dead server.
    self.deadline = deadline


class Stopped(Exception):
  """`stop()` turned true while the request was waiting."""


class BadResponse(Exception):
  """The peer answered something that is not an HTTP/1.x response (or one over `max_bytes`)."""


def check_url(url: str) -> tuple[str, int]:
  """(host, port) of an `http://host:port` URL; ValueError naming the URL otherwise."""
  parts = urllib.parse.urlsplit(url)
  if parts.scheme != "http" or not parts.hostname:
    raise ValueError(f"{url!r}: expected an http://host:port URL (no https, no path)")
  try:
    port = parts.port or 80
  except ValueError as e:  # A port that is not a number or is out of range.
    raise ValueError(f"{url!r}: {e}") from None
  return parts.hostname, port


def request(url: str, method: str, path: str, body: bytes | None, deadline_s: float, *,
            stop: Callable[[], bool] = lambda: False, poll_s: float = POLL_S,
            max_bytes: int = MAX_RESPONSE_BYTES) -> tuple[int, bytes]:
  """Sends `method path` to `url` and returns (status, body) of the complete answer.

  Raises `HTTPFailure` (naming the URL, and the deadline when it passed), `Stopped` or `BadResponse`.
  """
  host, port = check_url(url)
  what = f"{method} {url}{path}"
  end = time.monotonic() + deadline_s

  def wait(sock: socket.socket, events: int) -> None:
    poller = select.poll()  # poll, not select: file descriptors above 1024 are common in a JAX process.
    poller.register(sock, events)
    while True:
      if stop():
        raise Stopped(f"{what}: stop requested")
      left = end - time.monotonic()
      if left <= 0:
        raise HTTPFailure(f"{what}: no complete answer within the overall deadline of {deadline_s:g} s",
                          deadline=True)
      if poller.poll(max(1, int(min(left, poll_s) * 1000))):
        return  # Ready, or an error / hang-up that the next send / recv reports.

  try:
    family, socktype, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
  except OSError as e:
    raise HTTPFailure(f"{what}: cannot resolve {host!r}: {e}") from e
  sock = socket.socket(family, socktype, proto)
  try:
    sock.setblocking(False)
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EAGAIN):
      wait(sock, select.POLLOUT)
      err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
      raise OSError(err, os.strerror(err))
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
            "Content-Type: application/json\r\nAccept: application/json\r\n")
    if body is not None:
      head += f"Content-Length: {len(body)}\r\n"
    out = memoryview(head.encode("latin-1") + b"\r\n" + (body or b""))
    while out:
      wait(sock, select.POLLOUT)
      try:
        out = out[sock.send(out):]
      except BlockingIOError:
        pass
    reader = _ResponseReader(what, max_bytes)
    while True:
      wait(sock, select.POLLIN)
      try:
        data = sock.recv(1 << 20)
      except BlockingIOError:
        continue
      done = reader.feed(data)
      if done is not None:
        return done
  except OSError as e:
    gone = isinstance(e, (ConnectionRefusedError, ConnectionResetError, BrokenPipeError))
    raise HTTPFailure(f"{what}: {e!r}", server_gone=gone) from e
  finally:
    sock.close()


class _ResponseReader:
  """Accumulates received bytes; `feed` returns (status, body) once the answer is complete (b"" means EOF)."""

  def __init__(self, what: str, max_bytes: int):
    self.what, self.max_bytes = what, max_bytes
    self.buf = bytearray()
    self.head_end = -1  # Offset of the body once the head is complete.
    self.status = 0
    self.length: int | None = None
    self.chunked = False

  def feed(self, data: bytes) -> tuple[int, bytes] | None:
    eof = not data
    self.buf += data
    if len(self.buf) > self.max_bytes:
      raise BadResponse(f"{self.what}: answer larger than {self.max_bytes} bytes")
    if self.head_end < 0:
      i = self.buf.find(b"\r\n\r\n")
      if i < 0:
        if eof:
          raise HTTPFailure(f"{self.what}: connection closed before a complete answer ({len(self.buf)} bytes)",
                            server_gone=not self.buf)
        return None
      self._parse_head(bytes(self.buf[:i]))
      self.head_end = i + 4
    body = self.buf[self.head_end:]
    if self.chunked:
      if not (eof or body.endswith(b"0\r\n\r\n")):
        return None
      decoded = self._dechunk(bytes(body))
      if decoded is None:
        if eof:
          raise HTTPFailure(f"{self.what}: connection closed inside a chunked answer")
        return None
      return self.status, decoded
    if self.length is not None:
      if len(body) >= self.length:
        return self.status, bytes(body[:self.length])
      if eof:
        raise HTTPFailure(f"{self.what}: connection closed after {len(body)} of {self.length} body bytes")
      return None
    return (self.status, bytes(body)) if eof else None  # Framed by the end of the connection.

  def _parse_head(self, head: bytes) -> None:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
      raise BadResponse(f"{self.what}: not an HTTP answer: {lines[0][:100]!r}")
    self.status = int(parts[1])
    for line in lines[1:]:
      key, _, value = line.partition(":")
      key, value = key.strip().lower(), value.strip()
      if key == "transfer-encoding" and "chunked" in value.lower():
        self.chunked = True
      elif key == "content-length":
        if not value.isdigit():
          raise BadResponse(f"{self.what}: bad Content-Length {value[:40]!r}")
        self.length = int(value)

  def _dechunk(self, data: bytes) -> bytes | None:
    out, pos = bytearray(), 0
    while True:
      eol = data.find(b"\r\n", pos)
      if eol < 0:
        return None
      try:
        size = int(data[pos:eol].split(b";")[0].strip(), 16)
      except ValueError:
        raise BadResponse(f"{self.what}: bad chunk size {data[pos:eol][:40]!r}") from None
      if size == 0:
        return bytes(out)  # Trailers, if any, are ignored.
      start = eol + 2
      if len(data) < start + size + 2:
        return None
      out += data[start:start + size]
      pos = start + size + 2
