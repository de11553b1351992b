"""Checks cllm's TGI API with Hugging Face's own client, unmodified:
`InferenceClient(base_url=...).text_generation(...)`, which posts to TGI's compat route `POST /`.
Run by tests/clients.rs: `python tgi_checks.py CONFIG.json`.
"""
import json
import sys

from huggingface_hub import InferenceClient

CFG = json.load(open(sys.argv[1]))
client = InferenceClient(base_url=CFG["base_url"])
checks = 0

for case in CFG["cases"]:
    n = len(case["output_ids"])
    # The client leaves `return_full_text` to the server, and TGI's compat route (which the
    # client posts to) returns the prompt too for a text-generation model.
    full = case["prompt"] + case["text"]
    text = client.text_generation(case["prompt"], max_new_tokens=n)
    assert text == full, (case["prompt"], text, full)
    text = client.text_generation(case["prompt"], max_new_tokens=n, return_full_text=False)
    assert text == case["text"], (case["prompt"], text, case["text"])

    out = client.text_generation(case["prompt"], max_new_tokens=n, details=True)
    assert [t.id for t in out.details.tokens] == case["output_ids"], out.details.tokens
    assert out.generated_text == full
    assert out.details.finish_reason == "length" and out.details.generated_tokens == n
    assert all(t.logprob is not None and t.logprob <= 0 for t in out.details.tokens)

    pieces = list(client.text_generation(case["prompt"], max_new_tokens=n, stream=True))
    assert "".join(pieces) == case["text"], pieces

    events = list(client.text_generation(case["prompt"], max_new_tokens=n, stream=True, details=True))
    assert [e.token.id for e in events] == case["output_ids"]
    assert events[-1].generated_text == full and events[-1].details.finish_reason == "length"
    checks += 5

out = client.text_generation(
    CFG["cases"][0]["prompt"], max_new_tokens=4, details=True, decoder_input_details=True, top_n_tokens=3
)
assert [t.id for t in out.details.prefill] == CFG["cases"][0]["input_ids"], out.details.prefill
assert out.details.prefill[0].logprob is None and all(t.logprob <= 0 for t in out.details.prefill[1:])
assert len(out.details.top_tokens) == 4 and all(len(top) == 3 for top in out.details.top_tokens)
for token, top in zip(out.details.tokens, out.details.top_tokens):
    # The client leaves the nested lists as plain dicts.
    assert top[0]["id"] == token.id and top[0]["logprob"] == token.logprob, (token, top)
checks += 1
print(f"{checks} passed, 0 failed")
