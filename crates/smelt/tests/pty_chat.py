"""Drive `smelt run` in a pseudo-terminal like a person would.

usage: pty_chat.py SMELT_BINARY MODEL ctrl-c|ctrl-d
Two turns, a Ctrl-C in the middle of a long reply (the prompt must come back), then exit with
Ctrl-C or Ctrl-D at the prompt. Exits non-zero with a message on any failure.
"""
import os, pty, select, sys, time

binary, model, ending = sys.argv[1], sys.argv[2], sys.argv[3]
pid, fd = pty.fork()
if pid == 0:
    os.execv(binary, [binary, "run", model, "--temperature", "0", "-t", "2"])

out = b""
def read_until(marker, timeout=180):
    global out
    deadline = time.time() + timeout
    while time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if marker in out:
                return True
    return False

def fail(msg):
    sys.stderr.write(msg + "\n--- transcript ---\n" + out.decode("utf-8", "replace") + "\n")
    try:
        os.kill(pid, 9)
    except OSError:
        pass
    sys.exit(1)

if not read_until(b">>> "):
    fail("no prompt")
for i, question in enumerate([b"Say hi in three words.", b"Now say goodbye."]):
    out = b""
    os.write(fd, question + b"\r")
    if not read_until(b">>> "):
        fail(f"turn {i + 1}: no reply / prompt")
out = b""
os.write(fd, b"Write a very long story about a dragon, at least 500 words.\r")
time.sleep(4)
os.write(fd, b"\x03")
if not read_until(b">>> ", timeout=60):
    fail("Ctrl-C during a reply did not bring the prompt back")
if b"(stopped)" not in out:
    fail("reply was not reported as stopped")
os.write(fd, b"\x03" if ending == "ctrl-c" else b"\x04")
deadline = time.time() + 30
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            fail(f"exit code {code}")
        sys.exit(0)
    read_until(b"\x00", timeout=0.5)
fail("did not exit")
