"""`trimode chat` under a pseudo-terminal, as a person types into it: answers stream, the second
turn sees the first, /reset forgets, /exit leaves."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

from trimode import LLM, SamplingParams


def _wait_for_prompts(fd: int, seen: bytearray, count: int, timeout: float = 60) -> None:
    """Read the terminal until it has shown the `> ` prompt `count` times."""
    deadline = time.time() + timeout
    while seen.count(b"> ") < count:
        assert time.time() < deadline, f"{count} prompts expected in {bytes(seen)!r}"
        if select.select([fd], [], [], 0.5)[0]:
            seen += os.read(fd, 4096)


def test_chat_streams_answers_and_keeps_the_conversation(tiny_dir):
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "trimode", "chat", "--model", str(tiny_dir), "--dtype", "float32", "--max-tokens", "6"]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, close_fds=True)
    os.close(slave)
    seen = bytearray()
    try:
        _wait_for_prompts(master, seen, 1)
        for typed, line in enumerate(("hello", "again", "/reset", "hello"), 2):
            os.write(master, line.encode() + b"\n")  # typed only once the last answer is whole
            _wait_for_prompts(master, seen, typed)
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    llm = LLM(tiny_dir, dtype="float32", compile=False)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    first = llm.chat([{"role": "user", "content": "hello"}], params, use_tqdm=False)[0].text
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first}]
    second = llm.chat([[*turns, {"role": "user", "content": "again"}]], params, use_tqdm=False)[0].text
    text = bytes(seen).decode(errors="replace").replace("\r\n", "\n")
    # The terminal echoes what was typed; each answer follows on the next line.
    assert f"hello\n{first}\n" in text and f"again\n{second}\n" in text
    assert text.count(f"hello\n{first}\n") == 2  # after /reset, "hello" gets the first answer again
