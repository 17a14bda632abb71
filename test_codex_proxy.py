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
import types
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
    return http_request(base, "POST", path, body, headers, timeout)


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
        self.stopping = threading.Event()      # ends a "sleep" reply early at close()
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
            if self.stopping.wait(reply[1]):
                return
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
        self.stopping.set()
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


# ---------------------------------------------------------------------------
# Fake codex
# ---------------------------------------------------------------------------

FAKE_CODEX = r'''
import json, os, signal, subprocess, sys, threading, time, tomllib

STATE = os.environ["FAKE_CODEX_DIR"]
args = sys.argv[1:]
if args[:1] == ["--version"]:
    version_file = os.path.join(STATE, "version")
    print(open(version_file).read() if os.path.exists(version_file) else "codex-cli 0.0.0-fake")
    sys.exit(0)
if args[:2] == ["login", "status"]:
    if os.path.exists(os.path.join(STATE, "logged_out")):
        print("Not logged in", file=sys.stderr)
        sys.exit(1)
    print("Logged in using ChatGPT")
    sys.exit(0)
if args[:2] == ["debug", "models"]:
    print(json.dumps({"models": [
        {"slug": "gpt-5.5", "visibility": "list", "supports_search_tool": True,
         "apply_patch_tool_type": "freeform"},
        {"slug": "secret-model", "visibility": "hide"}]}))
    sys.exit(0)
assert args[0] == "exec", args

conf, model, images, i = {}, None, [], 1
while i < len(args):
    a = args[i]
    if a == "-c":
        key, _, value = args[i + 1].partition("=")
        conf[key] = value
        i += 2
    elif a.startswith("--model="):
        model = a.split("=", 1)[1]
        i += 1
    elif a in ("-i", "-s", "-C", "--disable"):
        if a == "-i":
            images.append(args[i + 1])
        i += 2
    else:
        i += 1

def toml(value):
    return tomllib.loads("v = " + value)["v"]

prompt = sys.stdin.read()
record = {"argv": args, "conf": conf, "prompt": prompt, "model": model,
          "pid": os.getpid(), "cwd": os.getcwd(), "cwd_files": os.listdir(os.getcwd()),
          "instructions": open(toml(conf["model_instructions_file"])).read(),
          "images": [open(p, "rb").read().hex() for p in images],
          "image_paths": images, "tools": None, "results": [], "ended": False}

def save():
    path = os.path.join(STATE, "records", f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)

out_lock = threading.Lock()
def emit(event):
    with out_lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

class Mcp:
    def __init__(self, command, argv):
        self.proc = subprocess.Popen([command] + argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self.lock, self.waiting, self.next_id = threading.Lock(), {}, 0
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.lock:
                slot = self.waiting.pop(msg.get("id"), None)
            if slot:
                slot.append(msg)
                slot[0].set()

    def request(self, method, params):
        with self.lock:
            self.next_id += 1
            msg_id, slot = self.next_id, [threading.Event()]
            self.waiting[msg_id] = slot
        self.proc.stdin.write((json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": method,
                                          "params": params}) + "\n").encode())
        self.proc.stdin.flush()
        slot[0].wait()
        return slot[1]

mcp = None
if "mcp_servers.client.command" in conf:
    mcp = Mcp(toml(conf["mcp_servers.client.command"]), toml(conf["mcp_servers.client.args"]))
    mcp.request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {}})
    mcp.proc.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
    mcp.proc.stdin.flush()
    record["tools"] = mcp.request("tools/list", {})["result"]["tools"]
    record["bridge_pid"] = mcp.proc.pid
save()

def fill(text):
    results = [r["text"] for r in record["results"]]
    return text.format(prompt=prompt, results=" | ".join(results), model=model)

def call_tools(calls):
    answers = [None] * len(calls)
    def one(n, call):
        params = {"name": call["name"], "arguments": call.get("arguments", {})}
        if call.get("id"):
            params["_meta"] = {"callId": call["id"]}
        emit({"type": "item.started", "item": {"id": f"item_c{n}", "type": "mcp_tool_call",
              "server": "client", "tool": call["name"], "arguments": params["arguments"],
              "status": "in_progress"}})
        answers[n] = mcp.request("tools/call", params)["result"]
    threads = [threading.Thread(target=one, args=(n, c)) for n, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, answer in enumerate(answers):
        record["results"].append({"name": calls[n]["name"], "text": answer["content"][0]["text"],
                                  "is_error": answer.get("isError", False)})
    save()

steps = [{"thread": True}, {"text": "fake answer"}, {"complete": {}}]
path = os.path.join(STATE, "scenario.json")
if os.path.exists(path):
    for rule in json.load(open(path)):
        if rule.get("when") is None or rule["when"] in prompt:
            steps = rule["steps"]
            break

usage = {"input_tokens": 11, "cached_input_tokens": 3, "output_tokens": 7,
         "reasoning_output_tokens": 2}
item = 0
for step in steps:
    kind, value = next(iter(step.items()))
    if kind == "thread":
        emit({"type": "thread.started", "thread_id": "thread-fake"})
        emit({"type": "turn.started"})
    elif kind in ("text", "reasoning"):
        item += 1
        emit({"type": "item.completed", "item": {"id": f"item_{item}",
              "type": "agent_message" if kind == "text" else "reasoning", "text": fill(value)}})
    elif kind == "warning":
        emit({"type": "error", "message": value})
    elif kind == "item_error":
        emit({"type": "item.completed", "item": {"id": "item_e", "type": "error", "message": value}})
    elif kind == "complete":
        emit({"type": "turn.completed", "usage": dict(usage, **value)})
    elif kind == "fail":
        emit({"type": "turn.failed", "error": {"message": value}})
    elif kind == "plain":
        print(value, flush=True)
    elif kind == "stderr":
        print(value, file=sys.stderr, flush=True)
    elif kind == "sleep":
        time.sleep(value)
    elif kind == "wait_file":
        deadline = time.time() + 30
        while not os.path.exists(os.path.join(STATE, value)) and time.time() < deadline:
            time.sleep(0.01)
    elif kind == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif kind == "calls":
        call_tools(value)
    elif kind == "exit":
        sys.exit(value)
record["ended"] = True
save()
'''


class FakeCodex:
    """The fake codex's folder: its scenario in, its records out."""

    def __init__(self, folder):
        self.dir = folder
        (folder / "records").mkdir(parents=True)
        self.script = folder / "codex"
        self.script.write_text(f"#!{sys.executable}\n{FAKE_CODEX}")
        self.script.chmod(0o755)

    def scenario(self, *rules):
        """Each rule: steps, or (prompt substring, steps); first match wins."""
        data = [{"when": r[0], "steps": r[1]} if isinstance(r, tuple) else
                {"when": None, "steps": r} for r in rules]
        (self.dir / "scenario.json").write_text(json.dumps(data))

    def records(self):
        out = []
        for path in sorted((self.dir / "records").glob("*.json"), key=os.path.getmtime):
            try:
                out.append(json.loads(path.read_text()))
            except ValueError:
                pass
        return out

    def wait_records(self, n, timeout=10):
        assert wait_until(lambda: len(self.records()) >= n, timeout), self.records()
        return self.records()

    def set_logged_out(self, value=True):
        flag = self.dir / "logged_out"
        if value:
            flag.write_text("")
        elif flag.exists():
            flag.unlink()


class Proxy:
    def __init__(self, server, thread):
        self.server = server
        self.thread = thread
        self.base = f"http://127.0.0.1:{server.server_address[1]}"

    def events(self, type=None):
        return [e for e in self.server.logs.since(0) if type is None or e["type"] == type]

    def wait_event(self, type, count=1, timeout=10):
        assert wait_until(lambda: len(self.events(type)) >= count, timeout), self.events()
        return self.events(type)

    def stop(self):
        self.server.shutdown()
        self.server.close()
        self.thread.join(10)


def assert_no_thread_outlives(threads_before):
    assert wait_until(lambda: set(threading.enumerate()) <= threads_before, 10), \
        [t.name for t in set(threading.enumerate()) - threads_before]


def spawn_proxy_process(codex_bin, home, **env):
    """`python3 codex_proxy.py` on a free loopback port, as a user runs it;
    its banner comes on the returned process's stdout."""
    env = dict(os.environ, CODEX_HOME=str(home), CODEX_PROXY_STATE_DIR=str(home / "state"),
               CODEX_PROXY_QUIET="1", **env)
    return subprocess.Popen([sys.executable, PROXY_SCRIPT, "--addr", "127.0.0.1:0",
                             "--codex-bin", str(codex_bin)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def start_proxy(config, extra_env=None):
    server = cp.ProxyServer(config, log_stream=None)
    server.env.update(extra_env or {})
    server.start_background()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="test-proxy", daemon=True)
    thread.start()
    return Proxy(server, thread)


@pytest.fixture
def fake_codex(tmp_path):
    return FakeCodex(tmp_path / "fake")


@pytest.fixture
def run_tmp(tmp_path, monkeypatch):
    """Temp files of the proxy's runs land here; none may be left behind."""
    folder = tmp_path / "runs"
    folder.mkdir()
    monkeypatch.setattr(cp.tempfile, "tempdir", str(folder))
    yield folder
    assert wait_until(lambda: not os.listdir(folder), 10), os.listdir(folder)


@pytest.fixture
def make_proxy(tmp_path, fake_codex, run_tmp):
    """Start proxies on port 0 against the fake codex; stop them and check
    that no thread, fake codex process (or its bridge) outlives the test."""
    threads_before = set(threading.enumerate())
    proxies = []
    home = tmp_path / "home"
    home.mkdir()

    def make(**overrides):
        fields = dict(port=0, codex_bin=str(fake_codex.script), codex_home=str(home),
                      state_dir=str(tmp_path / "state"), quiet=True, tool_quiet=0.1,
                      logs_html=os.path.join(HERE, "logs.html"))
        fields.update(overrides)
        proxy = start_proxy(cp.Config(**fields), {"FAKE_CODEX_DIR": str(fake_codex.dir)})
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()
    pids = [r[k] for r in fake_codex.records() for k in ("pid", "bridge_pid") if r.get(k)]
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 10), \
        [p for p in pids if pid_alive(p)]
    assert_no_thread_outlives(threads_before)


@pytest.fixture
def proxy(make_proxy):
    return make_proxy()


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, aliases, expected", [
    ("xedoc-2.5-tpg", {}, ("gpt-5.2-codex", None)),
    ("5.5-tpg", {}, ("gpt-5.5", None)),
    ("hgih-5.5-tpg", {}, ("gpt-5.5", "high")),       # reversed, then the suffix
    ("gpt-5.5-xhigh", {}, ("gpt-5.5", "xhigh")),
    ("o3", {}, ("o3", None)),
    ("my-model", {"my-model": "gpt-5.4-low"}, ("gpt-5.4", "low")),
    ("xedoc-2.5-tpg", {"xedoc-2.5-tpg": "other"}, ("other", None)),   # alias wins
    (None, {}, (None, None)),
    ("gpt-5-turbo", {}, ("gpt-5-turbo", None)),
])
def test_resolve_model(name, aliases, expected):
    assert cp.resolve_model(name, aliases) == expected


def test_render_prompt_lone_user_message_is_verbatim():
    msgs = [cp.Message("system", "be brief"), cp.Message("user", "hi <there>")]
    assert cp.render_prompt(msgs) == "hi <there>"


def test_render_prompt_transcript_carries_roles_calls_and_results():
    req = cp.parse_chat_request({"messages": [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "read a.py"},
        {"role": "assistant", "content": [], "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "read_file", "arguments": "{\"path\": \"a.py\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "print(1)"}]},
    ]})
    prompt = cp.render_prompt(req.messages)
    assert "SYS" not in prompt
    assert '<message role="user">\nread a.py\n</message>' in prompt
    assert '<tool_call id="call_1" name="read_file">{"path": "a.py"}</tool_call>' in prompt
    assert '<tool_result id="call_1" name="read_file">\nprint(1)\n</tool_result>' in prompt
    assert prompt.index("read a.py") < prompt.index("tool_call") < prompt.index("print(1)")


def test_instructions_hold_preamble_then_client_text_verbatim():
    msgs = [cp.Message("system", "  Rule one.\n"), cp.Message("user", "x"),
            cp.Message("system", "Rule two.")]
    text = cp.render_instructions(msgs, [], "auto")
    assert text.startswith(cp.INSTRUCTIONS_PREAMBLE)
    assert "  Rule one.\n" in text and text.index("Rule one") < text.index("Rule two")


@pytest.mark.parametrize("choice, expected", [
    ("auto", ""), ("none", ""), ("required", "must call at least one"),
    ({"type": "function", "function": {"name": "read_file"}}, "`read_file`"),
])
def test_tool_choice_instruction(choice, expected):
    tools = [cp.ToolSpec("read_file")]
    text = cp.tool_choice_instruction(choice, tools)
    assert (expected in text) if expected else text == ""


def test_normalize_tools_accepts_chat_flat_and_custom_forms():
    specs = cp.normalize_tools([
        {"type": "function", "function": {"name": "a", "description": "A",
                                          "parameters": {"type": "object", "properties": {"x": {}}}}},
        {"type": "function", "name": "b", "parameters": {"type": "object"}},
        {"type": "custom", "name": "ApplyPatch", "description": "patch",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: x"}},
        {"type": "web_search"},
    ])
    assert [(s.name, s.custom) for s in specs] == [("a", False), ("b", False), ("ApplyPatch", True)]
    assert specs[2].parameters["required"] == ["input"]
    assert "start: x" in specs[2].description


def test_translate_codex_event_table():
    t = cp.translate_codex_event
    assert t({"type": "thread.started", "thread_id": "T"}) == [("thread", "T")]
    assert t({"type": "item.completed", "item": {"id": "i", "type": "agent_message",
                                                  "text": "hi"}}) == [("text", ("i", "hi"))]
    assert t({"type": "item.updated", "item": {"type": "agent_message", "text": "h"}}) == []
    assert t({"type": "error", "message": "Reconnecting... 1/5"}) == [("warning", "Reconnecting... 1/5")]
    assert t({"type": "turn.failed", "error": {"message": "boom"}}) == [("failed", "boom")]
    assert t({"type": "item.completed", "item": {"type": "command_execution"}}) == \
        [("unexpected", "command_execution")]


def test_openai_usage_maps_every_field():
    assert cp.openai_usage({"input_tokens": 10, "cached_input_tokens": 4, "output_tokens": 6,
                            "reasoning_output_tokens": 2}) == {
        "prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 2}}


@pytest.mark.parametrize("message, status, code, retry", [
    ("You've hit your usage limit. Try again in 2 hours 5 minutes.", 429, "usage_limit_reached", "7500"),
    ("You've hit your usage limit. Upgrade to Pro.", 429, "usage_limit_reached", None),
    ("unexpected status 401 Unauthorized: token expired", 401, "codex_unauthorized", None),
    ("Your input exceeds the context window of this model.", 400, "context_length_exceeded", None),
    ("stream disconnected before completion", 502, "codex_error", None),
])
def test_classify_failure(message, status, code, retry):
    err = cp.classify_failure(message)
    assert (err.status, err.code, err.headers.get("Retry-After")) == (status, code, retry)


@pytest.mark.parametrize("message, seconds", [
    ("try again in 1 day, 2 hours and 3 minutes", 86400 + 7200 + 180),
    ("or try again at 2:36 AM.", 3600 + 36 * 60),             # now is 01:00
    ("or try again at 12:30 AM.", 23 * 3600 + 30 * 60),       # tomorrow
    ("or try again at Nov 27th, 2026 1:34 PM.", 2 * 86400 + 12 * 3600 + 34 * 60),
    ("or try again later.", None),
])
def test_retry_after_reads_codex_reset_times(message, seconds):
    now = cp.datetime.datetime(2026, 11, 25, 1, 0)
    assert cp.retry_after_seconds(message, now) == seconds


@pytest.mark.parametrize("shim_dir, modules_dir", [
    ("npm", "npm/node_modules"),                      # npm install -g
    ("proj/node_modules/.bin", "proj/node_modules"),  # a local install
])
def test_windows_codex_shim_runs_its_node_script(tmp_path, shim_dir, modules_dir):
    shim = tmp_path / shim_dir / "codex.cmd"
    shim.parent.mkdir(parents=True)
    shim.write_text("@node codex.js %*")
    shim.chmod(0o755)
    assert cp.resolve_codex(str(shim), windows=True) == [str(shim)]    # no script found
    script = tmp_path / modules_dir / "@openai" / "codex" / "bin" / "codex.js"
    script.parent.mkdir(parents=True)
    script.write_text("")
    node = tmp_path / shim_dir / "node.exe"
    node.write_text("")
    argv = cp.resolve_codex(str(shim), windows=True)
    assert argv[1] == str(script) and argv[0] in (shutil.which("node"), str(node))
    assert cp.resolve_codex(str(shim), windows=False) == [str(shim)]


def test_toml_value_round_trips_through_tomllib():
    value = {"a b": [1, 2.5, True], "path": "C:\\dir\\\"q\"", "nested": {"x": "y"},
             "text": "caf\u00e9 \U0001f600 tab\there\nnew \x7f \x00"}
    assert cp.tomllib.loads("v = " + cp.toml_value(value))["v"] == value


# ---------------------------------------------------------------------------
# Chat completions against the fake codex
# ---------------------------------------------------------------------------

def test_stream_follows_every_chunk_rule(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"reasoning": "thinking"}, {"text": "Hello"},
                         {"text": "World"}, {"complete": {}}])
    status, hdrs, raw = post_chat(proxy.base, chat_body(
        stream=True, stream_options={"include_usage": True}))
    assert status == 200
    assert hdrs["content-type"] == "text/event-stream"
    assert hdrs["cache-control"] == "no-cache"
    assert hdrs["transfer-encoding"] == "chunked"
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["model"] == "xedoc-2.5-tpg" and c["object"] == "chat.completion.chunk"
               for c in chunks)
    finishes = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1 and finishes[0]["choices"][0]["finish_reason"] == "stop"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == "Hello\n\nWorld"
    reasoning = [c["choices"][0]["delta"]["reasoning_content"] for c in chunks
                 if c["choices"] and "reasoning_content" in c["choices"][0]["delta"]]
    assert reasoning == ["thinking"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 18
    assert proxy.events("reasoning_detected")[0]["summary_chars"] == 8


def test_non_stream_answer_has_message_finish_reason_and_usage(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"reasoning": "hmm"}, {"text": "Hi there"},
                         {"complete": {}}])
    status, _, raw = post_chat(proxy.base, chat_body())
    body = json.loads(raw)
    assert status == 200 and body["object"] == "chat.completion"
    assert body["model"] == "xedoc-2.5-tpg"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hi there",
                                 "reasoning_content": "hmm"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                             "prompt_tokens_details": {"cached_tokens": 3},
                             "completion_tokens_details": {"reasoning_tokens": 2}}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_both_route_forms_answer_and_model_is_resolved(proxy, fake_codex, path):
    status, _, raw = post_chat(proxy.base, chat_body(), path=path)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "fake answer"
    record = fake_codex.wait_records(1)[0]
    assert record["model"] == "gpt-5.2-codex"


def test_codex_runs_as_a_pure_forwarder(proxy, fake_codex, run_tmp):
    post_chat(proxy.base, {"messages": [{"role": "system", "content": "SYSTEM RULES"},
                                        {"role": "developer", "content": "DEV RULES"},
                                        {"role": "user", "content": "hello"}]})
    record = fake_codex.wait_records(1)[0]
    argv = record["argv"]
    for flag in ("--json", "--skip-git-repo-check", "--ephemeral", "--ignore-user-config"):
        assert flag in argv
    assert argv[argv.index("-s") + 1] == "read-only"
    disabled = {argv[i + 1] for i, a in enumerate(argv) if a == "--disable"}
    assert disabled >= {"shell_tool", "view_image", "goals", "apps", "plugins"}
    assert record["conf"]["web_search"] == '"disabled"'
    assert record["conf"]["include_environment_context"] == "false"
    assert record["conf"]["project_doc_max_bytes"] == "0"
    assert argv[-1] == "-" and record["prompt"] == "hello"
    assert record["instructions"].startswith(cp.INSTRUCTIONS_PREAMBLE)
    assert "SYSTEM RULES\n\nDEV RULES" in record["instructions"]
    assert record["cwd_files"] == [] and record["cwd"].startswith(str(run_tmp))
    assert not any(a.startswith(("-m", "--model")) for a in argv)   # Codex's default model


def test_config_toml_keys_are_forwarded_and_nothing_else(make_proxy, fake_codex, tmp_path):
    (tmp_path / "home" / "config.toml").write_text(
        'model = "gpt-5.4"\nmodel_reasoning_summary = "detailed"\nservice_tier = "fast"\n'
        '[mcp_servers.evil]\ncommand = "rm"\n')
    proxy = make_proxy(codex_config=['model_verbosity="high"'])
    post_chat(proxy.base, {"messages": [{"role": "user", "content": "x"}]})
    record = fake_codex.wait_records(1)[0]
    assert record["model"] == "gpt-5.4"
    assert record["conf"]["model_reasoning_summary"] == '"detailed"'
    assert record["conf"]["service_tier"] == '"fast"'
    assert record["conf"]["model_verbosity"] == '"high"'
    assert not any("evil" in a for a in record["argv"])
    models = json.loads(http_request(proxy.base, "GET", "/v1/models")[2])["data"]
    assert {"gpt-5.4", "4.5-tpg", "gpt-5.5", "5.5-tpg"} <= {m["id"] for m in models}
    assert "secret-model" not in {m["id"] for m in models}


@pytest.mark.parametrize("model, body_extra, effort", [
    ("hgih-2.5-tpg", {}, "high"),
    ("xedoc-2.5-tpg", {"reasoning_effort": "low"}, "low"),
    ("gpt-5.2-minimal", {"reasoning_effort": "xhigh"}, "xhigh"),
])
def test_reasoning_effort_reaches_codex(proxy, fake_codex, model, body_extra, effort):
    post_chat(proxy.base, dict(chat_body(model=model), **body_extra, model=model))
    record = fake_codex.wait_records(1)[0]
    assert record["conf"]["model_reasoning_effort"] == f'"{effort}"'


def test_models_health_and_cors(make_proxy):
    proxy = make_proxy(aliases={"fast": "gpt-5.4-low"})
    for path in ("/v1/models", "/models"):
        status, hdrs, raw = http_request(proxy.base, "GET", path)
        body = json.loads(raw)
        assert status == 200 and body["object"] == "list"
        assert hdrs["access-control-allow-origin"] == "*"
        ids = [m["id"] for m in body["data"]]
        assert {"fast", "tsaf", "gpt-5.5", "5.5-tpg"} <= set(ids)
        assert all(m["object"] == "model" for m in body["data"])
    status, _, raw = http_request(proxy.base, "GET", "/v1/health")
    assert status == 200 and json.loads(raw)["status"] == "ok"
    assert json.loads(raw)["codex_version"] == "codex-cli 0.0.0-fake"
    assert json.loads(raw)["logged_in"] is True
    status, hdrs, _ = http_request(proxy.base, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://x", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert status == 204
    assert hdrs["access-control-allow-origin"] == "*"
    assert hdrs["access-control-allow-methods"] == "POST"
    assert hdrs["access-control-allow-headers"] == "authorization,content-type"


def test_shutdown_closes_kept_alive_connections(make_proxy):
    proxy = make_proxy()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.server.server_address[1], timeout=10)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().read() and conn.sock is not None     # kept alive
        proxy.stop()
        assert conn.sock.recv(1) == b""          # closed by the proxy, not left idling
    finally:
        conn.close()


def test_an_idle_kept_alive_connection_is_closed_after_a_while(make_proxy, monkeypatch):
    monkeypatch.setattr(cp.ProxyHandler, "timeout", 0.3)
    proxy = make_proxy()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.server.server_address[1], timeout=10)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().read()
        assert conn.sock.recv(1) == b""          # within the 10 s socket timeout
    finally:
        conn.close()


def test_a_request_on_a_connection_that_outlived_the_server_gets_503(make_proxy):
    proxy = make_proxy()
    proxy.server.stopping.set()                 # the moment between stop and close
    status, hdrs, raw = http_request(proxy.base, "GET", "/health")
    assert status == 503 and hdrs["connection"] == "close"
    assert json.loads(raw)["error"]["code"] == "shutting_down"


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ([1, 2], 400, None),
    ({"messages": []}, 400, "messages"),
    ({"model": "x"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, None),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url":
        {"url": "https://example.com/a.png"}}]}]}, 400, None),
])
def test_bad_requests_get_openai_errors_and_server_keeps_serving(proxy, body, status, param):
    got, hdrs, raw = post_chat(proxy.base, body)
    error = json.loads(raw)["error"]
    assert got == status and error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param
    assert hdrs["access-control-allow-origin"] == "*"
    assert post_chat(proxy.base, chat_body())[0] == 200


@pytest.mark.parametrize("model", ["--dangerously-bypass-approvals-and-sandbox", "a b", "x\n", ""])
def test_model_names_that_could_read_as_flags_are_refused(proxy, fake_codex, model):
    status, _, raw = post_chat(proxy.base, chat_body(model=model))
    if model == "":
        assert status == 200        # an empty name means Codex's default
        return
    assert status == 400 and json.loads(raw)["error"]["param"] == "model"
    assert fake_codex.records() == []


def test_model_reaches_codex_as_one_token(proxy, fake_codex):
    post_chat(proxy.base, chat_body(model="xedoc-2.5-tpg"))
    assert "--model=gpt-5.2-codex" in fake_codex.wait_records(1)[0]["argv"]


def test_http_servers_own_errors_are_json(proxy):
    status, _, raw = http_request(proxy.base, "PROPFIND", "/v1/models")
    assert status == 501 and json.loads(raw)["error"]["message"]


def test_a_new_codex_version_gets_its_own_catalog(proxy, fake_codex, tmp_path):
    assert (tmp_path / "state" / "model-catalog-codex-cli-0.0.0-fake.json").exists()
    (fake_codex.dir / "version").write_text("codex-cli 9.9.9")
    proxy.server.codex._checked_at -= cp.LOGIN_CACHE_SECONDS + 1
    post_chat(proxy.base, chat_body())
    catalog = tmp_path / "state" / "model-catalog-codex-cli-9.9.9.json"
    assert wait_until(catalog.exists, 10)
    models = json.loads(catalog.read_text())["models"]
    assert all(m["supports_search_tool"] is False and m["apply_patch_tool_type"] is None
               for m in models)


def test_remote_image_error_says_why(proxy):
    _, _, raw = post_chat(proxy.base, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]})
    assert "data:" in json.loads(raw)["error"]["message"]


def test_unknown_fields_are_ignored(proxy):
    status, _, _ = post_chat(proxy.base, chat_body(
        temperature=0.2, max_tokens=5, user="u", metadata={"a": "b"}, top_p=1,
        stream_options={"include_usage": False}, presence_penalty=0, seed=1))
    assert status == 200


def test_unknown_path_404_and_wrong_method_405(proxy):
    status, _, raw = http_request(proxy.base, "GET", "/v1/nothing")
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"
    status, hdrs, raw = http_request(proxy.base, "GET", "/v1/chat/completions")
    assert status == 405 and json.loads(raw)["error"]["message"] and hdrs["allow"] == "POST"
    status, _, _ = http_request(proxy.base, "DELETE", "/models")
    assert status == 405


def test_body_over_max_body_gets_413(make_proxy):
    proxy = make_proxy(max_body=1000)
    status, _, raw = post_chat(proxy.base, chat_body("x" * 2000))
    assert status == 413 and json.loads(raw)["error"]["code"] == "request_too_large"
    assert post_chat(proxy.base, chat_body("small"))[0] == 200


def test_data_url_images_are_passed_with_i_and_removed(proxy, fake_codex, run_tmp):
    png = b"\x89PNG\r\n\x1a\nfake-image"
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    status, _, _ = post_chat(proxy.base, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    assert status == 200
    record = fake_codex.wait_records(1)[0]
    assert record["images"] == [png.hex()] and record["image_paths"][0].endswith(".png")
    assert "what is this" in record["prompt"] and "[image #1]" in record["prompt"]


def test_legacy_function_role_and_null_content_are_accepted(proxy, fake_codex):
    status, _, _ = post_chat(proxy.base, {"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "f", "content": "RESULT-F"}]})
    assert status == 200
    assert "RESULT-F" in fake_codex.wait_records(1)[0]["prompt"]


def test_think_mode_puts_reasoning_in_content_and_strips_it_from_history(make_proxy, fake_codex):
    proxy = make_proxy(reasoning="think")
    fake_codex.scenario([{"thread": True}, {"reasoning": "R1"}, {"text": "A1"}, {"complete": {}}])
    _, _, raw = post_chat(proxy.base, chat_body(stream=True))
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in sse_events(raw)[:-1]
                      if c["choices"])
    assert content == "<think>\nR1\n</think>\n\nA1"
    assert "reasoning_content" not in raw.decode()
    post_chat(proxy.base, {"messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": content},
                                        {"role": "user", "content": "q2"}]})
    prompt = fake_codex.wait_records(2)[-1]["prompt"]
    assert "R1" not in prompt and "A1" in prompt


def test_reasoning_none_hides_the_summary(make_proxy, fake_codex):
    proxy = make_proxy(reasoning="none")
    fake_codex.scenario([{"thread": True}, {"reasoning": "SECRET-R"}, {"text": "A"}, {"complete": {}}])
    for stream in (True, False):
        _, _, raw = post_chat(proxy.base, chat_body(stream=stream))
        assert b"SECRET-R" not in raw and b"reasoning_content" not in raw


def test_warnings_are_logged_not_shown(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"warning": "Reconnecting... 1/5"},
                         {"item_error": "Model metadata for `x` not found"},
                         {"text": "ok"}, {"complete": {}}])
    _, _, raw = post_chat(proxy.base, chat_body(stream=True))
    assert b"Reconnecting" not in raw and b"metadata" not in raw
    assert {e["message"] for e in proxy.events("codex_warning")} == {
        "Reconnecting... 1/5", "Model metadata for `x` not found"}


def open_raw_stream(proxy, body):
    """POST a streaming request on a raw socket; return the socket."""
    sock = socket.create_connection(("127.0.0.1", int(proxy.base.rsplit(":", 1)[1])), timeout=20)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def recv_until(sock, marker, limit=10.0):
    seen, deadline = b"", time.monotonic() + limit
    while marker not in seen and time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        seen += data
    return seen


def test_first_chunk_leaves_before_codex_says_anything(proxy, fake_codex):
    fake_codex.scenario([{"wait_file": "go"}, {"thread": True}, {"text": "late"}, {"complete": {}}])
    sock = open_raw_stream(proxy, chat_body(stream=True))
    first = recv_until(sock, b'"role":"assistant"')
    assert b'"role":"assistant"' in first and b"late" not in first   # Codex waits for "go"
    (fake_codex.dir / "go").write_text("")
    rest = recv_until(sock, b"0\r\n\r\n")
    sock.close()
    assert b"late" in rest and b"[DONE]" in rest


def test_keepalive_comments_while_codex_is_silent(make_proxy, fake_codex):
    proxy = make_proxy(keepalive=0.1)
    fake_codex.scenario([{"thread": True}, {"sleep": 0.6}, {"text": "done"}, {"complete": {}}])
    _, _, raw = post_chat(proxy.base, chat_body(stream=True))
    assert raw.count(b": keepalive\n\n") >= 2
    assert sse_events(raw)[-1] == "[DONE]"


@pytest.mark.parametrize("steps, status, code", [
    ([{"thread": True}, {"fail": "You've hit your usage limit. Try again in 5 minutes."}],
     429, "usage_limit_reached"),
    ([{"thread": True}, {"fail": "unexpected status 401 Unauthorized"}], 401, "codex_unauthorized"),
    ([{"thread": True}, {"fail": "exceeds the context window"}], 400, "context_length_exceeded"),
    ([{"thread": True}, {"fail": "upstream exploded"}], 502, "codex_error"),
    ([{"thread": True}, {"text": "partial"}, {"exit": 1}], 502, "codex_error"),
    ([{"plain": "Error loading config: bad key"}, {"exit": 1}], 502, "codex_error"),
])
def test_failed_turns_map_to_statuses(proxy, fake_codex, steps, status, code):
    fake_codex.scenario(steps)
    got, hdrs, raw = post_chat(proxy.base, chat_body())
    assert got == status and json.loads(raw)["error"]["code"] == code
    if status == 429:
        assert hdrs["retry-after"] == "300"
    if steps[0].get("plain"):
        assert "bad key" in json.loads(raw)["error"]["message"]
    assert proxy.events("stream_codex_error")


def test_streamed_failure_is_one_error_event_then_done(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"fail": "You've hit your usage limit."}])
    status, _, raw = post_chat(proxy.base, chat_body(stream=True))
    events = sse_events(raw)
    assert status == 200 and events[-1] == "[DONE]"
    errors = [e for e in events[:-1] if "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "usage_limit_reached"
    assert not any(e.get("choices") and e["choices"][0]["finish_reason"] for e in events[:-1]
                   if isinstance(e, dict))


def test_idle_and_request_timeouts_end_the_run(make_proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"sleep": 30}])
    proxy = make_proxy(idle_timeout=0.5)
    status, _, raw = post_chat(proxy.base, chat_body())
    assert status == 504 and json.loads(raw)["error"]["code"] == "codex_idle_timeout"
    proxy = make_proxy(request_timeout=0.5, keepalive=0.1)
    status, _, raw = post_chat(proxy.base, chat_body(stream=True))
    errors = [e for e in sse_events(raw)[:-1] if "error" in e]
    assert errors[0]["error"]["code"] == "codex_request_timeout"
    pids = [r["pid"] for r in fake_codex.wait_records(2)]
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 5)


def test_codex_not_found_gives_503_with_install_hint(make_proxy, tmp_path):
    proxy = make_proxy(codex_bin=str(tmp_path / "no-such-codex"))
    status, _, raw = post_chat(proxy.base, chat_body())
    error = json.loads(raw)["error"]
    assert status == 503 and error["code"] == "codex_not_found"
    assert "npm install" in error["message"]
    assert json.loads(http_request(proxy.base, "GET", "/health")[2])["codex_version"] is None


def test_not_logged_in_gives_401_and_custom_provider_skips_the_check(make_proxy, fake_codex,
                                                                      tmp_path):
    fake_codex.set_logged_out()
    proxy = make_proxy()
    status, _, raw = post_chat(proxy.base, chat_body())
    error = json.loads(raw)["error"]
    assert status == 401 and error["code"] == "codex_not_logged_in"
    assert "codex login" in error["message"]
    fake_codex.set_logged_out(False)
    assert post_chat(proxy.base, chat_body())[0] == 401      # cached for 30 s
    proxy.server.codex._checked_at -= cp.LOGIN_CACHE_SECONDS + 1
    assert post_chat(proxy.base, chat_body())[0] == 200      # a stale "no" is rechecked at once
    fake_codex.set_logged_out()
    (tmp_path / "home" / "config.toml").write_text('model_provider = "mock"\n')
    assert post_chat(make_proxy().base, chat_body())[0] == 200


def test_more_than_max_concurrent_runs_get_429(make_proxy, fake_codex):
    proxy = make_proxy(max_concurrent=1)
    fake_codex.scenario([{"wait_file": "go"}, {"thread": True}, {"text": "x"}, {"complete": {}}])
    first = {}
    thread = threading.Thread(target=lambda: first.update(r=post_chat(proxy.base, chat_body())))
    thread.start()
    fake_codex.wait_records(1)
    status, hdrs, raw = post_chat(proxy.base, chat_body())
    assert status == 429 and hdrs["retry-after"]
    assert json.loads(raw)["error"]["type"] == "rate_limit_error"
    (fake_codex.dir / "go").write_text("")
    thread.join(20)
    assert first["r"][0] == 200
    assert post_chat(proxy.base, chat_body())[0] == 200


def disconnect_mid_stream(proxy):
    """Start a stream, read its first chunk, then hang up."""
    sock = open_raw_stream(proxy, chat_body(stream=True))
    assert b"role" in recv_until(sock, b"role")
    sock.close()


@pytest.mark.parametrize("ignore_term", [False, True])
def test_client_disconnect_terminates_codex(proxy, fake_codex, ignore_term):
    steps = [{"ignore_term": True}] if ignore_term else []
    fake_codex.scenario(("again", [{"thread": True}, {"text": "ok"}, {"complete": {}}]),
                        steps + [{"thread": True}, {"sleep": 60}, {"text": "never"}])
    disconnect_mid_stream(proxy)
    pid = fake_codex.wait_records(1)[0]["pid"]
    assert wait_until(lambda: not pid_alive(pid), 8)
    assert wait_until(lambda: proxy.events("client_disconnected"), 5)
    assert post_chat(proxy.base, chat_body("again"))[0] == 200


def test_client_disconnect_of_a_non_streaming_request_terminates_codex(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"sleep": 60}])
    sock = socket.create_connection(("127.0.0.1", int(proxy.base.rsplit(":", 1)[1])), timeout=20)
    body = json.dumps(chat_body()).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    pid = fake_codex.wait_records(1)[0]["pid"]
    sock.close()
    assert wait_until(lambda: not pid_alive(pid), 8)


# ---------------------------------------------------------------------------
# Access
# ---------------------------------------------------------------------------

KEY = "test-key-1234"


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/models"),
    ("GET", "/logs?format=json"), ("GET", "/logs/stream"), ("GET", "/v1/logs"),
])
def test_key_required_on_every_route_but_health(make_proxy, method, path):
    proxy = make_proxy(api_keys=(KEY, "second-key"))
    body = chat_body() if method == "POST" else None
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, _, raw = http_request(proxy.base, method, path, body, headers)
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    assert http_request(proxy.base, "GET", "/health")[0] == 200
    assert http_request(proxy.base, "OPTIONS", path.split("?")[0])[0] == 204


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"api-key": KEY},
                                     {"x-api-key": KEY}, {"Authorization": "Bearer second-key"}])
def test_key_accepted_in_each_header(make_proxy, headers):
    proxy = make_proxy(api_keys=(KEY, "second-key"))
    assert post_chat(proxy.base, chat_body(), headers)[0] == 200
    assert http_request(proxy.base, "GET", "/v1/models", headers=headers)[0] == 200


def test_keys_never_reach_the_log(make_proxy, tmp_path):
    stream = open(tmp_path / "stderr.txt", "w+")
    config = cp.Config(port=0, codex_bin="no-codex-here", api_keys=(KEY,),
                       state_dir=str(tmp_path / "s"))
    server = cp.ProxyServer(config, log_stream=stream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proxy = Proxy(server, thread)
    try:
        base = proxy.base
        post_chat(base, chat_body(), {"Authorization": "Bearer wrong-key-5678"})
        post_chat(base, chat_body(), {"Authorization": f"Bearer {KEY}"})
        _, _, raw = http_request(base, "GET", "/logs?format=json",
                                 headers={"x-api-key": KEY})
        assert json.loads(raw)["events"]
        assert proxy.events("auth_rejected")
    finally:
        proxy.stop()
    stream.seek(0)
    text = stream.read() + raw.decode()
    assert KEY not in text and "wrong-key-5678" not in text and "auth_rejected" in text


@pytest.mark.parametrize("header", ["CF-Connecting-IP", "X-Forwarded-For", "Forwarded", "X-Real-IP"])
def test_tunnelled_request_without_key_gets_403(proxy, header):
    status, _, raw = post_chat(proxy.base, chat_body(), {header: "203.0.113.9"})
    error = json.loads(raw)["error"]
    assert status == 403 and "--api-key" in error["message"]
    assert proxy.events("auth_rejected")[0]["reason"] == "tunnel_without_key"


def test_tunnelled_request_with_key_is_served(make_proxy):
    proxy = make_proxy(api_keys=(KEY,))
    assert post_chat(proxy.base, chat_body(), {"X-Forwarded-For": "203.0.113.9",
                                               "Authorization": f"Bearer {KEY}"})[0] == 200


def test_main_prints_a_banner_and_sigterm_ends_parked_codex(fake_codex, tmp_path):
    fake_codex.scenario(TOOL_TURN)
    proc = spawn_proxy_process(fake_codex.script, tmp_path, FAKE_CODEX_DIR=str(fake_codex.dir))
    try:
        banner = [proc.stdout.readline() for _ in range(5)]
        base = re.search(r"listening on (http://\S+)", banner[0]).group(1)
        assert banner[1].strip() == f"base URL for Cursor / OpenAI clients: {base}/v1"
        assert "codex-cli 0.0.0-fake" in banner[2] and "logged in" in banner[2]
        assert "API key: none" in banner[3]
        assert tool_round(types.SimpleNamespace(base=base),
                          [{"role": "user", "content": "x"}])[2] == "tool_calls"
        record = fake_codex.wait_records(1)[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert wait_until(lambda: not pid_alive(record["pid"]), 8)
        assert wait_until(lambda: not pid_alive(record["bridge_pid"]), 8)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_banner_names_a_global_agents_file(make_proxy, tmp_path):
    proxy = make_proxy()
    home = proxy.server.config.codex_home_dir
    assert "AGENTS" not in cp.banner(proxy.server)
    with open(os.path.join(home, "AGENTS.md"), "w") as f:
        f.write("be terse")
    with open(os.path.join(home, "AGENTS.override.md"), "w") as f:
        pass                                         # empty: Codex skips it, so do we
    note = cp.banner(proxy.server).splitlines()[-1]
    assert note.startswith("  note: Codex sends") and os.path.join(home, "AGENTS.md") in note


def test_an_old_python_gets_a_clear_message():
    code = ("import sys; sys.version_info = (3, 9, 6); "
            "exec(compile(open(sys.argv[1]).read(), sys.argv[1], 'exec'))")
    done = subprocess.run([sys.executable, "-c", code, PROXY_SCRIPT], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1 and "needs Python 3.11 or newer" in done.stderr


def test_bad_environment_values_are_usage_errors(monkeypatch, capsys):
    monkeypatch.setenv("CODEX_PROXY_MAX_BODY", "lots")
    with pytest.raises(SystemExit) as info:
        cp.main([])
    assert info.value.code == 2 and "--max-body" in capsys.readouterr().err


def test_non_loopback_bind_without_key_refuses_to_start(capsys):
    assert cp.main(["--addr", "0.0.0.0:0", "--codex-bin", "none"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_help_lists_an_environment_variable_for_every_flag():
    text = cp.build_parser().format_help()
    flags = re.findall(r"^\s+(--[a-z-]+)", text, re.M)
    assert len(flags) >= 18
    for action in cp.build_parser()._actions:
        if action.help not in (None, cp.argparse.SUPPRESS) and action.option_strings != ["-h", "--help"]:
            assert "env " in action.help, action.option_strings


def test_readme_documents_every_flag_and_variable():
    readme = open(os.path.join(HERE, "README.md")).read()
    for action in cp.build_parser()._actions:
        if action.help in (None, cp.argparse.SUPPRESS) or "--help" in action.option_strings:
            continue
        assert action.option_strings[-1] in readme
        for variable in re.findall(r"env ([A-Z_]+)", action.help):
            assert variable in readme, variable


def test_ci_runs_exactly_the_readme_test_command():
    readme = open(os.path.join(HERE, "README.md")).read()
    command = re.search(r"^Test it:\n\n    (.+)$", readme, re.M).group(1)
    ci_lines = open(os.path.join(HERE, ".ci", "run")).read().strip().splitlines()
    assert ci_lines[-1] == command


def test_addr_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CODEX_OPENAI_PROXY_ADDR", "127.0.0.1:9")
    args = cp.build_parser().parse_args([])
    assert cp.config_from_args(args).port == 9


# ---------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------

def test_logs_hold_the_seed_event_kinds_without_bodies(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"reasoning": "r"}, {"text": "SECRET ANSWER"},
                         {"complete": {}}])
    post_chat(proxy.base, chat_body("SECRET PROMPT"))
    fake_codex.scenario([{"thread": True}, {"fail": "boom"}])
    post_chat(proxy.base, chat_body())
    proxy.wait_event("cursor_response")
    status, _, raw = http_request(proxy.base, "GET", "/logs?format=json")
    events = json.loads(raw)["events"]
    kinds = {e["type"] for e in events}
    assert {"incoming_request", "codex_forward", "reasoning_detected", "cursor_response",
            "stream_codex_error"} <= kinds
    assert all({"seq", "ts", "type", "request_id"} <= set(e) for e in events)
    incoming = [e for e in events if e["type"] == "incoming_request"][0]
    assert incoming["model"] == "xedoc-2.5-tpg" and incoming["messages"] == 1
    assert incoming["stream"] is False and incoming["client"] == "127.0.0.1"
    forward = [e for e in events if e["type"] == "codex_forward"][0]
    assert forward["mapped_model"] == "gpt-5.2-codex" and forward["thread_id"] == "thread-fake"
    response = [e for e in events if e["type"] == "cursor_response"][0]
    assert response["finish_reason"] == "stop" and response["usage"]["total_tokens"] == 18
    assert b"SECRET" not in raw
    last = events[-1]["seq"]
    _, _, raw = http_request(proxy.base, "GET", f"/v1/logs?format=json&since={last - 1}")
    assert [e["seq"] for e in json.loads(raw)["events"]] == [last]


def test_log_bodies_records_prompt_and_answer(make_proxy, fake_codex):
    proxy = make_proxy(log_bodies=True)
    fake_codex.scenario([{"thread": True}, {"text": "THE ANSWER"}, {"complete": {}}])
    post_chat(proxy.base, chat_body("THE PROMPT"))
    assert proxy.events("incoming_request")[0]["prompt"] == "THE PROMPT"
    assert proxy.wait_event("cursor_response")[0]["answer"] == "THE ANSWER"


def test_logs_page_for_browsers_and_json_otherwise(make_proxy):
    proxy = make_proxy()
    status, hdrs, raw = http_request(proxy.base, "GET", "/logs", headers={"Accept": "text/html"})
    assert status == 200 and hdrs["content-type"].startswith("text/html")
    assert b"<script" in raw and b"http://" not in raw.replace(b"http://www.w3.org", b"")
    status, hdrs, raw = http_request(proxy.base, "GET", "/logs")
    assert hdrs["content-type"] == "application/json" and "events" in json.loads(raw)
    alone = make_proxy(logs_html=None)      # the single file copied on its own
    status, hdrs, raw = http_request(alone.base, "GET", "/logs", headers={"Accept": "text/html"})
    assert status == 200 and "events" in json.loads(raw)


def test_logs_stream_tails_new_events(proxy):
    host, port = proxy.base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/logs/stream?since=0")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    post_chat(proxy.base, chat_body())
    seen = b""
    deadline = time.monotonic() + 10
    while b"cursor_response" not in seen and time.monotonic() < deadline:
        seen += resp.fp.readline()
    conn.close()
    assert b"incoming_request" in seen and b"cursor_response" in seen and b"id: " in seen


def test_log_lines_on_stderr_escape_control_characters(tmp_path):
    stream = open(tmp_path / "err.txt", "w+")
    logs = cp.LogBuffer(3, stream)
    logs.add("incoming_request", "req_1", model="evil\x1b[31m\nname")
    for n in range(5):
        logs.add("x", None, n=n)
    stream.seek(0)
    first = stream.readline()
    assert "\x1b" not in first and "incoming_request" in first and first.count("\n") == 1
    assert [e["n"] for e in logs.since(0)] == [2, 3, 4]      # a ring of --log-size


def test_log_lines_survive_a_stream_that_cannot_encode_them(tmp_path):
    stream = open(tmp_path / "err.txt", "w+", encoding="cp1252")     # as on Windows
    logs = cp.LogBuffer(3, stream)
    logs.add("incoming_request", "req_1", model="caf\u00e9 \U0001f600")
    stream.seek(0)
    assert "incoming_request req_1" in stream.read()


# ---------------------------------------------------------------------------
# Responses-shaped bodies
# ---------------------------------------------------------------------------

def test_responses_shaped_body_gets_chat_chunks(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"text": "from responses"}, {"complete": {}}])
    body = {"model": "xedoc-2.5-tpg", "instructions": "RESP INSTRUCTIONS", "stream": True,
            "input": [{"type": "message", "role": "user",
                       "content": [{"type": "input_text", "text": "hi there"}]}],
            "reasoning": {"effort": "high"}, "text": {"verbosity": "low"}, "store": False}
    status, _, raw = post_chat(proxy.base, body)
    events = sse_events(raw)
    assert status == 200 and events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert "from responses" in raw.decode()
    record = fake_codex.wait_records(1)[0]
    assert "RESP INSTRUCTIONS" in record["instructions"] and record["prompt"] == "hi there"
    assert record["conf"]["model_reasoning_effort"] == '"high"'


# ---------------------------------------------------------------------------
# Client tool calls against the fake codex (an MCP client of the bridge)
# ---------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {"name": "read_file", "description": "Read a file",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                    "required": ["path"]}}},
    {"type": "function", "name": "list_dir", "description": "List a folder",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}},
    {"type": "custom", "name": "ApplyPatch", "description": "Apply a patch",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: patch"}},
]
PATCH = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch\n"


def tool_round(proxy, messages, stream=False, **extra):
    """POST with the tools; return (status, assistant message, finish_reason, raw)."""
    status, _, raw = post_chat(proxy.base, {"model": "5.5-tpg", "messages": messages,
                                            "tools": TOOLS, "stream": stream, **extra})
    if status != 200:
        return status, None, None, raw
    if not stream:
        body = json.loads(raw)
        return status, body["choices"][0]["message"], body["choices"][0]["finish_reason"], raw
    return status, assemble_stream(sse_events(raw)), finish_of(sse_events(raw)), raw


def assemble_stream(events):
    """Rebuild the assistant message from streamed chunks, as SDKs do."""
    message = {"role": "assistant", "content": "", "tool_calls": []}
    for event in events:
        if event == "[DONE]" or not event.get("choices"):
            continue
        delta = event["choices"][0]["delta"]
        message["content"] += delta.get("content") or ""
        for frag in delta.get("tool_calls") or []:
            calls = message["tool_calls"]
            while len(calls) <= frag["index"]:
                calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            call = calls[frag["index"]]
            call["id"] = frag.get("id") or call["id"]
            function = frag.get("function") or {}
            call["function"]["name"] += function.get("name") or ""
            call["function"]["arguments"] += function.get("arguments") or ""
    return message


def finish_of(events):
    reasons = [e["choices"][0]["finish_reason"] for e in events
               if e != "[DONE]" and e.get("choices") and e["choices"][0]["finish_reason"]]
    assert len(reasons) == 1, reasons
    return reasons[0]


def results_for(message, prefix="RESULT"):
    return [{"role": "tool", "tool_call_id": c["id"],
             "content": f"{prefix}:{c['function']['name']}:{c['function']['arguments']}"}
            for c in message["tool_calls"]]


TOOL_TURN = [{"thread": True}, {"text": "Let me look."},
             {"calls": [{"name": "read_file", "arguments": {"path": "a.py"}, "id": "call_m1"}]},
             {"text": "The file says {results}"}, {"complete": {}}]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_parks_the_turn_and_the_result_resumes_it(proxy, fake_codex, stream):
    fake_codex.scenario(TOOL_TURN)
    messages = [{"role": "user", "content": "read a.py"}]
    status, message, finish, raw = tool_round(proxy, messages, stream)
    assert status == 200 and finish == "tool_calls"
    assert message["content"] == "Let me look."
    assert message["tool_calls"] == [{"id": "call_m1", "type": "function", "function": {
        "name": "read_file", "arguments": '{"path": "a.py"}'}}]
    assert len(proxy.server.parked) == 1        # parked before the client saw the calls
    record = fake_codex.wait_records(1)[0]
    assert pid_alive(record["pid"]) and not record["ended"]       # parked, not ended
    messages += [message, *results_for(message)]
    status, final, finish, _ = tool_round(proxy, messages, stream)
    assert status == 200 and finish == "stop"
    assert final["content"] == 'The file says RESULT:read_file:{"path": "a.py"}'
    records = fake_codex.wait_records(1)
    assert len(records) == 1                    # the same process, no new run
    assert records[0]["results"] == [{"name": "read_file", "is_error": False,
                                      "text": 'RESULT:read_file:{"path": "a.py"}'}]
    kinds = [e["type"] for e in proxy.events()]
    assert {"tool_call_forwarded", "tool_result_received", "turn_resumed"} <= set(kinds)
    assert "fallback_transcript" not in kinds


def test_streamed_tool_calls_follow_the_fragment_rules(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"calls": [
        {"name": "read_file", "arguments": {"path": "a"}, "id": "call_a"},
        {"name": "list_dir", "arguments": {"path": "."}, "id": "call_b"}]},
        {"text": "done {results}"}, {"complete": {}}])
    _, _, raw = post_chat(proxy.base, {"model": "m", "stream": True, "tools": TOOLS,
                                       "messages": [{"role": "user", "content": "go"}],
                                       "stream_options": {"include_usage": True}})
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and finish_of(events) == "tool_calls"
    frags = [f for e in events[:-1] if e["choices"] for f in e["choices"][0]["delta"].get("tool_calls", [])]
    by_index = {}
    for frag in frags:
        by_index.setdefault(frag["index"], []).append(frag)
    assert sorted(by_index) == [0, 1]
    for index, parts in by_index.items():
        assert parts[0]["type"] == "function" and parts[0]["id"] and parts[0]["function"]["name"]
        assert all(set(p) == {"index", "function"} for p in parts[1:])
    ids = {parts[0]["id"] for parts in by_index.values()}
    assert ids == {"call_a", "call_b"}
    assert events[-2]["choices"] == [] and "usage" in events[-2]
    assert len({e["id"] for e in events[:-1]}) == 1


def test_parallel_calls_go_out_together_and_both_results_go_back(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"calls": [
        {"name": "read_file", "arguments": {"path": "a"}, "id": "call_a"},
        {"name": "read_file", "arguments": {"path": "b"}, "id": "call_b"}]},
        {"text": "both: {results}"}, {"complete": {}}])
    messages = [{"role": "user", "content": "read both"}]
    _, message, finish, _ = tool_round(proxy, messages)
    assert finish == "tool_calls" and len(message["tool_calls"]) == 2
    assert len({c["id"] for c in message["tool_calls"]}) == 2
    messages += [message, *results_for(message)]
    _, final, _, _ = tool_round(proxy, messages)
    assert 'RESULT:read_file:{"path": "a"}' in final["content"]
    assert 'RESULT:read_file:{"path": "b"}' in final["content"]
    assert len(fake_codex.records()[0]["results"]) == 2


def test_custom_tool_call_arrives_as_raw_text_and_its_result_goes_back(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"calls": [
        {"name": "ApplyPatch", "arguments": {"input": PATCH}, "id": "call_p"}]},
        {"text": "patched: {results}"}, {"complete": {}}])
    messages = [{"role": "user", "content": "add a.txt"}]
    _, message, _, _ = tool_round(proxy, messages, stream=True)
    call = message["tool_calls"][0]
    assert call["function"] == {"name": "ApplyPatch", "arguments": PATCH}
    messages += [message, {"role": "tool", "tool_call_id": call["id"],
                           "content": [{"type": "text", "text": "Applied."}]}]
    _, final, _, _ = tool_round(proxy, messages)
    assert final["content"] == "patched: Applied."


def test_bridge_lists_every_tool_form_to_the_model(proxy, fake_codex):
    post_chat(proxy.base, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS})
    tools = {t["name"]: t for t in fake_codex.wait_records(1)[0]["tools"]}
    assert set(tools) == {"read_file", "list_dir", "ApplyPatch"}
    assert tools["read_file"]["inputSchema"]["required"] == ["path"]
    assert tools["list_dir"]["description"] == "List a folder"
    assert tools["ApplyPatch"]["inputSchema"]["properties"]["input"]["type"] == "string"
    assert "start: patch" in tools["ApplyPatch"]["description"]


def test_no_tools_means_no_bridge_and_tool_choice_none_hides_them(proxy, fake_codex):
    post_chat(proxy.base, chat_body())
    post_chat(proxy.base, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                           "tool_choice": "none"})
    for record in fake_codex.wait_records(2):
        assert record["tools"] is None
        assert not any(a.startswith("mcp_servers") for a in record["argv"])


def test_tool_choice_required_and_named_become_instructions(proxy, fake_codex):
    for choice in ("required", {"type": "function", "function": {"name": "list_dir"}}):
        post_chat(proxy.base, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                               "tool_choice": choice})
    first, second = fake_codex.wait_records(2)
    assert "must call at least one" in first["instructions"]
    assert "`list_dir`" in second["instructions"]


def test_fallback_after_a_restart_replays_the_whole_conversation(make_proxy, fake_codex):
    fake_codex.scenario(("<tool_result", [{"thread": True}, {"text": "fallback saw: {prompt}"},
                                          {"complete": {}}]), TOOL_TURN)
    proxy = make_proxy()
    messages = [{"role": "user", "content": "read a.py"}]
    _, message, _, _ = tool_round(proxy, messages)
    proxy.stop()                                 # the parked Codex goes with it
    first_pid = fake_codex.records()[0]["pid"]
    assert wait_until(lambda: not pid_alive(first_pid), 8)
    proxy = make_proxy()
    messages += [message, *results_for(message)]
    status, final, finish, _ = tool_round(proxy, messages)
    assert status == 200 and finish == "stop"
    prompt = fake_codex.wait_records(2)[-1]["prompt"]
    assert '<tool_call id="call_m1" name="read_file">{"path": "a.py"}</tool_call>' in prompt
    assert 'RESULT:read_file:{"path": "a.py"}' in prompt and "read a.py" in prompt
    assert fake_codex.records()[-1]["tools"]               # tools exposed again
    assert "RESULT:read_file" in final["content"]
    assert proxy.events("fallback_transcript")


def test_abandoned_parked_turn_expires(make_proxy, fake_codex):
    proxy = make_proxy(tool_result_timeout=0.5)
    fake_codex.scenario(TOOL_TURN)
    tool_round(proxy, [{"role": "user", "content": "x"}])
    record = fake_codex.wait_records(1)[0]
    expired = proxy.wait_event("parked_expired")
    assert expired[0]["reason"] == "tool_result_timeout" and expired[0]["pending"] == ["call_m1"]
    assert wait_until(lambda: not pid_alive(record["pid"]), 8)
    assert len(proxy.server.parked) == 0


def test_max_parked_expires_the_oldest(make_proxy, fake_codex):
    proxy = make_proxy(max_parked=1)
    fake_codex.scenario(TOOL_TURN)
    tool_round(proxy, [{"role": "user", "content": "first"}])
    tool_round(proxy, [{"role": "user", "content": "second"}])
    first, second = fake_codex.wait_records(2)
    assert proxy.wait_event("parked_expired")[0]["reason"] == "max_parked"
    assert wait_until(lambda: not pid_alive(first["pid"]), 8)
    assert pid_alive(second["pid"]) and len(proxy.server.parked) == 1


def test_parked_turns_do_not_count_against_max_concurrent(make_proxy, fake_codex):
    proxy = make_proxy(max_concurrent=1)
    fake_codex.scenario(("plain question", [{"thread": True}, {"text": "ok"}, {"complete": {}}]),
                        TOOL_TURN)
    assert tool_round(proxy, [{"role": "user", "content": "x"}])[2] == "tool_calls"
    assert post_chat(proxy.base, chat_body("plain question"))[0] == 200


def test_shutdown_ends_parked_codex(make_proxy, fake_codex):
    proxy = make_proxy()
    fake_codex.scenario(TOOL_TURN)
    tool_round(proxy, [{"role": "user", "content": "x"}])
    record = fake_codex.wait_records(1)[0]
    proxy.stop()
    assert wait_until(lambda: not pid_alive(record["pid"]), 8)
    assert wait_until(lambda: not pid_alive(record["bridge_pid"]), 8)


def test_edited_history_expires_the_parked_turn_and_runs_fresh(proxy, fake_codex):
    fake_codex.scenario(("changed my mind", [{"thread": True}, {"text": "fresh"}, {"complete": {}}]),
                        TOOL_TURN)
    messages = [{"role": "user", "content": "x"}]
    _, message, _, _ = tool_round(proxy, messages)
    messages += [message, {"role": "user", "content": "changed my mind"}]
    _, final, _, _ = tool_round(proxy, messages)
    assert final["content"] == "fresh"
    assert proxy.wait_event("parked_expired")[0]["reason"] == "history_changed"
    first = fake_codex.records()[0]
    assert wait_until(lambda: not pid_alive(first["pid"]), 8)


def test_call_ids_stay_unique_within_a_conversation(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"calls": [
        {"name": "read_file", "arguments": {"path": "b"}, "id": "call_old"}]},
        {"text": "ok"}, {"complete": {}}])
    history = [{"role": "user", "content": "x"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_old",
                "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "call_old", "content": "old"},
               {"role": "user", "content": "again"}]
    _, message, _, _ = tool_round(proxy, history)
    new_id = message["tool_calls"][0]["id"]
    assert new_id != "call_old" and new_id.startswith("call_")


def test_missing_result_is_answered_with_an_error(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"calls": [
        {"name": "read_file", "arguments": {"path": "a"}, "id": "call_a"},
        {"name": "read_file", "arguments": {"path": "b"}, "id": "call_b"}]},
        {"text": "{results}"}, {"complete": {}}])
    messages = [{"role": "user", "content": "x"}]
    _, message, _, _ = tool_round(proxy, messages)
    messages += [message, results_for(message)[0]]
    assert tool_round(proxy, messages)[2] == "stop"
    results = fake_codex.records()[0]["results"]
    assert sorted(r["is_error"] for r in results) == [False, True]


def test_responses_shaped_tool_round_trip(proxy, fake_codex):
    fake_codex.scenario(TOOL_TURN)
    flat_tools = [{"type": "function", "name": "read_file", "parameters": {"type": "object"}}]
    body = {"model": "m", "stream": True, "tools": flat_tools, "instructions": "I",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "read"}]}]}
    _, _, raw = post_chat(proxy.base, body)
    call = assemble_stream(sse_events(raw))["tool_calls"][0]
    body["input"] += [{"type": "function_call", "call_id": call["id"], "name": call["function"]["name"],
                       "arguments": call["function"]["arguments"]},
                      {"type": "function_call_output", "call_id": call["id"], "output": "CONTENT"}]
    _, _, raw = post_chat(proxy.base, body)
    assert assemble_stream(sse_events(raw))["content"] == "The file says CONTENT"
    assert len(fake_codex.records()) == 1


def test_bridge_refuses_a_wrong_secret(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"wait_file": "go"}, {"complete": {}}])
    thread = threading.Thread(target=lambda: tool_round(proxy, [{"role": "user", "content": "x"}]))
    thread.start()
    fake_codex.wait_records(1)
    run_id = wait_until(lambda: next(iter(proxy.server._runs), None))
    host, port = proxy.server.bridge.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(json.dumps({"run": run_id, "secret": "guess", "call_id": "c",
                                 "name": "read_file", "arguments": {}}).encode() + b"\n")
        answer = json.loads(sock.makefile("rb").readline())
    assert answer["is_error"] and "secret" in answer["text"]
    (fake_codex.dir / "go").write_text("")
    thread.join(20)


def test_mcp_bridge_speaks_json_rpc(tmp_path):
    conf = tmp_path / "bridge.json"
    conf.write_text(json.dumps({"relay": "127.0.0.1:1", "run": "r", "secret": "s",
                                "tools": cp.mcp_tool_list(cp.normalize_tools(TOOLS))}))
    proc = subprocess.Popen([sys.executable, PROXY_SCRIPT, "--mcp-bridge", str(conf)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        lines = [{"jsonrpc": "2.0", "id": 1, "method": "initialize",
                  "params": {"protocolVersion": "2025-03-26"}},
                 {"jsonrpc": "2.0", "method": "notifications/initialized"},
                 {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                 {"jsonrpc": "2.0", "id": 3, "method": "resources/list"},
                 {"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                  "params": {"name": "read_file", "arguments": {}}}]
        out, _ = proc.communicate(b"".join(json.dumps(m).encode() + b"\n" for m in lines),
                                  timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    replies = {r["id"]: r for r in map(json.loads, out.splitlines())}
    assert replies[1]["result"]["protocolVersion"] == "2025-03-26"
    assert replies[1]["result"]["capabilities"] == {"tools": {}}
    assert [t["name"] for t in replies[2]["result"]["tools"]] == ["read_file", "list_dir", "ApplyPatch"]
    assert replies[3]["error"]["code"] == -32601
    assert replies[4]["result"]["isError"] is True     # nothing listens on the relay port


# ---------------------------------------------------------------------------
# End to end: the real Codex CLI against a fake Responses upstream
# ---------------------------------------------------------------------------

def require(what, available):
    """Skip with a reason locally; under CI a missing piece is a failure."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI (.ci/run installs it)")
    pytest.skip(f"{what} is not installed")


@pytest.fixture
def real_codex():
    path = shutil.which("codex")
    require("the Codex CLI (codex on PATH)", path)
    return path


@pytest.fixture
def openai_sdk():
    try:
        import openai
    except ImportError:
        openai = None
    require("the openai Python SDK", openai)
    return openai


class E2E:
    """A fake upstream, a CODEX_HOME pointing at it, and proxies on the real CLI."""

    def __init__(self, tmp_path, codex_path):
        self.tmp_path = tmp_path
        self.codex_path = codex_path
        self.responder = lambda body, index: [message_item("default answer")]
        self.upstream = FakeUpstream(lambda body, index: self.responder(body, index))
        self.home = tmp_path / "codex-home"
        self.home.mkdir()
        (self.home / "config.toml").write_text(
            'model_provider = "mock"\n[model_providers.mock]\nname = "mock"\n'
            f'base_url = "http://127.0.0.1:{self.upstream.port}/v1"\nwire_api = "responses"\n'
            'env_key = "MOCK_KEY"\nrequest_max_retries = 0\nstream_max_retries = 0\n')
        self.proxies = []

    def proxy(self, **overrides):
        fields = dict(port=0, codex_bin=self.codex_path, codex_home=str(self.home),
                      state_dir=str(self.tmp_path / "state"), quiet=True,
                      logs_html=os.path.join(HERE, "logs.html"))
        fields.update(overrides)
        proxy = start_proxy(cp.Config(**fields), {"MOCK_KEY": "mock-key"})
        self.proxies.append(proxy)
        return proxy

    def pids(self):
        return [e["pid"] for p in self.proxies for e in p.events("codex_forward")]

    def close(self):
        for proxy in self.proxies:
            proxy.stop()
        self.upstream.close()
        assert wait_until(lambda: not any(pid_alive(p) for p in self.pids()), 10)


@pytest.fixture
def e2e(tmp_path, real_codex, run_tmp):
    threads_before = set(threading.enumerate())
    env = E2E(tmp_path, real_codex)
    yield env
    env.close()
    assert_no_thread_outlives(threads_before)


def sdk_client(openai_sdk, base, **extra):
    return openai_sdk.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60, **extra)


def developer_text(body):
    return "\n".join(part["text"] for item in body["input"]
                     if item.get("role") == "developer" for part in item["content"])


def tool_names(body):
    names = set()
    for tool in body.get("tools", []):
        names.add(tool.get("name"))
        for child in tool.get("tools", []):
            names.add(f"{tool['name']}/{child['name']}")
    return names


CODEX_HOST_TOOLS = {"shell", "exec_command", "write_stdin", "apply_patch", "view_image",
                    "web_search", "tool_search", "update_plan", "request_user_input",
                    "unified_exec", "local_shell", "js_repl", "spawn_agent"}


def test_e2e_sdk_answers_streamed_and_not_on_both_routes(e2e, openai_sdk):
    e2e.responder = lambda body, index: [reasoning_item("Pondering."), message_item("Hello from upstream")]
    proxy = e2e.proxy()
    for base in (proxy.base + "/v1", proxy.base):
        client = sdk_client(openai_sdk, base)
        reply = client.chat.completions.create(model="5.5-tpg", messages=[
            {"role": "system", "content": "CLIENT SYSTEM TEXT"},
            {"role": "user", "content": "Say hello"}])
        assert reply.model == "5.5-tpg"
        assert reply.choices[0].message.content == "Hello from upstream"
        assert reply.choices[0].message.reasoning_content == "Pondering."
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.prompt_tokens == 100 and reply.usage.completion_tokens == 20
        assert reply.usage.prompt_tokens_details.cached_tokens == 40
        assert reply.usage.completion_tokens_details.reasoning_tokens == 5
        chunks = list(client.chat.completions.create(
            model="5.5-tpg", messages=[{"role": "user", "content": "Say hello"}], stream=True,
            stream_options={"include_usage": True}))
        assert all(c.model == "5.5-tpg" for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            "Hello from upstream"
        assert [getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks
                if c.choices and getattr(c.choices[0].delta, "reasoning_content", None)] == ["Pondering."]
        assert chunks[-1].usage.total_tokens == 120
    bodies = [r["body"] for r in e2e.upstream.requests]
    assert len(bodies) == 4 and all(b["model"] == "gpt-5.5" for b in bodies)


def test_e2e_upstream_sees_client_text_and_no_codex_prompt_or_host_tools(e2e, openai_sdk):
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    client.chat.completions.create(model="5.5-tpg", messages=[
        {"role": "system", "content": "CLIENT SYSTEM TEXT"}, {"role": "user", "content": "hi"}])
    client.chat.completions.create(model="5.5-tpg", tools=TOOLS[:1], messages=[
        {"role": "user", "content": "hi"}])
    for body in (r["body"] for r in e2e.upstream.requests):
        text = json.dumps(body["input"])
        assert "coding agent" not in text and "environment_context" not in text
        assert "AGENTS.md" not in text and "sandbox" not in text.lower()
        names = tool_names(body)
        assert not names & CODEX_HOST_TOOLS, names
        assert not any(n.startswith("mcp__") and "/" not in n and n != "mcp__client" for n in names)
    first, second = (r["body"] for r in e2e.upstream.requests)
    assert "CLIENT SYSTEM TEXT" in developer_text(first)
    assert developer_text(first).startswith(cp.INSTRUCTIONS_PREAMBLE)
    assert "mcp__client/read_file" in tool_names(second)


def test_e2e_usage_limit_is_429_or_one_error_event(e2e, openai_sdk):
    e2e.responder = lambda body, index: ("status", 429, {"error": {
        "type": "usage_limit_reached", "message": "The usage limit has been reached",
        "plan_type": "plus", "resets_in_seconds": 3600}})
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    with pytest.raises(openai_sdk.RateLimitError) as info:
        client.chat.completions.create(model="5.5-tpg", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 429 and "usage limit" in str(info.value)
    status, _, raw = post_chat(proxy.base, chat_body(stream=True, model="5.5-tpg"))
    events = sse_events(raw)
    errors = [e for e in events[:-1] if "error" in e]
    assert status == 200 and events[-1] == "[DONE]" and len(errors) == 1
    assert errors[0]["error"]["code"] == "usage_limit_reached"


def test_e2e_client_disconnect_stops_codex(e2e):
    e2e.responder = lambda body, index: ("sleep", 60, [message_item("too late")])
    proxy = e2e.proxy()
    sock = open_raw_stream(proxy, chat_body(stream=True, model="5.5-tpg"))
    assert b"role" in recv_until(sock, b"role")
    assert wait_until(lambda: e2e.upstream.requests, 20)     # Codex is waiting upstream
    pid = proxy.wait_event("codex_forward")[0]["pid"]
    assert pid_alive(pid)
    sock.close()
    assert wait_until(lambda: not pid_alive(pid), 5)
    assert proxy.wait_event("client_disconnected")


def agent_responder(body, index):
    """The model: read the file the user names, then answer with its content."""
    last = body["input"][-1]
    if last.get("type") == "function_call_output":
        outputs = [i for i in body["input"] if i.get("type") == "function_call_output"]
        text = json.dumps(outputs[-1]["output"])
        return [message_item(f"The file holds {re.search(r'CONTENT-[a-z0-9.]+', text).group()}")]
    prompt = json.dumps(body["input"])
    names = re.findall(r"read ([a-z0-9]+\.py)", prompt)
    return [function_call_item("read_file", {"path": names[-1]}, f"call_{index}_{names[-1][0]}")]


@pytest.mark.parametrize("stream", [False, True])
def test_e2e_sdk_agent_loop_with_a_tool_round_in_each_turn(e2e, openai_sdk, stream):
    e2e.responder = agent_responder
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    messages, answers, served = [], [], []

    def ask(**kw):
        if not stream:
            return client.chat.completions.create(model="5.5-tpg", messages=messages,
                                                  tools=TOOLS, **kw).choices[0]
        chunks = list(client.chat.completions.create(model="5.5-tpg", messages=messages,
                                                     tools=TOOLS, stream=True, **kw))
        message = assemble_stream([c.model_dump() for c in chunks])
        finish = finish_of([c.model_dump() for c in chunks])
        return openai_sdk.types.chat.chat_completion.Choice.model_validate(
            {"index": 0, "finish_reason": finish, "message": {
                "role": "assistant", "content": message["content"] or None,
                "tool_calls": message["tool_calls"] or None}})

    for filename in ("alpha.py", "beta.py"):
        messages.append({"role": "user", "content": f"read {filename}"})
        for _ in range(4):
            choice = ask()
            messages.append(choice.message.model_dump(exclude_none=True))
            if choice.finish_reason != "tool_calls":
                break
            for call in choice.message.tool_calls:
                path = json.loads(call.function.arguments)["path"]
                served.append((call.id, call.function.name, path))
                messages.append({"role": "tool", "tool_call_id": call.id,
                                 "content": f"CONTENT-{path}"})
        answers.append(choice.message.content)
    assert answers == ["The file holds CONTENT-alpha.py", "The file holds CONTENT-beta.py"]
    assert [s[1:] for s in served] == [("read_file", "alpha.py"), ("read_file", "beta.py")]
    outputs = [(i["call_id"], json.dumps(i["output"])) for r in e2e.upstream.requests
               for i in r["body"]["input"] if i.get("type") == "function_call_output"]
    for call_id, _, path in served:       # every result reached the model as that call's output
        assert any(cid == call_id and f"CONTENT-{path}" in out for cid, out in outputs)
    for request in e2e.upstream.requests:  # the client's tools, directly, for gpt-5.5
        names = tool_names(request["body"])
        assert {"mcp__client/read_file", "mcp__client/ApplyPatch"} <= names
        assert not names & CODEX_HOST_TOOLS
    assert len(proxy.events("turn_resumed")) == 2


def test_e2e_parallel_calls_and_apply_patch(e2e, openai_sdk):
    def responder(body, index):
        outputs = [i for i in body["input"] if i.get("type") == "function_call_output"]
        if not outputs:
            return [function_call_item("read_file", {"path": "a.py"}, "call_ra"),
                    function_call_item("ApplyPatch", {"input": PATCH}, "call_ap")]
        return [message_item("outputs: " + " ".join(
            re.findall(r"OUT-[A-Za-z_]+", json.dumps(outputs))))]
    e2e.responder = responder
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    messages = [{"role": "user", "content": "do both"}]
    choice = client.chat.completions.create(model="5.5-tpg", messages=messages, tools=TOOLS).choices[0]
    calls = {c.function.name: c for c in choice.message.tool_calls}
    assert choice.finish_reason == "tool_calls" and set(calls) == {"read_file", "ApplyPatch"}
    assert len({c.id for c in calls.values()}) == 2
    assert calls["ApplyPatch"].function.arguments == PATCH
    assert json.loads(calls["read_file"].function.arguments) == {"path": "a.py"}
    messages.append(choice.message.model_dump(exclude_none=True))
    for name, call in calls.items():
        messages.append({"role": "tool", "tool_call_id": call.id, "content": f"OUT-{name}"})
    final = client.chat.completions.create(model="5.5-tpg", messages=messages, tools=TOOLS)
    assert sorted(final.choices[0].message.content.split()[1:]) == ["OUT-ApplyPatch", "OUT-read_file"]


def test_e2e_restart_between_call_and_result_falls_back(e2e, openai_sdk):
    def responder(body, index):
        text = json.dumps(body["input"])
        if "CONTENT-alpha" in text:
            return [message_item("fallback answer with CONTENT-alpha")]
        return [function_call_item("read_file", {"path": "alpha.py"}, "call_r1")]
    e2e.responder = responder
    proxy = e2e.proxy()
    messages = [{"role": "user", "content": "read alpha.py"}]
    choice = sdk_client(openai_sdk, proxy.base + "/v1").chat.completions.create(
        model="5.5-tpg", messages=messages, tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls"
    proxy.stop()
    proxy = e2e.proxy()
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id,
                  "content": "CONTENT-alpha"}]
    final = sdk_client(openai_sdk, proxy.base + "/v1").chat.completions.create(
        model="5.5-tpg", messages=messages, tools=TOOLS)
    assert final.choices[0].message.content == "fallback answer with CONTENT-alpha"
    assert proxy.events("fallback_transcript")
    last = json.dumps(e2e.upstream.requests[-1]["body"]["input"])
    assert "read alpha.py" in last and "tool_result" in last


def test_e2e_abandoned_parked_turn_is_gone_after_the_timeout(e2e, openai_sdk):
    e2e.responder = lambda body, index: [function_call_item("read_file", {"path": "x"}, "call_z")]
    proxy = e2e.proxy(tool_result_timeout=1.0)
    choice = sdk_client(openai_sdk, proxy.base + "/v1").chat.completions.create(
        model="5.5-tpg", messages=[{"role": "user", "content": "x"}], tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls"
    pid = proxy.events("codex_forward")[0]["pid"]
    assert proxy.wait_event("parked_expired", timeout=10)
    assert wait_until(lambda: not pid_alive(pid), 5)


def test_e2e_responses_shaped_body_gets_chat_chunks(e2e):
    e2e.responder = lambda body, index: [message_item("responses ok")]
    proxy = e2e.proxy()
    status, _, raw = post_chat(proxy.base, {
        "model": "5.5-tpg", "stream": True, "instructions": "RESP-INSTR",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        "tools": [{"type": "function", "name": "read_file", "parameters": {"type": "object"}}]})
    events = sse_events(raw)
    assert status == 200 and events[-1] == "[DONE]"
    assert assemble_stream(events)["content"] == "responses ok"
    assert "RESP-INSTR" in developer_text(e2e.upstream.requests[0]["body"])


# ---------------------------------------------------------------------------
# logs.html in a real browser (headless Chromium through chromedriver)
# ---------------------------------------------------------------------------

class WebDriver:
    """Just enough of the W3C WebDriver protocol, over urllib."""

    def __init__(self, driver, browser, profile):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.proc = subprocess.Popen([driver, f"--port={port}", "--allowed-ips=127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        self.session = None
        assert wait_until(self._ready, 20), "chromedriver did not start"
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"]
        reply = self.call("POST", "/session", {"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": {"binary": browser, "args": args}}}})
        self.session = reply["sessionId"]

    def _ready(self):
        try:
            return self.call("GET", "/status")["ready"]
        except OSError:
            return False

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            return json.loads(resp.read())["value"]

    def go(self, url):
        self.call("POST", f"/session/{self.session}/url", {"url": url})

    def js(self, script, *args):
        return self.call("POST", f"/session/{self.session}/execute/sync",
                         {"script": script, "args": list(args)})

    def close(self):
        try:
            if self.session:
                self.call("DELETE", f"/session/{self.session}")
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def browser(tmp_path):
    driver = shutil.which("chromedriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    require("chromium and chromedriver (Debian packages chromium, chromium-driver)",
            driver and chromium)
    wd = WebDriver(driver, chromium, tmp_path / "profile")
    yield wd
    wd.close()


ROWS_JS = """return [...document.querySelectorAll('#rows tr')].filter(r => !r.hidden)
  .map(r => ({cls: r.className, cells: [...r.cells].map(c => c.textContent)}));"""


def test_logs_page_renders_events_live_in_a_browser(make_proxy, fake_codex, browser):
    proxy = make_proxy(api_keys=(KEY,))
    auth = {"Authorization": f"Bearer {KEY}"}
    fake_codex.scenario(("boom", [{"thread": True}, {"fail": "upstream exploded"}]),
                        [{"thread": True}, {"text": "hi"}, {"complete": {}}])
    assert post_chat(proxy.base, chat_body(), auth)[0] == 200
    post_chat(proxy.base, chat_body("boom"), auth)
    proxy.wait_event("stream_codex_error")
    browser.go(proxy.base + "/logs")
    assert wait_until(lambda: browser.js(
        "return document.getElementById('keyform').className") == "shown", 10)
    browser.js("document.getElementById('key').value = arguments[0];"
               "document.getElementById('keyform').requestSubmit();", KEY)

    def types():
        return [r["cells"][1] for r in browser.js(ROWS_JS)]
    assert wait_until(lambda: {"incoming_request", "codex_forward", "cursor_response",
                               "stream_codex_error"} <= set(types()), 15), types()
    rows = browser.js(ROWS_JS)
    error = next(r for r in rows if r["cells"][1] == "stream_codex_error")
    assert error["cls"] == "error" and "upstream exploded" in error["cells"][4]
    response = next(r for r in rows if r["cells"][1] == "cursor_response")
    assert "finish stop" in response["cells"][4] and "11 in / 7 out" in response["cells"][4]
    assert KEY not in json.dumps(rows)
    post_chat(proxy.base, chat_body("live one"), auth)           # the page tails new events
    request_id = proxy.wait_event("cursor_response", 2)[-1]["request_id"]
    assert wait_until(lambda: [r for r in browser.js(ROWS_JS) if r["cells"][2] == request_id
                               and r["cells"][1] == "cursor_response"], 15)
    browser.js("const f = document.getElementById('freq'); f.value = arguments[0];"
               "f.dispatchEvent(new Event('input'));", request_id)
    assert wait_until(lambda: set(r["cells"][2] for r in browser.js(ROWS_JS)) == {request_id}, 5)
    assert browser.js("return document.getElementById('status').textContent") == "live"


def test_logs_page_shows_a_turns_rounds_together(make_proxy, fake_codex, browser):
    proxy = make_proxy()
    fake_codex.scenario(("unrelated", [{"thread": True}, {"text": "hi"}, {"complete": {}}]),
                        TOOL_TURN)
    messages = [{"role": "user", "content": "read a.py"}]
    _, message, _, _ = tool_round(proxy, messages)
    assert post_chat(proxy.base, chat_body("unrelated"))[0] == 200     # between the rounds
    assert tool_round(proxy, messages + [message, *results_for(message)])[2] == "stop"
    turn = proxy.wait_event("turn_resumed")[0]["turn"]
    browser.go(proxy.base + "/logs")
    assert wait_until(lambda: [r["cells"][1] for r in browser.js(ROWS_JS)].count(
        "cursor_response") == 3, 15), json.dumps([r["cells"][1] for r in browser.js(ROWS_JS)])
    browser.js("[...document.querySelectorAll('td.turn a')]"
               ".find(a => a.textContent === arguments[0]).click();", turn)
    assert wait_until(lambda: all(r["cells"][3] == turn for r in browser.js(ROWS_JS)), 5)
    rows = browser.js(ROWS_JS)
    assert [r["cells"][1] for r in rows] == [
        "codex_forward", "tool_call_forwarded", "cursor_response",       # round 1
        "tool_result_received", "turn_resumed", "cursor_response"]       # round 2
    assert len({r["cells"][2] for r in rows}) == 2                       # two requests
    assert "read_file (call_m1)" in rows[1]["cells"][4] and rows[1]["cls"] == "tool"


def test_logs_page_reconnects_after_a_proxy_restart(make_proxy, fake_codex, browser):
    fake_codex.scenario([{"thread": True}, {"text": "hi"}, {"complete": {}}])
    proxy = make_proxy()
    assert post_chat(proxy.base, chat_body("before"))[0] == 200
    proxy.wait_event("cursor_response")
    browser.go(proxy.base + "/logs")

    def status():
        return browser.js("return document.getElementById('status').textContent")

    def types():
        return [r["cells"][1] for r in browser.js(ROWS_JS) if r["cls"] != "divider"]
    assert wait_until(lambda: status() == "live" and "cursor_response" in types(), 15), types()
    port = proxy.server.server_address[1]
    proxy.stop()
    assert wait_until(lambda: status().startswith("disconnected"), 10), status()
    proxy = make_proxy(port=port)                       # same address, new instance
    assert post_chat(proxy.base, chat_body("after"))[0] == 200
    request_id = proxy.wait_event("cursor_response")[-1]["request_id"]
    assert wait_until(lambda: any(r["cells"][2:3] == [request_id] for r in browser.js(ROWS_JS)), 30), \
        (status(), browser.js(ROWS_JS))
    rows = browser.js(ROWS_JS)
    assert [r["cells"][0] for r in rows if r["cls"] == "divider"] == ["proxy restarted"]
    assert types().count("cursor_response") == 2 and status() == "live"


# ---------------------------------------------------------------------------
# Benchmarks: python3 test_codex_proxy.py --bench   (figures, no assertions)
# ---------------------------------------------------------------------------

INSTANT_CODEX = """#!/bin/sh
case "$1" in
  --version) echo "codex-cli 0.0.0-instant"; exit 0;;
  login) exit 0;;
  debug) echo '{"models": []}'; exit 0;;
esac
cat > /dev/null
printf '%s\\n' '{"type":"thread.started","thread_id":"t"}' '{"type":"turn.started"}' \\
  '{"type":"item.completed","item":{"id":"item_0","type":"agent_message","text":"ok"}}' \\
  '{"type":"turn.completed","usage":{"input_tokens":1,"output_tokens":1}}'
"""


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def timed_concurrently(job, count, concurrency):
    """Run `job` (which returns the seconds it measured) `count` times,
    `concurrency` at a time; -> the list of those times."""
    times, lock, todo = [], threading.Lock(), list(range(count))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            elapsed = job()
            with lock:
                times.append(elapsed)
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return times


def timed_requests(base, body, count, concurrency):
    """Latencies (s) of `count` requests sent `concurrency` at a time."""
    def request():
        start = time.perf_counter()
        status, _, _ = post_chat(base, body)
        elapsed = time.perf_counter() - start
        assert status == 200
        return elapsed
    return timed_concurrently(request, count, concurrency)


def direct_runs(argv, env, prompt, count, concurrency=1):
    """Times (s) of running the same codex command directly, `concurrency` at a time."""
    def run():
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        proc.stdin.write(prompt.encode())
        proc.stdin.close()
        for line in proc.stdout:      # the proxy answers here too, not at exit
            if b'"turn.completed"' in line:
                break
        elapsed = time.perf_counter() - start
        proc.stdout.close()
        proc.wait(60)
        return elapsed
    return timed_concurrently(run, count, concurrency)


def ms(seconds):
    return f"{seconds * 1000:7.1f} ms"


def bench_proxy_overhead(folder, count=200):
    script = folder / "instant-codex"
    script.write_text(INSTANT_CODEX)
    script.chmod(0o755)
    # The proxy runs in its own process, as a user runs it, so that the
    # benchmark's client threads do not share its interpreter lock.
    proc = spawn_proxy_process(script, folder, CODEX_PROXY_MAX_CONCURRENT="16")
    try:
        proxy = types.SimpleNamespace(base=re.search(
            r"listening on (http://\S+)", proc.stdout.readline()).group(1))
        for concurrency in (1, 8):
            direct = direct_runs([str(script), "exec", "--json", "-"], os.environ, "hi", count,
                                 concurrency)
            print(f"instant fake codex run directly, concurrency {concurrency}: p50 "
                  f"{ms(percentile(direct, 50))}  p99 {ms(percentile(direct, 99))}  ({count} runs)")
            lat = timed_requests(proxy.base, chat_body(), count, concurrency)
            added50 = percentile(lat, 50) - percentile(direct, 50)
            added99 = percentile(lat, 99) - percentile(direct, 99)
            print(f"through the proxy, concurrency {concurrency}: p50 {ms(percentile(lat, 50))}  "
                  f"p99 {ms(percentile(lat, 99))}  -> added p50 {ms(added50)}  p99 {ms(added99)}")
        ttfb = []
        for _ in range(50):
            start = time.perf_counter()
            sock = open_raw_stream(proxy, chat_body(stream=True))
            recv_until(sock, b"role")
            ttfb.append(time.perf_counter() - start)
            recv_until(sock, b"0\r\n\r\n")
            sock.close()
        print(f"stream time to first byte: p50 {ms(percentile(ttfb, 50))}  "
              f"p99 {ms(percentile(ttfb, 99))}  (50 streams)")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_real_codex(folder, runs=20):
    codex = shutil.which("codex")
    if not codex:
        print("real Codex benchmarks skipped: codex is not on PATH")
        return
    env = E2E(folder, codex)
    try:
        proxy = env.proxy(tool_result_timeout=60)
        argv_prefix, user_config = proxy.server.check_ready()
        run_dir = folder / "direct-run"
        run_dir.mkdir()
        workdir, instructions, _ = cp.make_run_files(
            str(run_dir), cp.render_instructions([], [], "auto"), [])
        argv = cp.codex_argv(argv_prefix, model="gpt-5.5", effort=None, user_config=user_config,
                             extra_config=[], workdir=workdir, instructions_path=instructions,
                             catalog=proxy.server.catalog_path)
        direct_env = dict(proxy.server.env)
        via, direct = [], []
        for _ in range(runs):       # interleaved, so both see the same machine load
            via += timed_requests(proxy.base, chat_body(model="5.5-tpg"), 1, 1)
            pid = proxy.wait_event("codex_forward", len(via))[-1]["pid"]
            wait_until(lambda: not pid_alive(pid), 10)     # its exit must not slow the next
            direct += direct_runs(argv, direct_env, "hello", 1)
        ratio = percentile(via, 50) / percentile(direct, 50)
        print(f"real codex, plain answer: through the proxy p50 {ms(percentile(via, 50))}, "
              f"codex exec directly (to turn.completed) p50 {ms(percentile(direct, 50))}  -> "
              f"ratio {ratio:.3f} "
              f"(target <= 1.05; {runs} runs each)")
        bench_resume(env, proxy, runs)
    finally:
        env.close()


def answer_from_results(body, index):
    """The model: call read_file once, then answer from its result, whether the
    result comes as a function_call_output (resumed) or in a transcript (fresh)."""
    if "CONTENT-" in json.dumps(body["input"]):
        return [message_item("The file holds the content.")]
    return [function_call_item("read_file", {"path": "f.py"}, f"call_{index}")]


def bench_resume(env, proxy, runs):
    env.responder = answer_from_results
    follow_ups, fresh = [], []
    for n in range(runs):
        messages = [{"role": "user", "content": f"read f{n}.py"}]
        _, message, _, _ = tool_round(proxy, messages)
        messages += [message, *results_for(message, "CONTENT-x")]
        start = time.perf_counter()
        assert tool_round(proxy, messages)[2] == "stop"          # resumes the parked turn
        follow_ups.append(time.perf_counter() - start)
        for m in messages:                                       # same size, nothing parked
            for c in m.get("tool_calls", []):
                c["id"] = c["id"] + "-fresh"
            if m.get("tool_call_id"):
                m["tool_call_id"] += "-fresh"
        start = time.perf_counter()
        assert tool_round(proxy, messages)[2] == "stop"          # a fresh Codex (fallback)
        fresh.append(time.perf_counter() - start)
    speedup = percentile(fresh, 50) / percentile(follow_ups, 50)
    print(f"tool result follow-up (parked turn resumed) p50 {ms(percentile(follow_ups, 50))}, "
          f"fresh request of the same size p50 {ms(percentile(fresh, 50))}  -> {speedup:.1f}x "
          f"faster (target >= 3x; {runs} runs each)")


if __name__ == "__main__" and "--bench" in sys.argv:
    import tempfile
    with tempfile.TemporaryDirectory(prefix="codex-proxy-bench-") as tmp:
        base = __import__("pathlib").Path(tmp)
        (base / "a").mkdir()
        (base / "b").mkdir()
        bench_proxy_overhead(base / "a")
        bench_real_codex(base / "b")
