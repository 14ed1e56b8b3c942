"""The command agent that runs on the remote machine (standard library only; sent as source).

:mod:`labkit.remote.agent` starts this program once per SSH connection
(``[sudo -n] python3 -c ...``) and sends it requests as JSON lines on its stdin;
it answers each with one JSON line on its stdout.  Every request runs in a
thread of its own, so several callers share the agent at once.

Each request is acknowledged (``{"id": ID, "ack": true}``) as soon as it is read, before
it starts: a caller whose connection went before the acknowledgement knows it never ran.

Requests (``id`` is the caller's; bytes travel as base64):

- ``{"op": "run", "argv": [...], "env": {...}, "input": B64, "timeout": S}``: run a
  command in a session of its own; answer ``code`` (-1 for a signal), ``out``,
  ``err`` and ``s`` (seconds).  At ``timeout`` its process group gets TERM, and
  KILL ``KILL_AFTER`` s later.  Once it exited, output still arriving (a child
  kept the pipes) is read for ``DRAIN_AFTER_EXIT`` s at most.
- ``{"op": "kill", "target": ID}``: end request ID's process group now.
- ``{"op": "read", "path": P}``: a file's content (``data``).
- ``{"op": "write", "path": P, "data": B64, "mode": M}``: write a file (created or
  truncated; ``mode`` applied when given).
- ``{"op": "append", "path": P, "data": B64}``: append to a file made with mode 0600
  in folders made with umask 077, and fsync it.
- ``{"op": "atomic_write", "path": P, "data": B64, "mode": M}``: a temporary file
  beside it, fsynced, then renamed over it.

A file request that fails answers ``errno`` and ``error``.  When its stdin ends
(the connection went) the agent ends every command still running and exits.

This file must run on any Python 3.6 or later with nothing but the standard
library: it is the machine's own ``python3`` that runs it.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

KILL_AFTER = 2.0
DRAIN_AFTER_EXIT = 2.0
CHUNK = 65536

_out = sys.stdout.buffer
_out_lock = threading.Lock()
_running = {}  # request id -> Popen
_running_lock = threading.Lock()


def send(message):
    """Write one answer line (whole, under the lock: threads answer at once)."""
    line = (json.dumps(message, separators=(",", ":")) + "\n").encode()
    with _out_lock:
        _out.write(line)
        _out.flush()


def b64(data):
    return base64.b64encode(data).decode()


def unb64(text):
    return base64.b64decode(text) if text else b""


def end_group(proc):
    """TERM the process group now, KILL it ``KILL_AFTER`` s later if it still runs."""
    def signal_group(sig):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            pass
    signal_group(signal.SIGTERM)
    timer = threading.Timer(KILL_AFTER, lambda: proc.poll() is None and signal_group(signal.SIGKILL))
    timer.daemon = True
    timer.start()


def collect(pipe, chunks):
    try:
        while True:
            chunk = os.read(pipe.fileno(), CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        pass


def feed(pipe, data):
    try:
        pipe.write(data)
    except OSError:
        pass  # the command stopped reading; its exit code tells
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def run(request):
    start = time.monotonic()
    env = None
    if request.get("env"):
        env = dict(os.environ)
        env.update(request["env"])
    data = unb64(request.get("input")) if request.get("input") is not None else None
    try:
        proc = subprocess.Popen(request["argv"], stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                start_new_session=True, close_fds=True)
    except OSError as exc:
        message = "%s: %s\n" % (request["argv"][0], exc.strerror or exc)
        return {"code": 126 if isinstance(exc, PermissionError) else 127, "out": "", "err": b64(message.encode()),
                "s": time.monotonic() - start}
    with _running_lock:
        _running[request["id"]] = proc
    out, err = [], []
    readers = [threading.Thread(target=collect, args=(proc.stdout, out)),
               threading.Thread(target=collect, args=(proc.stderr, err))]
    if data is not None:
        readers.append(threading.Thread(target=feed, args=(proc.stdin, data)))
    for thread in readers:
        thread.daemon = True
        thread.start()
    timeout = request.get("timeout")
    timer = None
    if timeout is not None:
        timer = threading.Timer(float(timeout), end_group, args=(proc,))
        timer.daemon = True
        timer.start()
    code = proc.wait()
    if timer is not None:
        timer.cancel()
    with _running_lock:
        _running.pop(request["id"], None)
    deadline = time.monotonic() + DRAIN_AFTER_EXIT
    for thread in readers[:2]:
        thread.join(max(deadline - time.monotonic(), 0.0))
    return {"code": code if code >= 0 else -1, "out": b64(b"".join(out)), "err": b64(b"".join(err)),
            "s": time.monotonic() - start}


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def makedirs_private(folder):
    if folder and not os.path.isdir(folder):
        old = os.umask(0o077)
        try:
            os.makedirs(folder, exist_ok=True)
        finally:
            os.umask(old)


def file_op(request):
    op, path = request["op"], request["path"]
    if op == "read":
        with open(path, "rb") as f:
            return {"data": b64(f.read())}
    data = unb64(request.get("data"))
    mode = request.get("mode")
    if op == "write":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644 if mode is None else mode)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        if mode is not None:
            os.chmod(path, mode)
        return {}
    if op == "append":
        makedirs_private(os.path.dirname(path))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return {}
    if op == "atomic_write":
        folder, name = os.path.split(path)
        fd, tmp = tempfile.mkstemp(prefix="." + name + ".", suffix=".tmp", dir=folder or ".")
        try:
            write_all(fd, data)
            os.fchmod(fd, 0o644 if mode is None else mode)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(tmp, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return {}
    raise ValueError("unknown request %r" % op)


def answer(request):
    reply = {"id": request.get("id")}
    try:
        if request.get("op") == "run":
            reply.update(run(request))
        else:
            reply.update(file_op(request))
    except OSError as exc:
        reply.update(errno=exc.errno or 5, error=exc.strerror or str(exc))
    except Exception as exc:  # a bad request: answered, so the caller is not left waiting
        reply.update(errno=22, error="%s: %s" % (type(exc).__name__, exc))
    send(reply)


def main():
    send({"ready": True, "pid": os.getpid(), "python": sys.version.split()[0]})
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "kill":
            with _running_lock:
                proc = _running.get(request.get("target"))
            if proc is not None:
                end_group(proc)
            continue
        send({"id": request.get("id"), "ack": True})  # received: from here on it may have run
        thread = threading.Thread(target=answer, args=(request,))
        thread.daemon = True
        thread.start()
    # stdin ended: the caller is gone; end what still runs, then leave
    with _running_lock:
        procs = list(_running.values())
    for proc in procs:
        end_group(proc)
    deadline = time.monotonic() + KILL_AFTER + 1
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass


if __name__ == "__main__":
    main()
