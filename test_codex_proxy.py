"""Tests for codex_proxy.py.

Most behaviour runs against a fake `codex` (a small Python script written into
tmp_path that prints scripted JSONL and acts as an MCP client of the bridge).
The end-to-end tests run the real Codex CLI against a fake Responses upstream
on loopback; they skip when `codex` is not on PATH, except under CI (CI=true),
where a missing CLI fails them.  The benchmarks run with
`python3 test_codex_proxy.py --bench`.
"""

import base64
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import codex_proxy as cp

HERE = os.path.dirname(os.path.abspath(__file__))
PROXY_SCRIPT = os.path.join(HERE, "codex_proxy.py")


# ---------------------------------------------------------------------------
# Helpers: polling, HTTP, processes
# ---------------------------------------------------------------------------

def wait_until(predicate, timeout=10.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:    # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def http_request(base, method, path, body=None, headers=None, timeout=30):
    """-> (status, headers dict lower-cased, raw body bytes)."""
    host, port = base.split("//")[1].split("/")[0].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post_chat(base, body, headers=None, path="/v1/chat/completions", timeout=60):
    status, hdrs, raw = http_request(base, "POST", path, body, headers, timeout)
    return status, hdrs, raw


def sse_events(raw):
    """Parse an SSE body -> list of parsed data payloads ('[DONE]' kept as str)."""
    events = []
    for block in raw.decode().split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                payload = line[6:]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def chat_body(text="hello", **extra):
    return {"model": "xedoc-2.5-tpg", "messages": [{"role": "user", "content": text}],
            **extra}


# ---------------------------------------------------------------------------
# Fake Responses upstream (for the real Codex CLI)
# ---------------------------------------------------------------------------

class FakeUpstream:
    """A loopback Responses API.  `responder(body, index)` returns either a
    list of output items, or ("status", code, body_dict), or ("sleep", s, items)."""

    def __init__(self, responder):
        self.responder = responder
        self.requests = []
        self.lock = threading.Lock()
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                data = b'{"object":"list","data":[]}'
                self.send_response(404)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with upstream.lock:
                    upstream.requests.append({"path": self.path, "body": body})
                    index = len(upstream.requests) - 1
                upstream.serve(self, body, index)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def serve(self, handler, body, index):
        reply = self.responder(body, index)
        if isinstance(reply, tuple) and reply[0] == "status":
            data = json.dumps(reply[2]).encode()
            handler.send_response(reply[1])
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        if isinstance(reply, tuple) and reply[0] == "sleep":
            time.sleep(reply[1])
            reply = reply[2]
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Connection", "close")
        handler.end_headers()
        rid = f"resp_{index}"
        events = [{"type": "response.created", "response": {"id": rid}}]
        for item in reply:
            events.append({"type": "response.output_item.done", "item": item})
        events.append({"type": "response.completed", "response": {
            "id": rid, "usage": {"input_tokens": 100, "input_tokens_details":
                                 {"cached_tokens": 40}, "output_tokens": 20,
                                 "output_tokens_details": {"reasoning_tokens": 5},
                                 "total_tokens": 120}}})
        try:
            for event in events:
                handler.wfile.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
                handler.wfile.flush()
        except OSError:
            pass
        handler.close_connection = True

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def message_item(text):
    return {"type": "message", "role": "assistant", "id": "msg_1",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def reasoning_item(text):
    return {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": text}]}


def function_call_item(name, arguments, call_id, namespace="mcp__client"):
    item = {"type": "function_call", "id": "fc_" + call_id, "call_id": call_id,
            "name": name, "arguments": json.dumps(arguments)}
    if namespace:
        item["namespace"] = namespace
    return item
