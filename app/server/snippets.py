"""Copyable client examples for a running server (shown by `tailor serve` and the desktop app)."""

from __future__ import annotations

import json
import shlex


def python_snippet(url: str, model: str, api_key: str | None = None) -> str:
    return "\n".join([
        "from openai import OpenAI",
        "",
        f'client = OpenAI(base_url="{url}/v1", api_key={json.dumps(api_key or "not-needed")})',
        f'reply = client.chat.completions.create(model={json.dumps(model)},',
        '                                       messages=[{"role": "user", "content": "Hello! Who are you?"}])',
        "print(reply.choices[0].message.content)",
    ])


def curl_snippet(url: str, model: str, api_key: str | None = None) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello! Who are you?"}]})
    parts = [f"curl {url}/v1/chat/completions", "-H 'Content-Type: application/json'"]
    if api_key:
        parts.append(f"-H {shlex.quote('Authorization: Bearer ' + api_key)}")
    parts.append(f"-d {shlex.quote(body)}")
    return " \\\n  ".join(parts)


def one_line_example(url: str, model: str, api_key: str | None = None) -> str:
    return curl_snippet(url, model, api_key).replace(" \\\n  ", " ")
