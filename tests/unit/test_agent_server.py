"""The command agent's program (labkit/remote/agent_server.py), run here by this machine's python3 on pipes.

It runs on the remote machine with nothing but that machine's Python; here the same
source is started the same way (``python3 -I -c ...``) and spoken to as the SSH side does.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time

import pytest

from labkit.remote.agent import SERVER_SOURCE


class Agent:
    def __init__(self, tmp_path):
        argv = ["python3", "-I", "-c", "import base64,sys;exec(base64.b64decode(sys.argv[1]))",
                base64.b64encode(SERVER_SOURCE.encode()).decode()]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tmp_path)
        self.hello = json.loads(self.proc.stdout.readline())
        self.next = 0

    def send(self, **request) -> int:
        self.next += 1
        request.setdefault("id", self.next)
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        return request["id"]

    def reply(self, rid: int) -> dict:
        while True:
            message = json.loads(self.proc.stdout.readline())
            if message.get("id") == rid and not message.get("ack"):
                return message

    def run(self, argv, **kw) -> dict:
        return self.reply(self.send(op="run", argv=argv, **kw))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture
def agent(tmp_path):
    if shutil.which("python3") is None:
        pytest.skip("needs python3 (the remote machine's interpreter)")
    a = Agent(tmp_path)
    yield a
    if a.proc.poll() is None:
        a.close()


def out(reply, key="out") -> str:
    return base64.b64decode(reply[key]).decode()


def test_a_command_runs_with_its_input_environment_and_exit_code(agent):
    assert agent.hello["ready"] and agent.hello["pid"] == agent.proc.pid
    got = agent.run(["sh", "-c", 'cat; printf "%s" "$LK_WHO"; echo oops >&2; exit 3'],
                    input=base64.b64encode(b"from stdin\n").decode(), env={"LK_WHO": "me"})
    assert (got["code"], out(got), out(got, "err")) == (3, "from stdin\nme", "oops\n")


def test_a_missing_program_answers_127_naming_it(agent):
    got = agent.run(["no-such-program-lk"])
    assert got["code"] == 127 and "no-such-program-lk" in out(got, "err")


def test_requests_run_at_once_not_one_after_the_other(agent):
    start = time.monotonic()
    ids = [agent.send(op="run", argv=["sleep", "1"]) for _ in range(4)]
    assert [agent.reply(i)["code"] for i in ids] == [0, 0, 0, 0]
    assert time.monotonic() - start < 3


def test_the_deadline_ends_the_whole_process_group(agent, tmp_path):
    marker = tmp_path / "child.pid"
    got = agent.run(["sh", "-c", f"sleep 300 & echo $! > {marker}; echo started; wait"], timeout=1)
    assert got["code"] == -1 and out(got) == "started\n"
    child = int(marker.read_text())
    for _ in range(50):
        if not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the command's background child outlived the deadline")


def test_kill_ends_a_running_command_and_keeps_what_it_printed(agent):
    rid = agent.send(op="run", argv=["sh", "-c", "echo before; sleep 300"])
    time.sleep(0.5)
    agent.send(op="kill", target=rid)
    got = agent.reply(rid)
    assert got["code"] == -1 and out(got) == "before\n"


def test_a_child_keeping_the_pipes_open_does_not_hold_the_answer(agent):
    start = time.monotonic()
    got = agent.run(["sh", "-c", "(sleep 30 &) ; echo done"])
    assert got["code"] == 0 and out(got) == "done\n"
    assert time.monotonic() - start < 6


def test_files_append_atomic_write_and_errors(agent, tmp_path):
    path = tmp_path / "new" / "ledger.jsonl"
    for line in (b"one\n", b"two\n"):
        assert "errno" not in agent.reply(agent.send(op="append", path=str(path),
                                                     data=base64.b64encode(line).decode()))
    assert path.read_bytes() == b"one\ntwo\n"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    target = tmp_path / "state.json"
    agent.reply(agent.send(op="atomic_write", path=str(target), data=base64.b64encode(b"{}").decode(), mode=0o640))
    assert target.read_bytes() == b"{}" and target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    read = agent.reply(agent.send(op="read", path=str(target)))
    assert out(read, "data") == "{}"
    missing = agent.reply(agent.send(op="read", path=str(tmp_path / "nope")))
    assert missing["errno"] == 2
    bad = agent.reply(agent.send(op="frobnicate", path=str(target)))
    assert bad["errno"] == 22 and "frobnicate" in bad["error"]


def test_when_its_input_ends_it_ends_what_runs_and_exits(agent, tmp_path):
    marker = tmp_path / "sleep.pid"
    agent.send(op="run", argv=["sh", "-c", f"echo $$ > {marker}; exec sleep 300"])
    for _ in range(50):
        if marker.exists() and marker.read_text().strip():
            break
        time.sleep(0.1)
    pid = int(marker.read_text())
    agent.close()
    assert agent.proc.returncode == 0
    for _ in range(50):
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.1)
    else:
        pytest.fail("a command still ran after the agent's input ended")
