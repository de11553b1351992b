"""allow-list: a cllm rate limiter written in Python (world `rate-limiter`, cllm:policy@0.2.0).

Requests from the clients named in the config pass; everyone else gets 429 with the config's
reason. The config is the sidecar JSON next to the .wasm file (`NAME.json`), read once:

    {"allow": ["alice", "bob"], "retry_after_ms": 60000, "reason": "not on the allow list"}

| key              | default                   | meaning                                  |
|------------------|---------------------------|------------------------------------------|
| `allow`          | `[]`                      | client ids let through (exact match)     |
| `retry_after_ms` | `60000`                   | sent to refused clients as `Retry-After` |
| `reason`         | `"not on the allow list"` | the refusal's message                    |

Invalid JSON is reported on stderr (cllm logs it) and the defaults apply: everyone is refused.
"""

import json
import sys

from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import Decision_Allow, Decision_Reject, Rejection

DEFAULTS = {"allow": [], "retry_after_ms": 60000, "reason": "not on the allow list"}


def load_config():
    text = host.config()
    config = dict(DEFAULTS)
    if text.strip():
        try:
            config.update(json.loads(text))
        except ValueError as err:
            print(f"invalid config, using the defaults: {err}", file=sys.stderr)
    config["allow"] = frozenset(str(c) for c in config.get("allow", []))
    return config


CONFIG = None


class RateLimit(exports.RateLimit):
    def check(self, request):
        global CONFIG
        if CONFIG is None:
            CONFIG = load_config()
        if request.client_id in CONFIG["allow"]:
            return Decision_Allow()
        return Decision_Reject(
            Rejection(
                retry_after_ms=int(CONFIG["retry_after_ms"]),
                reason=f"{CONFIG['reason']} ({request.client_id})",
            )
        )

    def record_usage(self, usage):
        pass
