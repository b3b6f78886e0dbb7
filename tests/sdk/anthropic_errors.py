"""Calls the gateway with the official Anthropic SDK and prints which
exception class each of the gateway's own errors raised, one per line:
`<case> <exception class> <status> <x-tollgate-error>`."""
import sys

import anthropic

base_url, key = sys.argv[1], sys.argv[2]


def call(client):
    return client.messages.create(
        model="claude-test",
        max_tokens=8,
        messages=[{"role": "user", "content": "hello"}],
    )


def report(case, client):
    try:
        call(client)
        print(case, "ok", 200, "-")
    except anthropic.APIStatusError as error:
        print(
            case,
            type(error).__name__,
            error.status_code,
            error.response.headers.get("x-tollgate-error", "-"),
        )


good = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0)
report("first", good)
report("over_quota", good)
report("bad_key", anthropic.Anthropic(base_url=base_url, api_key="tg_" + "0" * 36, max_retries=0))
report("no_route", anthropic.Anthropic(base_url=base_url + "-nowhere", api_key=key, max_retries=0))
