"""Structured output and tool calling, driven by the official `openai` package: schemas checked
with `jsonschema`, Pydantic parsing, GBNF grammars checked by independent Python checkers, and
an agent loop that runs a real Python function."""
import asyncio
import json
import random
import re
from typing import List, Optional

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from conftest import BASE_MODEL, CHAT_MODEL


# ---------------------------------------------------------------- schemas


def random_schema(rng, depth=0):
    """A random schema from the supported keywords. Strings and arrays are bounded so that a
    base model, which writes whatever, still finishes within the token budget."""
    kinds = ["string", "integer", "number", "boolean", "enum", "const", "array", "object", "anyOf", "nullable", "pattern"]
    if depth >= 2:
        kinds = kinds[:6] + ["pattern"]
    k = rng.choice(kinds)
    if k == "string":
        s = {"type": "string", "maxLength": rng.randint(1, 24)}
        if rng.random() < 0.4:
            s["minLength"] = rng.randint(0, s["maxLength"])
        return s
    if k == "integer":
        s = {"type": "integer"}
        if rng.random() < 0.6:
            lo = rng.randint(-1000, 1000)
            s["minimum"] = lo
            if rng.random() < 0.7:
                s["maximum"] = lo + rng.randint(0, 5000)
        if rng.random() < 0.2:
            s["exclusiveMaximum"] = s.get("maximum", 100) + 1
        return s
    if k == "number":
        s = {"type": "number"}
        if rng.random() < 0.5:
            s["minimum"] = rng.randint(0, 10)
            s["maximum"] = s["minimum"] + rng.randint(0, 100)
        return s
    if k == "boolean":
        return {"type": "boolean"}
    if k == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True, "a \"quoted\" word", "ünïcödé"], rng.randint(1, 4))}
    if k == "const":
        return {"const": rng.choice(["fixed", 42, {"nested": [1, "two"]}, None])}
    if k == "array":
        lo = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo, "maxItems": lo + rng.randint(0, 2)}
    if k == "object":
        n = rng.randint(1, 4)
        props = {f"field_{depth}_{i}": random_schema(rng, depth + 1) for i in range(n)}
        req = [p for p in props if rng.random() < 0.6]
        return {"type": "object", "properties": props, "required": req, "additionalProperties": False}
    if k == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1), random_schema(rng, depth + 1)]}
    if k == "nullable":
        return {"type": [rng.choice(["string", "integer", "boolean"]), "null"], "maxLength": 10}
    return {"type": "string", "pattern": rng.choice([r"^[A-Z]{2}-\d{3}$", r"^(yes|no|maybe)$", r"^\w{1,10}@\w{1,8}\.com$", r"^#[0-9a-f]{6}$"])}


HAND_WRITTEN = 0


def schemas():
    rng = random.Random(20261127)
    out = []
    # Hand-written ones first: $defs/$ref (recursive too), tuples, formats, nested optionals.
    out.append({
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/node"}},
        "required": ["root"],
        "$defs": {"node": {"type": "object", "properties": {"label": {"type": "string", "maxLength": 8}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["label", "children"]}},
    })
    out.append({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string", "maxLength": 5}, {"type": "boolean"}], "items": False, "minItems": 3})
    out.append({"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}, "day": {"type": "string", "format": "date"}, "at": {"type": "string", "format": "time"}}, "required": ["id", "day", "at"]})
    out.append({"definitions": {"pt": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}}, "type": "array", "items": {"$ref": "#/definitions/pt"}, "minItems": 1, "maxItems": 3})
    out.append({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 0}, "b": {"type": "null"}, "c": {"oneOf": [{"type": "boolean"}, {"enum": ["x"]}]}}, "required": ["a", "b", "c"]})
    global HAND_WRITTEN
    HAND_WRITTEN = len(out)
    while len(out) < 50:
        s = random_schema(rng)
        if s.get("type") != "object":
            s = {"type": "object", "properties": {"value": s}, "required": ["value"]}
        out.append(s)
    return out


SCHEMAS = schemas()


def test_fifty_schemas_times_seeds_give_valid_instances(client):
    async def one(aclient, i, seed):
        schema = SCHEMAS[i]
        # The hand-written schemas (a recursive one among them) go to the instruction-tuned
        # model; a base model may nest forever. The random ones alternate between the models.
        model = CHAT_MODEL if i < HAND_WRITTEN else [BASE_MODEL, CHAT_MODEL][(i + seed) % 2]
        r = await aclient.chat.completions.create(
            model=model,
            # A short shared prompt (cached after the first request): the grammar does the rest.
            messages=[{"role": "user", "content": "Reply with a JSON object."}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}},
            temperature=1.0,
            seed=seed,
            max_tokens=400,
        )
        c = r.choices[0]
        assert c.finish_reason == "stop", f"schema {i} seed {seed} on {model}: {c.finish_reason}: {c.message.content!r}"
        instance = json.loads(c.message.content)
        jsonschema.validate(instance, schema)
        return instance

    async def all_():
        # A client of this event loop (the shared async one belongs to another test's loop).
        async with openai.AsyncOpenAI(base_url=str(client.base_url), api_key=client.api_key, max_retries=0, timeout=600) as aclient:
            return await asyncio.gather(*(one(aclient, i, seed) for i in range(len(SCHEMAS)) for seed in (1, 2)))

    results = asyncio.run(all_())
    assert len(results) == 100
    # Sampling with different seeds really varies the output.
    assert len({json.dumps(r, sort_keys=True) for r in results}) > 60


class Address(BaseModel):
    city: str
    country: str


class Person(BaseModel):
    name: str
    age: int
    email: Optional[str]
    hobbies: List[str]
    address: Address


def test_pydantic_parse(client):
    r = client.chat.completions.parse(
        model=CHAT_MODEL,
        messages=[{"role": "system", "content": "Extract the person."}, {"role": "user", "content": "Maria Rossi, 34, lives in Turin, Italy. She likes hiking and chess. No email."}],
        response_format=Person,
        temperature=0,
        max_tokens=200,
    )
    p = r.choices[0].message.parsed
    assert isinstance(p, Person) and isinstance(p.address, Address)
    assert p.age == 34 and "Maria" in p.name


def test_json_object_mode(client):
    # (Only the instruction-tuned model: a base model happily writes an endless object.)
    for seed in (5, 6):
        r = client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "Give me a JSON object describing a cat."}], response_format={"type": "json_object"}, max_tokens=400, temperature=0.7, seed=seed)
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_unsupported_schema_features_are_named(client):
    for schema, word in [
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"e": {"type": "string", "format": "email"}}}, "email"),
        ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "patternProperties"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}], response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        assert word in e.value.body["message"] and e.value.body["param"] == "response_format"


# ---------------------------------------------------------------- GBNF grammars


JSON_GBNF = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value){0,9} )? "}" ws
array  ::= "[" ws ( value ("," ws value){0,9} )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9]{1,3})? ws
ws     ::= | " " | "\n" [ \t]{0,20}
'''

ARITH_GBNF = r'''
# Arithmetic with one level of parentheses (so that every output ends).
root   ::= expr
expr   ::= term (ws [-+] ws term){0,5}
term   ::= factor (ws [*/] ws factor){0,5}
factor ::= number | "(" ws inner ws ")"
inner  ::= iterm (ws [-+] ws iterm){0,5}
iterm  ::= number (ws [*/] ws number){0,5}
number ::= [0-9]{1,4}
ws     ::= " "?
'''

LIST_GBNF = r'''
root ::= item{2,5}
item ::= "- " [a-z] [a-z ]{0,19} "\n"
'''

CHESS_GBNF = r'''
# A move in standard algebraic notation.
root      ::= castle | piece-move | pawn-move
castle    ::= "O-O" | "O-O-O"
piece-move ::= [KQRBN] [a-h]? [1-8]? "x"? square check?
pawn-move ::= ([a-h] "x")? square ("=" [QRBN])? check?
square    ::= [a-h] [1-8]
check     ::= "+" | "#"
'''


def arithmetic_ok(s):
    """An independent recursive-descent check of ARITH_GBNF's language."""
    pos = 0

    def ws():
        nonlocal pos
        if pos < len(s) and s[pos] == " ":
            pos += 1

    def number():
        nonlocal pos
        start = pos
        while pos < len(s) and s[pos].isdigit() and pos - start < 4:
            pos += 1
        return pos > start

    depth = 0

    def factor():
        nonlocal pos, depth
        if pos < len(s) and s[pos] == "(" and depth == 0:
            pos += 1
            depth += 1
            ws()
            ok = expr()
            ws()
            depth -= 1
            if ok and pos < len(s) and s[pos] == ")":
                pos += 1
                return True
            return False
        return number()

    def chain(item, ops):
        nonlocal pos
        if not item():
            return False
        for _ in range(5):
            save = pos
            ws()
            if pos < len(s) and s[pos] in ops:
                pos += 1
                ws()
                if item():
                    continue
            pos = save
            return True
        return True

    def term():
        return chain(factor, "*/")

    def expr():
        return chain(term, "+-")

    return expr() and pos == len(s)


def test_gbnf_grammars_constrain_output(client):
    json_chat = lambda seed: client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Describe a book as a JSON object."}], max_tokens=600, temperature=0.8, seed=seed, extra_body={"grammar": JSON_GBNF}
    ).choices[0]
    base = lambda grammar, prompt: lambda seed: client.completions.create(model=BASE_MODEL, prompt=prompt, max_tokens=300, temperature=0.8, seed=seed, extra_body={"grammar": grammar}).choices[0]
    cases = [
        (json_chat, lambda c: isinstance(json.loads(c.message.content), dict)),
        (base(ARITH_GBNF, "Compute: "), lambda c: arithmetic_ok(c.text)),
        (base(LIST_GBNF, "A shopping list:\n"), lambda c: re.fullmatch(r"(- [a-z][a-z ]{0,19}\n){2,5}", c.text) is not None),
        (base(CHESS_GBNF, "1. e4 e5 2."), lambda c: re.fullmatch(r"O-O(-O)?|[KQRBN][a-h]?[1-8]?x?[a-h][1-8][+#]?|([a-h]x)?[a-h][1-8](=[QRBN])?[+#]?", c.text) is not None),
    ]
    for run, ok in cases:
        for seed in range(3):
            c = run(seed)
            assert c.finish_reason == "stop", c
            assert ok(c), c


def test_regex_constrains_output(client):
    r = client.completions.create(model=BASE_MODEL, prompt="Call me at", max_tokens=30, temperature=1.0, seed=3, extra_body={"regex": r"\(\d{3}\) \d{3}-\d{4}"})
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", r.choices[0].text)


def test_malformed_grammars_get_a_position(client):
    for grammar, line, column in [('root ::= "abc', 1, 10), ('root ::= item\nitem ::= [a-z\n', 2, 10), ("root ::= x\n", 1, 10)]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=BASE_MODEL, prompt="x", max_tokens=5, extra_body={"grammar": grammar})
        msg = e.value.body["message"]
        assert f"line {line}, column {column}" in msg, msg
        assert e.value.body["param"] == "grammar"


# ---------------------------------------------------------------- tools


def add(a: int, b: int) -> int:
    return a + b


ADD_TOOL = {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}


def test_agent_loop_with_a_python_function(client):
    """Turn 1: the model calls the tool; the test runs the real function and sends the result
    back under the call's id; turn 2: the model answers in text. (Turn 2 sets tool_choice
    "none", the usual final turn of an agent loop: the 0.5B test model, left free, tends to call
    again rather than answer.)"""
    messages = [
        {"role": "system", "content": "Answer the user's question in a sentence, using the tool results."},
        {"role": "user", "content": "What is 1234 plus 4321?"},
    ]
    tools = [ADD_TOOL, WEATHER_TOOL]
    r = client.chat.completions.create(model=CHAT_MODEL, messages=messages, tools=tools, temperature=0, max_tokens=100)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.tool_calls and msg.content is None, msg
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "add" and call.id.startswith("call_")
    result = add(**json.loads(call.function.arguments))
    assert result == 5555
    messages.append(msg.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": str(result)})
    r2 = client.chat.completions.create(model=CHAT_MODEL, messages=messages, tools=tools, tool_choice="none", temperature=0, max_tokens=60)
    final = r2.choices[0]
    assert final.finish_reason == "stop" and final.message.tool_calls is None
    assert "5555" in final.message.content


def test_forced_calls_follow_the_schema(client):
    for model in (CHAT_MODEL, BASE_MODEL):
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Is it raining in Oslo?"}], tools=[ADD_TOOL, WEATHER_TOOL], tool_choice=choice, parallel_tool_calls=False, temperature=0.8, seed=11, max_tokens=200)
            c = r.choices[0]
            assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c
            f = c.message.tool_calls[0].function
            if choice != "required":
                assert f.name == "get_weather"
            tool = next(t for t in (ADD_TOOL, WEATHER_TOOL) if t["function"]["name"] == f.name)
            jsonschema.validate(json.loads(f.arguments), tool["function"]["parameters"])


def test_tool_choice_none_answers_in_text(client):
    r = client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "What is 2 plus 2?"}], tools=[ADD_TOOL], tool_choice="none", temperature=0, max_tokens=30)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def assemble(stream):
    calls, content, finish = {}, "", None
    for chunk in stream:
        for c in chunk.choices:
            d = c.delta
            if d.content:
                content += d.content
            for tc in d.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    slot["id"] = tc.id
                if tc.function and tc.function.name:
                    slot["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    slot["arguments"] += tc.function.arguments
            finish = c.finish_reason or finish
    return content, [calls[k] for k in sorted(calls)], finish


def test_streamed_tool_calls_assemble_to_the_non_streamed_result(client):
    for kw in ({}, {"tool_choice": "required"}):
        args = dict(model=CHAT_MODEL, messages=[{"role": "user", "content": "What's the weather in Paris and in Rome?"}], tools=[ADD_TOOL, WEATHER_TOOL], temperature=0, max_tokens=150, **kw)
        whole = client.chat.completions.create(**args).choices[0]
        content, calls, finish = assemble(client.chat.completions.create(stream=True, **args))
        assert finish == whole.finish_reason == "tool_calls"
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [(t.function.name, json.loads(t.function.arguments)) for t in whole.message.tool_calls]
        assert all(c["id"] for c in calls)
        # No raw call syntax leaks into the text.
        assert "<tool_call>" not in content and '"arguments"' not in content
        assert (content or None) == (whole.message.content or None)


def test_bad_tool_requests(client):
    for kw, param in [
        ({"tools": [ADD_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"not": {}}}}}}], "tool_choice": "required"}, "tools[0].function.parameters"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}], **kw)
        assert e.value.body["param"] == param, e.value.body
