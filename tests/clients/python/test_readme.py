"""The README's serving examples run as written: the server command, then every curl request,
the Python example and the JavaScript example, against a server started as the README says
(only the port, threads and data locations differ, so that the test does not touch the user's)."""
import json
import os
import pathlib
import re
import shlex
import subprocess
import tempfile

import pytest

from conftest import SMELT, Server, wait_for

pytestmark = pytest.mark.skipif(not SMELT, reason="needs SMELT_BIN (set by the Rust test server_clients)")

ROOT = pathlib.Path(__file__).resolve().parents[3]
README_URL = "http://127.0.0.1:8080"


def serving_blocks():
    """The fenced code blocks of the README's serving section, as (language, text)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Serving")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```(\w*)\n(.*?)```", text[start:end], re.S)


def commands(block):
    """Shell commands of a block: continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in block.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line.rstrip("\\") + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            out.append(cur)
            cur = ""
    return out


@pytest.fixture(scope="module")
def readme_server():
    blocks = serving_blocks()
    serve = [c for lang, b in blocks if lang == "sh" for c in commands(b) if " serve" in c and "curl" not in c]
    assert serve, "no serve command in the README's serving section"
    argv = shlex.split(serve[0])
    assert argv[:4] == ["cargo", "run", "--release", "--"], argv
    tmp = tempfile.mkdtemp(prefix="smelt-readme-")
    server = Server(["--data-dir", tmp + "/server", "--database", tmp + "/smelt.db"], command=argv[4:])
    yield server, blocks
    server.stop()


def run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_readme_curl_examples(readme_server):
    server, blocks = readme_server
    curls = [c for lang, b in blocks if lang == "sh" for c in commands(b) if c.startswith("curl ")]
    assert len(curls) >= 4, curls
    for c in curls:
        # --fail-with-body: an HTTP error fails the command (the README's lines do not ask for it).
        cmd = c.replace(README_URL, server.url).replace("curl ", "curl -sS --fail-with-body ", 1)
        out = run(["bash", "-c", cmd])
        if '"stream": true' in c:
            events = [l[6:] for l in out.splitlines() if l.startswith("data: ")]
            assert events[-1] == "[DONE]", out
            chunks = [json.loads(e) for e in events[:-1]]
            text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
            assert text.strip(), out
            assert chunks[-1]["usage"]["completion_tokens"] > 0
        else:
            body = json.loads(out)
            assert "error" not in body, body
            assert body.get("choices") or body.get("data"), body
            for choice in body.get("choices", []):
                assert (choice.get("message") or {}).get("content") or choice.get("text"), body


def test_readme_python_example(readme_server):
    server, blocks = readme_server
    code = [b for lang, b in blocks if lang == "python"]
    assert code
    out = run(["python3", "-c", code[0].replace(README_URL, server.url)])
    assert out.strip()


def test_readme_javascript_example(readme_server):
    server, blocks = readme_server
    code = [b for lang, b in blocks if lang in ("js", "javascript")]
    assert code
    # Beside the Node suite, so that `import "openai"` finds its node_modules.
    path = ROOT / "tests/clients/node" / f".readme-example-{os.getpid()}.mjs"
    path.write_text(code[0].replace(README_URL, server.url))
    try:
        out = run(["node", str(path)])
    finally:
        path.unlink()
    assert out.strip()


def test_chat_with_a_base_model_is_warned_about_once(readme_server):
    # The README's server also serves Gemma 3 270M base, which has no chat template: a chat
    # request to it is answered, and the log says once why the answer may ramble.
    server, _ = readme_server
    client = server.client_for("sk-local")
    for _ in range(2):
        r = client.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert r.choices[0].message.content is not None
    # The log is read by another thread: wait for the line to arrive.
    wait_for("the warning in the log", lambda: "warning: gemma-3-270m" in "".join(server.log), timeout=30)
    log = "".join(server.log)
    assert "gemma-3-270m: " in log and "no chat template (chat requests use Gemma's turn format)" in log, log
    assert log.count("warning: gemma-3-270m has no chat template") == 1, log
