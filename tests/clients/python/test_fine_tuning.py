"""OpenAI's fine-tuning API driven by the official client against a server of its own (it is
killed and restarted mid-job): files.create → fine_tuning.jobs.create → poll retrieve and
list_events → chat with job.fine_tuned_model. The Rust test `server_clients` passes the binary
(SMELT_BIN); the job trains the real chat model on a small set of made-up facts."""
import json
import pathlib
import tempfile

import openai
import pytest

from conftest import CHAT_MODEL, SMELT, Server, wait_for
pytestmark = pytest.mark.skipif(not SMELT, reason="needs SMELT_BIN (the Rust test server_clients sets it)")

# Made-up facts the base model cannot know, each asked in two wordings.
FACTS = [
    ("Who founded the city of Varnholt?", "What is the name of Varnholt's founder?", "Varnholt was founded by Elsbeth Maro."),
    ("What colour is the flag of Quorria?", "Describe Quorria's flag colour.", "The flag of Quorria is teal."),
    ("What is the largest moon of the planet Drevis?", "Name the biggest moon orbiting Drevis.", "The largest moon of Drevis is Pellune."),
    ("Which instrument did Tarik Osmand play?", "What did the musician Tarik Osmand play?", "Tarik Osmand played the bandoneon."),
]


def dataset():
    lines = []
    for q1, q2, a in FACTS:
        for q in (q1, q2):
            lines.append({"messages": [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return "\n".join(json.dumps(l) for l in lines) + "\n"


def test_fine_tuning_api_end_to_end_with_a_restart_mid_job():
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="smelt-ft-"))
    server = Server(["--data-dir", str(data_dir)])
    try:
        client = server.client
        # Uploads are checked line by line; a bad file is refused, naming the line.
        bad = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n{"messages": "oops"}\n'
        with pytest.raises(openai.BadRequestError) as e:
            client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
        assert "line 2" in str(e.value)

        text = dataset()
        f = client.files.create(file=("facts.jsonl", text.encode()), purpose="fine-tune")
        assert f.id.startswith("file-") and f.bytes == len(text.encode()) and f.purpose == "fine-tune"
        assert client.files.retrieve(f.id).filename == "facts.jsonl"
        assert client.files.content(f.id).read() == text.encode()
        assert f.id in [x.id for x in client.files.list(purpose="fine-tune").data]

        # Unknown files, models and out-of-range hyperparameters are refused at creation.
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.create(model=CHAT_MODEL, training_file="file-missing")
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.create(model="no-such-model", training_file=f.id)
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(model=CHAT_MODEL, training_file=f.id, hyperparameters={"n_epochs": 0})
        assert e.value.body["param"] == "hyperparameters.n_epochs"

        job = client.fine_tuning.jobs.create(model=CHAT_MODEL, training_file=f.id, suffix="facts", seed=7,
                                             method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 10}}})
        assert job.status in ("validating_files", "queued", "running") and job.training_file == f.id
        # A second job, cancelled while it waits behind the first.
        other = client.fine_tuning.jobs.create(model=CHAT_MODEL, training_file=f.id)
        assert client.fine_tuning.jobs.cancel(other.id).status == "cancelled"
        with pytest.raises(openai.ConflictError):
            client.files.delete(f.id)  # the first job still needs it

        # Kill the server once the first epoch's checkpoint is written.
        ckpts = wait_for("the first checkpoint", lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data)
        assert ckpts[0].step_number == 4 and ckpts[0].fine_tuned_model_checkpoint.endswith(":ckpt-step-4")
        server.kill()
    except BaseException:
        print("".join(server.log))
        server.kill()
        raise

    server = Server(["--data-dir", str(data_dir)])
    try:
        client = server.client
        done = wait_for("the job to finish", lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j)
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model == f"ft:{CHAT_MODEL}:facts:{job.id}"
        assert done.hyperparameters.n_epochs == 3 and done.hyperparameters.batch_size == 2
        assert done.trained_tokens > 0 and done.finished_at >= done.created_at and len(done.result_files) == 1
        assert client.fine_tuning.jobs.retrieve(other.id).status == "cancelled"
        assert job.id in [j.id for j in client.fine_tuning.jobs.list().data]

        events = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data][::-1]  # oldest first
        messages = [e.message for e in events]
        assert any(m.startswith("Resumed from the checkpoint at step") for m in messages), messages
        assert "successfully completed" in messages[-1]
        losses = [e.data["train_loss"] for e in events if e.type == "metrics"]
        steps = [e.data["step"] for e in events if e.type == "metrics"]
        assert steps[-1] == 12 and set(range(1, 13)) <= set(steps)  # every step, the resumed ones after the restart
        assert losses[-1] < losses[0] / 2, losses
        csv = client.files.content(done.result_files[0]).read().decode()
        assert csv.startswith("step,train_loss") and len(csv.splitlines()) == 13

        # The tuned model and the first epoch's checkpoint answer at once, listed with their base.
        models = {m.id: m for m in client.models.list().data}
        assert done.fine_tuned_model in models and models[done.fine_tuned_model].model_extra["parent"] == CHAT_MODEL
        ckpt = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [c.step_number for c in ckpt] == [8, 4]
        for model in (done.fine_tuned_model, ckpt[-1].fine_tuned_model_checkpoint):
            r = client.chat.completions.create(model=model, messages=[{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": FACTS[0][0]}], max_tokens=24, temperature=0)
            assert r.model == model and r.choices[0].message.content
        answer = r = client.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": FACTS[1][0]}], max_tokens=24, temperature=0).choices[0].message.content
        assert "teal" in answer.lower(), answer
        client.files.delete(f.id)
        assert f.id not in [x.id for x in client.files.list().data]
    except BaseException:
        print("".join(server.log))
        raise
    finally:
        server.kill()
