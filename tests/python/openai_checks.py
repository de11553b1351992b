"""Checks cllm's OpenAI API with the real `openai` client. Run by tests/clients.rs against a live
server: `python openai_checks.py CONFIG.json`, where the config names the server, the mode
(`main` or `auth`) and the golden cases. Exits non-zero (with the failing check) on any failure.
"""
import json
import sys

import urllib.request

import openai

CFG = json.load(open(sys.argv[1]))
BASE = CFG["base_url"] + "/v1"
MODEL = CFG["model"]


CURRENT = {"check": "setup"}


def client(**kw):
    """A client that does not retry (429 is an answer here) and is its own rate-limit client:
    each check sends as `X-Client-Id: <check name>` unless it says otherwise."""
    kw.setdefault("api_key", "unused")
    kw.setdefault("default_headers", {"X-Client-Id": CURRENT["check"]})
    return openai.OpenAI(base_url=BASE, max_retries=0, **kw)


def post_json(path, body):
    req = urllib.request.Request(
        CFG["base_url"] + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def check(name, fn):
    CURRENT["check"] = name
    fn()
    print(f"ok {name}", flush=True)


def models():
    listed = client().models.list().data
    assert [m.id for m in listed] == [MODEL], listed
    assert listed[0].owned_by == "cllm"
    assert listed[0].model_extra["max_model_len"] > 0


def completions_greedy_equals_golden():
    c = client()
    for case in CFG["cases"]:
        n = len(case["output_ids"])
        r = c.completions.create(model=MODEL, prompt=case["prompt"], max_tokens=n, temperature=0)
        choice = r.choices[0]
        assert choice.text == case["text"], (case["prompt"], choice.text, case["text"])
        assert choice.finish_reason == "length", choice.finish_reason
        assert r.usage.completion_tokens == n and r.usage.prompt_tokens == len(case["input_ids"]), r.usage
        assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL


def completions_n_with_seed():
    c = client()
    kw = dict(model=MODEL, prompt="Tom had a red ball", max_tokens=24, temperature=1.0, seed=11, n=2)
    first = c.completions.create(**kw)
    again = c.completions.create(**kw)
    assert [ch.index for ch in first.choices] == [0, 1], first.choices
    texts = [ch.text for ch in first.choices]
    assert texts == [ch.text for ch in again.choices], "same seed, same choices"
    assert texts[0] != texts[1], f"two independent samples: {texts}"
    assert first.usage.completion_tokens == 48, first.usage


def completions_logprobs_agree_with_greedy():
    r = client().completions.create(
        model=MODEL, prompt=CFG["cases"][0]["prompt"], max_tokens=12, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 12 and len(lp.token_logprobs) == 12 and len(lp.top_logprobs) == 12
    assert "".join(lp.tokens) == r.choices[0].text, (lp.tokens, r.choices[0].text)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0.0
        best = max(top, key=top.get)
        assert best == token and abs(top[best] - value) < 1e-6, (token, value, top)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def chat_matches_its_rendered_prompt():
    c = client()
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    rendered = post_json("/chat_tokenize", {"messages": messages})
    ids = [t["id"] for t in rendered["tokenize_response"]]
    assert rendered["templated_text"].startswith("<|im_start|>system"), rendered["templated_text"]
    chat = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    plain = c.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text, (chat, plain)
    assert chat.usage.prompt_tokens == len(ids), (chat.usage, len(ids))
    assert chat.choices[0].finish_reason == "length"
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"


def chat_stream_with_usage_equals_whole():
    c = client()
    messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Once"}]
    whole = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=30, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content, (text, whole.choices[0].message.content)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"], finishes
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 30, last
    assert last.usage.total_tokens == whole.usage.total_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def stop_sequence_is_never_emitted():
    c = client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "A story"}], temperature=0)
    full = c.chat.completions.create(max_tokens=60, **kw).choices[0].message.content
    words = full.split(" ")
    assert len(words) > 6, full
    # A stop string that starts mid-text and spans two words, so it comes across several tokens.
    stop = " ".join(words[3:5])[1:]
    expected = full[: full.index(stop)]
    whole = c.chat.completions.create(max_tokens=60, stop=[stop, "never-seen"], **kw)
    assert whole.choices[0].message.content == expected, (whole.choices[0].message.content, expected)
    assert whole.choices[0].finish_reason == "stop"
    deltas = [
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(max_tokens=60, stop=stop, stream=True, **kw)
        if ch.choices
    ]
    assert "".join(deltas) == expected, (deltas, expected)
    completion = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0)
    text = completion.choices[0].text
    stop = text[12:17]
    cut = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0, stop=stop)
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    # Log-probabilities line up with the text: the stop sequence's tokens are not reported
    # (the last one reported may run into it), whole or streamed.
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0, stop=stop, logprobs=1)
    expected = text[: text.index(stop)]
    lp = c.completions.create(**kw).choices[0].logprobs
    chunks = [ch.choices[0] for ch in c.completions.create(stream=True, **kw) if ch.choices]
    streamed = [t for ch in chunks if ch.logprobs for t in ch.logprobs.tokens]
    for tokens in [lp.tokens, streamed]:
        joined = "".join(tokens)
        assert joined.startswith(expected) and expected.startswith("".join(tokens[:-1])), (tokens, expected)
        assert len(joined) < len(expected) + len(stop), (tokens, expected, stop)


def errors_map_to_client_exceptions():
    c = client()
    try:
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("expected NotFoundError")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
    for kwargs, param in [
        (dict(temperature=5), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(n=100), "n"),
        (dict(response_format={"type": "json_object"}), "response_format"),
        (dict(logit_bias={"5": 10}), "logit_bias"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         "messages[0].content[0].type"),
        (dict(messages=[{"role": "user", "content": "x"},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]),
         "messages[1].tool_calls"),
        (dict(messages=[{"role": "narrator", "content": "x"}]), "messages[0].role"),
    ]:
        args = dict(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        args.update(kwargs)
        try:
            c.chat.completions.create(**args)
            raise AssertionError(f"expected BadRequestError for {kwargs}")
        except openai.BadRequestError as e:
            assert e.body["param"] == param and e.body["type"] == "invalid_request_error", (kwargs, e.body)
            assert param.split("[")[0] in e.body["message"], e.body


def rate_limited_client_gets_rate_limit_error():
    c = client(default_headers={"X-Client-Id": "greedy-script"})
    limit = CFG["client_burst"]
    for i in range(limit):
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=1, temperature=0)
    try:
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=1, temperature=0)
        raise AssertionError("expected RateLimitError")
    except openai.RateLimitError as e:
        assert int(e.response.headers["retry-after"]) >= 1, e.response.headers
        assert e.body["code"] == "rate_limit_exceeded", e.body
    # Another client is not affected.
    other = client(default_headers={"X-Client-Id": "polite-script"})
    other.completions.create(model=MODEL, prompt="Hi", max_tokens=1, temperature=0)


def auth():
    for key in ["wrong-key", "unused"]:
        try:
            client(api_key=key).models.list()
            raise AssertionError("expected AuthenticationError")
        except openai.AuthenticationError as e:
            assert e.body["type"] == "authentication_error", e.body
    r = client(api_key=CFG["api_key"]).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    assert r.usage.completion_tokens == 2


MODES = {
    "main": [
        models,
        completions_greedy_equals_golden,
        completions_n_with_seed,
        completions_logprobs_agree_with_greedy,
        chat_matches_its_rendered_prompt,
        chat_stream_with_usage_equals_whole,
        stop_sequence_is_never_emitted,
        errors_map_to_client_exceptions,
        rate_limited_client_gets_rate_limit_error,
    ],
    "auth": [auth],
}

for fn in MODES[CFG["mode"]]:
    check(fn.__name__, fn)
print(f"{len(MODES[CFG['mode']])} passed, 0 failed")
