"""Shared fixtures: the server under test is started by the Rust test `server_clients`, which
passes its address and model ids in the environment."""
import json
import os
import pathlib

import openai
import pytest

URL = os.environ.get("SMELT_URL", "http://127.0.0.1:8080")
CHAT_MODEL = os.environ.get("SMELT_CHAT_MODEL", "qwen2.5-coder-0.5b-instruct")
BASE_MODEL = os.environ.get("SMELT_BASE_MODEL", "gemma-3-270m")
GOLDEN = pathlib.Path(__file__).resolve().parents[3] / "crates/smelt-model/tests/data/golden"


@pytest.fixture(scope="session")
def client():
    return openai.OpenAI(base_url=URL + "/v1", api_key=os.environ.get("SMELT_API_KEY", "none"), max_retries=0, timeout=600)


@pytest.fixture(scope="session")
def aclient():
    return openai.AsyncOpenAI(base_url=URL + "/v1", api_key=os.environ.get("SMELT_API_KEY", "none"), max_retries=0, timeout=600)


def golden(name):
    return [json.loads(l) for l in (GOLDEN / name).read_text().splitlines() if l.strip()]
