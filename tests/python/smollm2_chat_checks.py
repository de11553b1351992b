"""SmolLM2-135M-Instruct (GGUF) through the openai client: the chat template and tokenizer
from the file must render and tokenize each golden conversation exactly as transformers did,
and greedy decoding must reply with the golden text up to the first <|im_end|>.

Usage: smollm2_chat_checks.py CONFIG.json  (base_url, model, cases)."""

import json
import sys
import urllib.request

import openai

config = json.load(open(sys.argv[1]))
client = openai.OpenAI(base_url=config["base_url"] + "/v1", api_key="unused", max_retries=0)


def post_json(path, body):
    request = urllib.request.Request(
        config["base_url"] + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        return json.load(response)


for case in config["cases"]:
    messages = case["messages"]
    rendered = post_json("/chat_tokenize", {"model": config["model"], "messages": messages})
    assert rendered["templated_text"] == case["prompt"], (rendered["templated_text"], case["prompt"])
    ids = [t["id"] for t in rendered["tokenize_response"]]
    assert ids == case["input_ids"], (messages, ids, case["input_ids"])
    # The golden reply is the first 32 greedy tokens: stopping at <|im_end|> when it comes
    # before them, else cut at 32.
    ended = case["first_eos_index"] is not None
    chat = client.chat.completions.create(
        model=config["model"], messages=messages, temperature=0, max_tokens=32 if not ended else 64
    )
    choice = chat.choices[0]
    assert choice.message.content == case["reply_text"], (choice.message.content, case["reply_text"])
    assert choice.finish_reason == ("stop" if ended else "length"), choice.finish_reason
    assert chat.usage.prompt_tokens == len(case["input_ids"]), chat.usage
print(f"{len(config['cases'])} conversations: golden prompt ids and replies")
