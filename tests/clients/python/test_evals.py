"""OpenAI's Evals API through the official client, on the shared server: evals with string,
similarity and model graders; runs that sample a served model over inline items, grade
pre-generated outputs, or re-run stored completions; output items; errors."""
import time

import openai
import pytest

from conftest import CHAT_MODEL

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Spain", "Madrid")]


def wait_run(client, eval_id, run_id, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if run.status in ("completed", "failed", "canceled"):
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} did not finish")


def make_eval(client, **extra):
    return client.evals.create(
        name="capitals",
        data_source_config={"type": "custom", "item_schema": {"type": "object", "properties": {"country": {"type": "string"}, "ideal": {"type": "string"}}}, "include_sample_schema": True},
        testing_criteria=[
            {"type": "string_check", "name": "mentions", "input": "{{sample.output_text}}", "reference": "{{item.ideal}}", "operation": "ilike"},
            {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}", "reference": "{{item.ideal}}", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.6},
            {"type": "label_model", "name": "judge", "model": CHAT_MODEL,
             "input": [{"role": "user", "content": "Is {{item.ideal}} the capital of {{item.country}}? Answer yes or no."}],
             "labels": ["yes", "no"], "passing_labels": ["yes"]},
        ],
        metadata={"suite": "capitals"},
        **extra,
    )


def test_eval_objects(client):
    ev = make_eval(client)
    assert ev.id.startswith("eval") and ev.name == "capitals" and ev.metadata == {"suite": "capitals"}
    assert [c.name for c in ev.testing_criteria] == ["mentions", "close", "judge"]
    assert client.evals.retrieve(ev.id).name == "capitals"
    assert ev.id in [e.id for e in client.evals.list(limit=100)]
    upd = client.evals.update(ev.id, name="capitals-v2", metadata={"suite": "capitals", "rev": "2"})
    assert upd.name == "capitals-v2" and client.evals.retrieve(ev.id).metadata == {"suite": "capitals", "rev": "2"}
    gone = client.evals.delete(ev.id)
    assert gone.deleted and gone.eval_id == ev.id
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve(ev.id)


def test_run_samples_a_served_model_and_grades_it(client):
    ev = make_eval(client)
    run = client.evals.runs.create(ev.id, name="qwen", data_source={
        "type": "completions",
        "model": CHAT_MODEL,
        "input_messages": {"type": "template", "template": [
            {"role": "system", "content": "Answer with the city name only."},
            {"role": "user", "content": "What is the capital of {{item.country}}?"}]},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 12, "seed": 1},
        "source": {"type": "file_content", "content": [{"item": {"country": c, "ideal": a}} for c, a in CAPITALS]},
    })
    assert run.status in ("queued", "in_progress", "completed") and run.eval_id == ev.id
    run = wait_run(client, ev.id, run.id)
    assert run.status == "completed", run.error
    assert run.result_counts.total == len(CAPITALS)
    assert run.result_counts.passed + run.result_counts.failed + run.result_counts.errored == len(CAPITALS)
    items = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=2))
    assert len(items) == len(CAPITALS)
    # Every grade is consistent with the sample it was given.
    per = {c.testing_criteria: c.passed for c in run.per_testing_criteria_results}
    for it in items:
        answer = it.sample.output[0].content
        mentions = next(r for r in it.results if r.name == "mentions")
        assert mentions.passed == (it.datasource_item["ideal"].lower() in answer.lower())
        assert it.sample.usage.completion_tokens > 0
        assert it.status == ("pass" if all(r.passed for r in it.results) else "fail")
    assert per["mentions"] == sum(next(r for r in it.results if r.name == "mentions").passed for it in items)
    assert per["mentions"] >= 4, "the chat model knows most capitals"
    # The judge was asked about true statements: it should mostly say yes.
    assert per["judge"] >= 4
    passed = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id, status="pass"))
    assert len(passed) == run.result_counts.passed and all(p.status == "pass" for p in passed)
    one = client.evals.runs.output_items.retrieve(items[0].id, eval_id=ev.id, run_id=run.id)
    assert one.id == items[0].id
    assert run.id in [r.id for r in client.evals.runs.list(ev.id)]
    assert run.per_model_usage[0].model_name == CHAT_MODEL


def test_run_grades_pregenerated_outputs(client):
    ev = client.evals.create(
        name="shapes",
        data_source_config={"type": "custom", "item_schema": {"type": "object"}, "include_sample_schema": True},
        testing_criteria=[
            {"type": "json_schema", "name": "json", "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}},
            {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.expected}}", "operation": "eq"},
            {"type": "text_similarity", "name": "rouge", "input": "{{sample.output_text}}", "reference": "{{item.expected}}", "evaluation_metric": "rouge_l", "pass_threshold": 0.5},
            {"type": "text_similarity", "name": "cosine", "input": "{{sample.output_text}}", "reference": "{{item.expected}}", "evaluation_metric": "cosine", "pass_threshold": 0.999, "embedding_model": CHAT_MODEL},
        ],
    )
    content = [
        {"item": {"expected": '{"n": 1}'}, "sample": {"output_text": '{"n": 1}'}},
        {"item": {"expected": '{"n": 2}'}, "sample": {"output_text": '{"n": "two"}'}},
        {"item": {"expected": '{"n": 3}'}, "sample": {"output_text": "three"}},
    ]
    run = client.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": content}})
    run = wait_run(client, ev.id, run.id)
    assert (run.result_counts.passed, run.result_counts.failed, run.result_counts.errored) == (1, 2, 0)
    assert {c.testing_criteria: c.passed for c in run.per_testing_criteria_results} == {"json": 1, "exact": 1, "rouge": 2, "cosine": 1}
    client.evals.runs.delete(run.id, eval_id=ev.id)
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(run.id, eval_id=ev.id)


def test_stored_completions_rerun_reproduce_their_answers(client):
    tag = f"evals-{time.time_ns()}"
    for c, _ in CAPITALS[:4]:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": f"Capital of {c}? One word."}], max_tokens=8, temperature=0, store=True, metadata={"suite": tag})
    ev = client.evals.create(
        name="replay",
        data_source_config={"type": "stored_completions", "metadata": {"suite": tag}},
        testing_criteria=[{"type": "string_check", "name": "same", "input": "{{sample.output_text}}", "reference": "{{item.output}}", "operation": "eq"}],
    )
    run = client.evals.runs.create(ev.id, data_source={
        "type": "completions", "model": CHAT_MODEL,
        "input_messages": {"type": "item_reference", "item_reference": "item.input"},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 8},
        "source": {"type": "stored_completions", "metadata": {"suite": tag}},
    })
    run = wait_run(client, ev.id, run.id)
    # Greedy decoding is batch-invariant: the replay answers exactly as the originals did.
    assert (run.result_counts.total, run.result_counts.passed) == (4, 4)


def test_bad_evals_get_openai_errors(client):
    good_config = {"type": "custom", "item_schema": {"type": "object"}}
    bad = [
        ({"type": "string_check", "input": "{{sample.output_text}}", "reference": "x", "operation": "contains"}, "testing_criteria[0].operation"),
        ({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "meteor", "pass_threshold": 0.5}, "testing_criteria[0].evaluation_metric"),
        ({"type": "label_model", "model": "no-such-model", "input": [{"role": "user", "content": "x"}], "labels": ["a"], "passing_labels": ["a"]}, "testing_criteria[0].model"),
    ]
    for crit, param in bad:
        with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as e:
            client.evals.create(data_source_config=good_config, testing_criteria=[crit])
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError):
        client.evals.create(data_source_config={"type": "mystery"}, testing_criteria=[bad[0][0]])
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.create("eval-missing", data_source={"type": "jsonl", "source": {"type": "file_content", "content": [{"item": {}}]}})
    ev = client.evals.create(data_source_config=good_config, testing_criteria=[{"type": "string_check", "input": "{{sample.output_text}}", "reference": "x", "operation": "eq"}])
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.create(ev.id, data_source={"type": "completions", "model": "no-such-model", "source": {"type": "file_content", "content": [{"item": {"input": "hi"}}]}})
    with pytest.raises(openai.BadRequestError) as e:
        client.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": [{"item": {"a": 1}}]}})
    assert "sample" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": []}})
