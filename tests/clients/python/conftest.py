"""Shared fixtures: the server under test is started by the Rust test `server_clients`, which
passes its address and model ids in the environment."""
import json
import os
import pathlib
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request

import openai
import pytest

URL = os.environ.get("SMELT_URL", "http://127.0.0.1:8080")
CHAT_MODEL = os.environ.get("SMELT_CHAT_MODEL", "qwen2.5-coder-0.5b-instruct")
BASE_MODEL = os.environ.get("SMELT_BASE_MODEL", "gemma-3-270m")
# The smelt binary, for tests that start servers of their own (set by `server_clients`).
SMELT = os.environ.get("SMELT_BIN")
GOLDEN = pathlib.Path(__file__).resolve().parents[3] / "crates/smelt-model/tests/data/golden"


@pytest.fixture(scope="session")
def client():
    return openai.OpenAI(base_url=URL + "/v1", api_key=os.environ.get("SMELT_API_KEY", "none"), max_retries=0, timeout=600)


@pytest.fixture(scope="session")
def aclient():
    return openai.AsyncOpenAI(base_url=URL + "/v1", api_key=os.environ.get("SMELT_API_KEY", "none"), max_retries=0, timeout=600)


def golden(name):
    return [json.loads(l) for l in (GOLDEN / name).read_text().splitlines() if l.strip()]


class Server:
    """A `smelt serve` of a test's own (the chat model, plus `args`); its log is kept for
    failures."""

    def __init__(self, args, api_key="none", command=None):
        if "--database" not in args:
            args = [*args, "--database", tempfile.mkdtemp(prefix="smelt-db-") + "/smelt.db"]
        # `command` replaces the usual serve line (the README test starts the README's own).
        command = command or ["serve", "-m", CHAT_MODEL, "--kv-memory", "256M"]
        self.proc = subprocess.Popen([SMELT, *command, "--port", "0", "-t", "2", *args],
                                     stderr=subprocess.PIPE, text=True)
        self.log = []
        for line in self.proc.stderr:
            self.log.append(line)
            if line.startswith("listening on "):
                self.url = line.split()[2]
                break
        else:
            raise RuntimeError("server exited before listening:\n" + "".join(self.log))
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health") as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        self.client = self.client_for(api_key)

    def client_for(self, api_key):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=600)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait()


def wait_for(what, cond, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError("timed out waiting for " + what)
