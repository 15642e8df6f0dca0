"""The OpenAI-compatible API and token streams, through the real `openai` client, against
`mgrpo serve` (`rollout/server_openai.py`, `server_stream.py`) and SGLang 0.5.23's own OpenAI
serving code (`tests/sglang_harness.py`, where `sglang` imports): the same greedy or seeded
tokens as the embedded engine both run, decoded by the model's tokenizer, in SGLang's reply
and chunk shapes. `serve_only` marks what only `mgrpo serve` does, and why.

The model is the tiny Qwen2 of `tests/serve_targets.py` (one character per token) with a chat
template set on its tokenizer. Its greedy output repeats a character, so the tests that need
varied text sample with a seed (the engine's per-row seed is SGLang's `sampling_seed`, which
a request's `seed` sets).
"""

import json
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from megatron_mgrpo.rollout.base import SamplingParams  # noqa: E402
from megatron_mgrpo.rollout.embedded import EmbeddedEngine  # noqa: E402
from megatron_mgrpo.rollout.server import EmbeddedServer, load_tokenizer  # noqa: E402
from tests.serve_targets import build_model_dir, serve_only, start_target  # noqa: E402
from tests.test_sglang_contract import http  # noqa: E402

# Only characters the one-character tokenizer knows (others read as "a").
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}={{ m['content'] }}.{% endfor %}"
                 "{% if add_generation_prompt %}assistant={% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2, its one-character-per-token tokenizer with a chat template."""
    return build_model_dir(str(tmp_path_factory.mktemp("openai_model")), CHAT_TEMPLATE)


@pytest.fixture(scope="module", params=["serve", "sglang"])
def server(request, model_dir):
    """The target (`tests/serve_targets.py`), with the engine and tokenizer it serves: for
    SGLang's app (another process), the same weights loaded here."""
    target = start_target(request.param, model_dir)
    if target.server is not None:
        target.engine, target.tokenizer = target.server.engine, target.server.tokenizer
    else:
        target.engine = EmbeddedEngine.from_pretrained(model_dir, sets=("policy",))
        target.tokenizer = load_tokenizer(model_dir)
    yield target
    target.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120.0)


def engine_text(server, prompt_ids, max_new, temperature=0.0, seed=0, **params):
    """What the engine itself generates for one prompt (the server idle): (text, tokens)."""
    c = server.engine.generate_rows([prompt_ids], [seed], SamplingParams(
        temperature=temperature, max_new_tokens=max_new, **params))[0]
    return server.tokenizer.decode(c.token_ids), c.token_ids


def chat_ids(server, messages=MESSAGES):
    out = server.tokenizer.apply_chat_template(messages, tokenize=True,
                                               add_generation_prompt=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


# ---- replies ----------------------------------------------------------------------------------

def test_models_lists_the_served_model(client, server, model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [model_dir]
    assert models[0].owned_by == "sglang" and models[0].max_model_len == server.context_len


def test_greedy_completion_is_the_engines_and_counts_its_tokens(client, server):
    prompt = "hello world"
    ids = server.tokenizer.encode(prompt)
    want, tokens = engine_text(server, ids, 7)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=7, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny" and r.id
    assert [c.text for c in r.choices] == [want] and r.choices[0].finish_reason == "length"
    assert r.choices[0].index == 0 and r.choices[0].logprobs is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids), 7, len(ids) + 7)
    assert r.metadata == {"weight_version": http(server.url, "/model_info")[1]["weight_version"]}
    # A seeded sample is the engine's too, from token ids as from text; a batch keeps order.
    want, _ = engine_text(server, ids, 9, temperature=1.0, seed=11)
    r = client.completions.create(model="tiny", prompt=[ids, server.tokenizer.encode("q")],
                                  max_tokens=9, temperature=1.0, seed=11)
    assert r.choices[0].text == want and [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == len(ids) + 1 and r.usage.completion_tokens == 18


def test_chat_completion_is_the_engine_on_the_chat_template(client, server):
    ids = chat_ids(server)
    assert server.tokenizer.decode(ids) == "system=be brief.user=2+2=.assistant="
    want, _ = engine_text(server, ids, 8, temperature=1.0, seed=5)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8,
                                       temperature=1.0, seed=5)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 8)
    # max_completion_tokens, the newer name, is the same limit.
    r = client.chat.completions.create(model="tiny", messages=MESSAGES,
                                       max_completion_tokens=3, temperature=0)
    assert r.choices[0].message.content == engine_text(server, ids, 3)[0]
    # A last assistant message: continued with continue_final_message, else a user turn.
    start = MESSAGES + [{"role": "assistant", "content": "4"}]
    r = client.chat.completions.create(model="tiny", messages=start, max_tokens=4,
                                       temperature=1.0, seed=3,
                                       extra_body={"continue_final_message": True})
    continued = ids + server.tokenizer.encode("4")
    assert r.choices[0].message.content == engine_text(server, continued, 4, 1.0, 3)[0]


def test_n_gives_n_choices(client, server):
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=1.0,
                                  n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 10
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, n=2,
                                       temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(len(c.message.content) == 4 for c in r.choices)
    assert r.usage.completion_tokens == 8


def test_finish_reason_stop_for_stop_strings_and_tokens_and_length(client, server):
    ids = server.tokenizer.encode("abc")
    text, tokens = engine_text(server, ids, 12, temperature=1.0, seed=1)
    stop = text[4:6]  # completed by the sixth token, unless it shows up earlier
    cut = text.find(stop)
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=1.0,
                                  seed=1, stop=[stop])
    c = r.choices[0]
    assert (c.text, c.finish_reason, c.matched_stop) == (text[:cut], "stop", stop)
    assert r.usage.completion_tokens == cut + len(stop)  # the tokens up to the match
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=1.0,
                                  seed=1, extra_body={"stop_token_ids": [tokens[3]]})
    c = r.choices[0]
    first = tokens.index(tokens[3])  # the stop token ends the text, and is trimmed from it
    assert (c.text, c.finish_reason, c.matched_stop) == (text[:first], "stop", tokens[3])
    assert r.usage.completion_tokens == first + 1
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=1.0,
                                  seed=1, stop=["#"])  # never generated
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, "length")


# ---- streams ----------------------------------------------------------------------------------

def test_completion_and_chat_streams_add_up_to_the_reply(client, server):
    kw = dict(model="tiny", prompt="abc", max_tokens=10, temperature=1.0, seed=2)
    reply = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert len(content) == 10  # one per token
    assert "".join(c.choices[0].text for c in content) == reply.choices[0].text
    assert [c.choices[0].finish_reason for c in content] == [None] * 9 + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == reply.usage.model_dump()
    completion = reply.choices[0].text

    chat = dict(model="tiny", messages=MESSAGES, max_tokens=6, temperature=1.0, seed=4)
    reply = client.chat.completions.create(**chat)
    chunks = list(client.chat.completions.create(**chat, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + \
        ["length"]
    assert all(c.object == "chat.completion.chunk" and c.model == "tiny" for c in chunks)

    # A stop string across tokens: the text before it is streamed...
    stop = completion[5:8]
    cut = completion.find(stop)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        **kw, stop=stop, stream=True))
    assert streamed.startswith(completion[:cut])
    # ... and its first characters are held back, never sent and then taken back.
    serve_only(server, "SGLang streams a stop string's first characters before the token "
                       "that completes it (a delta cannot take them back)")
    assert streamed == completion[:cut]


def test_streams_of_n_choices(client, server):
    kw = dict(model="tiny", prompt="xyz", max_tokens=6, temperature=1.0, seed=9, n=2)
    reply = client.completions.create(**kw)
    texts = {0: "", 1: ""}
    for c in client.completions.create(**kw, stream=True):
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == {i: c.text for i, c in enumerate(reply.choices)}
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=5, temperature=1.0, n=2)
    finishes = {}
    for c in client.chat.completions.create(**kw, stream=True):
        if c.choices[0].finish_reason:
            finishes[c.choices[0].index] = c.choices[0].finish_reason
    assert finishes == {0: "length", 1: "length"}


def sse_events(url, body):
    """The `data:` events of a `/generate` stream, as they arrive."""
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line[len(b"data: "):].decode().rstrip() for line in r
                  if line.startswith(b"data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_generate_streams_each_token_and_ends_with_the_reply(server):
    body = {"text": "abc", "rid": "s1", "return_logprob": True,
            "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 7}}
    status, reply, _ = http(server.url, "/generate", body)
    assert status == 200
    events = sse_events(server.url, {**body, "stream": True})
    assert len(events) == 6  # SGLang's: the cumulative item after every token
    for k, e in enumerate(events[:-1], 1):
        assert e["output_ids"] == reply["output_ids"][:k] and e["text"] == reply["text"][:k]
        assert e["meta_info"]["finish_reason"] is None
        assert e["meta_info"]["completion_tokens"] == k
        assert len(e["meta_info"]["output_token_logprobs"]) == k
    last = events[-1]
    last["meta_info"].pop("e2e_latency"), reply["meta_info"].pop("e2e_latency")
    assert last == reply
    # A batch stream: each event one row's item, with its index.
    events = sse_events(server.url, {"text": ["ab", "cd"], "stream": True, "sampling_params": {
        "max_new_tokens": 3, "n": 2}})
    assert sorted(e["index"] for e in events) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(e["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
               for e in events if e["meta_info"]["completion_tokens"] == 3)


def test_a_client_that_leaves_mid_stream_frees_the_server(client, server, monkeypatch):
    """The generation ends with the stream (SGLang aborts the rows of a request whose
    client has gone) and the server serves on at once."""
    ended = []
    if server.server is not None:  # in this process: see the engine's row end
        generate_rows = server.engine.generate_rows

        def recording(*args, **kwargs):
            out = generate_rows(*args, **kwargs)
            ended.append(out)
            return out

        monkeypatch.setattr(server.engine, "generate_rows", recording)
    steps = server.context_len - 10
    stream = client.completions.create(model="tiny", prompt="abc", max_tokens=steps,
                                       temperature=1.0, stream=True)
    chunks = iter(stream)
    assert next(chunks).choices[0].text and next(chunks).choices[0].text
    stream.close()
    if server.server is not None:
        deadline = time.monotonic() + 60
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended and ended[0][0].finish_reason == "abort"
        assert len(ended[0][0].token_ids) < steps
    t0 = time.monotonic()
    assert http(server.url, "/health_generate", timeout=30)[0] == 200
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert server.server is None or not server.server._running
    assert time.monotonic() - t0 < 20


# ---- refusals ---------------------------------------------------------------------------------

APPLIED = "SGLang applies it (the harness's stub engine refuses it)"
ACCEPTED = "SGLang's OpenAI serving takes it; mgrpo serve refuses what it does not do"


@pytest.mark.parametrize("chat,kwargs,needle,why", [
    (False, {"logprobs": 1}, "logprobs", "SGLang returns log-probs"),
    (True, {"logprobs": True}, "logprobs", "SGLang returns log-probs"),
    (True, {"top_logprobs": 2}, "top_logprobs", "SGLang returns log-probs"),
    (False, {"frequency_penalty": 0.5}, "frequency_penalty", APPLIED),
    (True, {"presence_penalty": 1.0}, "presence_penalty", APPLIED),
    (False, {"logit_bias": {"3": 5}}, "logit_bias", APPLIED),
    (False, {"echo": True}, "echo", ACCEPTED), (False, {"best_of": 2}, "best_of", ACCEPTED),
    (False, {"suffix": "x"}, "suffix", ACCEPTED),
    (True, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", ACCEPTED),
    (True, {"response_format": {"type": "json_object"}}, "response_format", APPLIED),
    (False, {"extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty", APPLIED),
    (False, {"extra_body": {"regex": "a+"}}, "regex", APPLIED),
    (False, {"max_tokens": 10 ** 6}, "maximum context length", None),
    (True, {"max_tokens": 10 ** 6}, "maximum context length", None),
    (False, {"extra_body": {"top_k": 0}}, "top_k", None),
    (False, {"extra_body": {"min_tokens": 9}}, "min_new_tokens", None)])
def test_unsupported_parameters_are_400s_in_openai_shape(client, server, chat, kwargs, needle,
                                                         why):
    if why:
        serve_only(server, why)
    with pytest.raises(openai.BadRequestError) as e:
        if chat:
            client.chat.completions.create(model="tiny", messages=MESSAGES, **kwargs)
        else:
            client.completions.create(model="tiny", prompt="abc", **{"max_tokens": 4, **kwargs})
    body = e.value.body
    assert e.value.status_code == 400 and needle in body["message"], body
    assert {k: body[k] for k in ("object", "type", "code")} == {
        "object": "error", "type": "BadRequestError", "code": 400}


def test_malformed_bodies_are_400s(server):
    wrong = []
    for path, body in [("/v1/completions", {"prompt": "a", "max_tokens": "three"}),
                       ("/v1/completions", {"prompt": "a", "max_tokens": 0}),
                       ("/v1/completions", {}), ("/v1/chat/completions", {}),
                       ("/v1/completions", {"prompt": "a", "stream": True,
                                            "stream_options": {"include_usage": "maybe"}}),
                       ("/v1/chat/completions", {"messages": [{"content": "x"}]}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                           {"type": "image_url", "image_url": {"url": "x"}}]}]})]:
        status, reply, _ = http(server.url, path, body)
        if not (status == 400 and reply["object"] == "error"):
            wrong.append((path, body, status, reply))
    assert not wrong
    status, reply, _ = http(server.url, "/v1/completions", raw=b"{not json")
    assert status == 400
    # Streams refuse before they start: a 400, not an event.
    status, reply, _ = http(server.url, "/v1/completions", {"prompt": "a", "stream": True,
                                                             "presence_penalty": 2})
    assert status == 400 and reply["type"] == "BadRequestError"


def test_without_a_tokenizer_the_openai_api_is_one_400(model_dir):
    engine = EmbeddedEngine.from_pretrained(model_dir, sets=("policy",))
    bare = EmbeddedServer(engine, model_path=model_dir, tokenizer=None).start()
    try:
        for path, body in [("/v1/completions", {"prompt": [1, 2]}),
                           ("/v1/chat/completions", {"messages": MESSAGES})]:
            status, reply, _ = http(bare.url, path, body)
            assert status == 400 and "has none: use /generate with input_ids" in \
                reply["message"], reply
        assert http(bare.url, "/v1/models")[0] == 200
    finally:
        bare.stop()


def test_chat_samples_with_the_models_generation_config_where_the_request_is_silent(
        model_dir, tmp_path):
    import shutil

    shutil.copytree(model_dir, tmp_path / "m")
    with open(tmp_path / "m" / "generation_config.json", "w") as f:
        json.dump({"temperature": 0.0, "repetition_penalty": 1.1}, f)
    engine = EmbeddedEngine.from_pretrained(str(tmp_path / "m"), sets=("policy",))
    server = EmbeddedServer(engine, model_path=str(tmp_path / "m"),
                            tokenizer=load_tokenizer(model_dir)).start()
    try:
        body = {"messages": MESSAGES, "max_tokens": 5}
        status, reply, _ = http(server.url, "/v1/chat/completions", body)
        assert status == 400 and "repetition_penalty=1.1" in reply["message"]
        status, reply, _ = http(server.url, "/v1/chat/completions", {
            **body, "repetition_penalty": 1.0})
        greedy = engine_text(server, chat_ids(server), 5)[0]
        assert status == 200 and reply["choices"][0]["message"]["content"] == greedy
    finally:
        server.stop()


# ---- the engine's step callback ---------------------------------------------------------------

def test_the_engines_step_callback_sees_every_token_and_can_end_rows(model_dir):
    engine = EmbeddedEngine.from_pretrained(model_dir, sets=("policy",))
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    prompts, seeds = [[1, 2, 3], [4, 5], [6]], [1, 2, 3]
    plain = engine.generate_rows(prompts, seeds, params)
    seen = [[] for _ in prompts]
    ends = [[] for _ in prompts]

    def on_step(rows, tokens, logprobs, end):
        for r, t, e in zip(rows, tokens, end):
            seen[r].append(t)
            ends[r].append(e)
        return [1] if len(seen[1]) == 3 else None  # row 1 ends at its third token

    got = engine.generate_rows(prompts, seeds, params, on_step=on_step)
    assert [c.token_ids for c in got] == [plain[0].token_ids, plain[1].token_ids[:3],
                                          plain[2].token_ids]
    assert [c.finish_reason for c in got] == ["length", "stop", "length"]
    assert seen == [c.token_ids for c in got]
    assert ends[0] == [False] * 7 + [True]
