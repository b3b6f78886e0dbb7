"""Calls the gateway with the official OpenAI SDK (max_retries=2) and prints,
one line per case, what the call came to and every response the SDK got on
the way: `<case> <ok | exception class> attempts=<n> [<status>
<x-tollgate-error> should-retry=<x-should-retry>]...`."""
import sys

import openai

base_url, quota_key, rate_key = sys.argv[1], sys.argv[2], sys.argv[3]
responses = []


def record(response):
    fields = [str(response.status_code)]
    if "x-tollgate-error" in response.headers:
        fields.append(response.headers["x-tollgate-error"])
    if "x-should-retry" in response.headers:
        fields.append("should-retry=" + response.headers["x-should-retry"])
    responses.append("[" + " ".join(fields) + "]")


def client(key):
    # The SDK's own httpx client class, with a hook that sees each response.
    http_client = openai.DefaultHttpxClient(event_hooks={"response": [record]})
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=2, http_client=http_client)


def report(case, client):
    responses.clear()
    try:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hello"}],
        )
        outcome = "ok"
    except openai.APIStatusError as error:
        outcome = type(error).__name__
    print(case, outcome, f"attempts={len(responses)}", *responses)


quota = client(quota_key)
report("first", quota)
report("over_quota", quota)
rate = client(rate_key)
report("rate_first", rate)
report("rate_limited", rate)
