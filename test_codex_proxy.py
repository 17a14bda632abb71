"""Tests for codex_proxy.py.

Most behaviour runs against a fake `codex` (a small Python script written into
tmp_path) that speaks both engines: `codex app-server` JSON-RPC, and `codex
exec --json` with the MCP bridge.  It plays a scenario the test writes and
records what it was given.  The end-to-end tests run the real Codex CLI
against a fake Responses upstream on loopback; they skip when `codex` is not
on PATH, except under CI (CI=true), where a missing CLI fails them.  The
benchmarks and the stress run: `python3 test_codex_proxy.py --bench` and
`--stress`; they print figures and assert nothing about time.

The helpers come first (polling and HTTP, the fake upstream, the fake codex,
the fixtures), then one section per feature: requests, each API, tool calls
and parked turns, conversations, stored responses, web search, the plan's
windows, models, failures, processes, access, HTTP, start-up, logs, and the
code's shape.  A feature's end-to-end tests sit in its section, after its
fast tests.  The benchmarks come last.
"""

import base64
import collections
import copy
import dataclasses
import functools
import http.client
import http.server
import inspect
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import types
import urllib.error
import urllib.request
import zlib

import pytest

import codex_proxy as cp

HERE = os.path.dirname(os.path.abspath(__file__))
PROXY_SCRIPT = os.path.join(HERE, "codex_proxy.py")
ENGINES = ["app-server", "exec"]

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
    # A zombie is not alive, once its last thread is gone: a killed process's
    # first thread turns zombie while the others are still exiting, and until
    # they have, its parent cannot see the exit.
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return False
    return not (status["State"].split()[0] == "Z" and int(status["Threads"]) <= 1)


def port_of(base):
    return int(base.rsplit(":", 1)[1].split("/")[0])


class Deadline:
    """Shut a socket down when `seconds` have passed, so that no read on it
    outlives the deadline, however the peer trickles (keepalives included)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.expired = False
        self._timer = None

    def watch(self, sock):
        def expire():
            self.expired = True
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._timer = threading.Timer(self.seconds, expire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def cancel(self):
        if self._timer is not None:
            self._timer.cancel()


def http_request(base, method, path, body=None, headers=None, timeout=30, head_only=False):
    """-> (status, headers dict lower-cased, raw body bytes); the whole
    exchange must be over within `timeout` seconds.  `head_only` reads the
    status and headers, not the body (an endless stream's)."""
    conn = http.client.HTTPConnection("127.0.0.1", port_of(base), timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    deadline = Deadline(timeout)
    try:
        conn.connect()
        deadline.watch(conn.sock)
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = b"" if head_only else resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw
    except (OSError, http.client.HTTPException):
        if deadline.expired:
            pytest.fail(f"{method} {path}: no whole answer within {timeout} s")
        raise
    finally:
        deadline.cancel()
        conn.close()


def post_chat(base, body, headers=None, path="/v1/chat/completions", timeout=60):
    return http_request(base, "POST", path, body, headers, timeout)


def raw_exchange(base, data, timeout=10.0, half_close=True):
    """Send raw bytes on a new connection and (unless `half_close` is false)
    say that is all; -> the response read (headers and a Content-Length
    body), or what came before the peer closed.  A half-closed client is one
    that left, as far as a turn is concerned: send whole requests that
    should be answered with half_close=False."""
    sock = socket.create_connection(("127.0.0.1", port_of(base)), timeout=timeout)
    try:
        sock.sendall(data)
        try:
            if half_close:
                sock.shutdown(socket.SHUT_WR)   # nothing more will come
        except OSError:
            pass                            # the proxy closed it already: read its answer
        return recv_response(sock, timeout)
    finally:
        sock.close()


def recv_some(sock, deadline):
    """One read that ends by the deadline -> bytes; b"" at the end or the deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        return b""
    sock.settimeout(left)
    try:
        return sock.recv(65536)
    except socket.timeout:
        return b""


def recv_response(sock, timeout=10.0):
    """One HTTP response with a Content-Length body (or up to close)."""
    seen, deadline = b"", time.monotonic() + timeout
    while True:
        head, sep, rest = seen.partition(b"\r\n\r\n")
        match = re.search(rb"(?i)content-length: *(\d+)", head) if sep else None
        if match and len(rest) >= int(match.group(1)):
            return seen
        data = recv_some(sock, deadline)
        if not data:
            return seen
        seen += data


def sse_events(raw, named=False):
    """Parse an SSE body -> its data payloads ('[DONE]' kept as str).  With
    `named`, every event has an `event:` line that names its data's type."""
    events = []
    for block in raw.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        names = [line[7:] for line in lines if line.startswith("event: ")]
        for line in lines:
            if line.startswith("data: "):
                payload = line[6:]
                data = payload if payload == "[DONE]" else json.loads(payload)
                if named:
                    assert names == [data["type"]], block
                events.append(data)
    return events


def chat_body(text="hello", **extra):
    return {"model": "xedoc-2.5-tpg", "messages": [{"role": "user", "content": text}],
            **extra}


def tiny_png():
    """A valid 1x1 PNG, so that Codex can decode it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------
# Fake Responses upstream (for the real Codex CLI)
# ---------------------------------------------------------------------------

class FakeUpstream:
    """A loopback Responses API.  `responder(body, index)` returns a list of
    output items, ("status", code, body_dict), ("sleep", s, items), or
    ("drip", seconds_between, [delta, ...], reasoning_text, (n, event)) for a
    message streamed delta by delta (held before delta n until the event)."""

    USAGE = {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 40},
             "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 5},
             "total_tokens": 120}

    def __init__(self, responder):
        self.responder = responder
        self.headers = {}       # sent on every streamed answer (the plan's x-codex-* windows)
        self.requests = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()      # ends a "sleep" or "drip" early at close()
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
                    upstream.requests.append({"path": self.path, "body": body,
                                              "headers": dict(self.headers)})
                    index = len(upstream.requests) - 1
                upstream.serve(self, body, index)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def bodies(self):
        with self.lock:
            return [r["body"] for r in self.requests]

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
        for name, value in self.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.close_connection = True
        rid = f"resp_{index}"
        try:
            self.send(handler, {"type": "response.created", "response": {"id": rid}})
            if isinstance(reply, tuple) and reply[0] == "drip":
                if not self.drip(handler, *reply[1:]):
                    return
            else:
                for item in reply:
                    self.send(handler, {"type": "response.output_item.done", "item": item})
            self.send(handler, {"type": "response.completed",
                                "response": {"id": rid, "usage": self.USAGE}})
        except OSError:
            pass

    def drip(self, handler, pause, deltas, reasoning=None, gate=None):
        index = 0
        if reasoning:
            self.send(handler, {"type": "response.output_item.added", "output_index": 0,
                                "item": {"type": "reasoning", "id": "rs_1", "summary": []}})
            self.send(handler, {"type": "response.reasoning_summary_text.delta",
                                "item_id": "rs_1", "output_index": 0, "summary_index": 0,
                                "delta": reasoning})
            self.send(handler, {"type": "response.output_item.done", "output_index": 0,
                                "item": reasoning_item(reasoning)})
            index = 1
        self.send(handler, {"type": "response.output_item.added", "output_index": index,
                            "item": {"type": "message", "role": "assistant", "id": "msg_1",
                                     "content": []}})
        for n, delta in enumerate(deltas):
            if gate is not None and n == gate[0]:       # hold here until the test lets go
                deadline = time.monotonic() + 60
                while not gate[1].wait(0.05):
                    if self.stopping.is_set() or time.monotonic() > deadline:
                        return False
            if self.stopping.wait(pause):
                return False
            self.send(handler, {"type": "response.output_text.delta", "item_id": "msg_1",
                                "output_index": index, "content_index": 0, "delta": delta})
        self.send(handler, {"type": "response.output_item.done", "output_index": index,
                            "item": message_item("".join(deltas))})
        return True

    @staticmethod
    def send(handler, event):
        handler.wfile.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
        handler.wfile.flush()

    def close(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def message_item(text):
    return {"type": "message", "role": "assistant", "id": "msg_1",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def reasoning_item(text):
    return {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": text}]}


def function_call_item(name, arguments, call_id, namespace=None):
    item = {"type": "function_call", "id": "fc_" + call_id, "call_id": call_id,
            "name": name, "arguments": json.dumps(arguments)}
    if namespace:
        item["namespace"] = namespace
    return item


# ---------------------------------------------------------------------------
# Fake codex: both engines, scripted by the test, recording what it was given
# ---------------------------------------------------------------------------

# The fake `codex` is the code below, run as its own small program: FakeCodex
# writes the source of FAKE_CODEX_PARTS into an executable file, so the
# program needs nothing but the standard library (and, for exec's -c values,
# codex_proxy's TOML reader).  Its folder holds the scenario it plays
# (scenario.json) and the records of what each process was given.


FAKE_USAGE = {"input_tokens": 11, "cached_input_tokens": 3, "output_tokens": 7,
              "reasoning_output_tokens": 2}


class FakeProcess:
    """One fake codex process: its arguments, its scenario, its record."""

    def __init__(self, state, args):
        self.state, self.engine = state, args[0]
        self.out_lock = threading.Lock()       # one JSON line at a time on stdout
        self.save_lock = threading.Lock()      # one writer of the record at a time
        self.conf, self.model, self.images = {}, None, []
        i = 1
        while i < len(args):
            a = args[i]
            if a == "-c":
                key, _, value = args[i + 1].partition("=")
                self.conf[key] = value
                i += 2
            elif a.startswith("--model="):
                self.model = a.split("=", 1)[1]
                i += 1
            elif a in ("-i", "-s", "-C", "--disable", "--output-schema"):
                if a == "-i":
                    self.images.append(args[i + 1])
                if a == "--output-schema":
                    with open(args[i + 1]) as f:
                        self.conf["output_schema"] = json.dumps(json.load(f))
                i += 2
            else:
                i += 1
        cwd = os.getcwd()
        self.record = {"engine": self.engine, "argv": args, "conf": self.conf,
                       "model": self.model, "pid": os.getpid(), "cwd": cwd,
                       "cwd_files": os.listdir(cwd), "env_keys": sorted(os.environ),
                       "env_values": list(os.environ.values()), "tools": None,
                       "results": [], "ended": False, "interrupted": False}

    def path(self, name):
        return os.path.join(self.state, name)

    def emit(self, event):
        with self.out_lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    def save(self, record=None, thread="0"):
        """One record per turn of each thread (a kept thread has several):
        records/PID-THREAD-TURN.json.  Threads save one at a time: two
        writers of one file leave a torn one."""
        record = self.record if record is None else record
        with self.save_lock:
            turn = len(record.get("turns", []))
            path = self.path(os.path.join("records", f"{os.getpid()}-{thread}-{turn}.json"))
            for _ in range(100):        # another thread may add a key meanwhile
                try:
                    data = json.dumps(record)
                    break
                except RuntimeError:
                    time.sleep(0.001)
            with open(path + ".tmp", "w") as f:
                f.write(data)
            os.replace(path + ".tmp", path)

    def read_json(self, name, default=None):
        if not os.path.exists(self.path(name)):
            return default
        with open(self.path(name)) as f:
            return json.load(f)

    def scenario(self, prompt):
        """The steps of the first rule whose `when` is in the prompt."""
        for rule in self.read_json("scenario.json", []):
            if rule.get("when") is None or rule["when"] in prompt:
                return rule["steps"]
        return [{"thread": True}, {"text": "fake answer"}, {"complete": {}}]

    def fill(self, text, record=None):
        """A scenario's text with what the run (or thread) was given filled in."""
        record = self.record if record is None else record
        results = [r["text"] for r in record["results"]]
        return text.format(prompt=record.get("prompt", ""), results=" | ".join(results),
                           model=record.get("model"),
                           seen=record.get("seen", record.get("prompt", "")))

    def common_step(self, kind, value):
        """Steps both engines play alike."""
        if kind == "plain":
            print(value, flush=True)
        elif kind == "stderr":
            print(value, file=sys.stderr, flush=True)
        elif kind == "sleep":
            time.sleep(value)
        elif kind == "wait_file":
            deadline = time.time() + 30
            while not os.path.exists(self.path(value)) and time.time() < deadline:
                time.sleep(0.01)
        elif kind == "touch":
            open(self.path(value), "w").close()
        elif kind == "ignore_term" and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)    # app-server: see turn/start
        elif kind == "exit":           # from any thread, at once
            sys.stdout.flush()
            os._exit(value)


class FakeMcpClient:
    """The exec engine's side of the MCP bridge (codex_proxy.py --mcp-bridge)."""

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

    def notify(self, method):
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", "method": method}).encode() + b"\n")
        self.proc.stdin.flush()


class FakeExec:
    """`codex exec --json`: the prompt on stdin, JSONL events on stdout."""

    def __init__(self, fake):
        self.fake = fake
        self.mcp = None

    @staticmethod
    def toml(value):
        sys.path.insert(0, os.environ["FAKE_CODEX_PROXY_DIR"])
        import codex_proxy          # its TOML reader (this may be Python 3.9)
        return codex_proxy.read_toml("v = " + value)["v"]

    def run(self):
        fake, record, conf = self.fake, self.fake.record, self.fake.conf
        record["prompt"] = sys.stdin.read()
        record["turn_order"] = time.time()
        with open(self.toml(conf["model_instructions_file"])) as f:
            record["instructions"] = f.read()
        record["images"] = []
        for path in fake.images:
            with open(path, "rb") as f:
                record["images"].append(f.read().hex())
        record["image_paths"] = fake.images
        if "mcp_servers.client.command" in conf:
            self.start_bridge()
        fake.save()
        for n, step in enumerate(fake.scenario(record["prompt"])):
            self.step(n, *next(iter(step.items())))
        record["ended"] = True
        fake.save()

    def start_bridge(self):
        conf, record = self.fake.conf, self.fake.record
        mcp = self.mcp = FakeMcpClient(self.toml(conf["mcp_servers.client.command"]),
                                       self.toml(conf["mcp_servers.client.args"]))
        mcp.request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {}})
        mcp.notify("notifications/initialized")
        record["tools"] = mcp.request("tools/list", {})["result"]["tools"]
        record["bridge_pid"] = mcp.proc.pid

    def step(self, n, kind, value):
        emit, fill = self.fake.emit, self.fake.fill
        if kind == "thread":
            emit({"type": "thread.started", "thread_id": "thread-fake"})
            emit({"type": "turn.started"})
        elif kind in ("text", "reasoning", "deltas"):
            text = "".join(value) if kind == "deltas" else value
            emit({"type": "item.completed", "item": {
                "id": f"item_{n}", "type": "reasoning" if kind == "reasoning" else
                "agent_message", "text": fill(text)}})
        elif kind == "warning":
            emit({"type": "error", "message": value})
        elif kind == "item_error":
            emit({"type": "item.completed", "item": {"id": "item_e", "type": "error",
                                                     "message": value}})
        elif kind == "complete":
            emit({"type": "turn.completed", "usage": dict(FAKE_USAGE, **value)})
        elif kind == "fail":
            emit({"type": "turn.failed", "error": {"message": value}})
        elif kind == "calls":
            self.calls(value)
        elif kind == "command":
            emit({"type": "item.completed", "item": {"id": "c", "type": "command_execution"}})
        elif kind == "search":          # exec tells a search, with no citations
            emit({"type": "item.started", "item": {"id": f"ws_{n}", "type": "web_search",
                                                   "query": "", "action": {"type": "search"}}})
            emit({"type": "item.completed", "item": {
                "id": f"ws_{n}", "type": "web_search", "query": value,
                "action": {"type": "search", "query": value, "queries": [value]}}})
        elif kind == "cited":
            emit({"type": "item.completed", "item": {"id": f"item_{n}", "type": "agent_message",
                                                     "text": value["text"]}})
        elif kind == "loop_unknown":          # exec tells only its log of each refused call
            for n in range(200):
                print(f"ERROR codex_core::tools::router: error=unsupported call: {value}",
                      file=sys.stderr, flush=True)
                self.fake.record["model_calls"] = n + 1
                self.fake.save()
                time.sleep(0.01)
        else:
            self.fake.common_step(kind, value)

    def calls(self, calls):
        """Each call through the bridge, side by side, as Codex makes them:
        each announced on stdout first, then made."""
        answers = [None] * len(calls)
        for n, call in enumerate(calls):
            self.fake.emit({"type": "item.started", "item": {
                "id": f"item_c{n}", "type": "mcp_tool_call", "server": "client",
                "tool": call["name"], "arguments": call.get("arguments", {}),
                "status": "in_progress"}})

        def one(n, call):
            params = {"name": call["name"], "arguments": call.get("arguments", {})}
            if call.get("id"):
                params["_meta"] = {"callId": call["id"]}
            answers[n] = self.mcp.request("tools/call", params)["result"]
        threads = [threading.Thread(target=one, args=(n, c)) for n, c in enumerate(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n, answer in enumerate(answers):
            self.fake.record["results"].append({
                "name": calls[n]["name"], "text": answer["content"][0]["text"],
                "is_error": answer.get("isError", False)})
        self.fake.save()


class FakeAppServer:
    """`codex app-server`: JSON-RPC on stdin/stdout, any number of threads
    (each a FakeThread with its own record), their turns."""

    def __init__(self, fake):
        self.fake = fake
        self.record = fake.record           # the process's own: initialize, methods
        self.lock = threading.Lock()        # guards waiting, next_id and threads
        self.waiting, self.next_id = {}, 0
        self.threads = {}

    def emit(self, message):
        self.fake.emit(message)

    def request(self, method, params):
        """A request to the proxy -> the slot its answer lands in."""
        with self.lock:
            rid, self.next_id = self.next_id, self.next_id + 1
            slot = self.waiting[rid] = [threading.Event()]
        self.emit({"id": rid, "method": method, "params": params})
        return slot

    def serve(self):
        for line in sys.stdin:
            msg = json.loads(line)
            method, mid, params = msg.get("method"), msg.get("id"), msg.get("params") or {}
            if method is None:
                with self.lock:
                    slot = self.waiting.pop(mid, None)
                if slot:
                    slot.append(msg)
                    slot[0].set()
                continue
            self.record.setdefault("methods", []).append(method)
            thread = self.threads.get(params.get("threadId"))
            handler = getattr(thread, "on_" + method.replace("/", "_"), None) or \
                getattr(self, "on_" + method.replace("/", "_"), None)
            if handler is None:
                self.reply(mid, error={"code": -32601, "message": "unknown " + method})
            else:
                handler(mid, params)

    def reply(self, mid, result=None, error=None):
        self.emit({"id": mid, "error": error} if error else {"id": mid, "result": result})

    def on_initialize(self, mid, params):
        self.record["initialize"] = params
        self.fake.save()
        self.reply(mid, {"userAgent": "fake", "codexHome": "/x"})

    def on_initialized(self, mid, params):
        pass

    def on_config_read(self, mid, params):
        if self.fake.read_json("no_config_read"):
            self.reply(mid, error={"code": -32601, "message": "unknown config/read"})
        else:
            self.reply(mid, {"config": self.fake.read_json("effective_config.json", {})})

    def on_account_rateLimits_read(self, mid, params):
        limits = self.fake.read_json("rate_limits.json")
        if limits is None:
            self.reply(mid, error={"code": -32600, "message": "no ChatGPT login"})
        else:
            self.reply(mid, {"rateLimits": limits})

    def on_thread_start(self, mid, params):
        with self.lock:
            self.started = getattr(self, "started", 0) + 1
            thread = FakeThread(self, f"thread-{os.getpid()}-{self.started}")
            self.threads[thread.thread_id] = thread
        thread.start(params)
        self.reply(mid, {"thread": {"id": thread.thread_id}})
        self.emit({"method": "thread/started", "params": {"thread": {"id": thread.thread_id}}})


class FakeThread:
    """One thread of the fake app-server: its record (what the process was
    given, and what this thread was), its turns."""

    def __init__(self, server, thread_id):
        self.server, self.fake = server, server.fake
        self.thread_id, self.turn_id = thread_id, "turn-fake"
        self.record = dict(server.record, thread_id=thread_id, results=[], ended=False,
                           interrupted=False)
        self.interrupted = threading.Event()        # the current turn's

    def notify(self, method, params):
        self.fake.emit({"method": method, "params": dict(params, threadId=self.thread_id)})

    def save(self):
        """One record per turn of this thread: records/PID-THREAD-TURN.json."""
        self.record["methods"] = list(self.server.record.get("methods", []))
        self.fake.save(self.record, self.thread_id.rsplit("-", 1)[1])

    def raw(self, method, params):
        if (self.record.get("thread") or {}).get("experimentalRawEvents"):
            self.notify(method, params)

    def start(self, params):
        record = self.record
        record["thread"] = params
        record["conf"] = params.get("config") or {}
        record["model"] = params.get("model")
        record["instructions"] = params.get("baseInstructions")
        record["tools"] = [{"name": t["name"], "description": t["description"],
                            "inputSchema": t["inputSchema"]}
                           for t in params.get("dynamicTools") or []] or None
        self.save()

    def on_thread_inject_items(self, mid, params):
        self.record.setdefault("injected", []).extend(params["items"])
        self.save()
        gate = self.fake.read_json("inject_gate")       # hold the answer until a file exists
        if gate:
            threading.Thread(target=self._answer_after, args=(mid, gate), daemon=True).start()
        else:
            self.server.reply(mid, {})

    def _answer_after(self, mid, gate):
        self.fake.common_step("wait_file", gate)
        self.server.reply(mid, {})

    def on_thread_unsubscribe(self, mid, params):
        self.record["unsubscribed"] = True
        self.save()
        with self.server.lock:
            self.server.threads.pop(self.thread_id, None)
        self.server.reply(mid, {"status": "unsubscribed"})

    def on_turn_start(self, mid, params):
        record = self.record
        record["turn"] = params
        record["prompt"] = "\n".join(i["text"] for i in params["input"] if i["type"] == "text")
        record["turn_order"] = time.time()
        record["images"] = [i["url"] for i in params["input"] if i["type"] == "image"]
        record["results"], record["ended"] = [], False
        record.setdefault("turns", []).append({"prompt": record["prompt"],
                                               "injected": len(record.get("injected", []))})
        self.turn_id = f"turn-fake-{len(record['turns'])}"
        self.interrupted = threading.Event()
        record["seen"] = self.seen()
        self.save()
        steps = self.fake.scenario(record["seen"])
        if any("ignore_term" in step for step in steps):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)    # only the main thread may
        self.server.reply(mid, {"turn": {"id": self.turn_id, "status": "inProgress"}})
        threading.Thread(target=self.play, args=(steps, self.interrupted), daemon=True).start()

    def seen(self):
        """What the model sees this turn, for choosing the scenario: the
        history injected so far, then the turn's input."""
        return json.dumps(self.record.get("injected", [])) + "\n" + self.record["prompt"]

    def on_turn_interrupt(self, mid, params):
        self.record["interrupted"] = True
        self.save()
        self.interrupted.set()
        self.server.reply(mid, {})

    def play(self, steps, interrupted):
        self.notify("turn/started", {"turn": {"id": self.turn_id}})
        for n, step in enumerate(steps):
            if interrupted.is_set():
                break
            self.step(n + 1, step, *next(iter(step.items())))
        if interrupted.is_set():
            self.notify("turn/completed", {"turn": {"id": self.turn_id,
                                                    "status": "interrupted"}})
        self.record["ended"] = True
        self.save()

    def step(self, n, step, kind, value):
        fill = functools.partial(self.fake.fill, record=self.record)
        if kind in ("text", "deltas"):
            self.message(f"m{n}", [fill(value)] if kind == "text" else
                         [fill(v) for v in value], step.get("pause"))
        elif kind == "whole_text":
            self.notify("item/completed", {"item": {"type": "agentMessage", "id": f"m{n}",
                                                    "text": fill(value)}})
        elif kind == "reasoning":
            self.notify("item/reasoning/summaryTextDelta", {"itemId": f"r{n}",
                        "delta": fill(value), "summaryIndex": 0})
            self.notify("item/completed", {"item": {"type": "reasoning", "id": f"r{n}",
                                                    "summary": [fill(value)]}})
        elif kind in ("warning", "item_error"):
            self.notify("error", {"error": {"message": value}, "willRetry": True})
        elif kind == "complete":
            self.complete(dict(FAKE_USAGE, **value))
        elif kind == "fail":
            error = {"message": value, "codexErrorInfo": step.get("info"),
                     "additionalDetails": None}
            self.notify("error", {"error": error, "willRetry": False})
            self.notify("turn/completed", {"turn": {"id": self.turn_id, "status": "failed",
                                                    "error": error}})
        elif kind == "calls":
            self.calls(value, step.get("gap", 0), step.get("raw", True), step.get("gate"))
        elif kind == "rate_limits":
            self.fake.emit({"method": "account/rateLimits/updated",
                            "params": {"rateLimits": value}})
        elif kind == "command":
            self.notify("item/started", {"item": {"type": "commandExecution", "id": "c"}})
        elif kind == "notice":
            self.notify("warning", {"message": value})
        elif kind == "loop_unknown":
            self.loop_unknown(value)
        elif kind == "search":
            self.search(f"ws_{n}", value)
        elif kind == "cited":
            self.message(f"m{n}", [value["text"]], None)
            self.raw("rawResponseItem/completed", {"item": {
                "type": "message", "id": f"m{n}", "role": "assistant", "content": [{
                    "type": "output_text", "text": value["text"], "annotations": [
                        dict(c, type="url_citation") for c in value["citations"]]}]}})
        elif kind != "thread":
            self.fake.common_step(kind, value)

    def search(self, item_id, query):
        """A hosted web search, as app-server tells it (webSearch items)."""
        self.notify("item/started", {"item": {"type": "webSearch", "id": item_id, "query": "",
                                              "action": {"type": "search", "query": None}}})
        self.notify("item/completed", {"item": {
            "type": "webSearch", "id": item_id, "query": query,
            "action": {"type": "search", "query": query, "queries": [query]}}})
        self.raw("rawResponseItem/completed", {"item": {
            "type": "web_search_call", "id": item_id, "status": "completed",
            "action": {"type": "search", "query": query}}})

    def answer_of(self, slot):
        while not slot[0].wait(0.05):
            if self.interrupted.is_set():
                return None
        return slot[1]

    def loop_unknown(self, name):
        """A model that calls a tool nobody declared, again and again, each
        answered by Codex itself: as many model calls as it is allowed."""
        for n in range(200):
            if self.interrupted.is_set():
                return
            self.raw("rawResponseItem/completed", {"item": {
                "type": "function_call", "name": name, "call_id": f"call_u{n}",
                "arguments": "{}"}})
            self.raw("rawResponse/completed", {"responseId": f"resp_u{n}"})
            self.record["model_calls"] = n + 1
            self.save()
            time.sleep(0.01)

    def message(self, item_id, deltas, pause):
        self.notify("item/started", {"item": {"type": "agentMessage", "id": item_id,
                                              "text": ""}})
        for delta in deltas:
            if self.interrupted.is_set():
                break
            self.notify("item/agentMessage/delta", {"itemId": item_id, "delta": delta})
            if pause:
                time.sleep(pause)
        self.notify("item/completed", {"item": {"type": "agentMessage", "id": item_id,
                                                "text": "".join(deltas)}})

    def complete(self, usage):
        """The thread's usage, then the end of the turn.  `total` is the
        thread's running sum and `last` the model call's own: a turn's usage
        is what it added to the total."""
        def counts(usage):
            return {"inputTokens": usage["input_tokens"],
                    "cachedInputTokens": usage["cached_input_tokens"],
                    "outputTokens": usage["output_tokens"],
                    "reasoningOutputTokens": usage["reasoning_output_tokens"],
                    "totalTokens": usage["input_tokens"] + usage["output_tokens"]}
        total = self.record.setdefault("usage_total", {k: 0 for k in usage})
        for key, value in usage.items():
            total[key] += value
        self.notify("thread/tokenUsage/updated", {"tokenUsage": {
            "total": counts(total), "last": counts({k: v // 2 for k, v in usage.items()}),
            "modelContextWindow": 1000}})
        self.notify("turn/completed", {"turn": {"id": self.turn_id, "status": "completed"}})

    def calls(self, calls, gap, raw, gate=None):
        """Each call as Codex sends it: its raw item, then the request; the
        raw end of the response once all are out.  Between calls: `gap`
        seconds, or until the file `gate` exists."""
        slots = []
        for n, call in enumerate(calls):
            if n and gap:
                time.sleep(gap)
            if n and gate:
                self.fake.common_step("wait_file", gate)
            if raw:
                self.raw("rawResponseItem/completed", {"item": {
                    "type": "function_call", "name": call["name"], "call_id": call.get("id"),
                    "arguments": json.dumps(call.get("arguments", {}))}})
            self.notify("item/started", {"item": {"type": "dynamicToolCall",
                                                  "id": call.get("id"), "tool": call["name"]}})
            slots.append(self.server.request("item/tool/call", {
                "threadId": self.thread_id, "turnId": self.turn_id, "callId": call.get("id"),
                "namespace": None, "tool": call["name"], "arguments": call.get("arguments", {})}))
        if raw:
            self.raw("rawResponse/completed", {"responseId": "resp_fake"})
        for n, slot in enumerate(slots):
            answer = self.answer_of(slot)
            if answer is None:
                continue
            result = answer["result"]
            self.record["results"].append({"name": calls[n]["name"],
                                           "text": result["contentItems"][0]["text"],
                                           "is_error": not result["success"]})
        self.save()


def fake_codex_main(args):
    """The fake `codex` command line: --version, login status, debug models,
    exec and app-server, as the proxy uses them."""
    state = os.environ["FAKE_CODEX_DIR"]
    if args[:1] == ["--version"]:
        version_file = os.path.join(state, "version")
        if os.path.exists(version_file):
            with open(version_file) as f:
                print(f.read())
        else:
            print("codex-cli 0.0.0-fake")
        return 0
    if args[:2] == ["login", "status"]:
        if os.path.exists(os.path.join(state, "logged_out")):
            print("Not logged in", file=sys.stderr)
            return 1
        print("Logged in using ChatGPT")
        return 0
    if args[:2] == ["debug", "models"]:
        print(json.dumps({"models": [
            {"slug": "gpt-5.5", "visibility": "list", "supports_search_tool": True,
             "apply_patch_tool_type": "freeform", "priority": 13, "context_window": 272000,
             "input_modalities": ["text", "image"], "display_name": "GPT-5.5",
             "supported_reasoning_levels": [{"effort": "low"}, {"effort": "high"}]},
            {"slug": "gpt-6-sol", "visibility": "list", "tool_mode": "code_mode_only",
             "experimental_supported_tools": ["clock"], "priority": 6,
             "context_window": 500000, "input_modalities": ["text"],
             "supported_reasoning_levels": []},
            {"slug": "secret-model", "visibility": "hide", "priority": 1}]}))
        return 0
    if args[0] == "app-server" and os.path.exists(os.path.join(state, "no_app_server")):
        print("error: unrecognized subcommand 'app-server'", file=sys.stderr)
        return 2
    fake = FakeProcess(state, args)
    if fake.engine == "exec":
        FakeExec(fake).run()
        return 0
    fake.save()
    FakeAppServer(fake).serve()
    fake.record["stdin_closed"] = True
    fake.save()
    return 0


FAKE_CODEX_PARTS = (FAKE_USAGE, FakeProcess, FakeMcpClient, FakeExec, FakeAppServer,
                    FakeThread, fake_codex_main)


@functools.lru_cache(maxsize=None)
def fake_codex_program():
    """The fake codex's source: the parts above, then a call of its main
    (built once: inspect parses the whole file to find a class)."""
    parts = ["import functools, json, os, signal, subprocess, sys, threading, time",
             f"FAKE_USAGE = {FAKE_USAGE!r}"]
    parts += [inspect.getsource(part) for part in FAKE_CODEX_PARTS[1:]]
    parts.append("sys.exit(fake_codex_main(sys.argv[1:]))")
    return "\n\n\n".join(parts) + "\n"


class FakeCodex:
    """The fake codex's folder: its scenario in, its records out."""

    def __init__(self, folder):
        self.dir = folder
        (folder / "records").mkdir(parents=True)
        self.script = folder / "codex"
        self.script.write_text(f"#!{sys.executable}\n{fake_codex_program()}")
        self.script.chmod(0o755)
        self.env = {"FAKE_CODEX_DIR": str(folder), "FAKE_CODEX_PROXY_DIR": HERE}

    def scenario(self, *rules):
        """Each rule: steps, or (prompt substring, steps); first match wins."""
        data = [{"when": r[0], "steps": r[1]} if isinstance(r, tuple) else
                {"when": None, "steps": r} for r in rules]
        (self.dir / "scenario.json").write_text(json.dumps(data))

    def write(self, name, value):
        (self.dir / name).write_text(json.dumps(value))

    def all_records(self):
        out = []
        for path in sorted((self.dir / "records").glob("*.json"), key=os.path.getmtime):
            try:
                out.append(json.loads(path.read_text()))
            except ValueError:
                pass
        return out

    def records(self):
        """Records of processes that served a turn, oldest first."""
        return sorted((r for r in self.all_records() if "prompt" in r),
                      key=lambda r: r.get("turn_order", 0))

    def wait_records(self, n, timeout=10):
        assert wait_until(lambda: len(self.records()) >= n, timeout), self.all_records()
        return self.records()

    def pids(self):
        return sorted({r[k] for r in self.all_records() for k in ("pid", "bridge_pid")
                       if r.get(k)})

    def thread_records(self, thread_id):
        return [r for r in self.all_records() if r.get("thread_id") == thread_id]

    def run_ended(self, record, timeout=10):
        """Wait until the run a record belongs to has ended: its thread let
        go (unsubscribed: Codex unloads it; the process lives on) on
        app-server, its process gone on exec."""
        if record["engine"] == "exec":
            return wait_until(lambda: not pid_alive(record["pid"]), timeout)
        return wait_until(lambda: any(r.get("unsubscribed") for r in
                                      self.thread_records(record["thread_id"])), timeout)

    def run_alive(self, record):
        if record["engine"] == "exec":
            return pid_alive(record["pid"])
        return pid_alive(record["pid"]) and not any(
            r.get("unsubscribed") for r in self.thread_records(record["thread_id"]))

    def set_logged_out(self, value=True):
        flag = self.dir / "logged_out"
        if value:
            flag.write_text("")
        elif flag.exists():
            flag.unlink()


def conf_value(record, key):
    """A thread/run config value, whichever engine recorded it."""
    value = record["conf"].get(key)
    if record["engine"] == "exec" and value is not None:
        return cp.read_toml("v = " + value)["v"]
    return value


def seen_by_model(record):
    """All the conversation a fake codex was given: exec's transcript, or
    app-server's injected history items and the turn's input."""
    return json.dumps(record.get("injected", [])) + "\n" + record["prompt"]


def tool_names_of(record):
    return {t["name"] for t in record["tools"] or []}


def argv_config(record):
    """The `-c KEY=VALUE` settings a fake codex was started with."""
    argv = record["argv"]
    return dict(argv[i + 1].partition("=")[::2] for i, a in enumerate(argv) if a == "-c")


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
    assert wait_until(lambda: set(threading.enumerate()) <= threads_before, 15), \
        [t.name for t in set(threading.enumerate()) - threads_before]


def spawn_proxy_process(codex_bin, home, *args, **env):
    """`python3 codex_proxy.py` on a free loopback port, as a user runs it;
    its banner comes on the returned process's stdout."""
    env = dict(os.environ, CODEX_HOME=str(home), CODEX_PROXY_STATE_DIR=str(home / "state"),
               CODEX_PROXY_QUIET="1", **env)
    return subprocess.Popen([sys.executable, PROXY_SCRIPT, "--addr", "127.0.0.1:0",
                             "--codex-bin", str(codex_bin), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def read_banner(proc):
    lines = []
    while not lines or lines[-1].strip():
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("  logs:"):
            break
    return lines


def stop_process(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_proxy(config, extra_env=None, apis=cp.APIS):
    server = cp.ProxyServer(config, log_stream=None, apis=apis)
    server.env.update(extra_env or {})
    server.start_background()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="test-proxy", daemon=True)
    thread.start()
    return Proxy(server, thread)


TEST_DEADLINE_SECONDS = 240


@pytest.fixture(autouse=True)
def watchdog():
    """No test waits forever: past the deadline the main thread gets an
    exception wherever it blocks (a read, a join, a wait), so a hang is a
    failure with a traceback, not a suite that never ends."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"the test ran over {TEST_DEADLINE_SECONDS} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_DEADLINE_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


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

    def make(apis=cp.APIS, **overrides):
        fields = dict(port=0, codex_bin=str(fake_codex.script), codex_home=str(home),
                      state_dir=str(tmp_path / "state"), quiet=True, tool_quiet=0.1, codex_processes=1,
                      logs_html=os.path.join(HERE, "logs.html"))
        fields.update(overrides)
        proxy = start_proxy(cp.Config(**fields), fake_codex.env, apis)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()
    pids = fake_codex.pids()
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 10), \
        [p for p in pids if pid_alive(p)]
    assert_no_thread_outlives(threads_before)


@pytest.fixture
def proxy(make_proxy):
    """The default engine: app-server, chosen by its start-up probe."""
    return make_proxy()


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture
def both(make_proxy, engine):
    """The same test on each engine."""
    return make_proxy(engine=engine)


# ---------------------------------------------------------------------------
# Helpers: a sample config.toml, stored conversations
# ---------------------------------------------------------------------------

TOML_SAMPLE = r'''
# Codex's config, as users write it
model = "gpt-5.4"   # trailing comment
model_provider = 'mock'
model_reasoning_effort = "high"
notify = ["notify-send", "Codex"]
service_tier = """fast"""
literal = QQQa\bQQQ
escapes = "tab\there \"q\" \u00e9 \U0001F600"
numbers = [1, -2, +3, 0x1F, 0o17, 0b101, 1_000, 2.5, -1e3, inf]
nested = [[1, 2], ["a"], { x = 1, y.z = "w" },]
"dotted.key" = true
when = 1979-05-27T07:32:00Z
a.b.c = false

[model_providers.mock]
name = "mock"
base_url = "http://127.0.0.1:9/v1"
env_key = "MOCK_KEY"
request_max_retries = 0

[mcp_servers."my server"]
command = "rm"
args = [
  "-rf",  # comment inside an array
  "/",
]

[[profiles.list]]
name = "one"
[[profiles.list]]
name = "two"
'''.replace("QQQ", "'" * 3)


TOML_EXPECTED = {
    "model": "gpt-5.4", "model_provider": "mock", "model_reasoning_effort": "high",
    "notify": ["notify-send", "Codex"], "service_tier": "fast", "literal": "a\\b",
    "escapes": "tab\there \"q\" \u00e9 \U0001F600",
    "numbers": [1, -2, 3, 31, 15, 5, 1000, 2.5, -1000.0, float("inf")],
    "nested": [[1, 2], ["a"], {"x": 1, "y": {"z": "w"}}], "dotted.key": True,
    "a": {"b": {"c": False}},
    "model_providers": {"mock": {"name": "mock", "base_url": "http://127.0.0.1:9/v1",
                                 "env_key": "MOCK_KEY", "request_max_retries": 0}},
    "mcp_servers": {"my server": {"command": "rm", "args": ["-rf", "/"]}},
    "profiles": {"list": [{"name": "one"}, {"name": "two"}]},
}


def headers_of(pairs):
    message = http.client.HTTPMessage()
    for key, value in pairs:
        message[key] = value
    return message


def stored_conversation():
    call = cp.ToolCall("call_1", "read_file", '{"path": "a"}')
    reasoning = {"type": "reasoning", "summary": [], "encrypted_content": "ENC"}
    return [cp.Message("system", "rules", name=cp.INSTRUCTIONS_MESSAGE),
            cp.Message("user", "look", images=["data:image/png;base64,AAAA"]),
            cp.Message("assistant", "", tool_calls=[call], reasoning=[reasoning]),
            cp.Message("tool", "content", tool_call_id="call_1")]


STORE_WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
import codex_proxy as cp
store = cp.DiskStore(sys.argv[2], 10 ** 8, sys.argv[3])
for n in range(150):
    store.put(f"{sys.argv[3]}-{n}", [cp.Message("user", f"text {n}")],
              [{"id": f"{sys.argv[3]}-item-{n}", "type": "message"}])
    store.remember(f"{sys.argv[3]}-{n}")
store.close()
"""


# ---------------------------------------------------------------------------
# Helpers: responders and the pump, fed by hand (no process)
# ---------------------------------------------------------------------------

class FakeHandler:
    """What a responder and the pump need of an HTTP handler, recorded."""

    def __init__(self, gone=False):
        self.request_id = "req_test"
        self.chunks, self.json, self.error = [], None, None
        self.started = self.ended = False
        self.gone = gone
        self.close_connection = False
        self.stalled = False
        self.server = types.SimpleNamespace(seal=SEAL)

    def start_event_stream(self, content_type="text/event-stream"):
        self.started = True

    def write_chunk(self, data):
        assert self.started and not self.ended
        self.chunks.append(data)

    def end_chunks(self):
        self.ended = True

    def send_json(self, status, body, headers=None):
        self.json = (status, body)

    def send_error_body(self, error):
        self.error = error

    def client_gone(self):
        return self.gone

    def body(self):
        return b"".join(self.chunks)


def chat_request(**fields):
    return cp.parse_chat_request(dict(chat_body(), **fields))


class FakeRun:
    """A run whose events the test puts by hand."""

    engine = "fake"
    signals_responses = False

    def __init__(self, events=()):
        self.id, self.thread_id, self.proc, self.warm = "run_x", None, None, False
        self.model = self.effort = None
        self.events = queue.Queue()
        self.stderr_tail = []
        self.answers = []
        for event in events:
            self.events.put(event)

    def answer(self, call_id, text, is_error=False):
        self.answers.append((call_id, text, is_error))


class FakeLauncher:
    """What the pump needs of the launcher: config, logs, what failures
    mean, and whether a warning is worth logging."""

    def __init__(self, **config):
        self.config = cp.Config(**dict({"keepalive": 30.0, "tool_quiet": 0.05}, **config))
        self.logs = cp.LogBuffer(100)
        self.stopping = threading.Event()

    @staticmethod
    def failure(payload):
        return cp.classify_codex_error(payload)

    @staticmethod
    def redact(text):
        return text

    @staticmethod
    def worth_logging(warning):
        return True

    @staticmethod
    def default_model():
        return None


def pump(events, request=None, gone=False, **config):
    """A pump over a run fed by hand -> (pump, launcher, handler, run)."""
    launcher, handler = FakeLauncher(**config), FakeHandler(gone)
    request = request or chat_request(stream=True)
    out = cp.ChatResponder(handler, request, "content")
    out.open()
    run = FakeRun(events)
    return cp.TurnPump(run, out, handler, launcher), launcher, handler, run


def finished(p, handler):
    """The pump's TurnEnd, and the stream as the client would read it once
    the end is written (Turns writes the last bytes, not the pump)."""
    end = p.pump()
    if end.kind == "calls":
        p.responder.tool_calls([c.call for c in end.calls])
    if end.kind in ("calls", "answered"):
        p.responder.finish(end.reason, end.usage)
    return end, assemble_stream(sse_events(handler.body()))


def pending(call_id, name="read_file"):
    return cp.PendingCall(cp.ToolCall(call_id, name, "{}"))


# ---------------------------------------------------------------------------
# Helpers: conversations and kept threads
# ---------------------------------------------------------------------------

def chat_messages(*messages):
    return [cp.parse_message(m, n, "think") for n, m in enumerate(messages)]


def kept_run(run_id, exited=False):
    run = types.SimpleNamespace(id=run_id, exited=threading.Event())
    if exited:
        run.exited.set()
    return run


def settings(**changes):
    return dataclasses.replace(cp.ThreadSettings("instr", (("read_file", "d1"),), "gpt-5.5"),
                               **changes)


class SlowSettings(cp.ThreadSettings):
    """Settings whose comparison takes a while: two claims racing for one
    kept thread overlap for sure, unless something keeps them apart."""

    def differences(self, other):
        time.sleep(0.005)
        return super().differences(other)


CHAT_TURN = [{"thread": True}, {"text": "answer to: {prompt}"}, {"complete": {}}]


def converse(proxy, messages, **extra):
    status, _, raw = post_chat(proxy.base, {"model": "5.5-tpg", "messages": messages, **extra})
    assert status == 200, raw
    body = json.loads(raw)
    return body["choices"][0]["message"], body["usage"]


def image_part(data):
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


# ---------------------------------------------------------------------------
# Helpers: the odd tool names real clients send
# ---------------------------------------------------------------------------

ODD_TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name} tool",
                                               "parameters": {"type": "object", "properties": {
                                                   "q": {"type": "string"}}}}}
             for name in ("mcp.fs.read_file", "fs/list", "mcp__github__search", "exec_command",
                          "shell_command", "ok_name")]


# ---------------------------------------------------------------------------
# Helpers: a seal and a room for thinking signatures
# ---------------------------------------------------------------------------

SEAL = cp.Seal(b"k" * 32)


def room(limit=10 ** 7):
    return cp.Room(limit, seal=SEAL)


# ---------------------------------------------------------------------------
# Helpers: raw streams and chunking, a slow login
# ---------------------------------------------------------------------------

def assert_closed_maybe_408(sock):
    seen = recv_response(sock)
    assert seen == b"" or seen.startswith(b"HTTP/1.1 408 "), seen
    sock.settimeout(10)
    assert sock.recv(1) == b""                  # closed, not left idling


def open_raw_stream(proxy, body, path="/v1/chat/completions"):
    """POST a streaming request on a raw socket; return the socket."""
    sock = socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=20)
    data = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return sock


def recv_until(sock, marker, limit=10.0):
    """What the socket says up to `marker`, the peer closing or `limit` s."""
    seen, deadline = b"", time.monotonic() + limit
    while marker not in seen:
        data = recv_some(sock, deadline)
        if not data:
            break
        seen += data
    return seen


def strip_chunking(raw):
    """The complete chunks of a chunked HTTP response so far (headers dropped)."""
    _, sep, body = raw.partition(b"\r\n\r\n")
    out = b""
    while sep and body:
        size, sep, rest = body.partition(b"\r\n")
        if not sep or not re.fullmatch(rb"[0-9a-fA-F]+", size) or int(size, 16) == 0 \
                or len(rest) < int(size, 16):
            break
        out += rest[:int(size, 16)]
        body = rest[int(size, 16) + 2:]
    return out


SLOW_LOGIN = """#!/bin/sh
if [ "$1" = login ]; then
  touch "$FAKE_CODEX_DIR/login_check_started"
  i=0
  while [ ! -e "$FAKE_CODEX_DIR/release_login" ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done
fi
exec "$FAKE_CODEX_DIR/codex" "$@"
"""


# ---------------------------------------------------------------------------
# Helpers: the test key
# ---------------------------------------------------------------------------

KEY = "test-key-1234"


# ---------------------------------------------------------------------------
# Helpers: raw requests and fuzz
# ---------------------------------------------------------------------------

def request_bytes(head, body=b"", path=b"/v1/chat/completions", method=b"POST"):
    return method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head + b"\r\n" + body


def hostile_requests(seed, count):
    """A seeded stream of hostile requests: bodies, framing, headers."""
    rng = random.Random(seed)
    values = [None, True, 0, -1, 1e308, "", "x" * 300, "\ud800", "\x00", [], {}, [[]],
              {"a": {"b": {}}}, "https://evil.example/a.png", "\u202e", "A" * 70]
    fields = ["model", "messages", "stream", "tools", "tool_choice", "n", "stop",
              "response_format", "reasoning_effort", "stream_options", "input",
              "instructions", "previous_response_id", "text", "reasoning", "parallel_tool_calls"]

    def message():
        msg = {"role": rng.choice(["user", "system", "assistant", "tool", "function", "wizard",
                                   None, 5]),
               "content": rng.choice(values + [[{"type": rng.choice(
                   ["text", "image_url", "input_image", "input_file", None]),
                   "text": rng.choice(values), "image_url": rng.choice(values)}]])}
        for key in ("tool_calls", "tool_call_id", "name", "function_call"):
            if rng.random() < 0.2:
                msg[key] = rng.choice(values + [[{"function": rng.choice(values)}]])
        return msg

    for n in range(count):
        kind = rng.random()
        path = rng.choice([b"/v1/chat/completions", b"/v1/responses", b"/chat/completions"])
        if kind < 0.6:
            body = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(0, 5))}
            if rng.random() < 0.7:
                body["messages"] = [message() for _ in range(rng.randint(0, 3))]
            if rng.random() < 0.3:
                body["input"] = rng.choice(values + [[message()], [{"type": rng.choice(
                    ["function_call", "function_call_output", "item_reference", "reasoning"]),
                    "call_id": rng.choice(values), "name": rng.choice(values),
                    "output": rng.choice(values)}]])
            data = json.dumps(body).encode()
            yield request_bytes(b"Content-Type: application/json\r\nContent-Length: %d\r\n"
                                % len(data), data, path), True         # whole: it stays to read
        elif kind < 0.75:
            depth = rng.choice([70, 500, 3000])
            data = b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
            yield request_bytes(b"Content-Length: %d\r\n" % len(data), data, path), True
        elif kind < 0.9:
            head = rng.choice([b"Content-Length: -5\r\n", b"Content-Length: 99999999999\r\n",
                               b"Transfer-Encoding: chunked\r\n", b"Content-Length: abc\r\n",
                               b"Content-Length: 3\r\nContent-Length: 4\r\n", b""])
            body = rng.choice([b"", b"{}", b"-1\r\n", b"5\r\nabc\r\n0\r\n\r\n",
                               bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))])
            yield request_bytes(head, body, path), False       # framing junk: it leaves
        else:
            junk = bytes(rng.randrange(32, 127) for _ in range(rng.randint(1, 60)))
            yield rng.choice([junk + b"\r\n\r\n", b"GET " + junk + b" HTTP/1.1\r\n\r\n",
                              b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              + junk + b"\r\n\r\n"]), False


def fuzz(base, seed, count, deadline_seconds=60, timeout=10.0):
    """-> (tried, {status: count}, hangs).  Status 0: closed with no answer; a
    hang: no answer within `timeout` although the whole request was sent."""
    statuses, hangs, tried = {}, 0, 0
    deadline = time.monotonic() + deadline_seconds
    for data, whole in hostile_requests(seed, count):
        if time.monotonic() > deadline:
            break
        tried += 1
        started = time.monotonic()
        try:
            raw = raw_exchange(base, data, timeout=timeout, half_close=not whole)
        except OSError:
            raw = b""
        match = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
        status = int(match.group(1)) if match else 0
        if status == 0 and time.monotonic() - started >= timeout:
            hangs += 1
        statuses[status] = statuses.get(status, 0) + 1
    return tried, statuses, hangs


LOW_FD_PROXY = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))
sys.argv = sys.argv[1:]
exec(compile(open(sys.argv[0]).read(), sys.argv[0], "exec"),
     {"__name__": "__main__", "__file__": sys.argv[0]})
"""


# ---------------------------------------------------------------------------
# Helpers: trickles, orphans, the wrong-type sweep
# ---------------------------------------------------------------------------

def trickle(sock, data, pause, until):
    """Send `data` a byte at a time; -> what the proxy said once it stopped
    listening (or `until` seconds passed)."""
    deadline = time.monotonic() + until
    for byte in data:
        if time.monotonic() > deadline:
            break
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(pause)
    return recv_until(sock, b"}", max(0.1, deadline - time.monotonic()))


ORPHAN_MAKER = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
"""


FIELD_VALUES = [None, True, 0, -1, 2.5, "", "x", [], {}, [None], {"a": None}, [[[]]]]


def field_paths(value, path=()):
    """Every path of a JSON value: each key and index, all the way down."""
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from field_paths(child, path + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from field_paths(child, path + (index,))


def replaced(value, path, new):
    value = json.loads(json.dumps(value))
    if not path:
        return new
    node = value
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = new
    return value


SWEEP_BODIES = {
    "/v1/chat/completions": {
        "model": "5.5-tpg", "stream": False, "n": 1, "stop": ["END"],
        "stream_options": {"include_usage": True}, "reasoning_effort": "low",
        "reasoning": {"effort": "low"}, "parallel_tool_calls": True, "tool_choice": "auto",
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
            "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}},
        "tools": [{"type": "function", "function": {"name": "f", "description": "d",
                   "parameters": {"type": "object", "properties": {"p": {"type": "string"}},
                                  "required": ["p"]}}}],
        "messages": [{"role": "system", "content": "s"},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "c1", "type": "function",
                          "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "r"}]},
    "/v1/responses": {
        "model": "5.5-tpg", "instructions": "i", "store": False, "stream": False,
        "reasoning": {"effort": "low", "summary": "auto"}, "text": {"format": {"type": "text"}},
        "tool_choice": "auto", "parallel_tool_calls": True, "metadata": {"k": "v"},
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}},
                  {"type": "custom", "name": "P", "format": {"type": "grammar",
                                                             "syntax": "lark",
                                                             "definition": "start: x"}}],
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                  {"type": "reasoning", "summary": [], "encrypted_content": "e"},
                  {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "c1", "output": "r"}]},
}


SWEEP_BODIES.update({
    "/v1/messages": {
        "model": "claude-x", "max_tokens": 100, "stream": False, "system": "s",
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "output_config": {"effort": "low"}, "stop_sequences": ["END"],
        "tool_choice": {"type": "auto"}, "metadata": {"user_id": "u"},
        "tools": [{"name": "f", "description": "d", "input_schema": {
            "type": "object", "properties": {"p": {"type": "string"}}}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                     {"role": "assistant", "content": [
                         {"type": "thinking", "thinking": "t", "signature": "SIGNED"},
                         {"type": "tool_use", "id": "t1", "name": "f", "input": {"p": "x"}}]},
                     {"role": "user", "content": [
                         {"type": "tool_result", "tool_use_id": "t1", "content": "r"}]}]},
    "/api/chat": {
        "model": "5.5-tpg", "stream": False, "think": True, "format": "json",
        "options": {"temperature": 0.2, "num_ctx": 8192, "stop": ["END"], "seed": 4},
        "keep_alive": "5m",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"p": {"type": "string"}}}}}],
        "messages": [{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "",
                      "tool_calls": [{"function": {"name": "f", "arguments": {"p": "x"}}}]},
                     {"role": "tool", "content": "r", "tool_name": "f"}]},
    "/api/generate": {
        "model": "5.5-tpg", "stream": False, "prompt": "hi", "system": "s", "think": "low",
        "format": {"type": "object", "properties": {"a": {"type": "string"}}},
        "options": {"stop": ["END"], "num_predict": 10}, "context": [1, 2, 3]},
})


SIGNED = {"summary": [{"type": "summary_text", "text": "t"}], "encrypted_content": "E"}


def sweep_variants(body, seal):
    """(where, make) for every field of `body`, and for every field inside
    its thinking signature's content: make(value) is the body with that
    field set to value (signatures signed with the proxy's own seal)."""
    def with_signature(changed, content=SIGNED):
        """The proxy's own signature around any content, odd ones too."""
        payload = base64.urlsafe_b64encode(zlib.compress(json.dumps(content).encode())).decode()
        signature = f"{cp.SIGNATURE_PREFIX}{payload}.{seal._mac(payload)}"
        return json.loads(json.dumps(changed).replace('"SIGNED"', json.dumps(signature)))
    for where in field_paths(body):
        yield where, lambda value, where=where: with_signature(replaced(body, where, value))
    if "SIGNED" in json.dumps(body):
        for where in field_paths(SIGNED):
            yield ("signature",) + where, lambda value, where=where: with_signature(
                body, replaced(SIGNED, where, value))


# ---------------------------------------------------------------------------
# Helpers: a toy API (one more row of APIS)
# ---------------------------------------------------------------------------

class ToyResponder(cp.Responder):
    """A toy API's answer: its text as plain text, whole."""

    def open(self):
        pass

    def text(self, key, delta):
        self.content.append(delta)

    def reasoning(self, item, part, delta):
        pass

    def tool_calls(self, calls):
        pass

    def finish(self, reason, usage):
        data = ("toy says: " + self.answer_text()).encode()
        self.handler.send_response(200)
        self.handler.send_header("Content-Type", "text/plain")
        self.handler.send_header("Content-Length", str(len(data)))
        self.handler.end_headers()
        self.handler.wfile.write(data)


def parse_toy(body, server, room):
    if not isinstance(body.get("say"), str):
        raise cp.bad_request("say must be a string", "say")
    return cp.ProxyRequest(None, [cp.Message("user", body["say"])])


# ---------------------------------------------------------------------------
# Helpers: the process pool
# ---------------------------------------------------------------------------

def pool_ready(proxy):
    """Every process of the pool is up (--codex-processes of them)."""
    return len(proxy.server.launcher.pool) == proxy.server.config.codex_processes


def pool_pids(proxy):
    return [p.proc.pid for p in proxy.server.launcher.pool.processes() if not p.retired]


# ---------------------------------------------------------------------------
# Helpers: tool rounds
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


def tool_round(proxy, messages, stream=False, tools=TOOLS, **extra):
    """POST with the tools; return (status, assistant message, finish_reason, raw)."""
    status, _, raw = post_chat(proxy.base, {"model": "5.5-tpg", "messages": messages,
                                            "tools": tools, "stream": stream, **extra})
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


def two_reads(answer, **options):
    """A turn whose model reads files a and b in one response, then answers."""
    return [{"thread": True}, dict({"calls": [
        {"name": "read_file", "arguments": {"path": "a"}, "id": "call_a"},
        {"name": "read_file", "arguments": {"path": "b"}, "id": "call_b"}]}, **options),
        {"text": answer}, {"complete": {}}]


TOOL_TURN = [{"thread": True}, {"text": "Let me look."},
             {"calls": [{"name": "read_file", "arguments": {"path": "a.py"}, "id": "call_m1"}]},
             {"text": "The file says {results}"}, {"complete": {}}]


# ---------------------------------------------------------------------------
# Helpers: Responses, web search and plan bodies
# ---------------------------------------------------------------------------

def post_responses(base, body, headers=None):
    return post_chat(base, body, headers, path="/v1/responses")


def response_events(raw):
    """The Responses SSE stream -> its events; each event's name is its type."""
    return sse_events(raw, named=True)


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"},
                                           "temp": {"type": "number"}},
          "required": ["city", "temp"]}


SEARCH_TURN = [{"thread": True}, {"search": "python 3.14 release"},
               {"cited": {"text": "Python 3.14 came out in October 2025.", "citations": [
                   {"url": "https://python.org/3.14", "title": "Python 3.14", "start_index": 0,
                    "end_index": 11}]}}, {"complete": {}}]


SEARCH_TOOL = {"type": "web_search", "search_context_size": "high",
               "user_location": {"type": "approximate", "country": "DE", "city": "Berlin"},
               "filters": {"allowed_domains": ["python.org"]}}


def claude_search_body(**extra):
    """What Claude Code's WebSearch tool sends (observed on 2.1.197)."""
    return dict({"model": "claude-sonnet-4-5", "max_tokens": 32000, "stream": True,
                 "messages": [{"role": "user", "content": [{"type": "text", "text":
                               "Perform a web search for the query: python 3.14 release"}]}],
                 "system": [{"type": "text", "text": "You are an assistant for performing a "
                                                     "web search tool use"}],
                 "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
                 "tool_choice": {"type": "tool", "name": "web_search"},
                 "thinking": {"type": "disabled"}, "temperature": 1}, **extra)


LIMITS = {"limitId": "codex", "planType": "plus",
          "primary": {"usedPercent": 42, "windowDurationMins": 300, "resetsAt": None},
          "secondary": {"usedPercent": 100, "windowDurationMins": 10080, "resetsAt": None}}


def messages_body(text, stream=False):
    return {"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": stream,
            "messages": [{"role": "user", "content": text}]}


def post_messages(base, body, headers=None):
    return http_request(base, "POST", "/v1/messages", body, headers, 60)


def plan_step(five_hours, week, reset):
    """A fake step reporting the plan's windows: a 5-hour and a weekly one."""
    return {"rate_limits": {
        "primary": {"usedPercent": five_hours, "windowDurationMins": 300, "resetsAt": reset},
        "secondary": {"usedPercent": week, "windowDurationMins": 10080,
                      "resetsAt": reset + 86400}}}


# ---------------------------------------------------------------------------
# Helpers: a refused model
# ---------------------------------------------------------------------------

REFUSED = "The 'gpt-4o' model is not supported when using Codex with a ChatGPT account."


# ---------------------------------------------------------------------------
# Helpers for the end-to-end tests: the real Codex CLI, the SDKs, Claude Code
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
        self.write_config()
        self.proxies = []

    def write_config(self, extra=""):
        (self.home / "config.toml").write_text(
            'model_provider = "mock"\n' + extra +
            '[model_providers.mock]\nname = "mock"\n'
            f'base_url = "http://127.0.0.1:{self.upstream.port}/v1"\nwire_api = "responses"\n'
            'env_key = "MOCK_KEY"\nrequest_max_retries = 0\nstream_max_retries = 0\n')

    def proxy(self, **overrides):
        fields = dict(port=0, codex_bin=self.codex_path, codex_home=str(self.home),
                      state_dir=str(self.tmp_path / "state"), quiet=True,
                      logs_html=os.path.join(HERE, "logs.html"))
        fields.update(overrides)
        proxy = start_proxy(cp.Config(**fields), {"MOCK_KEY": "mock-key"})
        self.proxies.append(proxy)
        return proxy

    def pids(self):
        return [e["pid"] for p in self.proxies for e in p.events("codex_forward")] + \
            [p.proc.pid for proxy in self.proxies for p in proxy.server.launcher.pool.processes()
             if p.proc is not None]

    def close(self):
        for proxy in self.proxies:
            proxy.stop()
        self.upstream.close()
        assert wait_until(lambda: not any(pid_alive(p) for p in self.pids()), 10)


def loaded_threads(proxy):
    """The threads Codex holds loaded now, in every process of the pool."""
    found = []
    for process in proxy.server.launcher.pool.processes():
        if not process.exited.is_set():
            found += process.call("thread/loaded/list", {}, 10).get("data") or []
    return found


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
    return "\n".join(part.get("text", "") for item in body["input"]
                     if item.get("role") == "developer" for part in item.get("content") or [])


def tool_names(body):
    names = set()
    for tool in body.get("tools", []):
        names.add(tool.get("name"))
        for child in tool.get("tools", []):
            names.add(f"{tool['name']}/{child['name']}")
    return names


def call_for(body, name, arguments, call_id):
    """A function_call item as the model would send it for this request: the
    exec engine's client tools sit in the `mcp__client` namespace."""
    namespaced = any(t.get("name") == "mcp__client" for t in body.get("tools", []))
    return function_call_item(name, arguments, call_id, "mcp__client" if namespaced else None)


CODEX_HOST_TOOLS = {"shell", "exec_command", "write_stdin", "apply_patch", "view_image",
                    "web_search", "tool_search", "update_plan", "request_user_input",
                    "unified_exec", "local_shell", "js_repl", "spawn_agent"}


# exec adds these for any MCP server, ours included; they only reach our bridge,
# which answers "method not found".  app-server offers none of them.
MCP_RESOURCE_TOOLS = {"list_mcp_resources", "list_mcp_resource_templates", "read_mcp_resource"}


WORDS = [f"w{n} " for n in range(40)]


def agent_responder(body, index):
    """The model: read the file the user names, then answer with its content."""
    last = body["input"][-1]
    if last.get("type") == "function_call_output":
        outputs = [i for i in body["input"] if i.get("type") == "function_call_output"]
        text = json.dumps(outputs[-1]["output"])
        return [message_item(f"The file holds {re.search(r'CONTENT-[a-z0-9.]+', text).group()}")]
    prompt = json.dumps(body["input"])
    names = re.findall(r"read ([a-z0-9]+\.py)", prompt)
    return [call_for(body, "read_file", {"path": names[-1]}, f"call_{index}_{names[-1][0]}")]


def upstream_message(text, index):
    return {"type": "message", "role": "assistant", "id": f"msg_{index}",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def encrypted_reasoning(index):
    return {"type": "reasoning", "id": f"rs_{index}", "encrypted_content": f"ENC-{index}",
            "summary": [{"type": "summary_text", "text": f"thinking {index}"}]}


def one_tool_round(trigger, call, answer, otherwise):
    """A model for one tool round: `call` (an item, or a function of the
    request that makes one) when the last input holds `trigger`; `answer`
    and the result once a result is there; else reasoning and `otherwise`."""
    def responder(body, index):
        outputs = [i["output"] for i in body["input"] if i.get("type") == "function_call_output"]
        if outputs:
            return [upstream_message(f"{answer}{outputs[-1]}", index)]
        if trigger in json.dumps(body["input"][-1]):
            return [call(body) if callable(call) else call]
        return [reasoning_item("Pondering."), upstream_message(otherwise, index)]
    return responder


def read_then_answer(path, call_id, answer):
    """A model that calls read_file(path) until the request holds results,
    then answers answer(body, [the results' outputs])."""
    def responder(body, index):
        outputs = [i["output"] for i in body["input"] if i.get("type") == "function_call_output"]
        if outputs:
            return [upstream_message(answer(body, outputs), index)]
        return [call_for(body, "read_file", {"path": path}, call_id)]
    return responder


def session_responder(body, index):
    """The model: read the file the user's last message names, then answer
    with what the tool gave; every response starts with encrypted reasoning."""
    last = body["input"][-1]
    if last.get("type") == "function_call_output":
        return [encrypted_reasoning(index),
                upstream_message(f"answer {index}: {last['output']}", index)]
    name = re.findall(r"read (\S+)", json.dumps(last))[-1].rstrip('"')
    return [encrypted_reasoning(index),
            call_for(body, "read_file", {"path": name}, f"call_{index}")]


def without_ids(items):
    return [{k: v for k, v in item.items() if k != "id"} for item in items]


def chat_session(client, messages, names, model="5.5-tpg"):
    """Each name: a user turn, one tool round, the answer; -> the answers."""
    answers = []
    for name in names:
        messages.append({"role": "user", "content": f"read {name}"})
        choice = client.chat.completions.create(model=model, messages=messages,
                                                tools=TOOLS).choices[0]
        assert choice.finish_reason == "tool_calls"
        messages.append(choice.message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": choice.message.tool_calls[0].id,
                         "content": f"CONTENT-{name}"})
        final = client.chat.completions.create(model=model, messages=messages,
                                               tools=TOOLS).choices[0]
        messages.append(final.message.model_dump(exclude_none=True))
        answers.append(final.message.content)
    return answers


def codex_cli_client(e2e, tmp_path, proxy, *flags):
    """The Codex CLI as a client of the proxy (its provider) -> run(prompt)
    -> (exit code, output)."""
    home, work = tmp_path / "client-home", tmp_path / "client-work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(
        'model_provider = "proxy"\n[model_providers.proxy]\nname = "proxy"\n'
        f'base_url = "{proxy.base}/v1"\nwire_api = "responses"\nenv_key = "PROXY_KEY"\n'
        'request_max_retries = 0\nstream_max_retries = 0\n')
    env = dict(os.environ, CODEX_HOME=str(home), PROXY_KEY="unused")

    def run(prompt):
        done = subprocess.run([e2e.codex_path, "exec", "--skip-git-repo-check", *flags,
                               "-C", str(work), "-m", "gpt-5.5", prompt], env=env,
                              capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        return done.returncode, done.stdout + done.stderr
    return run


def by_cache_key(bodies):
    """Upstream request bodies grouped by prompt_cache_key (Codex's thread)."""
    groups = {}
    for body in bodies:
        groups.setdefault(body["prompt_cache_key"], []).append(body)
    return groups


@pytest.fixture
def anthropic_sdk():
    try:
        import anthropic
    except ImportError:
        anthropic = None
    require("the anthropic Python SDK", anthropic)
    return anthropic


@pytest.fixture
def ollama_lib():
    try:
        import ollama
    except ImportError:
        ollama = None
    require("the ollama Python library", ollama)
    return ollama


def anthropic_client(anthropic_sdk, proxy):
    return anthropic_sdk.Anthropic(base_url=proxy.base, api_key="unused", max_retries=0,
                                   timeout=60)


def upstream_texts(body):
    """The text of every message item an upstream request holds."""
    return [part.get("text", "") for item in body["input"] if item.get("type") == "message"
            for part in item["content"] if isinstance(part, dict)]


class GatedDrip:
    """An upstream that writes 40 words 50 ms apart and holds after 20 until
    the client has seen 10 of them: words held back to the end can never
    arrive, so the stream fails instead of passing slowly.  Times are counted
    from the upstream's first byte, leaving Codex's start-up (long on a loaded
    machine) out of the first-to-last ratio."""

    def __init__(self):
        self.gate, self.began, self.times = threading.Event(), [], []

    def __call__(self, body, index):
        self.began.append(time.monotonic())
        return ("drip", 0.05, WORDS, None, (20, self.gate))

    def seen(self):
        self.times.append(time.monotonic() - self.began[0])
        if len(self.times) >= 10:
            self.gate.set()

    def streamed(self):
        return len(self.times) >= 10 and self.times[0] <= 0.3 * self.times[-1]


@pytest.fixture
def claude_code():
    path = shutil.which("claude")
    require("Claude Code (claude on PATH; .ci/run installs it)", path)
    return path


def run_claude(claude, proxy, prompt, cwd, home, model=None, extra=()):
    """`claude -p` against the proxy, as a user would run it, offline."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "CLAUDE", "OPENAI_"))}
    env.update(HOME=str(home), ANTHROPIC_BASE_URL=proxy.base, ANTHROPIC_AUTH_TOKEN="unused",
               DISABLE_TELEMETRY="1", DISABLE_AUTOUPDATER="1", DISABLE_ERROR_REPORTING="1",
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", NO_PROXY="127.0.0.1,localhost")
    if model:
        env["ANTHROPIC_MODEL"] = model
    done = subprocess.run([claude, "-p", prompt, "--output-format", "json", *extra], cwd=cwd,
                          env=env,
                          capture_output=True, text=True, timeout=150,
                          stdin=subprocess.DEVNULL)
    result = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
    return done.returncode, result, done.stdout + done.stderr


def offered_call(body, name, arguments, call_id):
    """A function call of the client tool `name` as this request offers it:
    a plain function, or a child of a namespace (Codex's lite wire format
    sends them in an `additional_tools` input item)."""
    for item in body.get("input", []):
        for tool in item.get("tools", []) if item.get("type") == "additional_tools" else []:
            if any(child.get("name") == name for child in tool.get("tools", [])):
                return function_call_item(name, arguments, call_id, tool["name"])
    return function_call_item(name, arguments, call_id)


# ---------------------------------------------------------------------------
# Helpers: a real browser for logs.html (headless Chromium through chromedriver)
# ---------------------------------------------------------------------------

SEARCHED = [{"type": "web_search_call", "id": "ws_e2e", "status": "completed",
             "action": {"type": "search", "query": "python 3.14 release",
                        "sources": [{"type": "url", "url": "https://python.org/3.14"}]}},
            {"type": "message", "role": "assistant", "id": "msg_searched", "content": [{
                "type": "output_text", "text": "Python 3.14 came out in October 2025.",
                "annotations": [{"type": "url_citation", "url": "https://python.org/3.14",
                                 "title": "Python 3.14", "start_index": 0,
                                 "end_index": 11}]}]}]


def searching(body, index):
    """A model that searches when it has the hosted search tool."""
    if any(t.get("type") == "web_search" for t in body.get("tools", [])):
        return SEARCHED
    return [upstream_message("no search tool", index)]


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


def page_text(browser, element_id):
    return browser.js("return document.getElementById(arguments[0]).textContent", element_id)


# ---------------------------------------------------------------------------
# Requests: messages, content, model names and fields (parsing)
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


@pytest.mark.parametrize("parameters", [
    {"type": "object", "properties": []}, {"type": "object", "required": "a"},
    {"type": "object", "properties": {"a": 5}}, {"type": "object", "anyOf": {}},
    {"type": "object", "properties": {"a": {"type": 3}}},
    {"type": "object", "properties": {"a": {"items": [1]}}}])
def test_hostile_schemas_are_refused_as_data(parameters):
    with pytest.raises(cp.ProxyError) as error:
        cp.normalize_tools([{"type": "function", "name": "f", "parameters": parameters}])
    assert error.value.status == 400
    with pytest.raises(cp.ProxyError) as error:
        cp.parse_chat_request(chat_body(response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": parameters}}))
    assert error.value.status == 400 and error.value.param == "response_format"


def test_cursors_bodies_keep_usage_and_effort_on_both_shapes():
    shaped = cp.parse_chat_request({"input": "hi", "stream": True, "reasoning": {
        "effort": "high"}, "stream_options": {"include_usage": True}})
    assert shaped.include_usage and shaped.reasoning_effort == "high" and shaped.messages
    plain = cp.parse_chat_request(chat_body(reasoning={"effort": "low"}))
    assert plain.reasoning_effort == "low"


def test_bodies_that_are_not_objects_are_400s_on_every_route(proxy):
    for path in ("/v1/messages/count_tokens", "/v1/messages", "/api/chat", "/api/generate",
                 "/api/show", "/v1/responses", "/v1/chat/completions"):
        assert http_request(proxy.base, "POST", path, [1, 2])[0] == 400, path
    status, _, _ = http_request(proxy.base, "POST", "/v1/messages", {
        "messages": [{"role": "user", "content": "x"}], "output_config": {"effort": ["x"]}})
    assert status == 400


@pytest.mark.parametrize("model, body_extra, effort", [
    ("hgih-2.5-tpg", {}, "high"),
    ("xedoc-2.5-tpg", {"reasoning_effort": "low"}, "low"),
    ("gpt-5.2-minimal", {"reasoning_effort": "xhigh"}, "xhigh"),
])
def test_reasoning_effort_reaches_codex(both, fake_codex, model, body_extra, effort):
    post_chat(both.base, dict(chat_body(model=model), **body_extra, model=model))
    record = fake_codex.wait_records(1)[0]
    got = record["turn"].get("effort") if record["engine"] == "app-server" else \
        conf_value(record, "model_reasoning_effort")
    assert got == effort


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    ([1, 2], None),
    ({"messages": []}, "messages"),
    ({"model": "x"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, None),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url":
        {"url": "https://example.com/a.png"}}]}]}, None),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"function": "x"}},
     "tool_choice"),
    ({"messages": [{"role": "function", "name": {"a": 1}, "content": "x"}]}, None),
    ({"messages": [{"role": "user", "content": ""}]}, "messages"),
    ({"messages": [{"role": "system", "content": "only rules"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function",
      "function": {"name": ""}}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": "all"}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "max"},
     "reasoning_effort"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": "x"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, None),
    ({"messages": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, None),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
    ('{"messages": [{"role": "user", "content": "x"}], "a": ' .encode() + b"[" * 5000 +
     b"]" * 5000 + b"}", None),
    (b'\xff\xfe{"messages"}', None),
])
def test_bad_requests_get_openai_errors_and_server_keeps_serving(proxy, fake_codex, body, param):
    got, _, raw = post_chat(proxy.base, body)
    error = json.loads(raw)["error"]
    assert got == 400 and error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param
    assert fake_codex.records() == []
    assert post_chat(proxy.base, chat_body())[0] == 200


def test_a_prompt_over_codexs_input_limit_is_refused_before_codex_starts(proxy, fake_codex):
    status, _, raw = post_chat(proxy.base, chat_body("x" * (cp.MAX_INPUT_CHARS + 1)))
    error = json.loads(raw)["error"]
    assert status == 400 and error["code"] == "context_length_exceeded"
    assert fake_codex.records() == [] and "/" not in error["message"]


@pytest.mark.parametrize("model", ["--dangerously-bypass-approvals-and-sandbox", "a b", "x\n", ""])
def test_model_names_that_could_read_as_flags_are_refused(make_proxy, fake_codex, model):
    proxy = make_proxy(engine="exec")
    status, _, raw = post_chat(proxy.base, chat_body(model=model))
    if model == "":
        assert status == 200        # an empty name means Codex's default
        return
    assert status == 400 and json.loads(raw)["error"]["param"] == "model"
    assert fake_codex.records() == []


def test_exec_gets_the_model_as_one_token(make_proxy, fake_codex):
    post_chat(make_proxy(engine="exec").base, chat_body(model="xedoc-2.5-tpg"))
    assert "--model=gpt-5.2-codex" in fake_codex.wait_records(1)[0]["argv"]


def test_remote_image_error_says_why(proxy):
    _, _, raw = post_chat(proxy.base, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]})
    assert "data:" in json.loads(raw)["error"]["message"]


def test_unknown_fields_are_ignored(proxy, fake_codex):
    status, _, raw = post_chat(proxy.base, chat_body(
        temperature=0.2, max_tokens=5, user="u", metadata={"a": "b"}, top_p=1,
        stream_options={"include_usage": False}, presence_penalty=0, seed=1,
        logit_bias={"1": 2}, some_future_field={"x": [1]}))
    assert status == 200
    body = json.loads(raw)
    assert body["choices"][0]["message"]["content"] == "fake answer"
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["total_tokens"] == 18
    record = fake_codex.wait_records(1)[0]
    assert record["prompt"] == "hello"                  # none of them reached Codex
    assert "some_future_field" not in json.dumps(record) and "temperature" not in json.dumps(record)


def test_data_url_images_reach_codex(both, fake_codex, run_tmp):
    png = tiny_png()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    status, _, _ = post_chat(both.base, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    assert status == 200
    record = fake_codex.wait_records(1)[0]
    if record["engine"] == "exec":
        assert record["images"] == [png.hex()] and record["image_paths"][0].endswith(".png")
    else:
        assert record["images"] == [url]
    assert "what is this" in record["prompt"] and "[image #1]" in record["prompt"]


def test_legacy_function_role_and_null_content_are_accepted(proxy, fake_codex):
    status, _, _ = post_chat(proxy.base, {"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "f", "content": "RESULT-F"}]})
    assert status == 200
    record = fake_codex.wait_records(1)[0]
    assert record["prompt"] == "" and record["turn"]["input"] == []     # goes on from the result
    assert {"type": "function_call_output", "call_id": "f", "output": "RESULT-F"} in \
        record["injected"]


def test_a_wrong_type_in_any_field_of_any_api_is_never_a_5xx(make_proxy, fake_codex):
    """Every field of every API, the content inside a thinking signature and
    Ollama's options and format included."""
    fake_codex.scenario([{"thread": True}, {"text": '{{"a": "x"}}'}, {"complete": {}}])
    proxy = make_proxy(max_concurrent=16)
    rng = random.Random(15)
    statuses = {}
    for path, body in SWEEP_BODIES.items():
        for where, make in sweep_variants(body, proxy.server.seal):
            for value in rng.sample(FIELD_VALUES, 3 if path.startswith("/v1/chat") or
                                    path.startswith("/v1/resp") else 2):
                status = http_request(proxy.base, "POST", path, make(value), timeout=20)[0]
                statuses.setdefault(status, []).append((path, where, value))
    assert not [s for s in statuses if s >= 500], {s: v[:3] for s, v in statuses.items()
                                                   if s >= 500}
    assert 400 in statuses and 200 in statuses


def test_cursors_own_previous_response_id_on_chat_is_ignored(proxy, fake_codex):
    body = {"model": "m", "previous_response_id": "resp_from_cursor", "store": True,
            "input": [{"role": "user", "content": "hi"}]}
    status, _, raw = post_chat(proxy.base, body)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "fake answer"


def test_e2e_an_image_reaches_the_model(e2e, openai_sdk):
    proxy = e2e.proxy()
    url = "data:image/png;base64," + base64.b64encode(tiny_png()).decode()
    sdk_client(openai_sdk, proxy.base + "/v1").chat.completions.create(
        model="5.5-tpg", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": url}}]}])
    parts = [p for item in e2e.upstream.bodies()[0]["input"] if item.get("role") == "user"
             for p in item["content"]]
    assert any(p["type"] == "input_image" for p in parts), parts


# ---------------------------------------------------------------------------
# Chat Completions: answers, streams and usage
# ---------------------------------------------------------------------------

def test_usage_maps_every_field_for_both_apis():
    usage = cp.usage_from_app_server({"inputTokens": 10, "cachedInputTokens": 4,
                                      "outputTokens": 6, "reasoningOutputTokens": 2,
                                      "totalTokens": 16})
    assert cp.openai_usage(usage) == {
        "prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 2}}
    assert cp.responses_usage(usage) == {
        "input_tokens": 10, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 16}
    assert cp.openai_usage({"input_tokens": "x", "output_tokens": True})["total_tokens"] == 0


def test_chat_responder_streams_role_text_reasoning_calls_then_usage_and_done():
    handler = FakeHandler()
    out = cp.ChatResponder(handler, chat_request(stream=True, stream_options={
        "include_usage": True}), "content")
    out.open()
    out.reasoning("r1", 0, "Thinking.")
    out.reasoning("r1", 1, "More.")
    out.text("m1", "Hello")
    out.text("m1", " there")
    out.text("m2", "Second")
    out.tool_calls([cp.ToolCall("call_1", "read_file", '{"path": "a"}')])
    out.finish("tool_calls", {"input_tokens": 5, "output_tokens": 2})
    events = sse_events(handler.body())
    chunks = [e for e in events if e != "[DONE]"]
    assert events[-1] == "[DONE]" and handler.ended
    assert {c["id"] for c in chunks} == {out.id} and all(c["model"] == "xedoc-2.5-tpg"
                                                          for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Thinking.\n\nMore."
    assert "".join(d.get("content") or "" for d in deltas) == "Hello there\n\nSecond"
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["id"] == "call_1" and calls[0]["function"]["name"] == "read_file"
    assert "".join(c["function"]["arguments"] for c in calls) == '{"path": "a"}'
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7


def test_chat_responder_without_a_stream_answers_one_completion():
    handler = FakeHandler()
    out = cp.ChatResponder(handler, chat_request(), "think")
    out.open()
    out.reasoning("r1", 0, "Hmm.")
    out.text("m1", "Answer")
    out.finish("stop", {"input_tokens": 1, "output_tokens": 1})
    status, body = handler.json
    message = body["choices"][0]["message"]
    assert status == 200 and not handler.chunks and body["object"] == "chat.completion"
    assert message["content"] == "<think>\nHmm.\n</think>\n\nAnswer"
    assert out.answer_text() == "Answer" and "reasoning_content" not in message


def test_pump_relays_a_turn_to_its_end():
    usage = {"input_tokens": 4, "output_tokens": 2}
    p, launcher, handler, _ = pump([("thread", "th"), ("reasoning", ("r", 0, "hm")),
                                    ("text", ("m", "Hi")), ("warning", "Reconnecting... 1/5"),
                                    ("usage", usage), ("completed", None)])
    end, stream = finished(p, handler)
    assert (end.kind, end.usage, end.reason, end.cut) == ("answered", usage, "stop", False)
    assert stream["content"] == "Hi" and end.first_output is not None
    kinds = [e["type"] for e in launcher.logs.since(0)]
    assert kinds == ["codex_forward", "codex_warning", "reasoning_detected"]


def test_the_pump_writes_no_last_byte():
    """The end is a value: the calls and the finish are Turns' to write,
    once it has parked, kept or stored what it must."""
    p, _, handler, _ = pump([("text", ("m", "Hi")), ("completed", None)])
    assert p.pump().kind == "answered"
    assert "[DONE]" not in sse_events(handler.body()) and not handler.ended
    p, _, handler, _ = pump([("tool_call", pending("c1"))])
    assert p.pump().kind == "calls" and b"tool_calls" not in handler.body()


def test_cursors_responses_shaped_chat_body_gets_its_usage_chunk(proxy, fake_codex):
    status, _, raw = post_chat(proxy.base, {"model": "5.5-tpg", "stream": True,
                                            "input": [{"role": "user", "content": "hi"}],
                                            "stream_options": {"include_usage": True},
                                            "reasoning": {"effort": "high"}})
    chunks = [e for e in sse_events(raw) if e != "[DONE]"]
    assert status == 200 and chunks[-1]["usage"]["total_tokens"] == 18
    assert fake_codex.wait_records(1)[0]["turn"]["effort"] == "high"


def test_stream_follows_every_chunk_rule(both, fake_codex):
    fake_codex.scenario([{"thread": True}, {"reasoning": "thinking"}, {"text": "Hello"},
                         {"text": "World"}, {"complete": {}}])
    status, hdrs, raw = post_chat(both.base, chat_body(
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
    assert both.wait_event("reasoning_detected")[0]["summary_chars"] == 8


def test_non_stream_answer_has_message_finish_reason_and_usage(both, fake_codex):
    fake_codex.scenario([{"thread": True}, {"reasoning": "hmm"}, {"text": "Hi there"},
                         {"complete": {}}])
    status, _, raw = post_chat(both.base, chat_body())
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


def test_app_server_answer_streams_as_it_is_written(proxy, fake_codex):
    """Deltas reach the client while Codex is still writing (it waits for a
    file the test creates only after it has seen the first words)."""
    fake_codex.scenario([{"thread": True}, {"deltas": ["one ", "two "]}, {"wait_file": "go"},
                         {"deltas": ["three"]}, {"complete": {}}])
    sock = open_raw_stream(proxy, chat_body(stream=True))
    try:
        early = recv_until(sock, b'"two "')
        assert b'"one "' in early and b'"two "' in early and b"three" not in early
        (fake_codex.dir / "go").write_text("")
        rest = recv_until(sock, b"0\r\n\r\n")
    finally:
        sock.close()
    chunks = [e for e in sse_events(strip_chunking(early + rest)) if e != "[DONE]"]
    content = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert [c for c in content if c] == ["one ", "two ", "\n\nthree"]


def test_whole_messages_without_deltas_still_arrive_once(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"whole_text": "all at once"}, {"complete": {}}])
    _, _, raw = post_chat(proxy.base, chat_body(stream=True))
    assert assemble_stream(sse_events(raw))["content"] == "all at once"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_both_route_forms_answer_and_model_is_resolved(proxy, fake_codex, path):
    status, _, raw = post_chat(proxy.base, chat_body(), path=path)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "fake answer"
    assert fake_codex.wait_records(1)[0]["model"] == "gpt-5.2-codex"


def test_first_chunk_leaves_before_codex_says_anything(both, fake_codex):
    fake_codex.scenario([{"wait_file": "go"}, {"thread": True}, {"text": "late"}, {"complete": {}}])
    sock = open_raw_stream(both, chat_body(stream=True))
    first = recv_until(sock, b'"role":"assistant"')
    assert b'"role":"assistant"' in first and b"late" not in first   # Codex waits for "go"
    (fake_codex.dir / "go").write_text("")
    rest = recv_until(sock, b"0\r\n\r\n")
    sock.close()
    assert b"late" in rest and b"[DONE]" in rest


def test_keepalive_comments_while_codex_is_silent(make_proxy, fake_codex):
    proxy = make_proxy(keepalive=0.1)
    fake_codex.scenario([{"thread": True}, {"wait_file": "go"}, {"text": "done"},
                         {"complete": {}}])
    sock = open_raw_stream(proxy, chat_body(stream=True))
    try:
        seen = b""
        for _ in range(20):                 # Codex stays silent until "go"
            if seen.count(b": keepalive\n\n") >= 2:
                break
            seen += recv_until(sock, b": keepalive")
        assert seen.count(b": keepalive\n\n") >= 2, seen
        assert b"done" not in seen           # keepalives came while Codex said nothing
        (fake_codex.dir / "go").write_text("")
        seen += recv_until(sock, b"0\r\n\r\n")
    finally:
        sock.close()
    assert sse_events(strip_chunking(seen))[-1] == "[DONE]" and b"done" in seen


def test_responses_shaped_body_on_chat_gets_chat_chunks_and_resumes(proxy, fake_codex):
    fake_codex.scenario(TOOL_TURN)
    flat_tools = [{"type": "function", "name": "read_file", "parameters": {"type": "object"}}]
    body = {"model": "m", "stream": True, "tools": flat_tools, "instructions": "I",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "read"}]}],
            "reasoning": {"effort": "high"}, "text": {"verbosity": "low"}, "store": False}
    _, _, raw = post_chat(proxy.base, body)
    events = sse_events(raw)
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    call = assemble_stream(events)["tool_calls"][0]
    record = fake_codex.wait_records(1)[0]
    assert "I" in record["instructions"] and record["turn"]["effort"] == "high"
    body["input"] += [{"type": "function_call", "call_id": call["id"], "name": call["function"]["name"],
                       "arguments": call["function"]["arguments"]},
                      {"type": "function_call_output", "call_id": call["id"], "output": "CONTENT"}]
    _, _, raw = post_chat(proxy.base, body)
    assert assemble_stream(sse_events(raw))["content"] == "The file says CONTENT"
    assert len(fake_codex.records()) == 1


def test_e2e_sdk_answers_streamed_and_not_on_both_routes(e2e, openai_sdk):
    e2e.responder = lambda body, index: [reasoning_item("Pondering."), message_item("Hello from upstream")]
    proxy = e2e.proxy()
    assert wait_until(lambda: len(proxy.server.launcher.pool) == 2, 20)      # as users meet it
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
    bodies = e2e.upstream.bodies()
    assert len(bodies) == 4 and all(b["model"] == "gpt-5.5" for b in bodies)
    forwards = proxy.events("codex_forward")
    assert {f["engine"] for f in forwards} == {"app-server"} and forwards[0]["warm"] is True


def test_e2e_answers_stream_token_by_token_three_at_once(e2e):
    """The upstream holds each answer after 20 of its 40 deltas until the test
    has seen, on every one of three streams, the reasoning and then at least
    10 content chunks: the words cannot have been held back to the end."""
    gate = threading.Event()
    e2e.responder = lambda body, index: ("drip", 0.01, WORDS, "Thinking it over.", (20, gate))
    proxy = e2e.proxy()
    assert wait_until(lambda: len(proxy.server.launcher.pool) == 2, 20)
    socks = [open_raw_stream(proxy, chat_body(stream=True, model="5.5-tpg")) for _ in range(3)]
    seen = [b""] * 3

    def enough(n):
        events = sse_events(strip_chunking(seen[n]).rsplit(b"\n\n", 1)[0] + b"\n\n")
        deltas = [e["choices"][0]["delta"] for e in events if e != "[DONE]" and e["choices"]]
        texts = [d for d in deltas if d.get("content")]
        thinking = [i for i, d in enumerate(deltas) if d.get("reasoning_content")]
        return len(texts) >= 10 and thinking and thinking[0] < deltas.index(texts[0])
    try:
        for n, sock in enumerate(socks):
            sock.settimeout(0.2)
            deadline = time.monotonic() + 30
            while not enough(n) and time.monotonic() < deadline:
                try:
                    seen[n] += sock.recv(65536)
                except socket.timeout:
                    pass
            assert enough(n), seen[n][-500:]
        assert not gate.is_set()
        gate.set()
        for n, sock in enumerate(socks):
            sock.settimeout(20)
            seen[n] += recv_until(sock, b"0\r\n\r\n", 30)
            content = assemble_stream(sse_events(strip_chunking(seen[n])))["content"]
            assert content == "".join(WORDS)
    finally:
        gate.set()
        for sock in socks:
            sock.close()


def test_e2e_the_usage_of_a_tool_turn_is_exact(e2e, openai_sdk):
    def responder(body, index):
        if any(i.get("type") == "function_call_output" for i in body["input"]):
            return [message_item("done")]
        return [call_for(body, "read_file", {"path": "a"}, "call_u")]
    e2e.responder = responder
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    messages = [{"role": "user", "content": "read a"}]
    first = client.chat.completions.create(model="5.5-tpg", messages=messages, tools=TOOLS)
    assert first.choices[0].finish_reason == "tool_calls" and first.usage.total_tokens == 0
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": "call_u", "content": "A"}]
    chunks = list(client.chat.completions.create(model="5.5-tpg", messages=messages, tools=TOOLS,
                                                 stream=True,
                                                 stream_options={"include_usage": True}))
    usage = chunks[-1].usage              # both model calls of the turn, summed
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (200, 40, 240)
    assert usage.prompt_tokens_details.cached_tokens == 80
    assert usage.completion_tokens_details.reasoning_tokens == 10


def test_e2e_responses_shaped_body_on_chat_gets_chat_chunks(e2e):
    e2e.responder = lambda body, index: [message_item("responses ok")]
    proxy = e2e.proxy()
    status, _, raw = post_chat(proxy.base, {
        "model": "5.5-tpg", "stream": True, "instructions": "RESP-INSTR",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        "tools": [{"type": "function", "name": "read_file", "parameters": {"type": "object"}}]})
    events = sse_events(raw)
    assert status == 200 and events[-1] == "[DONE]"
    assert assemble_stream(events)["content"] == "responses ok"
    assert "RESP-INSTR" in developer_text(e2e.upstream.bodies()[0])


def test_e2e_cursors_responses_shaped_chat_body_gets_usage_and_effort(e2e):
    e2e.responder = lambda body, index: [upstream_message("shaped ok", index)]
    proxy = e2e.proxy()
    status, _, raw = post_chat(proxy.base, {
        "model": "5.5-tpg", "stream": True, "stream_options": {"include_usage": True},
        "reasoning": {"effort": "high"},
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text",
                                                                   "text": "hi"}]}]})
    chunks = [e for e in sse_events(raw) if e != "[DONE]"]
    assert status == 200 and chunks[-1]["usage"]["total_tokens"] == 120
    assert e2e.upstream.bodies()[0]["reasoning"]["effort"] == "high"


# ---------------------------------------------------------------------------
# The Responses API
# ---------------------------------------------------------------------------

def test_responses_responder_writes_items_in_sequence():
    handler = FakeHandler()
    request = cp.parse_responses_request({"input": "hi", "stream": True, "model": "m"})
    out = cp.ResponsesResponder(handler, request, "content")
    out.open()
    out.reasoning("r1", 0, "a")
    out.reasoning("r1", 1, "b")
    out.text("m1", "Hel")
    out.text("m1", "lo")
    out.tool_calls([cp.ToolCall("call_1", "f", "{}"), cp.ToolCall("call_2", "P", "raw", True)])
    out.end_output()
    written = len(handler.chunks)
    assert out.stored() == (out.id, out.output) and len(out.output) == 4   # whole before the end
    out.finish("tool_calls", {"input_tokens": 3, "output_tokens": 4})
    assert len(handler.chunks) == written + 1           # the last bytes: response.completed
    events = sse_events(handler.body())
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(1, len(events) + 1))
    output = events[-1]["response"]["output"]
    assert [i["type"] for i in output] == ["reasoning", "message", "function_call",
                                           "custom_tool_call"]
    assert [p["text"] for p in output[0]["summary"]] == ["a", "b"]
    assert output[1]["content"][0]["text"] == "Hello" and output[3]["input"] == "raw"
    assert events[-1]["response"]["usage"]["total_tokens"] == 7
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert added == [0, 1, 2, 3]


def test_what_the_codex_cli_sends_parses():
    request = cp.parse_responses_request({"input": [
        {"type": "additional_tools", "role": "developer", "tools": [
            {"type": "namespace", "name": "functions", "tools": [
                {"type": "custom", "name": "exec", "format": {"type": "grammar",
                                                              "syntax": "lark",
                                                              "definition": "start: x"}}]}]},
        {"role": "developer", "content": [{"type": "input_text", "text": "You are Codex."}]},
        {"role": "user", "content": "hi"},
        {"type": "custom_tool_call", "call_id": "c1", "name": "exec", "input": "x",
         "namespace": "functions"},
        {"type": "custom_tool_call_output", "call_id": "c1", "output": [
            {"type": "input_text", "text": "Script completed"}]},
        {"type": "function_call_output", "output": "goal context"}]})
    assert [(t.namespace, t.name, t.custom) for t in request.tools] == [("functions", "exec", True)]
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool", "user"]
    assert request.messages[3].text == "Script completed"
    assert request.messages[4].text == "Tool output:\ngoal context"     # no call id: context
    names = cp.ToolNames(request.tools, nested=True)
    assert names.to_codex("functions", "exec") == ("client_functions", "exec")


@pytest.mark.parametrize("path", ["/v1/responses", "/responses"])
def test_responses_create_answers_with_a_response_object(both, fake_codex, path):
    fake_codex.scenario([{"thread": True}, {"reasoning": "mulling"}, {"text": "Hi there"},
                         {"complete": {}}])
    status, _, raw = post_chat(both.base, {"model": "5.5-tpg", "input": "hello",
                                           "instructions": "Be brief.", "metadata": {"k": "v"}},
                               path=path)
    response = json.loads(raw)
    assert status == 200 and response["object"] == "response"
    assert response["status"] == "completed" and response["model"] == "5.5-tpg"
    assert response["id"].startswith("resp_") and response["instructions"] == "Be brief."
    assert [o["type"] for o in response["output"]] == ["reasoning", "message"]
    assert response["output"][0]["summary"] == [{"type": "summary_text", "text": "mulling"}]
    assert response["output"][1]["content"][0]["text"] == "Hi there"
    assert response["usage"] == {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 3},
                                 "output_tokens": 7, "output_tokens_details":
                                 {"reasoning_tokens": 2}, "total_tokens": 18}
    assert response["metadata"] == {"k": "v"}
    record = fake_codex.wait_records(1)[0]
    assert record["prompt"] == "hello" and "Be brief." in record["instructions"]


def test_responses_stream_gives_the_event_sequence_sdks_parse(both, fake_codex):
    fake_codex.scenario([{"thread": True}, {"reasoning": "R"},
                         {"deltas": ["Hel", "lo", " world"]}, {"complete": {}}])
    status, hdrs, raw = post_responses(both.base, {"model": "m", "input": "hi", "stream": True})
    assert status == 200 and hdrs["content-type"] == "text/event-stream"
    events = response_events(raw)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(1, len(events) + 1))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Hello world"
    done = [e for e in events if e["type"] == "response.output_text.done"]
    assert done[0]["text"] == "Hello world"
    assert "response.reasoning_summary_text.delta" in kinds
    assert kinds.index("response.reasoning_summary_text.delta") < \
        kinds.index("response.output_text.delta")
    for required in ("response.output_item.added", "response.content_part.added",
                     "response.content_part.done", "response.output_item.done"):
        assert required in kinds
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["total_tokens"] == 18
    assert final["output"][-1]["content"][0]["text"] == "Hello world"
    assert len({e["response"]["id"] for e in events if "response" in e}) == 1


def test_an_unknown_previous_response_id_is_a_400(proxy, fake_codex):
    status, _, raw = post_responses(proxy.base, {"model": "m", "input": "x",
                                                 "previous_response_id": "resp_nope"})
    error = json.loads(raw)["error"]
    assert status == 400 and error["code"] == "previous_response_not_found"
    assert error["param"] == "previous_response_id" and fake_codex.records() == []


def test_instructions_do_not_carry_over_but_input_developer_messages_do(proxy, fake_codex):
    first = json.loads(post_responses(proxy.base, {
        "model": "m", "instructions": "OLD RULES",
        "input": [{"role": "developer", "content": "KEEP THIS"},
                  {"role": "user", "content": "hi"}]})[2])
    post_responses(proxy.base, {"model": "m", "instructions": "NEW RULES", "input": "again",
                                "previous_response_id": first["id"]})
    second = fake_codex.wait_records(2)[-1]["instructions"]
    assert "NEW RULES" in second and "KEEP THIS" in second and "OLD RULES" not in second


def test_previous_response_id_continues_the_conversation(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"text": "answer to: {seen}"}, {"complete": {}}])
    first = json.loads(post_responses(proxy.base, {"model": "m", "input": "my name is Ada"})[2])
    second = json.loads(post_responses(proxy.base, {"model": "m", "input": "what is my name?",
                                                    "previous_response_id": first["id"]})[2])
    one, two = fake_codex.wait_records(2)
    assert one["pid"] == two["pid"] and second["status"] == "completed"   # the same thread
    assert two["prompt"] == "what is my name?" and not two.get("injected")
    assert proxy.events("conversation_continued")
    not_kept = json.loads(post_responses(proxy.base, {"model": "m", "input": "x",
                                                      "store": False})[2])
    assert post_responses(proxy.base, {"model": "m", "input": "y", "previous_response_id":
                                       not_kept["id"]})[0] == 400


def test_a_failed_streamed_response_ends_with_response_failed(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"fail": "You've hit your usage limit.",
                                            "info": "usageLimitExceeded"}])
    status, _, raw = post_responses(proxy.base, {"model": "m", "input": "x", "stream": True})
    events = response_events(raw)
    assert status == 200 and events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"]["code"] == "usage_limit_reached"
    status, hdrs, raw = post_responses(proxy.base, {"model": "m", "input": "x"})
    assert status == 429 and json.loads(raw)["error"]["code"] == "usage_limit_reached"


@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "input"),
    ({"model": "m", "input": 5}, "input"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}, "input"),
    ({"model": "m", "input": "x", "background": True}, "background"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"model": "m", "input": "x", "reasoning": {"summary": "loud"}}, "reasoning"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image",
                                                            "image_url": "http://x/a.png"}]}]},
     None),
])
def test_bad_responses_requests_get_400(proxy, fake_codex, body, param):
    status, _, raw = post_responses(proxy.base, body)
    error = json.loads(raw)["error"]
    assert status == 400 and (param is None or error["param"] == param), error
    assert fake_codex.records() == []


def test_e2e_responses_api_with_the_sdk(e2e, openai_sdk):
    e2e.responder = lambda body, index: ("drip", 0.0, WORDS, "Pondering.")
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    response = client.responses.create(model="5.5-tpg", input="Say forty words",
                                       instructions="INSTR-R")
    assert response.model == "5.5-tpg" and response.output_text == "".join(WORDS)
    assert response.usage.input_tokens == 100 and response.usage.output_tokens == 20
    assert response.usage.input_tokens_details.cached_tokens == 40
    with client.responses.stream(model="5.5-tpg", input="Say forty words") as stream:
        kinds, deltas = [], []
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert len(deltas) >= 10 and "".join(deltas) == "".join(WORDS) == final.output_text
    assert "response.reasoning_summary_text.delta" in kinds
    assert "INSTR-R" in developer_text(e2e.upstream.bodies()[0])
    e2e.responder = lambda body, index: [message_item('{"city": "Paris", "temp": 21}')]
    parsed = client.responses.create(model="5.5-tpg", input="weather", text={"format": {
        "type": "json_schema", "name": "weather", "schema": SCHEMA, "strict": True}})
    assert json.loads(parsed.output_text) == {"city": "Paris", "temp": 21}
    fmt = e2e.upstream.bodies()[-1]["text"]["format"]
    assert fmt["type"] == "json_schema" and fmt["strict"] is True
    assert set(fmt["schema"]["properties"]) == {"city", "temp"}


def test_e2e_a_previous_response_id_chain_stays_on_one_thread(e2e, openai_sdk):
    e2e.responder = lambda body, index: [upstream_message(
        "you said " + body["input"][-1]["content"][0]["text"], index)]
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    previous = None
    for text in ("first words", "second words", "third words"):
        response = client.responses.create(model="5.5-tpg", input=text,
                                           previous_response_id=previous)
        previous = response.id
    assert response.output_text == "you said third words"
    bodies = e2e.upstream.bodies()
    assert len(bodies) == 3 and len({b["prompt_cache_key"] for b in bodies}) == 1
    assert [i.get("role") for i in bodies[2]["input"]] == [
        "developer", "user", "assistant", "user", "assistant", "user"]


# ---------------------------------------------------------------------------
# The Anthropic Messages API
# ---------------------------------------------------------------------------

def test_a_claude_code_turn_parses_into_the_request_model():
    png = base64.b64encode(tiny_png()).decode()
    enc = SEAL.sign({"summary": [{"type": "summary_text", "text": "hm"}],
                     "encrypted_content": "ENC"})
    request = cp.parse_messages_request({
        "model": "claude-opus-4-8", "max_tokens": 64000, "stream": True,
        "system": [{"type": "text", "text": "billing tag"},
                   {"type": "text", "text": "You are Claude Code.",
                    "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "<system-reminder>x"},
                                         {"type": "text", "text": "read it",
                                          "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": "Available agent types: none"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": enc},
                {"type": "text", "text": "Reading."},
                {"type": "tool_use", "id": "toolu_1", "name": "Read",
                 "input": {"file_path": "/p/hello.txt"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                    {"type": "text", "text": "1\thello"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": png}}]},
                {"type": "text", "text": "thanks"}]}],
        "tools": [{"name": "Read", "description": "Read a file", "input_schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "properties": {"file_path": {"type": "string"}}, "required": ["file_path"],
            "additionalProperties": False}}, {"type": "web_search_20250305", "name": "web"}],
        "thinking": {"type": "adaptive"}, "output_config": {"effort": "max"},
        "metadata": {"user_id": "{}"}, "context_management": {"edits": []}}, room())
    assert request.stream and request.model == "claude-opus-4-8"
    assert [m.role for m in request.messages] == ["system", "user", "system", "assistant",
                                                  "tool", "user"]
    assert request.messages[0].text == "billing tag\nYou are Claude Code."
    assert request.messages[3].tool_calls[0].arguments == '{"file_path": "/p/hello.txt"}'
    assert request.messages[3].reasoning[0]["encrypted_content"] == "ENC"
    tool = request.messages[4]
    assert tool.tool_call_id == "toolu_1" and tool.text == "1\thello" and len(tool.images) == 1
    assert request.tools[0].name == "Read" and "$schema" not in request.tools[0].parameters
    assert request.ignored_tools == [] and request.web_search == {"mode": "live", "name": "web"}
    assert (request.reasoning_effort, request.reasoning_summary) == ("xhigh", "auto")
    assert cp.resolve_model(request.model, {}) == (None, None)         # Codex's default
    assert cp.resolve_model("claude-opus-4-8", {"claude-opus-4-8": "gpt-5.5"})[0] == "gpt-5.5"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "document"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "url", "url": "https://x/a.png"}}]}]}, None),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "some"}},
     "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "deep"}}, "thinking"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens"),
])
def test_bad_messages_requests_are_400s(body, param):
    with pytest.raises(cp.ProxyError) as error:
        cp.parse_messages_request(body)
    assert error.value.status == 400 and (param is None or error.value.param == param)
    assert cp.anthropic_error(error.value)["error"]["type"] == "invalid_request_error"


def test_anthropic_tool_choice_thinking_and_format_map_to_the_shared_fields():
    base = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
    request = cp.parse_messages_request(dict(base, tool_choice={
        "type": "tool", "name": "f", "disable_parallel_tool_use": True},
        tools=[{"name": "f", "input_schema": {"type": "object"}}],
        thinking={"type": "enabled", "budget_tokens": 1024},
        output_config={"format": {"type": "json_schema", "schema": {
            "type": "object", "properties": {"t": {"type": "string"}}, "required": ["t"],
            "additionalProperties": False}}},
        stop_sequences=["END"]))
    assert request.tool_choice == {"name": "f"} and not request.parallel_tool_calls
    assert (request.reasoning_effort, request.reasoning_summary) == ("low", "auto")
    assert request.output_schema["properties"] == {"t": {"type": "string"}}
    assert request.stop == ["END"] and cp.forces_tool(request)
    assert cp.parse_messages_request(dict(base, thinking={"type": "disabled"})
                                     ).reasoning_summary is None
    assert cp.count_tokens_estimate(dict(base, system="s" * 4000)) >= 1000


def test_the_messages_responder_streams_blocks_in_the_order_the_sdk_asserts():
    handler = FakeHandler()
    request = cp.parse_messages_request({"messages": [{"role": "user", "content": "x"}],
                                         "stream": True, "thinking": {"type": "adaptive"},
                                         "model": "claude-x"})
    out = cp.MessagesResponder(handler, request, "content")
    out.open()
    out.reasoning_items.append({"summary": [], "encrypted_content": "ENC"})
    out.reasoning("r", 0, "Hm.")
    out.text("m", "Hel")
    out.text("m", "lo")
    out.tool_calls([cp.ToolCall("toolu_1", "Read", '{"file_path": "a"}')])
    out.finish("tool_calls", {"input_tokens": 10, "cached_input_tokens": 4, "output_tokens": 3})
    raw = handler.body().decode()
    names = re.findall(r"^event: (\S+)$", raw, re.M)
    assert names == ["message_start", "content_block_start", "content_block_delta",
                     "content_block_delta", "content_block_stop", "content_block_start",
                     "content_block_delta", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    events = sse_events(handler.body())
    assert events[0]["message"]["model"] == "claude-x" and "usage" in events[0]["message"]
    assert events[3]["delta"]["type"] == "signature_delta"
    assert SEAL.open(events[3]["delta"]["signature"], room())["encrypted_content"] == "ENC"
    assert events[10]["delta"] == {"type": "input_json_delta",
                                   "partial_json": '{"file_path": "a"}'}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert events[-2]["usage"] == {"input_tokens": 6, "cache_read_input_tokens": 4,
                                   "cache_creation_input_tokens": 0, "output_tokens": 3}


def test_a_streamed_anthropic_error_is_anthropics_event_exactly():
    handler = FakeHandler()
    request = cp.parse_messages_request({"model": "m", "max_tokens": 5, "stream": True,
                                         "messages": [{"role": "user", "content": "x"}]})
    out = cp.MessagesResponder(handler, request, "content")
    out.open()
    out.fail(cp.ProxyError(503, "Codex is busy", "api_error", "server_overloaded"))
    blocks = [b for b in handler.body().decode().split("\n\n") if b]
    assert blocks[-1] == 'event: error\ndata: {"type":"error","error":{"type":' \
        '"overloaded_error","message":"Codex is busy"}}'
    assert handler.ended


def test_the_messages_responder_without_a_stream_and_at_a_stop_sequence():
    handler = FakeHandler()
    request = cp.parse_messages_request({"messages": [{"role": "user", "content": "x"}],
                                         "model": "m"})
    out = cp.MessagesResponder(handler, request, "content")
    out.reasoning("r", 0, "not asked for")
    out.text("m", "answer")
    out.stop_sequence = "END"
    out.finish("stop", {})
    status, message = handler.json
    assert status == 200 and message["content"] == [{"type": "text", "text": "answer"}]
    assert message["stop_reason"] == "stop_sequence" and message["stop_sequence"] == "END"
    handler = FakeHandler()
    out = cp.MessagesResponder(handler, cp.parse_messages_request(
        {"messages": [{"role": "user", "content": "x"}], "stream": True}), "content")
    out.open()
    out.keepalive()
    out.fail(cp.ProxyError(429, "limit", "rate_limit_error", "usage_limit_reached"))
    raw = handler.body().decode()
    assert "event: ping" in raw and "event: error" in raw and '"rate_limit_error"' in raw


def test_e2e_the_anthropic_sdk_creates_messages(e2e, anthropic_sdk):
    e2e.responder = lambda body, index: [upstream_message("Hello from upstream", index)]
    e2e.write_config('model = "gpt-5.5"\n')          # the user's default model
    proxy = e2e.proxy()
    client = anthropic_client(anthropic_sdk, proxy)
    message = client.messages.create(model="claude-opus-4-8", max_tokens=100, system="Be brief.",
                                     messages=[{"role": "user", "content": "Say hello"}])
    assert message.model == "claude-opus-4-8" and message.stop_reason == "end_turn"
    assert message.content[0].text == "Hello from upstream"
    assert message.usage.input_tokens == 60 and message.usage.cache_read_input_tokens == 40
    assert message.usage.output_tokens == 20
    body = e2e.upstream.bodies()[0]
    assert body["model"] == "gpt-5.5" and "Be brief." in developer_text(body)  # config.toml's
    raw = client.messages.with_raw_response.create(          # Claude Code's query and
        model="claude-opus-4-8", max_tokens=10, extra_query={"beta": "true"},  # system turn
        messages=[{"role": "user", "content": "hi"},
                  {"role": "system", "content": "MID-CONVERSATION SYSTEM"},
                  {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": "again"}])
    assert raw.http_response.status_code == 200
    assert "MID-CONVERSATION SYSTEM" in developer_text(e2e.upstream.bodies()[-1])
    assert client.messages.count_tokens(model="claude-opus-4-8", messages=[
        {"role": "user", "content": "count me " * 100}]).input_tokens > 100
    with pytest.raises(anthropic_sdk.BadRequestError) as error:
        client.messages.create(model="claude-opus-4-8", max_tokens=10, messages=[])
    assert error.value.body["type"] == "error"
    assert error.value.body["error"]["type"] == "invalid_request_error"


def test_e2e_the_anthropic_sdk_streams_text_as_it_is_written(e2e, anthropic_sdk):
    e2e.responder = drip = GatedDrip()
    proxy = e2e.proxy()
    assert wait_until(lambda: pool_ready(proxy), 20)
    client = anthropic_client(anthropic_sdk, proxy)
    with client.messages.stream(model="claude-opus-4-8", max_tokens=500,
                                messages=[{"role": "user", "content": "count"}]) as stream:
        for _ in stream.text_stream:
            drip.seen()
        final = stream.get_final_message()
    assert drip.streamed(), drip.times
    assert final.content[0].text == "".join(WORDS) and final.stop_reason == "end_turn"


def test_e2e_the_anthropic_sdk_tool_round_image_format_and_thinking(e2e, anthropic_sdk):
    e2e.responder = one_tool_round("read it", function_call_item(
        "Read", {"file_path": "/p/a.txt"}, "call_r"), "the file says ", '{"title": "ok"}')
    proxy = e2e.proxy()
    client = anthropic_client(anthropic_sdk, proxy)
    tools = [{"name": "Read", "description": "Read a file", "input_schema": {
        "type": "object", "properties": {"file_path": {"type": "string"}},
        "required": ["file_path"]}}]
    messages = [{"role": "user", "content": "read it"}]
    first = client.messages.create(model="claude-opus-4-8", max_tokens=100, tools=tools,
                                   messages=messages)
    assert first.stop_reason == "tool_use" and first.content[-1].input == {"file_path": "/p/a.txt"}
    messages += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "content": "hello file",
                                               "tool_use_id": first.content[-1].id}]}]
    final = client.messages.create(model="claude-opus-4-8", max_tokens=100, tools=tools,
                                   messages=messages)
    assert final.content[-1].text == "the file says hello file"
    png = base64.b64encode(tiny_png()).decode()
    shaped = client.messages.create(
        model="claude-opus-4-8", max_tokens=100, thinking={"type": "enabled", "budget_tokens": 4096},
        output_config={"format": {"type": "json_schema", "schema": {
            "type": "object", "properties": {"title": {"type": "string"}},
            "required": ["title"], "additionalProperties": False}}},
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": png}}]}])
    assert [b.type for b in shaped.content] == ["thinking", "text"]
    assert shaped.content[0].thinking == "Pondering."
    body = e2e.upstream.bodies()[-1]
    assert body["reasoning"]["summary"] == "auto" and body["reasoning"]["effort"] == "medium"
    assert body["text"]["format"]["type"] == "json_schema"
    parts = [p for item in body["input"] if item.get("role") == "user" for p in item["content"]]
    assert any(p["type"] == "input_image" for p in parts)


@pytest.mark.parametrize("model", [None, "gpt-5.5"])
def test_e2e_claude_code_answers_and_runs_its_own_read_tool(e2e, claude_code, tmp_path, model):
    project = tmp_path / "project"
    project.mkdir()
    (project / "hello.txt").write_text("hello file\n")

    e2e.responder = one_tool_round("hello.txt", lambda body: offered_call(
        body, "Read", {"file_path": str(project / "hello.txt")}, "call_read"), "TOOL-SAID: ",
        "PLAIN-OK")
    proxy = e2e.proxy()
    home = tmp_path / "claude-home"
    home.mkdir()
    code, result, output = run_claude(claude_code, proxy, "say hello", project, home, model)
    assert code == 0 and "PLAIN-OK" in result.get("result", ""), output[-3000:]
    first = e2e.upstream.bodies()[0]
    assert first["model"] == (model or first["model"]) and not first["model"].startswith("claude")
    code, result, output = run_claude(claude_code, proxy, "show me hello.txt", project, home,
                                      model)
    assert code == 0 and "hello file" in result.get("result", ""), output[-3000:]
    outputs = [i for i in e2e.upstream.bodies()[-1]["input"]
               if i.get("type") == "function_call_output"]
    assert "hello file" in json.dumps(outputs)        # the file's text reached the model
    assert [e["name"] for e in proxy.events("tool_call_forwarded")] == ["Read"]


# ---------------------------------------------------------------------------
# The Ollama API
# ---------------------------------------------------------------------------

def test_ollama_messages_match_results_to_calls_by_name_and_order():
    png = base64.b64encode(tiny_png()).decode()
    request = cp.parse_ollama_chat({"model": "gpt-5.5:latest", "messages": [
        {"role": "user", "content": "weather?", "images": [png]},
        {"role": "assistant", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "content": "12:00", "tool_name": "get_time"},
        {"role": "tool", "content": "Sunny"}], "tools": [], "think": "high",
        "format": {"type": "object", "properties": {"a": {"type": "string"}},
                   "required": ["a"], "title": "A"}, "options": {"stop": ["\n\n"],
                                                               "num_ctx": 8192}})
    calls = request.messages[1].tool_calls
    assert [(m.role, m.tool_call_id) for m in request.messages[2:]] == [
        ("tool", calls[1].id), ("tool", calls[0].id)]
    assert request.messages[0].images[0].startswith("data:image/png;base64,")
    assert calls[0].arguments == '{"city": "Paris"}' and request.stream      # Ollama's default
    assert (request.reasoning_effort, request.reasoning_summary) == ("high", "auto")
    assert request.output_schema["required"] == ["a"] and request.stop == ["\n\n"]
    assert cp.resolve_model("gpt-5.5:latest", {}) == ("gpt-5.5", None)
    generate = cp.parse_ollama_generate({"model": "m", "prompt": "p", "system": "s",
                                         "stream": False, "format": "json"})
    assert [m.role for m in generate.messages] == ["system", "user"] and not generate.stream
    assert generate.output_instruction
    with pytest.raises(cp.ProxyError):
        cp.parse_ollama_chat({"model": "m", "messages": [{"role": "user", "content": 5}]})


def test_the_ollama_responder_writes_ndjson_lines_the_library_reads():
    handler = FakeHandler()
    request = cp.parse_ollama_chat({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                    "think": True})
    out = cp.OllamaResponder(handler, request, "content")
    out.open()
    out.reasoning("r", 0, "Hm.")
    out.text("m", "Hi")
    out.keepalive()
    out.tool_calls([cp.ToolCall("c1", "f", '{"a": 1}')])
    out.finish("tool_calls", {"input_tokens": 5, "output_tokens": 2})
    lines = handler.body().decode().split("\n")
    assert lines[-1] == "" and all(lines[:-1])          # one object a line, no blank line
    objects = [json.loads(line) for line in lines[:-1]]
    assert objects[0]["message"]["thinking"] == "Hm." and objects[1]["message"]["content"] == "Hi"
    assert objects[3]["message"]["tool_calls"] == [{"function": {"name": "f",
                                                                 "arguments": {"a": 1}}}]
    assert objects[-1]["done"] and objects[-1]["eval_count"] == 2
    assert not any(o["done"] for o in objects[:-1])
    handler = FakeHandler()
    out = cp.OllamaGenerateResponder(handler, cp.parse_ollama_generate(
        {"model": "m", "prompt": "x", "stream": False}), "content")
    out.text("m", "whole")
    out.finish("stop", {})
    assert handler.json[1]["response"] == "whole" and handler.json[1]["done"]


def test_e2e_the_ollama_library_lists_shows_chats_and_generates(e2e, ollama_lib):
    e2e.responder = lambda body, index: [upstream_message(
        "echo: " + upstream_texts(body)[-1], index)]
    proxy = e2e.proxy()
    client = ollama_lib.Client(host=proxy.base)
    names = [m.model for m in client.list().models]
    assert "gpt-5.5" in names
    assert client.show("gpt-5.5").modelinfo is not None
    assert json.loads(http_request(proxy.base, "GET", "/api/version")[2])["version"]
    reply = client.chat(model="gpt-5.5", messages=[{"role": "user", "content": "hi there"}])
    assert reply.message.content == "echo: hi there" and reply.done
    generated = client.generate(model="gpt-5.5", prompt="just a prompt", system="Be brief.")
    assert generated.response == "echo: just a prompt"
    assert "Be brief." in developer_text(e2e.upstream.bodies()[-1])
    e2e.responder = lambda body, index: ("status", 429, {"error": {
        "type": "usage_limit_reached", "message": "The usage limit has been reached"}})
    with pytest.raises(ollama_lib.ResponseError) as error:
        client.chat(model="gpt-5.5", messages=[{"role": "user", "content": "x"}])
    assert error.value.status_code == 429


def test_e2e_the_ollama_library_streams_pieces_as_they_are_written(e2e, ollama_lib):
    e2e.responder = drip = GatedDrip()
    proxy = e2e.proxy()
    assert wait_until(lambda: pool_ready(proxy), 20)
    text = ""
    for piece in ollama_lib.Client(host=proxy.base).chat(
            model="gpt-5.5", messages=[{"role": "user", "content": "count"}], stream=True):
        if piece.message.content:
            drip.seen()
            text += piece.message.content
    assert drip.streamed(), drip.times
    assert text == "".join(WORDS)


def test_e2e_the_ollama_library_tools_images_format_and_thinking(e2e, ollama_lib):
    e2e.responder = one_tool_round("weather", function_call_item(
        "get_weather", {"city": "Paris"}, "call_w"), "weather: ", '{"a": "b"}')
    proxy = e2e.proxy()
    client = ollama_lib.Client(host=proxy.base)

    def get_weather(city: str) -> str:
        """Get the weather.

        Args:
            city: The city
        """
        return "Sunny"
    messages = [{"role": "user", "content": "weather in Paris?"}]
    reply = client.chat(model="gpt-5.5", messages=messages, tools=[get_weather])
    call = reply.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    messages += [reply.message, {"role": "tool", "content": "Sunny", "tool_name": "get_weather"}]
    final = client.chat(model="gpt-5.5", messages=messages, tools=[get_weather])
    assert final.message.content == "weather: Sunny"
    png = base64.b64encode(tiny_png()).decode()
    shaped = client.chat(model="gpt-5.5", think=True, format={
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
        messages=[{"role": "user", "content": "what is this", "images": [png]}])
    assert shaped.message.thinking == "Pondering." and shaped.message.content == '{"a": "b"}'
    body = e2e.upstream.bodies()[-1]
    assert body["text"]["format"]["type"] == "json_schema"
    parts = [p for item in body["input"] if item.get("role") == "user" for p in item["content"]]
    assert any(p["type"] == "input_image" for p in parts)


# ---------------------------------------------------------------------------
# Client tool calls and parked turns
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("choice, parsed, instruction", [
    ("auto", "auto", ""), ("none", "none", ""), (None, "auto", ""),
    ("required", "required", "must call at least one"),
    ({"type": "function", "function": {"name": "read_file"}}, {"name": "read_file"}, "`read_file`"),
    ({"type": "function", "name": "read_file"}, {"name": "read_file"}, "`read_file`"),
    ({"type": "allowed_tools", "mode": "required", "tools": []}, "required", "at least one"),
])
def test_tool_choice_forms(choice, parsed, instruction):
    assert cp.parse_tool_choice(choice) == parsed
    text = cp.tool_choice_instruction(parsed, [cp.ToolSpec("read_file")])
    assert (instruction in text) if instruction else text == ""


@pytest.mark.parametrize("choice", [{"function": "x"}, "sometimes", 5, {"type": "function"},
                                    {"function": {"name": 3}}])
def test_bad_tool_choice_is_a_400(choice):
    with pytest.raises(cp.ProxyError) as info:
        cp.parse_tool_choice(choice)
    assert info.value.status == 400 and info.value.param == "tool_choice"


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


def test_pump_ends_with_the_calls_when_the_model_has_finished_its_calls():
    calls = [pending("c1"), pending("c2")]
    p, _, handler, run = pump([("tool_call", calls[0]), ("tool_call", calls[1]),
                               ("response_done", frozenset({"c1", "c2"}))])
    run.signals_responses = True
    end, stream = finished(p, handler)
    assert (end.kind, end.reason, end.calls) == ("calls", "tool_calls", calls)
    assert [c["id"] for c in stream["tool_calls"]] == ["c1", "c2"]


def test_pump_waits_only_briefly_for_a_call_no_response_announced():
    """A call from inside a tool of Codex's own was never in a response: no
    response_done will list it, so a quiet spell ends the batch."""
    call = pending("c1")
    p, _, handler, run = pump([("tool_call", call)], tool_quiet=0.05)
    run.signals_responses = True
    assert p.pump().calls == [call]


def test_pump_waits_for_every_call_exec_announced_however_late():
    """exec names each call before it reaches the bridge: the batch waits
    for all of them, far past the quiet spell, so a slow third call still
    goes out with the first two."""
    calls = [pending("c1"), pending("c2"), pending("c3", "list_dir")]
    p, _, handler, run = pump([("call_announced", ("read_file", {})),
                               ("call_announced", ("read_file", "{}")),
                               ("call_announced", ("list_dir", {})),
                               ("tool_call", calls[0]), ("tool_call", calls[1])],
                              tool_quiet=0.01)
    threading.Timer(0.5, run.events.put, (("tool_call", calls[2]),)).start()
    end = p.pump()
    assert end.calls == calls


def test_pump_sends_one_call_when_the_client_takes_one_at_a_time():
    calls = [pending("c1"), pending("c2")]
    request = chat_request(stream=True, parallel_tool_calls=False)
    p, _, handler, run = pump([("tool_call", calls[0]), ("tool_call", calls[1])], request)
    end, stream = finished(p, handler)
    assert end.calls == calls[:1] and [c["id"] for c in stream["tool_calls"]] == ["c1"]
    assert run.answers == [("c2", cp.TurnPump.NOT_RUN, True)]


def test_forced_tool_choices_are_the_extraction_pattern():
    one = cp.parse_chat_request(chat_body(tools=TOOLS[:1], tool_choice="required"))
    assert cp.forces_tool(one)
    assert cp.forces_tool(cp.parse_chat_request(chat_body(tools=TOOLS, tool_choice={
        "type": "function", "function": {"name": "read_file"}})))
    assert not cp.forces_tool(cp.parse_chat_request(chat_body(tools=TOOLS, tool_choice="required")))
    assert not cp.forces_tool(cp.parse_chat_request(chat_body(tools=TOOLS)))


def test_forced_tool_calls_leave_nothing_parked(proxy, fake_codex):
    fake_codex.scenario(("RESULT:", [{"thread": True}, {"text": "answered fresh"},
                                     {"complete": {}}]),
                        [{"thread": True}, {"calls": [
                            {"name": "read_file", "arguments": {"path": "x"}, "id": "c1"}]},
                         {"text": "never"}, {"complete": {}}])
    choice = {"type": "function", "function": {"name": "read_file"}}
    for n in range(3):
        _, call, finish, _ = tool_round(proxy, [{"role": "user", "content": f"extract {n}"}],
                                        tool_choice=choice)
        assert finish == "tool_calls"
    assert all(fake_codex.run_ended(r) for r in fake_codex.wait_records(3))
    assert json.loads(http_request(proxy.base, "GET", "/health")[2])["parked_turns"] == 0
    messages = [{"role": "user", "content": "extract 2"}, call, *results_for(call)]
    _, final, _, _ = tool_round(proxy, messages, tool_choice=choice)
    assert final["content"] == "answered fresh"


def test_ollama_tool_results_resume_the_parked_turn_without_ids(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"calls": [
        {"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_w"}]},
        {"text": "It is {results}"}, {"complete": {}}])
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "weather in Paris?"}]
    first = json.loads(http_request(proxy.base, "POST", "/api/chat", {
        "model": "gpt-5.5", "stream": False, "messages": messages, "tools": tools})[2])
    call = first["message"]["tool_calls"][0]
    assert call == {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages += [{"role": "assistant", "tool_calls": [call]},
                 {"role": "tool", "content": "Sunny", "tool_name": "get_weather"}]
    final = json.loads(http_request(proxy.base, "POST", "/api/chat", {
        "model": "gpt-5.5", "stream": False, "messages": messages, "tools": tools})[2])
    assert final["message"]["content"] == "It is Sunny" and proxy.events("turn_resumed")


def test_ollama_results_never_resume_another_users_turn(proxy, fake_codex):
    fake_codex.scenario(("alice", [{"thread": True}, {"calls": [
        {"name": "get_time", "arguments": {}, "id": "c_a"}]},
        {"text": "alice got {results}"}, {"complete": {}}]),
        ("bob", [{"thread": True}, {"calls": [{"name": "get_time", "arguments": {}, "id": "c_b"}]},
                 {"text": "bob got {results}"}, {"complete": {}}]))
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {}}}}]
    chats = {}
    for who in ("alice", "bob"):
        messages = [{"role": "user", "content": f"{who} asks the time"}]
        first = json.loads(http_request(proxy.base, "POST", "/api/chat", {
            "model": "m", "stream": False, "messages": messages, "tools": tools})[2])
        messages += [{"role": "assistant", "tool_calls": first["message"]["tool_calls"]},
                     {"role": "tool", "content": f"{who.upper()}-TIME", "tool_name": "get_time"}]
        chats[who] = messages
    for who in ("bob", "alice"):
        final = json.loads(http_request(proxy.base, "POST", "/api/chat", {
            "model": "m", "stream": False, "messages": chats[who], "tools": tools})[2])
        assert final["message"]["content"] == f"{who} got {who.upper()}-TIME"


def test_a_parked_turn_whose_codex_died_is_answered_fresh(proxy, fake_codex):
    fake_codex.scenario(("RESULT:", [{"thread": True}, {"text": "fresh: {seen}"},
                                     {"complete": {}}]), TOOL_TURN)
    messages = [{"role": "user", "content": "read a.py"}]
    _, call, finish, _ = tool_round(proxy, messages)
    assert finish == "tool_calls"
    pid = fake_codex.records()[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(pid), 5)
    status, final, finish, _ = tool_round(proxy, messages + [call, *results_for(call)])
    assert status == 200 and finish == "stop" and "RESULT:read_file" in final["content"]
    assert proxy.wait_event("parked_expired")[0]["reason"] == "codex_exited"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_parks_the_turn_and_the_result_resumes_it(both, fake_codex, stream):
    fake_codex.scenario(TOOL_TURN)
    messages = [{"role": "user", "content": "read a.py"}]
    status, message, finish, raw = tool_round(both, messages, stream)
    assert status == 200 and finish == "tool_calls"
    assert message["content"] == "Let me look."
    assert message["tool_calls"] == [{"id": "call_m1", "type": "function", "function": {
        "name": "read_file", "arguments": '{"path": "a.py"}'}}]
    assert len(both.server.turns.parked) == 1        # parked before the client saw the calls
    record = fake_codex.wait_records(1)[0]
    assert pid_alive(record["pid"]) and not record["ended"]       # parked, not ended
    messages += [message, *results_for(message)]
    status, final, finish, _ = tool_round(both, messages, stream)
    assert status == 200 and finish == "stop"
    assert final["content"] == 'The file says RESULT:read_file:{"path": "a.py"}'
    records = fake_codex.wait_records(1)
    assert len(records) == 1                    # the same process, no new run
    assert wait_until(lambda: fake_codex.records()[0]["results"])
    assert fake_codex.records()[0]["results"] == [{"name": "read_file", "is_error": False,
                                                   "text": 'RESULT:read_file:{"path": "a.py"}'}]
    kinds = [e["type"] for e in both.events()]
    assert {"tool_call_forwarded", "tool_result_received", "turn_resumed"} <= set(kinds)
    assert "fallback_transcript" not in kinds


def test_streamed_tool_calls_follow_the_fragment_rules(both, fake_codex):
    fake_codex.scenario([{"thread": True}, {"calls": [
        {"name": "read_file", "arguments": {"path": "a"}, "id": "call_a"},
        {"name": "list_dir", "arguments": {"path": "."}, "id": "call_b"}]},
        {"text": "done {results}"}, {"complete": {}}])
    _, _, raw = post_chat(both.base, {"model": "m", "stream": True, "tools": TOOLS,
                                      "messages": [{"role": "user", "content": "go"}],
                                      "stream_options": {"include_usage": True}})
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and finish_of(events) == "tool_calls"
    assert all(e["model"] == "m" for e in events[:-1])      # the client's name, tool chunks too
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


def test_parallel_calls_go_out_together_and_both_results_go_back(both, fake_codex):
    fake_codex.scenario(two_reads("both: {results}"))
    messages = [{"role": "user", "content": "read both"}]
    _, message, finish, _ = tool_round(both, messages)
    assert finish == "tool_calls" and len(message["tool_calls"]) == 2
    assert len({c["id"] for c in message["tool_calls"]}) == 2
    messages += [message, *results_for(message)]
    _, final, _, _ = tool_round(both, messages)
    assert 'RESULT:read_file:{"path": "a"}' in final["content"]
    assert 'RESULT:read_file:{"path": "b"}' in final["content"]
    assert len(fake_codex.records()[0]["results"]) == 2


def test_calls_of_one_response_go_out_together_however_far_apart(proxy, fake_codex):
    """app-server says when the model has finished its response: siblings that
    arrive later than --tool-quiet-ms still go out in the same response, and
    the response goes out as soon as the model is done."""
    fake_codex.scenario(two_reads("both: {results}", gap=0.4))
    _, message, finish, _ = tool_round(proxy, [{"role": "user", "content": "x"}])
    assert finish == "tool_calls" and [c["id"] for c in message["tool_calls"]] == ["call_a", "call_b"]
    assert fake_codex.records()[0]["thread"]["experimentalRawEvents"] is True


def test_without_that_sign_a_quiet_spell_ends_the_batch(proxy, fake_codex):
    fake_codex.scenario(two_reads("both: {results}", gate="second", raw=False))
    messages = [{"role": "user", "content": "x"}]
    _, first, finish, _ = tool_round(proxy, messages)
    assert finish == "tool_calls" and [c["id"] for c in first["tool_calls"]] == ["call_a"]
    (fake_codex.dir / "second").write_text("")      # the sibling comes after the response
    messages += [first, *results_for(first)]
    _, second, finish, _ = tool_round(proxy, messages)      # the late sibling, same turn
    assert finish == "tool_calls" and [c["id"] for c in second["tool_calls"]] == ["call_b"]
    messages += [second, *results_for(second)]
    _, final, finish, _ = tool_round(proxy, messages)
    assert finish == "stop" and final["content"].count("RESULT:read_file") == 2
    assert len(fake_codex.records()) == 1


def test_parallel_tool_calls_false_sends_one_call_at_a_time(both, fake_codex):
    fake_codex.scenario(two_reads("got: {results}"))
    messages = [{"role": "user", "content": "read both"}]
    _, message, finish, _ = tool_round(both, messages, parallel_tool_calls=False)
    assert finish == "tool_calls" and len(message["tool_calls"]) == 1
    record = fake_codex.wait_records(1)[0]
    assert "one tool per reply" in record["instructions"]
    messages += [message, *results_for(message)]
    _, final, _, _ = tool_round(both, messages, parallel_tool_calls=False)
    assert "Not run: the client accepts one tool call at a time" in final["content"]
    assert 'RESULT:read_file' in final["content"]


def test_custom_tool_call_arrives_as_raw_text_and_its_result_goes_back(both, fake_codex):
    fake_codex.scenario([{"thread": True}, {"calls": [
        {"name": "ApplyPatch", "arguments": {"input": PATCH}, "id": "call_p"}]},
        {"text": "patched: {results}"}, {"complete": {}}])
    messages = [{"role": "user", "content": "add a.txt"}]
    _, message, _, _ = tool_round(both, messages, stream=True)
    call = message["tool_calls"][0]
    assert call["function"] == {"name": "ApplyPatch", "arguments": PATCH}
    messages += [message, {"role": "tool", "tool_call_id": call["id"],
                           "content": [{"type": "text", "text": "Applied."}]}]
    _, final, _, _ = tool_round(both, messages)
    assert final["content"] == "patched: Applied."


def test_every_tool_form_reaches_the_model(both, fake_codex):
    post_chat(both.base, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS})
    tools = {t["name"]: t for t in fake_codex.wait_records(1)[0]["tools"]}
    assert set(tools) == {"read_file", "list_dir", "ApplyPatch"}
    assert tools["read_file"]["inputSchema"]["required"] == ["path"]
    assert tools["list_dir"]["description"] == "List a folder"
    assert tools["ApplyPatch"]["inputSchema"]["properties"]["input"]["type"] == "string"
    assert "start: patch" in tools["ApplyPatch"]["description"]


def test_no_tools_and_tool_choice_none_offer_none(both, fake_codex):
    post_chat(both.base, chat_body())
    post_chat(both.base, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                          "tool_choice": "none"})
    for record in fake_codex.wait_records(2):
        assert record["tools"] is None
        assert not any(a.startswith("mcp_servers") for a in record["argv"] + list(record["conf"]))


def test_tool_choice_required_and_named_become_instructions(proxy, fake_codex):
    for choice in ("required", {"type": "function", "function": {"name": "list_dir"}}):
        post_chat(proxy.base, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                               "tool_choice": choice})
    first, second = fake_codex.wait_records(2)
    assert "must call at least one" in first["instructions"]
    assert "`list_dir`" in second["instructions"]


def test_fallback_after_a_restart_replays_the_whole_conversation(make_proxy, fake_codex, engine):
    fake_codex.scenario(("RESULT:", [{"thread": True}, {"text": "fallback saw: {seen}"},
                                     {"complete": {}}]), TOOL_TURN)
    proxy = make_proxy(engine=engine)
    messages = [{"role": "user", "content": "read a.py"}]
    _, message, _, _ = tool_round(proxy, messages)
    proxy.stop()                                 # the parked Codex goes with it
    first_pid = fake_codex.records()[0]["pid"]
    assert wait_until(lambda: not pid_alive(first_pid), 8)
    proxy = make_proxy(engine=engine)
    messages += [message, *results_for(message)]
    status, final, finish, _ = tool_round(proxy, messages)
    assert status == 200 and finish == "stop"
    record = fake_codex.wait_records(2)[-1]
    if engine == "exec":                         # the whole conversation as a transcript
        prompt = record["prompt"]
        assert '<tool_call id="call_m1" name="read_file">{"path": "a.py"}</tool_call>' in prompt
        assert 'RESULT:read_file:{"path": "a.py"}' in prompt and "read a.py" in prompt
    else:                                        # ... or as the thread's own items
        assert record["injected"] == [
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "read a.py"}]},
            {"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": "Let me look."}]},
            {"type": "function_call", "call_id": "call_m1", "name": "read_file",
             "arguments": '{"path": "a.py"}'},
            {"type": "function_call_output", "call_id": "call_m1",
             "output": 'RESULT:read_file:{"path": "a.py"}'}]
        assert record["turn"]["input"] == []     # the model goes on from the result
    assert fake_codex.records()[-1]["tools"]               # tools offered again
    assert "RESULT:read_file" in final["content"]
    assert proxy.events("fallback_transcript")


@pytest.mark.parametrize("alpha_id, beta_id", [("call_alpha", "call_beta"),
                                               ("call_same", "call_same")])
def test_two_parked_turns_are_each_resumed_by_their_own_call_ids(proxy, fake_codex, alpha_id,
                                                                 beta_id):
    """Even when the model gives both conversations the same call id: the
    second gets a fresh one, so nothing crosses."""
    fake_codex.scenario(("alpha", [{"thread": True}, {"calls": [
        {"name": "read_file", "arguments": {"path": "alpha"}, "id": alpha_id}]},
        {"text": "alpha got {results}"}, {"complete": {}}]),
        ("beta", [{"thread": True}, {"calls": [
            {"name": "read_file", "arguments": {"path": "beta"}, "id": beta_id}]},
            {"text": "beta got {results}"}, {"complete": {}}]))
    alpha = [{"role": "user", "content": "alpha"}]
    beta = [{"role": "user", "content": "beta"}]
    _, alpha_call, _, _ = tool_round(proxy, alpha)
    _, beta_call, _, _ = tool_round(proxy, beta)
    assert len(proxy.server.turns.parked) == 2
    assert alpha_call["tool_calls"][0]["id"] != beta_call["tool_calls"][0]["id"]
    _, beta_final, _, _ = tool_round(proxy, beta + [beta_call, *results_for(beta_call, "B")])
    _, alpha_final, _, _ = tool_round(proxy, alpha + [alpha_call, *results_for(alpha_call, "A")])
    assert beta_final["content"] == 'beta got B:read_file:{"path": "beta"}'
    assert alpha_final["content"] == 'alpha got A:read_file:{"path": "alpha"}'
    assert len(fake_codex.records()) == 2 and not proxy.events("fallback_transcript")


def test_a_call_id_alone_never_resumes_another_conversations_turn(proxy, fake_codex):
    """Bob's history answers Alice's call id: it is not Alice's turn that
    gets his result, and Alice's turn waits on, for her own result."""
    fake_codex.scenario(("bob's own history", [{"thread": True}, {"text": "fresh: {seen}"},
                                               {"complete": {}}]), TOOL_TURN)
    alice = [{"role": "user", "content": "read a.py"}]
    _, call, finish, _ = tool_round(proxy, alice)
    assert finish == "tool_calls"
    bob = [{"role": "user", "content": "bob's own history"}, call, *results_for(call, "BOB")]
    _, answer, _, _ = tool_round(proxy, bob)
    assert answer["content"].startswith("fresh:") and "BOB" in answer["content"]
    assert len(proxy.server.turns.parked) == 1 and not proxy.events("parked_expired")
    _, final, finish, _ = tool_round(proxy, alice + [call, *results_for(call, "ALICE")])
    assert final["content"].startswith("The file says ALICE") and finish == "stop"


def test_the_codex_clis_goal_objective_after_a_result_resumes_the_turn(proxy, fake_codex):
    """The Codex CLI adds its goal objective after the result of create_goal,
    as a function_call_output with no call id: context, not a result."""
    fake_codex.scenario([{"thread": True}, {"calls": [
        {"name": "create_goal", "arguments": {"objective": "ship it"}, "id": "call_g"}]},
        {"text": "got {results}"}, {"complete": {}}])
    tools = [{"type": "function", "name": "create_goal",
              "parameters": {"type": "object", "properties": {"objective": {"type": "string"}}}}]
    items = [{"role": "user", "content": "set a goal"}]
    status, _, raw = post_responses(proxy.base, {"model": "5.5-tpg", "input": items,
                                                 "tools": tools, "store": False})
    call = json.loads(raw)["output"][0]
    assert call["type"] == "function_call" and call["name"] == "create_goal"
    items += [call, {"type": "function_call_output", "call_id": call["call_id"],
                     "output": "goal created"},
              {"type": "function_call_output", "name": "goal_objective", "namespace": "agent",
               "output": "ship it"}]
    status, _, raw = post_responses(proxy.base, {"model": "5.5-tpg", "input": items,
                                                 "tools": tools, "store": False})
    text = json.loads(raw)["output"][0]["content"][0]["text"]
    assert status == 200 and text.startswith("got goal created") and "ship it" in text
    assert proxy.events("turn_resumed") and not proxy.events("parked_expired")
    assert len(fake_codex.records()) == 1           # the same turn, not a second thread


def test_a_handoff_to_another_agent_is_not_resumed_as_the_first(proxy, fake_codex):
    """Agents SDK handoffs: agent B answers A's tool call with its own tools and
    instructions; A's parked turn must not continue as B."""
    fake_codex.scenario(("assistant", [{"thread": True}, {"text": "B speaking"},
                                       {"complete": {}}]),
                        [{"thread": True}, {"calls": [{"name": "transfer_to_b",
                                                       "arguments": {}, "id": "call_h"}]},
                         {"text": "A continued"}, {"complete": {}}])
    a_tools = [{"type": "function", "function": {"name": "transfer_to_b", "parameters": {
        "type": "object", "properties": {}}}}]
    b_tools = [{"type": "function", "function": {"name": "refund", "parameters": {
        "type": "object", "properties": {}}}}]
    messages = [{"role": "system", "content": "You are agent A."},
                {"role": "user", "content": "I need a refund"}]
    _, message, finish, _ = tool_round(proxy, messages, tools=a_tools)
    assert finish == "tool_calls"
    handoff = [{"role": "system", "content": "You are agent B."}] + messages[1:] + [
        message, {"role": "tool", "tool_call_id": "call_h", "content": "{\"assistant\": \"B\"}"}]
    _, final, _, _ = tool_round(proxy, handoff, tools=b_tools)
    assert final["content"] == "B speaking"
    fresh = fake_codex.records()[-1]
    assert "You are agent B." in fresh["instructions"] and "agent A" not in fresh["instructions"]
    assert tool_names_of(fresh) == {"refund"}
    assert proxy.wait_event("parked_expired")[0]["reason"] == "conversation_changed"


def test_other_tools_alone_expire_the_parked_turn(proxy, fake_codex):
    """The same system text with other tools is another conversation too."""
    fake_codex.scenario(("RESULT:", [{"thread": True}, {"text": "answered fresh"},
                                     {"complete": {}}]), TOOL_TURN)
    messages = [{"role": "system", "content": "Same system text."},
                {"role": "user", "content": "read a.py"}]
    _, message, finish, _ = tool_round(proxy, messages)
    assert finish == "tool_calls"
    other_tools = [t for t in TOOLS if (t.get("function") or t).get("name") != "list_dir"]
    _, final, _, _ = tool_round(proxy, messages + [message, *results_for(message)],
                                tools=other_tools)
    assert final["content"] == "answered fresh"
    assert proxy.wait_event("parked_expired")[0]["reason"] == "conversation_changed"
    assert tool_names_of(fake_codex.records()[-1]) == {"read_file", "ApplyPatch"}


def test_abandoned_parked_turn_expires(make_proxy, fake_codex):
    proxy = make_proxy(tool_result_timeout=0.5)
    fake_codex.scenario(TOOL_TURN)
    tool_round(proxy, [{"role": "user", "content": "x"}])
    record = fake_codex.wait_records(1)[0]
    expired = proxy.wait_event("parked_expired")
    assert expired[0]["reason"] == "tool_result_timeout" and expired[0]["pending"] == ["call_m1"]
    assert fake_codex.run_ended(record)
    assert len(proxy.server.turns.parked) == 0


def test_max_parked_expires_the_oldest(make_proxy, fake_codex):
    proxy = make_proxy(max_parked=1)
    fake_codex.scenario(TOOL_TURN)
    tool_round(proxy, [{"role": "user", "content": "first"}])
    tool_round(proxy, [{"role": "user", "content": "second"}])
    first, second = fake_codex.wait_records(2)
    assert proxy.wait_event("parked_expired")[0]["reason"] == "max_parked"
    assert fake_codex.run_ended(first)
    assert fake_codex.run_alive(second) and len(proxy.server.turns.parked) == 1


def test_parked_turns_do_not_count_against_max_concurrent(make_proxy, fake_codex):
    proxy = make_proxy(max_concurrent=1)
    fake_codex.scenario(("plain question", [{"thread": True}, {"text": "ok"}, {"complete": {}}]),
                        TOOL_TURN)
    assert tool_round(proxy, [{"role": "user", "content": "x"}])[2] == "tool_calls"
    assert post_chat(proxy.base, chat_body("plain question"))[0] == 200


def test_shutdown_ends_parked_codex(make_proxy, fake_codex, engine):
    proxy = make_proxy(engine=engine)
    fake_codex.scenario(TOOL_TURN)
    tool_round(proxy, [{"role": "user", "content": "x"}])
    record = fake_codex.wait_records(1)[0]
    proxy.stop()
    assert wait_until(lambda: not any(pid_alive(p) for p in fake_codex.pids()), 8)
    assert record["pid"] in fake_codex.pids()


def test_edited_history_expires_the_parked_turn_and_runs_fresh(proxy, fake_codex):
    fake_codex.scenario(("changed my mind", [{"thread": True}, {"text": "fresh"}, {"complete": {}}]),
                        TOOL_TURN)
    messages = [{"role": "user", "content": "x"}]
    _, message, _, _ = tool_round(proxy, messages)
    messages += [message, {"role": "user", "content": "changed my mind"}]
    _, final, _, _ = tool_round(proxy, messages)
    assert final["content"] == "fresh"
    assert proxy.wait_event("parked_expired")[0]["reason"] == "history_changed"
    assert fake_codex.run_ended(fake_codex.records()[0])


def test_missing_result_is_answered_with_an_error(both, fake_codex):
    fake_codex.scenario(two_reads("{results}"))
    messages = [{"role": "user", "content": "x"}]
    _, message, _, _ = tool_round(both, messages)
    messages += [message, results_for(message)[0]]
    assert tool_round(both, messages)[2] == "stop"
    results = fake_codex.records()[0]["results"]
    assert sorted(r["is_error"] for r in results) == [False, True]


def test_responses_tool_calls_park_and_resume_statelessly_or_by_previous_id(both, fake_codex):
    fake_codex.scenario(TOOL_TURN)
    tools = [{"type": "function", "name": "read_file", "description": "Read",
              "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}]
    first = json.loads(post_responses(both.base, {"model": "m", "input": "read a.py",
                                                  "tools": tools})[2])
    call = first["output"][-1]
    assert call["type"] == "function_call" and call["name"] == "read_file"
    assert call["arguments"] == '{"path": "a.py"}' and call["call_id"] == "call_m1"
    assert first["output"][0]["content"][0]["text"] == "Let me look."
    follow = {"model": "m", "tools": tools, "previous_response_id": first["id"],
              "input": [{"type": "function_call_output", "call_id": call["call_id"],
                         "output": "CONTENT-A"}]}
    second = json.loads(post_responses(both.base, follow)[2])
    assert second["output"][-1]["content"][0]["text"] == "The file says CONTENT-A"
    assert second["previous_response_id"] == first["id"]
    assert len(fake_codex.records()) == 1 and both.events("turn_resumed")
    stateless = {"model": "m", "tools": tools, "input": [
        {"role": "user", "content": "read a.py"},
        {"type": "function_call", "call_id": "call_zz", "name": "read_file",
         "arguments": '{"path": "a.py"}'},
        {"type": "function_call_output", "call_id": "call_zz", "output": "CONTENT-B"}]}
    fake_codex.scenario([{"thread": True}, {"text": "fresh saw {seen}"}, {"complete": {}}])
    third = json.loads(post_responses(both.base, stateless)[2])
    assert "CONTENT-B" in third["output"][-1]["content"][0]["text"]


def test_responses_custom_tool_calls_come_back_as_custom_items(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"calls": [
        {"name": "ApplyPatch", "arguments": {"input": PATCH}, "id": "call_p"}]},
        {"text": "patched: {results}"}, {"complete": {}}])
    tools = [{"type": "custom", "name": "ApplyPatch", "description": "patch"}]
    status, _, raw = post_responses(proxy.base, {"model": "m", "input": "patch", "tools": tools,
                                                 "stream": True})
    events = response_events(raw)
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done[-1]["type"] == "custom_tool_call" and done[-1]["input"] == PATCH
    assert any(e["type"] == "response.custom_tool_call_input.done" for e in events)
    follow = {"model": "m", "tools": tools, "previous_response_id": events[-1]["response"]["id"],
              "input": [{"type": "custom_tool_call_output", "call_id": "call_p",
                         "output": "Applied."}]}
    final = json.loads(post_responses(proxy.base, follow)[2])
    assert final["output"][-1]["content"][0]["text"] == "patched: Applied."


def test_responses_streamed_tool_call_events(proxy, fake_codex):
    fake_codex.scenario(TOOL_TURN)
    tools = [{"type": "function", "name": "read_file", "parameters": {"type": "object"}}]
    _, _, raw = post_responses(proxy.base, {"model": "m", "input": "x", "tools": tools,
                                            "stream": True})
    events = response_events(raw)
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" in kinds
    args_done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert args_done[0]["arguments"] == '{"path": "a.py"}' and args_done[0]["name"] == "read_file"
    final = events[-1]["response"]
    assert [o["type"] for o in final["output"]] == ["message", "function_call"]
    assert final["usage"]["total_tokens"] == 0      # the turn's usage comes with its last response


@pytest.mark.parametrize("stream, engine_name", [(False, "app-server"), (True, "app-server"),
                                                 (False, "exec")])
def test_e2e_sdk_agent_loop_with_a_tool_round_in_each_turn(e2e, openai_sdk, stream, engine_name):
    e2e.responder = agent_responder
    proxy = e2e.proxy(engine=engine_name)
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    messages, answers, served = [], [], []

    def ask():
        if not stream:
            return client.chat.completions.create(model="5.5-tpg", messages=messages,
                                                  tools=TOOLS).choices[0]
        chunks = list(client.chat.completions.create(model="5.5-tpg", messages=messages,
                                                     tools=TOOLS, stream=True))
        assert all(c.model == "5.5-tpg" for c in chunks)
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
    outputs = [(i["call_id"], json.dumps(i["output"])) for body in e2e.upstream.bodies()
               for i in body["input"] if i.get("type") == "function_call_output"]
    for call_id, _, path in served:       # every result reached the model as that call's output
        assert any(cid == call_id and f"CONTENT-{path}" in out for cid, out in outputs)
    for body in e2e.upstream.bodies():     # the client's tools, directly, for gpt-5.5
        names = tool_names(body)
        assert {"read_file", "ApplyPatch"} <= {n.split("/")[-1] for n in names}
        assert not names & CODEX_HOST_TOOLS
        assert engine_name == "exec" or not names & MCP_RESOURCE_TOOLS, names
    assert len(proxy.events("turn_resumed")) == 2


def test_e2e_parallel_calls_and_apply_patch(e2e, openai_sdk):
    def responder(body, index):
        outputs = [i for i in body["input"] if i.get("type") == "function_call_output"]
        if not outputs:
            return [call_for(body, "read_file", {"path": "a.py"}, "call_ra"),
                    call_for(body, "ApplyPatch", {"input": PATCH}, "call_ap")]
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
        return [call_for(body, "read_file", {"path": "alpha.py"}, "call_r1")]
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
    items = e2e.upstream.bodies()[-1]["input"]          # the history as items, no transcript
    assert [i.get("role") or i["type"] for i in items] == [
        "developer", "user", "function_call", "function_call_output"]
    assert items[1]["content"][0]["text"] == "read alpha.py" and "tool_result" not in json.dumps(items)
    assert items[3]["call_id"] == "call_r1" and items[3]["output"] == "CONTENT-alpha"


def test_e2e_abandoned_parked_turn_is_gone_after_the_timeout(e2e, openai_sdk):
    e2e.responder = lambda body, index: [call_for(body, "read_file", {"path": "x"}, "call_z")]
    proxy = e2e.proxy(tool_result_timeout=1.0)
    choice = sdk_client(openai_sdk, proxy.base + "/v1").chat.completions.create(
        model="5.5-tpg", messages=[{"role": "user", "content": "x"}], tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls"
    thread = proxy.events("codex_forward")[0]["thread_id"]
    assert proxy.wait_event("parked_expired", timeout=10)
    assert wait_until(lambda: thread not in loaded_threads(proxy), 5)


def test_e2e_responses_tools_stateless_and_by_previous_response_id(e2e, openai_sdk):
    e2e.responder = agent_responder
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    tools = [{"type": "function", "name": "read_file", "description": "Read a file",
              "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                             "required": ["path"]}}]
    first = client.responses.create(model="5.5-tpg", input="read delta.py", tools=tools)
    call = [o for o in first.output if o.type == "function_call"][0]
    assert call.name == "read_file" and json.loads(call.arguments) == {"path": "delta.py"}
    by_id = client.responses.create(model="5.5-tpg", tools=tools, previous_response_id=first.id,
                                    input=[{"type": "function_call_output", "call_id": call.call_id,
                                            "output": "CONTENT-delta.py"}])
    assert by_id.output_text == "The file holds CONTENT-delta.py"
    second = client.responses.create(model="5.5-tpg", input="read eps.py", tools=tools)
    call = [o for o in second.output if o.type == "function_call"][0]
    stateless = client.responses.create(model="5.5-tpg", tools=tools, input=[
        {"role": "user", "content": "read eps.py"},
        {"type": "function_call", "call_id": call.call_id, "name": "read_file",
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "CONTENT-eps.py"}])
    assert stateless.output_text == "The file holds CONTENT-eps.py"
    assert len(proxy.events("turn_resumed")) == 2


def test_e2e_a_handoff_reaches_the_model_as_the_new_agent(e2e, openai_sdk):
    def responder(body, index):
        if "AGENT B" in developer_text(body):
            return [message_item("B here")]
        return [call_for(body, "transfer_to_b", {}, "call_hand")]
    e2e.responder = responder
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    a_tools = [{"type": "function", "function": {"name": "transfer_to_b", "parameters": {
        "type": "object", "properties": {}}}}]
    b_tools = [{"type": "function", "function": {"name": "refund", "parameters": {
        "type": "object", "properties": {}}}}]
    history = [{"role": "user", "content": "refund please"}]
    choice = client.chat.completions.create(model="5.5-tpg", tools=a_tools, messages=[
        {"role": "system", "content": "AGENT A"}] + history).choices[0]
    assert choice.finish_reason == "tool_calls"
    history += [choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": "call_hand", "content": "transferred"}]
    final = client.chat.completions.create(model="5.5-tpg", tools=b_tools, messages=[
        {"role": "system", "content": "AGENT B"}] + history)
    assert final.choices[0].message.content == "B here"
    last = e2e.upstream.bodies()[-1]
    assert "refund" in tool_names(last) and "transfer_to_b" not in tool_names(last)
    assert "AGENT B" in developer_text(last) and "AGENT A" not in developer_text(last)


def test_e2e_parallel_tool_calls_false(e2e, openai_sdk):
    e2e.responder = lambda body, index: [call_for(body, "read_file", {"path": "a"}, "call_p1"),
                                         call_for(body, "read_file", {"path": "b"}, "call_p2")]
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    choice = client.chat.completions.create(model="5.5-tpg", tools=TOOLS, messages=[
        {"role": "user", "content": "read a and b"}], parallel_tool_calls=False).choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert "one tool per reply" in developer_text(e2e.upstream.bodies()[0])


def test_e2e_alices_call_id_in_bobs_history_resumes_nothing_of_hers(e2e, openai_sdk):
    def answer(body, outputs):
        users = [i["content"][0]["text"] for i in body["input"] if i.get("role") == "user"]
        return f"{users[0]} got {outputs[-1]}"
    e2e.responder = read_then_answer("a.py", "call_shared", answer)
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    alice = [{"role": "user", "content": "alice asks"}]
    call = client.chat.completions.create(model="5.5-tpg", messages=alice,
                                          tools=TOOLS).choices[0].message
    bob = [{"role": "user", "content": "bob asks"}, call.model_dump(exclude_none=True),
           {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "BOB-DATA"}]
    reply = client.chat.completions.create(model="5.5-tpg", messages=bob, tools=TOOLS)
    assert reply.choices[0].message.content == "bob asks got BOB-DATA"
    alice += [call.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "ALICE-DATA"}]
    reply = client.chat.completions.create(model="5.5-tpg", messages=alice, tools=TOOLS)
    assert reply.choices[0].message.content == "alice asks got ALICE-DATA"
    assert len(proxy.events("turn_resumed")) == 1 and not proxy.events("parked_expired")


def test_e2e_forced_extraction_calls_leave_no_parked_codex(e2e, openai_sdk):
    e2e.responder = lambda body, index: [function_call_item("read_file", {"path": "x"},
                                                            f"call_{index}")]
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    for n in range(3):
        choice = client.chat.completions.create(
            model="5.5-tpg", tools=TOOLS, messages=[{"role": "user", "content": f"extract {n}"}],
            tool_choice={"type": "function", "function": {"name": "read_file"}}).choices[0]
        assert choice.finish_reason == "tool_calls"
    threads = {e["thread_id"] for e in proxy.events("codex_forward")}
    assert len(threads) == 3 and wait_until(lambda: not threads & set(loaded_threads(proxy)), 10)
    assert json.loads(http_request(proxy.base, "GET", "/health")[2])["parked_turns"] == 0


def test_e2e_the_codex_clis_goal_follow_up_resumes_its_own_turn(e2e, tmp_path):
    """The Codex CLI as a client: the model sets a goal; the CLI answers
    create_goal, then adds its goal objective as a call-less output.  The
    follow-up resumes the turn that made the call; no second thread."""
    def responder(body, index):
        outputs = [i for i in body["input"] if i.get("type") == "function_call_output"]
        if outputs:
            return [upstream_message(f"goal noted: {json.dumps(outputs)[:200]}", index)]
        if "create_goal" in tool_names(body):
            return [function_call_item("create_goal", {"objective": "ship the fix"},
                                       "call_goal")]
        return [upstream_message("no goal tool offered", index)]
    e2e.responder = responder
    proxy = e2e.proxy()
    code, output = codex_cli_client(e2e, tmp_path, proxy)("set a goal to ship the fix")
    assert code == 0 and "goal noted" in output, output[-2000:]
    assert [e["name"] for e in proxy.events("tool_call_forwarded")] == ["create_goal"]
    assert proxy.events("turn_resumed") and not proxy.events("parked_expired")
    assert len({b["prompt_cache_key"] for b in e2e.upstream.bodies()}) == 1
    assert "ship the fix" in json.dumps(e2e.upstream.bodies()[-1]["input"])


def test_e2e_a_parked_turn_whose_codex_was_killed_is_answered_fresh(e2e, openai_sdk):
    def responder(body, index):
        outputs = [i for i in body["input"] if i.get("type") == "function_call_output"]
        if outputs:
            return [upstream_message(f"fresh answer: {outputs[-1]['output']}", index)]
        return [function_call_item("read_file", {"path": "a.py"}, "call_k")]
    e2e.responder = responder
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    messages = [{"role": "user", "content": "read a.py"}]
    choice = client.chat.completions.create(model="5.5-tpg", messages=messages,
                                            tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls"
    pid = proxy.events("codex_forward")[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(pid), 5)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id,
                  "content": "CONTENT-A"}]
    final = client.chat.completions.create(model="5.5-tpg", messages=messages, tools=TOOLS)
    assert final.choices[0].message.content == "fresh answer: CONTENT-A"
    assert proxy.events("parked_expired")[0]["reason"] == "codex_exited"


# ---------------------------------------------------------------------------
# Tool names, hosted tools, call ids and loop guards
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("allowed", [0, 3])
def test_max_unknown_calls_allows_that_many_in_a_row_and_stops_the_next(allowed):
    calls = [("model_call", ("nobody",))] * allowed
    end = pump(calls + [("text", ("m", "done")), ("completed", None)],
               max_unknown_calls=allowed)[0].pump()
    assert end.kind == "answered"
    end = pump(calls + [("model_call", ("nobody",)), ("completed", None)],
               max_unknown_calls=allowed)[0].pump()
    assert (end.kind, end.error.code) == ("failed", "model_loop")
    broken = [("model_call", ("nobody",)), ("model_call", ())] * (allowed + 2)
    assert pump(broken + [("completed", None)], max_unknown_calls=max(1, allowed))[0] \
        .pump().kind == "answered"              # in a row: a declared call breaks the streak


def test_every_tool_gets_a_name_codex_takes_and_comes_back_as_its_own():
    long_name = "a" * 80
    specs = cp.normalize_tools(ODD_TOOLS + [
        {"type": "function", "name": long_name}, {"type": "function", "name": "a_b"},
        {"type": "function", "name": "a.b"}])
    names = cp.ToolNames(specs, nested=True)
    offered = {tool.name: name for _, name, tool in names.offered()}
    assert offered == {"mcp.fs.read_file": "mcp_fs_read_file", "fs/list": "fs_list",
                       "mcp__github__search": "client_mcp__github__search",
                       "exec_command": "client_exec_command",
                       "shell_command": "client_shell_command", "ok_name": "ok_name",
                       long_name: offered[long_name], "a_b": "a_b", "a.b": "a_b_2"}
    assert len(offered[long_name]) <= 64 and cp.CODEX_NAME.fullmatch(offered[long_name])
    for tool in specs:
        assert names.from_codex(None, offered[tool.name]) is tool
    assert cp.ToolNames(specs, nested=True).offered() == names.offered()      # stable
    assert names.to_codex(None, "gone.tool") == (None, "gone_tool")       # an old call


def test_namespace_tools_nest_where_codex_takes_them_and_flatten_elsewhere():
    specs = cp.normalize_tools([{"type": "namespace", "name": "mcp__github", "tools": [
        {"type": "function", "name": "search", "parameters": {"type": "object"}},
        {"type": "function", "name": "exec_command"}]}, {"type": "function", "name": "search"}])
    assert [(t.namespace, t.name) for t in specs] == [("mcp__github", "search"),
                                                      ("mcp__github", "exec_command"),
                                                      (None, "search")]
    nested = cp.ToolNames(specs, nested=True)
    tools = cp.dynamic_tools(nested)
    assert tools[1] == {"type": "function", "name": "search", "description": "",
                        "inputSchema": {"type": "object", "properties": {}}}
    assert tools[0]["type"] == "namespace" and tools[0]["name"] == "client_mcp__github"
    assert [t["name"] for t in tools[0]["tools"]] == ["search", "exec_command"]
    assert nested.from_codex("client_mcp__github", "exec_command") is specs[1]
    flat = cp.ToolNames(specs, nested=False)
    assert [name for _, name, _ in flat.offered()] == [
        "client_mcp__github__search", "client_mcp__github__exec_command", "search"]
    call = cp.ToolCall("c1", "search", "{}", namespace="mcp__github")
    assert cp.output_call_item("fc_1", call)["namespace"] == "mcp__github"


def test_a_tool_declared_twice_differently_is_named_in_a_400():
    same = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    assert len(cp.normalize_tools([same, same])) == 1
    with pytest.raises(cp.ProxyError) as error:
        cp.normalize_tools([same, dict(same, description="other")])
    assert "'f'" in error.value.message
    request = cp.parse_responses_request({"input": "x", "tools": [
        {"type": "file_search"}, same, {"type": "namespace", "name": "ns", "tools": [same]}]})
    assert request.ignored_tools == ["file_search"] and len(request.tools) == 2


def test_odd_tool_names_reach_codex_as_aliases_and_calls_come_back_as_their_own(both, fake_codex):
    fake_codex.scenario([{"thread": True}, {"calls": [
        {"name": "mcp_fs_read_file", "arguments": {"q": "a"}, "id": "c1"},
        {"name": "client_exec_command", "arguments": {"q": "b"}, "id": "c2"},
        {"name": "client_mcp__github__search", "arguments": {"q": "c"}, "id": "c3"}]},
        {"text": "got {results}"}, {"complete": {}}])
    messages = [{"role": "user", "content": "use them"}]
    _, call, finish, _ = tool_round(both, messages, tools=ODD_TOOLS)
    assert finish == "tool_calls" and tool_names_of(fake_codex.wait_records(1)[0]) == {
        "mcp_fs_read_file", "fs_list", "client_mcp__github__search", "client_exec_command",
        "client_shell_command", "ok_name"}
    assert sorted(c["function"]["name"] for c in call["tool_calls"]) == [    # exec: any order
        "exec_command", "mcp.fs.read_file", "mcp__github__search"]
    _, final, _, _ = tool_round(both, messages + [call, *results_for(call)], tools=ODD_TOOLS)
    assert "RESULT:exec_command" in final["content"] and "RESULT:mcp.fs.read_file" in \
        final["content"]


def test_a_model_that_loops_on_an_undeclared_tool_is_stopped(both, fake_codex):
    fake_codex.scenario([{"thread": True}, {"loop_unknown": "nobody_tool"},
                         {"text": "never"}, {"complete": {}}])
    status, _, raw = post_chat(both.base, chat_body(stream=False, tools=TOOLS))
    error = json.loads(raw)["error"]
    assert status == 502 and error["code"] == "model_loop" and "nobody_tool" in error["message"]
    record = fake_codex.wait_records(1)[0]
    assert fake_codex.run_ended(record)
    calls = fake_codex.records()[0].get("model_calls")
    assert calls is not None and calls <= 20
    assert both.wait_event("stream_codex_error")[0]["code"] == "model_loop"


def test_a_flattened_namespace_tool_and_a_function_of_its_name_stay_apart():
    specs = cp.normalize_tools([{"type": "namespace", "name": "ns", "tools": [
        {"type": "function", "name": "x"}]}, {"type": "function", "name": "ns__x"}])
    flat = cp.ToolNames(specs, nested=False)
    names = [name for _, name, _ in flat.offered()]
    assert len(set(names)) == 2 and "ns__x" in names
    assert {flat.from_codex(None, n).namespace for n in names} == {"ns", None}


def test_a_codex_that_runs_a_tool_of_its_own_is_stopped(both, fake_codex):
    """Fail closed: Codex must never run anything itself."""
    fake_codex.scenario([{"thread": True}, {"command": "ls"}, {"text": "ran ls"},
                         {"complete": {}}])
    status, headers, raw = post_chat(both.base, chat_body())
    assert status == 502 and json.loads(raw)["error"]["code"] == "codex_tool_used"
    assert headers["x-should-retry"] == "false"
    record = fake_codex.wait_records(1)[0]
    assert fake_codex.run_ended(record)


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


def test_e2e_odd_tool_names_reach_the_model_and_come_back_as_their_own(e2e, openai_sdk):
    def responder(body, index):
        outputs = [i["output"] for i in body["input"] if i.get("type") == "function_call_output"]
        if outputs:
            return [upstream_message("outputs: " + " | ".join(outputs), index)]
        if "call them" in json.dumps(body["input"]):
            return [function_call_item("mcp_fs_read_file", {"q": "a"}, "call_a"),
                    function_call_item("client_exec_command", {"q": "b"}, "call_b"),
                    function_call_item("client_mcp__github__search", {"q": "c"}, "call_c")]
        return [upstream_message("plain answer", index)]
    e2e.responder = responder
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    tools = [t for t in ODD_TOOLS if t["function"]["name"] != "ok_name"]
    plain = client.chat.completions.create(model="5.5-tpg", tools=tools, messages=[
        {"role": "user", "content": "hello"}])
    assert plain.choices[0].message.content == "plain answer"
    assert {"mcp_fs_read_file", "fs_list", "client_mcp__github__search", "client_exec_command",
            "client_shell_command"} <= tool_names(e2e.upstream.bodies()[0])
    messages = [{"role": "user", "content": "call them"}]
    choice = client.chat.completions.create(model="5.5-tpg", tools=tools,
                                            messages=messages).choices[0]
    calls = {c.function.name: c for c in choice.message.tool_calls}
    assert set(calls) == {"mcp.fs.read_file", "exec_command", "mcp__github__search"}
    messages.append(choice.message.model_dump(exclude_none=True))
    messages += [{"role": "tool", "tool_call_id": c.id, "content": f"OUT-{name}"}
                 for name, c in calls.items()]
    final = client.chat.completions.create(model="5.5-tpg", tools=tools, messages=messages)
    assert sorted(final.choices[0].message.content[9:].split(" | ")) == [
        "OUT-exec_command", "OUT-mcp.fs.read_file", "OUT-mcp__github__search"]


def test_e2e_a_model_looping_on_an_undeclared_tool_is_stopped(e2e, openai_sdk):
    e2e.responder = lambda body, index: [function_call_item("nobody_tool", {}, f"call_{index}")]
    proxy = e2e.proxy()
    with pytest.raises(openai_sdk.APIStatusError) as error:
        sdk_client(openai_sdk, proxy.base + "/v1").chat.completions.create(
            model="5.5-tpg", tools=TOOLS, messages=[{"role": "user", "content": "go"}])
    assert error.value.status_code == 502 and "nobody_tool" in str(error.value)
    thread = proxy.events("codex_forward")[0]["thread_id"]
    # its thread is gone from Codex: nothing is left that could call the model
    assert wait_until(lambda: thread not in loaded_threads(proxy), 8)
    # 3 undeclared calls are allowed (--max-unknown-calls), the 4th stops the
    # turn; one more model call may be under way as the stop lands
    assert 4 <= len(e2e.upstream.requests) <= 5


def test_e2e_the_codex_cli_as_a_client_runs_its_own_shell_tool(e2e, tmp_path):
    e2e.responder = one_tool_round("run echo", function_call_item(
        "client_exec_command", {"cmd": "echo CLIENT-SHELL-OK"}, "call_shell"), "done: ",
        "plain answer from the proxy")
    proxy = e2e.proxy()
    client_codex = codex_cli_client(e2e, tmp_path, proxy,
                                    "--dangerously-bypass-approvals-and-sandbox")
    code, output = client_codex("say hello")
    assert code == 0 and "plain answer from the proxy" in output, output[-2000:]
    code, output = client_codex("run echo via your shell")
    assert code == 0 and "done:" in output, output[-2000:]
    last = json.dumps(e2e.upstream.bodies()[-1]["input"])
    assert "CLIENT-SHELL-OK" in last              # the client ran it; its output reached the model
    forwarded = proxy.events("tool_call_forwarded")
    assert [e["name"] for e in forwarded] == ["exec_command"]


# ---------------------------------------------------------------------------
# Stop sequences
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_stop_filter_cuts_before_the_stop_whatever_the_split(seed):
    rng = random.Random(seed)
    text = "The answer is 42.\nObservation: done\nmore"
    cuts = sorted(rng.sample(range(1, len(text)), 6))
    deltas = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    stop = cp.StopFilter(["\nObservation:", "never"])
    out = ""
    for delta in deltas:
        out += stop.feed(delta)
        if stop.hit:
            break
    assert stop.hit and out == "The answer is 42."
    nothing = cp.StopFilter(["zzz"])
    assert "".join(nothing.feed(d) for d in deltas) + nothing.flush() == text


def test_pump_cuts_at_a_stop_sequence_split_across_deltas():
    request = chat_request(stream=True, stop=["END"])
    p, _, handler, _ = pump([("text", ("m", "one E")), ("text", ("m", "ND two"))], request)
    end, stream = finished(p, handler)
    assert (end.kind, end.cut) == ("answered", True) and stream["content"] == "one "


@pytest.mark.parametrize("stream", [False, True])
def test_stop_cuts_the_answer_and_ends_the_turn(both, fake_codex, stream):
    fake_codex.scenario([{"thread": True}, {"deltas": ["Thought: look\nAct", "ion: search\n",
                                                       "Observ", "ation: made up"]},
                         {"wait_file": "never"}, {"complete": {}}])
    status, message, finish, _ = tool_round(both, [{"role": "user", "content": "q"}], stream,
                                            tools=[], stop=["Observation:", "zzz"])
    assert status == 200 and finish == "stop"
    assert message["content"] == "Thought: look\nAction: search\n"
    assert fake_codex.run_ended(fake_codex.wait_records(1)[0])
    if fake_codex.records()[0]["engine"] == "app-server":
        assert fake_codex.records()[0]["interrupted"] is True


def test_stop_on_the_responses_api(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"deltas": ["one two ", "STOP three"]},
                         {"complete": {}}])
    response = json.loads(post_responses(proxy.base, {"model": "m", "input": "x",
                                                      "stop": "STOP"})[2])
    assert response["output"][-1]["content"][0]["text"] == "one two "


@pytest.mark.parametrize("stream", [False, True])
def test_e2e_stop_cuts_the_answer(e2e, openai_sdk, stream):
    e2e.responder = lambda body, index: ("drip", 0.0, ["Thought: hmm\nAct", "ion: look\nObs",
                                                       "ervation: invented\n", "more"])
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    kwargs = dict(model="5.5-tpg", messages=[{"role": "user", "content": "go"}],
                  stop=["Observation:"])
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        reply = client.chat.completions.create(**kwargs)
        text, finish = reply.choices[0].message.content, [reply.choices[0].finish_reason]
    assert text == "Thought: hmm\nAction: look\n" and finish == ["stop"]


# ---------------------------------------------------------------------------
# Structured output
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("schema, strict", [
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
     {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
      "additionalProperties": False}),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {
        "type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}}},
      "required": ["a"], "additionalProperties": False},
     {"type": "object", "properties": {"a": {"type": "array", "items": {
         "type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"],
         "additionalProperties": False}}}, "required": ["a"], "additionalProperties": False}),
    ({"type": "object", "properties": {"a": {"type": "string"}}}, None),         # optional
    ({"type": "object", "properties": {}, "additionalProperties": True}, None),  # open
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "required": ["a"],
      "$defs": {"A": {"type": "object", "properties": {"x": {"type": "string"}}}}}, None),
    ({"type": "array", "items": {"type": "string"}}, None),                      # not an object
])
def test_strict_schema_keeps_meaning_or_gives_up(schema, strict):
    assert cp.strict_schema(schema) == strict


def test_structured_output_becomes_the_output_schema(both, fake_codex):
    post_chat(both.base, chat_body(response_format={"type": "json_schema", "json_schema": {
        "name": "weather", "schema": SCHEMA, "strict": True}}))
    post_responses(both.base, {"model": "m", "input": "x", "text": {"format": {
        "type": "json_schema", "name": "weather", "schema": SCHEMA, "strict": True}}})
    for record in fake_codex.wait_records(2):
        schema = record["turn"]["outputSchema"] if record["engine"] == "app-server" else \
            json.loads(record["conf"]["output_schema"])
        assert schema == dict(SCHEMA, additionalProperties=False)
    assert "sent as the output schema" in both.events("incoming_request")[0]["output_format"]


def test_a_schema_strict_mode_cannot_take_becomes_an_instruction(proxy, fake_codex):
    loose = {"type": "object", "properties": {"city": {"type": "string"}}}
    post_chat(proxy.base, chat_body(response_format={"type": "json_schema", "json_schema": {
        "name": "w", "schema": loose}}))
    post_chat(proxy.base, chat_body(response_format={"type": "json_object"}))
    first, second = fake_codex.wait_records(2)
    assert "outputSchema" not in first["turn"]
    assert "conforms to this JSON Schema" in first["instructions"]
    assert json.dumps(loose) in first["instructions"]
    assert "exactly one valid JSON object" in second["instructions"]
    notes = [e["output_format"] for e in proxy.events("incoming_request")]
    assert "not valid for strict mode" in notes[0] and "json_object" in notes[1]


def test_e2e_structured_output_on_chat(e2e, openai_sdk):
    e2e.responder = lambda body, index: [message_item('{"city": "Oslo", "temp": 3}')]
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    reply = client.chat.completions.create(model="5.5-tpg", messages=[
        {"role": "user", "content": "weather"}], response_format={"type": "json_schema",
        "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}})
    assert json.loads(reply.choices[0].message.content) == {"city": "Oslo", "temp": 3}
    fmt = e2e.upstream.bodies()[0]["text"]["format"]
    assert fmt["type"] == "json_schema" and set(fmt["schema"]["properties"]) == {"city", "temp"}
    client.chat.completions.create(model="5.5-tpg", messages=[
        {"role": "user", "content": "weather"}], response_format={"type": "json_object"})
    body = e2e.upstream.bodies()[1]
    assert "format" not in body.get("text", {}) and "JSON object" in developer_text(body)


# ---------------------------------------------------------------------------
# Reasoning, thinking blocks and sealed signatures
# ---------------------------------------------------------------------------

def test_thinking_signatures_are_sealed_and_carry_encrypted_reasoning_only():
    item = {"summary": [{"type": "summary_text", "text": "a"}], "encrypted_content": "E" * 500}
    signature = SEAL.sign(item)
    assert signature.startswith("cxp2.") and len(signature) < 200        # compressed
    assert SEAL.open(signature, room())["encrypted_content"] == "E" * 500
    payload, mac = signature[5:].rsplit(".", 1)
    altered = "cxp2." + base64.urlsafe_b64encode(zlib.compress(json.dumps(
        {"summary": [], "encrypted_content": "FORGED"}).encode())).decode() + "." + mac
    for foreign in ("", "EqQBCkYIBRgC", "cxp1." + payload, "cxp2.!!!", altered, None,
                    cp.Seal(b"other" * 8).sign(item)):        # another proxy's secret
        assert SEAL.open(foreign, room()) is None
    for summary in ([{"type": "summary_text", "text": 5}], [{"type": "other", "text": "x"}],
                    "text", [["summary_text", "x"]]):          # ours, but odd inside: dropped
        odd = SEAL.sign({"summary": summary, "encrypted_content": "E"})
        assert SEAL.open(odd, room()) is None


def test_a_thinking_block_that_is_not_ours_is_dropped_and_said():
    mine = SEAL.sign({"summary": [], "encrypted_content": "MINE"})
    forged = cp.Seal(b"x" * 32).sign({"summary": [], "encrypted_content": "FORGED"})
    request = cp.parse_messages_request({"model": "m", "max_tokens": 9, "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "a", "signature": mine},
            {"type": "thinking", "thinking": "b", "signature": forged},
            {"type": "text", "text": "answer"}]},
        {"role": "user", "content": "more"}]}, room())
    assert [r["encrypted_content"] for r in request.messages[1].reasoning] == ["MINE"]
    assert request.notes == ["1 thinking signature(s) this proxy did not make (or altered) "
                             "were dropped: their reasoning is not sent"]


def test_a_signature_bomb_costs_nothing_and_ours_count_against_max_body():
    """A forged bomb that inflates to valid-looking JSON is refused before
    it is inflated (memory stays flat); a real one still counts, whole, in
    what the request may grow to (--max-body)."""
    data = json.dumps({"summary": [], "encrypted_content": "A" * (64 * 1024 * 1024)}).encode()
    payload = base64.urlsafe_b64encode(zlib.compress(data)).decode()
    bomb = f"cxp2.{payload}.{'A' * 24}"
    tracemalloc.start()
    try:
        assert SEAL.open(bomb, room()) is None
        assert tracemalloc.get_traced_memory()[1] < 8 * 1024 * 1024
    finally:
        tracemalloc.stop()
    big = SEAL.sign({"summary": [], "encrypted_content": "E" * 3000})
    with pytest.raises(cp.ProxyError) as refused:
        SEAL.open(big, room(limit=2000))
    assert refused.value.status == 413 and "--max-body" in refused.value.message


def test_think_mode_puts_reasoning_in_content_and_strips_it_from_history(make_proxy, fake_codex,
                                                                         engine):
    proxy = make_proxy(reasoning="think", engine=engine)
    fake_codex.scenario([{"thread": True}, {"reasoning": "R1"}, {"text": "A1"}, {"complete": {}}])
    _, _, raw = post_chat(proxy.base, chat_body(stream=True))
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in sse_events(raw)[:-1]
                      if c["choices"])
    assert content == "<think>\nR1\n</think>\n\nA1"
    assert "reasoning_content" not in raw.decode()
    post_chat(proxy.base, {"messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": content},
                                        {"role": "user", "content": "q2"}]})
    seen = seen_by_model(fake_codex.wait_records(2)[-1])
    assert "R1" not in seen and "A1" in seen


def test_reasoning_none_hides_the_summary(make_proxy, fake_codex):
    proxy = make_proxy(reasoning="none")
    fake_codex.scenario([{"thread": True}, {"reasoning": "SECRET-R"}, {"text": "A"}, {"complete": {}}])
    for stream in (True, False):
        _, _, raw = post_chat(proxy.base, chat_body(stream=stream))
        assert b"SECRET-R" not in raw and b"reasoning_content" not in raw


def test_e2e_a_clients_encrypted_reasoning_reaches_the_model(e2e, openai_sdk):
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    client.responses.create(model="5.5-tpg", store=False, input=[
        {"role": "user", "content": "think about it"},
        {"type": "reasoning", "id": "rs_client", "encrypted_content": "CLIENT-ENC",
         "summary": [{"type": "summary_text", "text": "I thought."}]},
        {"role": "assistant", "content": "Done thinking."},
        {"role": "user", "content": "and?"}])
    items = e2e.upstream.bodies()[0]["input"]
    assert [i.get("role") or i["type"] for i in items] == [
        "developer", "user", "reasoning", "assistant", "user"]
    assert items[2]["encrypted_content"] == "CLIENT-ENC"


def test_e2e_odd_content_inside_a_signature_is_never_a_5xx(e2e):
    """Codex refuses a history whose reasoning summary holds a number: such
    content inside one of the proxy's own signatures is dropped, not sent."""
    e2e.responder = lambda body, index: [upstream_message("fine", index)]
    proxy = e2e.proxy()
    seal = proxy.server.seal
    for summary in ([{"type": "summary_text", "text": 5}], [{"text": "no type"}], "flat"):
        content = {"summary": summary, "encrypted_content": "ENC"}
        payload = base64.urlsafe_b64encode(zlib.compress(json.dumps(content).encode())).decode()
        status, _, raw = http_request(proxy.base, "POST", "/v1/messages", {
            "model": "claude-x", "max_tokens": 50, "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "t",
                     "signature": f"{cp.SIGNATURE_PREFIX}{payload}.{seal._mac(payload)}"},
                    {"type": "text", "text": "a"}]},
                {"role": "user", "content": "more"}]})
        assert status == 200, raw
    assert not any(i.get("type") == "reasoning" for b in e2e.upstream.bodies()
                   for i in b["input"])


# ---------------------------------------------------------------------------
# Conversations: native history and kept threads
# ---------------------------------------------------------------------------

def test_history_goes_to_codex_as_the_items_a_thread_holds():
    png = "data:image/png;base64," + base64.b64encode(tiny_png()).decode()
    messages = chat_messages(
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": png}}]},
        {"role": "assistant", "content": "On it.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "read", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "file text"},
        {"role": "user", "content": "and now?"})
    history, last = cp.split_turn(messages)
    assert last.text == "and now?" and [m.role for m in history] == ["user", "assistant", "tool"]
    assert cp.history_items(history, cp.ToolNames([], True)) == [
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "look\n[image #1]"},
            {"type": "input_image", "image_url": png}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "On it."}]},
        {"type": "function_call", "call_id": "c1", "name": "read", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "file text"}]
    assert cp.split_turn(messages[:-1]) == (messages[1:-1], None)     # ends in results
    assert cp.turn_input(None) == []
    assert cp.turn_input(last) == [{"type": "text", "text": "and now?", "text_elements": []}]


def test_responses_items_keep_custom_calls_and_encrypted_reasoning():
    request = cp.parse_responses_request({"input": [
        {"role": "user", "content": "patch it"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "hm"}],
         "encrypted_content": "ENC-1"},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Patching."}]},
        {"type": "custom_tool_call", "call_id": "p1", "name": "ApplyPatch", "input": "*** x"},
        {"type": "custom_tool_call_output", "call_id": "p1", "output": "done"},
        {"type": "reasoning", "id": "rs_2", "summary": []}]})      # no encrypted_content: dropped
    history, last = cp.split_turn(request.messages)
    assert last is None
    assert cp.history_items(history, cp.ToolNames([], True)) == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "patch it"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "hm"}],
         "encrypted_content": "ENC-1"},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Patching."}]},
        {"type": "custom_tool_call", "call_id": "p1", "name": "ApplyPatch", "input": "*** x"},
        {"type": "custom_tool_call_output", "call_id": "p1", "output": "done"}]


def test_a_faithful_echo_has_the_same_conversation_key():
    sent = chat_messages(
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
        {"role": "assistant", "content": "<think>\nhm\n</think>\n\nDone."})
    echo = chat_messages(
        {"role": "system", "content": "ignored here"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [], "tool_calls": [           # Cursor drops the text
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"b":2,"a":1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r "},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "next"})
    key, _ = cp.conversation_key(sent)
    longer, ends = cp.conversation_key(echo)
    assert longer[:len(key)] == key and len(longer) == len(key) + 1
    assert echo[ends[len(key) - 1]:][0].text == "next"
    split = chat_messages({"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"},
                          {"role": "assistant", "content": "B"})
    joined = chat_messages({"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "A\n\nB"})
    assert cp.conversation_key(split)[0] == cp.conversation_key(joined)[0]
    edited = chat_messages({"role": "user", "content": "hi!"})
    assert cp.conversation_key(edited)[0][0] != key[0]


def test_kept_threads_match_by_history_and_settings_and_say_why_not():
    now = [0.0]
    kept = cp.KeptThreads(2, ttl=100, clock=lambda: now[0])
    a, b, c = kept_run("a"), kept_run("b"), kept_run("c")
    ends = [1, 2, 3, 4, 5, 6]

    def claim(key, match=settings()):
        return kept.claim(match, key, ends, None)
    assert kept.keep(b, settings(), (b"1", b"2", b"3", b"4")) == []
    assert claim((b"1", b"2", b"3", b"8", b"9"))[1] == "message 3 edited"
    assert claim((b"1", b"2"))[1] == "an earlier point of the conversation"
    assert kept.keep(a, settings(), (b"1", b"2")) == []
    assert claim((b"1", b"2"))[1] == "nothing new since its last turn"
    assert claim((b"1", b"2", b"9"), settings(instructions="other"))[1] == \
        "instructions changed"
    assert claim((b"1", b"2", b"9"), settings(tools=(("list_dir", "d2"),)))[1] == \
        "tools changed (+list_dir \u2212read_file)"
    assert claim((b"1", b"2", b"9"), settings(tools=(("read_file", "d9"),)))[1] == \
        "tools changed (~read_file)"
    assert claim((b"1", b"2", b"9"), settings(model="gpt-5.4"))[1] == "model changed"
    assert claim((b"1", b"2", b"9"), settings(effort="high"))[1] == \
        "reasoning effort changed"
    assert claim((b"1", b"8", b"9"))[1] == "message 1 edited"
    assert claim((b"7",))[1] == "a new conversation"
    found, why, hinted = claim((b"1", b"2", b"3", b"4", b"5"))
    assert found.run is b and why is None and not hinted and len(kept) == 1   # the longest
    assert claim((b"1", b"2", b"3", b"4", b"5"))[0].run is a
    assert claim((b"6", b"2"))[1] is None               # nothing known: the caller says why


def test_a_kept_thread_goes_to_one_claim_however_many_race_for_it():
    kept = cp.KeptThreads(8, ttl=100)
    match = SlowSettings("instr", (("read_file", "d1"),), "gpt-5.5")
    for round in range(5):
        run = kept_run(f"r{round}")
        kept.keep(run, match, (b"1", b"2"))
        barrier, got, errors = threading.Barrier(6), [], []

        def claim():
            barrier.wait(5)
            try:
                got.append(kept.claim(match, (b"1", b"2", b"3"), [1, 2, 3], None)[0])
            except Exception as exc:        # a lost lock shows up as one, or as two winners
                errors.append(exc)
        threads = [threading.Thread(target=claim) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert errors == [] and [k.run for k in got if k is not None] == [run]


def test_side_requests_never_push_a_conversation_out():
    """Past the size, one-shot requests (a chat UI's title, tags, follow-ups)
    go first: the newest of those fresher than ONE_SHOT_GRACE (the side
    requests that follow an answer push each other out, not the chat's
    first turn), else the least recently used one-shot; then the least
    recently used conversation."""
    now = [0.0]
    kept = cp.KeptThreads(3, ttl=1000, clock=lambda: now[0])
    chat = kept_run("chat")
    kept.keep(chat, settings(), (b"q1", b"a1"))          # its first turn: a one-shot so far
    evicted = []
    for n in range(6):                                  # six side requests after the answer
        now[0] += 1
        evicted += kept.keep(kept_run(f"side{n}"), settings(), (b"s%d" % n, b"t%d" % n))
    assert [r.id for r in evicted] == ["side2", "side3", "side4", "side5"]
    assert kept.claim(settings(), (b"q1", b"a1", b"q2"), [1] * 9, None)[0].run is chat
    kept.keep(chat, settings(), (b"q1", b"a1", b"q2", b"a2"))
    now[0] += cp.ONE_SHOT_GRACE                         # side0 and side1 have gone stale
    assert [r.id for r in kept.keep(kept_run("new"), settings(), (b"n", b"m"))] == ["side0"]
    kept = cp.KeptThreads(2, ttl=100, clock=lambda: now[0])
    old = kept_run("old")
    kept.keep(old, settings(), (b"1", b"2", b"3"))
    kept.keep(kept_run("x"), settings(), (b"4", b"5", b"6"))
    assert kept.keep(kept_run("y"), settings(), (b"7", b"8", b"9")) == [old]   # then the oldest


def test_what_was_let_go_is_named_when_it_comes_back():
    now = [0.0]
    kept = cp.KeptThreads(1, ttl=100, clock=lambda: now[0])
    a, b = kept_run("a"), kept_run("b")
    kept.keep(a, settings(), (b"1", b"2", b"3"))
    assert kept.keep(b, settings(), (b"4", b"5", b"6")) == [a]
    assert kept.claim(settings(), (b"1", b"2", b"3", b"7"), [1] * 9, None)[1] == \
        "evicted (max_kept)"
    now[0] = 101
    assert kept.take_due() == [(b, "ttl")] and len(kept) == 0
    assert kept.claim(settings(), (b"4", b"5", b"6", b"7"), [1] * 9, None)[1] == \
        "expired (ttl)"
    dead = kept_run("d", exited=True)
    kept.keep(dead, settings(), (b"z",))
    assert kept.claim(settings(), (b"z", b"w"), [1] * 9, None)[:2] == (None, "process died")
    assert kept.take_due() == [(dead, "exited")]


def test_a_hint_the_client_appended_and_dropped_keeps_the_thread():
    """aider appends "Reply in English." to its newest user message only."""
    hint = "\n\nReply in English.\n"
    first = [cp.Message("user", "fix the bug" + hint), cp.Message("assistant", "done")]
    key, ends = cp.conversation_key(first)
    kept = cp.KeptThreads(4, ttl=100)
    run = kept_run("a")
    kept.keep(run, settings(), key, cp.hint_candidates(first[0]), 0)
    second = [cp.Message("user", "fix the bug"), cp.Message("assistant", "done"),
              cp.Message("user", "and the test" + hint)]
    key2, ends2 = cp.conversation_key(second)
    assert key2[0] != key[0]
    found, why, hinted = kept.claim(settings(), key2, ends2, second[-1])
    assert found.run is run and hinted
    kept.keep(run, settings(), key, cp.hint_candidates(first[0]), 0)
    other = second[:2] + [cp.Message("user", "and the test")]        # no hint now: edited
    found, why, _ = kept.claim(settings(), cp.conversation_key(other)[0], ends2, other[-1])
    assert found is None                # it differs from the first message on: nothing shared
    changed = [cp.Message("user", "fix the other bug")] + second[1:]  # more than the hint
    found, why, _ = kept.claim(settings(), cp.conversation_key(changed)[0], ends2, changed[-1])
    assert found is None


def test_the_next_turn_of_a_conversation_continues_its_kept_thread(proxy, fake_codex):
    fake_codex.scenario(CHAT_TURN)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"}]
    answer, first_usage = converse(proxy, messages)
    messages += [answer, {"role": "user", "content": "two"}]
    answer, usage = converse(proxy, messages)
    assert answer["content"] == "answer to: two"
    first, second = fake_codex.wait_records(2)
    assert first["pid"] == second["pid"] and not second.get("injected")
    assert second["prompt"] == "two" and len(second["turns"]) == 2
    assert usage == first_usage                  # each turn's own usage, not the thread's sum
    continued = proxy.wait_event("conversation_continued")[0]
    assert continued["new_messages"] == 1 and continued["run"] == proxy.events(
        "conversation_started")[0]["run"]
    assert json.loads(http_request(proxy.base, "GET", "/health")[2])["conversations"] == 1


def test_a_conversation_with_tool_rounds_stays_on_one_thread(proxy, fake_codex):
    fake_codex.scenario(TOOL_TURN)
    messages = [{"role": "user", "content": "read a.py"}]
    for round_ in range(3):
        _, call, finish, _ = tool_round(proxy, messages)
        assert finish == "tool_calls"
        messages += [call, *results_for(call)]
        _, answer, finish, _ = tool_round(proxy, messages)
        assert finish == "stop" and answer["content"].startswith("The file says RESULT")
        messages += [answer, {"role": "user", "content": f"read it again ({round_})"}]
    assert len({r["pid"] for r in fake_codex.records()}) == 1
    assert len(proxy.events("conversation_continued")) == 2
    assert len(proxy.events("turn_resumed")) == 3


def test_an_edited_history_starts_a_new_thread_that_sees_the_edit(proxy, fake_codex):
    fake_codex.scenario(CHAT_TURN)
    messages = [{"role": "user", "content": "one"}]
    answer, _ = converse(proxy, messages)
    messages += [answer, {"role": "user", "content": "two"}]
    answer, _ = converse(proxy, messages)
    messages[1] = {"role": "assistant", "content": "an edited answer"}
    converse(proxy, messages + [answer, {"role": "user", "content": "three"}])
    records = fake_codex.wait_records(3)
    assert records[0]["thread_id"] == records[1]["thread_id"] != records[2]["thread_id"]
    assert records[2]["prompt"] == "three"
    assert records[2]["injected"][1]["content"][0]["text"] == "an edited answer"
    assert proxy.wait_event("conversation_started", 2)[1]["reason"] == "message 1 edited"


def test_only_the_newest_conversations_are_kept(make_proxy, fake_codex):
    """With room for one: a one-shot never pushes out a conversation (it is
    let go itself), and of two conversations the older goes."""
    proxy = make_proxy(keep_conversations=1)
    fake_codex.scenario(CHAT_TURN)

    def two_turns(name):
        messages = [{"role": "user", "content": f"{name} conversation"}]
        answer, _ = converse(proxy, messages)
        messages += [answer, {"role": "user", "content": "more"}]
        return messages + [converse(proxy, messages)[0]]
    first = two_turns("first")
    assert len(proxy.events("conversation_continued")) == 1
    converse(proxy, [{"role": "user", "content": "second conversation"}])
    assert proxy.wait_event("conversation_expired")[0]["reason"] == "max_kept"
    assert len(proxy.server.turns.kept) == 1        # the one-shot went, the conversation stays
    first += [{"role": "user", "content": "still there?"}]
    first.append(converse(proxy, first)[0])
    assert len(proxy.events("conversation_continued")) == 2
    two_turns("third")                              # a second conversation: the older goes
    assert fake_codex.run_ended(fake_codex.records()[0])
    assert json.loads(http_request(proxy.base, "GET", "/health")[2])["conversations"] == 1
    converse(proxy, first + [{"role": "user", "content": "again"}])
    assert proxy.events("conversation_started")[-1]["reason"] == "evicted (max_kept)"


def test_an_idle_kept_conversation_ends_after_its_ttl(make_proxy, fake_codex):
    proxy = make_proxy(conversation_ttl=1.0)
    fake_codex.scenario(CHAT_TURN)
    converse(proxy, [{"role": "user", "content": "hello"}])
    record = fake_codex.wait_records(1)[0]
    assert proxy.wait_event("conversation_expired")[0]["reason"] == "ttl"
    assert fake_codex.run_ended(record) and len(proxy.server.turns.kept) == 0
    assert pid_alive(record["pid"])             # the process serves other conversations


def test_without_kept_conversations_every_turn_is_a_new_thread(make_proxy, fake_codex):
    proxy = make_proxy(keep_conversations=0)
    fake_codex.scenario(CHAT_TURN)
    answer, _ = converse(proxy, [{"role": "user", "content": "one"}])
    converse(proxy, [{"role": "user", "content": "one"}, answer, {"role": "user", "content": "two"}])
    first, second = fake_codex.wait_records(2)
    assert first["thread_id"] != second["thread_id"] and \
        [i["role"] for i in second["injected"]] == ["user", "assistant"]
    assert fake_codex.run_ended(first) and fake_codex.run_ended(second)


@pytest.mark.parametrize("change, reason", [
    ({"system": "Be long."}, "instructions changed"),
    ({"model": "5.4-tpg"}, "model changed"),
    ({"reasoning_effort": "high"}, "reasoning effort changed"),
    ({"image": "QkJC"}, "message 3 edited"),          # its index in the request, system first
    ({"tool_image": "QkJC"}, "message 5 edited"),
])
def test_each_setting_and_every_image_decides_whether_a_thread_continues(
        proxy, fake_codex, change, reason):
    fake_codex.scenario(CHAT_TURN)
    system = [{"role": "system", "content": change.get("system", "Be brief.")}]
    call = {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "read_file",
                                                         "arguments": "{}"}}]}
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "a1"},
               {"role": "user", "content": [{"type": "text", "text": "see"},
                                            image_part("QUFB")]}, call,
               {"role": "tool", "tool_call_id": "call_1", "content": [
                   {"type": "text", "text": "shot"}, image_part("QUFB")]},
               {"role": "user", "content": "two"}]
    answer, _ = converse(proxy, [{"role": "system", "content": "Be brief."}] + history)
    again = copy.deepcopy(history)
    if "image" in change:
        again[2]["content"][1] = image_part(change["image"])
    if "tool_image" in change:
        again[4]["content"][1] = image_part(change["tool_image"])
    extra = {k: v for k, v in change.items() if k in ("model", "reasoning_effort")}
    status, _, raw = post_chat(proxy.base, dict(
        {"model": "5.5-tpg", "messages": system + again + [answer, {"role": "user",
                                                                     "content": "three"}]},
        **extra))
    assert status == 200, raw
    assert proxy.wait_event("conversation_started", 2)[1]["reason"] == reason
    first, second = fake_codex.wait_records(2)
    assert first["thread_id"] != second["thread_id"]


def test_two_requests_for_one_kept_conversation_at_once_get_two_threads(proxy, fake_codex):
    fake_codex.scenario(("two", [{"thread": True}, {"touch": "started"}, {"wait_file": "go"},
                                 {"text": "answer to: {prompt}"}, {"complete": {}}]), CHAT_TURN)
    answer, _ = converse(proxy, [{"role": "user", "content": "one"}])
    messages = [{"role": "user", "content": "one"}, answer, {"role": "user", "content": "two"}]
    replies = []
    first = threading.Thread(target=lambda: replies.append(converse(proxy, messages)))
    first.start()
    assert wait_until(lambda: (fake_codex.dir / "started").exists(), 10)
    (fake_codex.dir / "started").unlink()
    second = threading.Thread(target=lambda: replies.append(converse(proxy, messages)))
    second.start()
    assert wait_until(lambda: (fake_codex.dir / "started").exists(), 10)   # both running
    (fake_codex.dir / "go").write_text("")
    first.join(20)
    second.join(20)
    assert [r[0]["content"] for r in replies] == ["answer to: two"] * 2
    assert len({r["thread_id"] for r in fake_codex.records()}) == 2
    assert len(proxy.events("conversation_continued")) == 1


def test_a_think_mode_echo_continues_the_thread(make_proxy, fake_codex):
    proxy = make_proxy(reasoning="think")
    fake_codex.scenario([{"thread": True}, {"reasoning": "Hm."}, {"text": "A1"}, {"complete": {}}])
    answer, _ = converse(proxy, [{"role": "user", "content": "q"}])
    assert answer["content"].startswith("<think>")
    converse(proxy, [{"role": "user", "content": "q"}, answer, {"role": "user", "content": "q2"}])
    assert proxy.wait_event("conversation_continued")


def test_the_responses_api_continues_a_thread_from_echoed_items(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"reasoning": "Hm."}, {"text": "A1"}, {"complete": {}}])
    first = json.loads(post_responses(proxy.base, {"model": "m", "input": "q", "store": False})[2])
    echoed = [{"role": "user", "content": "q"}] + first["output"] + [
        {"role": "user", "content": "q2"}]
    assert post_responses(proxy.base, {"model": "m", "input": echoed, "store": False})[0] == 200
    assert proxy.wait_event("conversation_continued")
    assert fake_codex.wait_records(2)[-1]["prompt"] == "q2"


def test_ollama_generate_context_continues_the_conversation(proxy, fake_codex):
    fake_codex.scenario(CHAT_TURN)

    def generate(**fields):
        status, _, raw = http_request(proxy.base, "POST", "/api/generate",
                                      dict({"model": "5.5-tpg", "stream": False}, **fields))
        assert status == 200, raw
        return json.loads(raw)
    first = generate(prompt="one")
    assert first["response"] == "answer to: one" and first["context"][0] == cp.CONTEXT_MARK
    second = generate(prompt="two", context=first["context"])
    assert second["response"] == "answer to: two" and second["context"] != first["context"]
    records = fake_codex.wait_records(2)
    assert records[0]["thread_id"] == records[1]["thread_id"] and records[1]["prompt"] == "two"
    assert proxy.wait_event("conversation_continued")
    third = generate(prompt="three", context=[1, 2, 3])      # another server's: a fresh answer
    assert third["response"] == "answer to: three"
    assert "context is not one this proxy knows" in proxy.events("incoming_request")[2]["notes"][0]
    assert cp.context_id_of(cp.context_numbers("ctx_" + "ab" * 12)) == "ctx_" + "ab" * 12


def test_a_kept_thread_is_not_continued_with_other_tools_offered(proxy, fake_codex):
    fake_codex.scenario(CHAT_TURN)
    messages = [{"role": "user", "content": "one"}]
    answer, _ = converse(proxy, messages, tools=TOOLS, tool_choice="none")
    converse(proxy, messages + [answer, {"role": "user", "content": "two"}], tools=TOOLS)
    first, second = fake_codex.wait_records(2)
    assert first["thread_id"] != second["thread_id"] and tool_names_of(second) == {
        "read_file", "list_dir", "ApplyPatch"}
    assert proxy.wait_event("conversation_started", 2)[1]["reason"] == \
        "tools changed (+read_file +list_dir +ApplyPatch)"


def test_a_kept_thread_continues_only_with_the_same_search(proxy, fake_codex):
    fake_codex.scenario(CHAT_TURN)
    messages = [{"role": "user", "content": "one"}]
    answer, _ = converse(proxy, messages)
    converse(proxy, messages + [answer, {"role": "user", "content": "two"}],
             web_search_options={})
    assert proxy.wait_event("conversation_started", 2)[1]["reason"] == \
        "instructions changed, web search changed"


def test_e2e_a_session_is_one_thread_of_native_items_with_one_cache_key(e2e, openai_sdk):
    e2e.responder = session_responder
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    messages = [{"role": "system", "content": "You read files."}]
    answers = chat_session(client, messages, ["a.py", "b.py", "c.py"])
    assert [a.split(": ")[1] for a in answers] == ["CONTENT-a.py", "CONTENT-b.py", "CONTENT-c.py"]
    bodies = e2e.upstream.bodies()
    assert len(bodies) == 6 and len({b["prompt_cache_key"] for b in bodies}) == 1
    for earlier, later in zip(bodies, bodies[1:]):           # each input a prefix of the next
        assert without_ids(later["input"][:len(earlier["input"])]) == without_ids(earlier["input"])
    third = bodies[4]["input"]
    assert [i.get("role") or i["type"] for i in third] == [
        "developer", "user", "reasoning", "function_call", "function_call_output",
        "reasoning", "assistant", "user", "reasoning", "function_call", "function_call_output",
        "reasoning", "assistant", "user"]
    assert [i["content"][0]["text"] for i in third if i.get("role") == "user"] == \
        ["read a.py", "read b.py", "read c.py"]
    assert [i["output"] for i in third if i["type"] == "function_call_output"] == \
        ["CONTENT-a.py", "CONTENT-b.py"]
    assert [i["encrypted_content"] for i in third if i["type"] == "reasoning"] == \
        ["ENC-0", "ENC-1", "ENC-2", "ENC-3"]                # the earlier reasoning, kept
    assert "<transcript" not in json.dumps(bodies) and "tool_result" not in json.dumps(bodies)
    assert len(proxy.events("conversation_continued")) == 2


def test_e2e_an_edited_history_gets_a_new_thread_that_sees_the_edit(e2e, openai_sdk):
    e2e.responder = lambda body, index: [upstream_message(
        "echo: " + json.dumps([i["content"][0]["text"] for i in body["input"]
                               if i.get("role") == "user"]), index)]
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    messages = [{"role": "user", "content": "my name is Ada"}]
    first = client.chat.completions.create(model="5.5-tpg", messages=messages).choices[0]
    messages += [first.message.model_dump(exclude_none=True), {"role": "user", "content": "go on"}]
    client.chat.completions.create(model="5.5-tpg", messages=messages)
    messages[0]["content"] = "my name is Grace"
    edited = client.chat.completions.create(model="5.5-tpg", messages=messages).choices[0]
    assert "my name is Grace" in edited.message.content
    keys = [b["prompt_cache_key"] for b in e2e.upstream.bodies()]
    assert keys[0] == keys[1] != keys[2]


def test_e2e_interleaved_conversations_keep_their_own_threads(e2e, openai_sdk):
    def responder(body, index):             # the same call id in every conversation
        last = body["input"][-1]
        if last.get("type") == "function_call_output":
            return [upstream_message(f"got {last['output']}", index)]
        name = re.findall(r"read (\S+)", json.dumps(last))[-1].rstrip('"')
        return [call_for(body, "read_file", {"path": name}, "call_same")]
    e2e.responder = responder
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    conversations = {"x": [], "y": []}
    pending = {}
    for name in ("one", "two"):
        for who, messages in conversations.items():     # both ask before either answers
            messages.append({"role": "user", "content": f"read {who}-{name}"})
            choice = client.chat.completions.create(model="5.5-tpg", messages=messages,
                                                    tools=TOOLS).choices[0]
            messages.append(choice.message.model_dump(exclude_none=True))
            pending[who] = choice.message.tool_calls[0].id
        for who, messages in conversations.items():
            messages.append({"role": "tool", "tool_call_id": pending[who],
                             "content": f"CONTENT-{who}-{name}"})
            final = client.chat.completions.create(model="5.5-tpg", messages=messages,
                                                   tools=TOOLS).choices[0]
            assert final.message.content == f"got CONTENT-{who}-{name}"
            messages.append(final.message.model_dump(exclude_none=True))
    by_key = {}
    for body in e2e.upstream.bodies():
        by_key.setdefault(body["prompt_cache_key"], []).append(json.dumps(body["input"]))
    assert len(by_key) == 2                                 # one thread each
    for inputs in by_key.values():
        who = "x" if "x-one" in inputs[0] else "y"
        other = "y" if who == "x" else "x"
        assert len(inputs) == 4 and not any(f"{other}-" in text for text in inputs)


def test_e2e_after_a_restart_the_history_goes_up_as_items(e2e, openai_sdk):
    e2e.responder = lambda body, index: [upstream_message(f"answer {index}", index)]
    url = "data:image/png;base64," + base64.b64encode(tiny_png()).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this"},
                                             {"type": "image_url", "image_url": {"url": url}}]},
                {"role": "assistant", "content": "A picture."}]
    for n in range(200):                    # a long conversation: 401 messages in all
        messages += [{"role": "user", "content": f"question {n}"},
                     {"role": "assistant", "content": f"answer {n}"}]
    messages.append({"role": "user", "content": "last question"})
    assert len(messages) == 403
    proxy = e2e.proxy()                     # nothing kept: as after a restart
    reply = sdk_client(openai_sdk, proxy.base + "/v1").chat.completions.create(
        model="5.5-tpg", messages=messages)
    assert reply.choices[0].message.content == "answer 0"
    items = e2e.upstream.bodies()[0]["input"]
    assert len(items) >= 400 and items[-1]["content"][0]["text"] == "last question"
    assert {"type": "input_image", "image_url": url, "detail": "original"} in items[1]["content"] \
        or any(p.get("type") == "input_image" for p in items[1]["content"])
    assert "<transcript" not in json.dumps(items)
    assert proxy.events("conversation_started")[0]["history_messages"] == 402


def test_e2e_kept_conversations_are_bounded_and_expire(e2e, openai_sdk):
    e2e.responder = lambda body, index: [upstream_message(f"answer {index}", index)]
    proxy = e2e.proxy(keep_conversations=1, conversation_ttl=2.0)
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    for text in ("first conversation", "second conversation"):
        client.chat.completions.create(model="5.5-tpg", messages=[{"role": "user", "content": text}])
        health = json.loads(http_request(proxy.base, "GET", "/health")[2])
        assert health["conversations"] <= 1
    first = proxy.events("codex_forward")[0]["thread_id"]
    assert proxy.wait_event("conversation_expired")[0]["reason"] == "max_kept"
    assert wait_until(lambda: first not in loaded_threads(proxy), 8)
    expired = proxy.wait_event("conversation_expired", 2, timeout=15)[1]
    assert expired["reason"] == "ttl"
    assert json.loads(http_request(proxy.base, "GET", "/health")[2])["conversations"] == 0


def test_e2e_aiders_hint_keeps_the_thread(e2e, openai_sdk):
    hint = "\n\nReply in English.\n"
    e2e.responder = lambda body, index: [upstream_message(f"answer {index}", index)]
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    history = [{"role": "system", "content": "Act as an expert software developer."}]
    for n, question in enumerate(("fix the bug", "add a test", "rename it")):
        sent = history + [{"role": "user", "content": question + hint}]
        reply = client.chat.completions.create(model="5.5-tpg", messages=sent)
        history += [{"role": "user", "content": question},     # aider keeps it without the hint
                    reply.choices[0].message.model_dump(exclude_none=True)]
    assert len(proxy.events("conversation_continued")) == 2
    assert len(by_cache_key(e2e.upstream.bodies())) == 1


def test_e2e_a_chat_uis_side_requests_never_push_its_chat_out(e2e, openai_sdk):
    e2e.responder = lambda body, index: [upstream_message(f"answer {index}", index)]
    proxy = e2e.proxy(keep_conversations=4)
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    chat = [{"role": "user", "content": "tell me about tides"}]
    for turn in range(3):
        reply = client.chat.completions.create(model="5.5-tpg", messages=chat)
        chat += [reply.choices[0].message.model_dump(exclude_none=True),
                 {"role": "user", "content": f"and then {turn}?"}]
        for task in ("title", "tags", "follow-ups", "search query", "emoji", "summary"):
            client.chat.completions.create(model="5.5-tpg", messages=[
                {"role": "user", "content": f"### Task: write a {task} for: {chat[0]['content']}"
                                            f" ({turn})"}])
    assert len(proxy.events("conversation_continued")) == 2
    chat_keys = [b["prompt_cache_key"] for b in e2e.upstream.bodies()
                 if "tides" in json.dumps(b["input"][1:2]) and "Task" not in json.dumps(b)]
    assert len(chat_keys) == 3 and len(set(chat_keys)) == 1


def test_e2e_an_image_changed_inside_a_tool_result_is_a_new_conversation(e2e, openai_sdk):
    def answer(body, outputs):
        return "I see " + str([p["image_url"][-12:] for o in outputs if isinstance(o, list)
                               for p in o if p.get("type") == "input_image"])
    e2e.responder = read_then_answer("shot.png", "call_img", answer)
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    messages = [{"role": "user", "content": "look at the screenshot"}]
    call = client.chat.completions.create(model="5.5-tpg", messages=messages,
                                          tools=TOOLS).choices[0].message
    images = [base64.b64encode(tiny_png()).decode(), base64.b64encode(tiny_png() + b"2").decode()]

    def with_image(data):
        return messages + [call.model_dump(exclude_none=True), {
            "role": "tool", "tool_call_id": call.tool_calls[0].id, "content": [
                {"type": "text", "text": "the file"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]}]
    first = client.chat.completions.create(model="5.5-tpg", messages=with_image(images[0]),
                                           tools=TOOLS).choices[0].message
    followed = with_image(images[0]) + [first.model_dump(exclude_none=True),
                                        {"role": "user", "content": "and now?"}]
    client.chat.completions.create(model="5.5-tpg", messages=followed, tools=TOOLS)
    changed = with_image(images[1]) + [first.model_dump(exclude_none=True),
                                       {"role": "user", "content": "and now?"}]
    client.chat.completions.create(model="5.5-tpg", messages=changed, tools=TOOLS)
    keys = [b["prompt_cache_key"] for b in e2e.upstream.bodies()]
    assert keys[0] == keys[1] == keys[2] != keys[3]          # the changed image: a new thread
    assert images[1][-12:] in json.dumps(e2e.upstream.bodies()[3]["input"])
    assert proxy.events("conversation_started")[-1]["reason"] == "message 2 edited"


def test_e2e_ollama_generate_with_context_continues(e2e, ollama_lib):
    e2e.responder = lambda body, index: [upstream_message(
        "seen: " + " / ".join(i["content"][0]["text"] for i in body["input"]
                              if i.get("role") == "user"), index)]
    proxy = e2e.proxy()
    client = ollama_lib.Client(host=proxy.base)
    first = client.generate(model="5.5-tpg", prompt="my name is Ada")
    second = client.generate(model="5.5-tpg", prompt="what is my name?", context=first.context)
    assert second.response == "seen: my name is Ada / what is my name?"
    assert len(by_cache_key(e2e.upstream.bodies())) == 1
    assert proxy.events("conversation_continued")


# ---------------------------------------------------------------------------
# Stored responses
# ---------------------------------------------------------------------------

def test_response_store_is_bounded_and_forgets():
    now = [0.0]
    store = cp.ResponseStore(keep=2, ttl=10, max_bytes=400, clock=lambda: now[0])
    store.put("a", [cp.Message("user", "x" * 10)])
    store.put("b", [cp.Message("user", "y" * 10)])
    store.put("c", [cp.Message("user", "z" * 10)])
    assert store.get("a") is None and store.get("c")[0].text == "z" * 10
    store.get("c")[0].text = "changed"                   # a copy
    assert store.get("c")[0].text == "z" * 10
    assert not store.put("big", [cp.Message("user", "w" * 400)])    # over the byte budget
    assert store.get("big") is None
    now[0] = 11
    assert store.get("b") is None and len(store) == 0 and store.size() == 0


def test_everything_a_stored_response_holds_counts():
    """Encrypted reasoning is bytes too: 20 big reasoning items cannot hide."""
    store = cp.ResponseStore(max_bytes=10 * 1024 * 1024)
    reasoning = {"type": "reasoning", "summary": [], "encrypted_content": "E" * 1024 * 1024}
    for n in range(20):
        store.put(f"r{n}", [cp.Message("assistant", "ok", reasoning=[reasoning])])
    assert store.size() <= 10 * 1024 * 1024 and len(store) < 20


def test_the_store_accounting_stays_right_over_many_puts_and_evictions():
    now = [0.0]
    store = cp.ResponseStore(keep=7, ttl=50, max_bytes=3000, clock=lambda: now[0])
    rng = random.Random(5)
    for n in range(500):
        now[0] += rng.random() * 3
        store.put(f"r{rng.randrange(40)}", [cp.Message("user", "x" * rng.randrange(600))],
                  [{"id": f"i{n}", "type": "message"}])
        entries = store._entries
        assert store.size() == sum(size for _, size, _ in entries.values()) <= 3000
        assert len(entries) <= 7
        assert set(store._by_item.values()) <= set(entries)


def test_stored_responses_outlive_a_restart_on_disk(tmp_path):
    path = str(tmp_path / "responses.sqlite3")
    store = cp.DiskStore(path, 10 ** 6, "first")
    item = {"id": "msg_1", "type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": "hi"}]}
    assert store.put("resp_1", stored_conversation(), [item])
    store.remember("kept-digest")
    assert store._entries == {} and len(store) == 1         # memory holds no body
    store.close()
    again = cp.DiskStore(path, 10 ** 6, "second")
    assert again.get("resp_1") == stored_conversation() and again.item("msg_1") == item
    assert again.get("resp_2") is None and again.item("msg_2") is None
    assert again.seen_before(["kept-digest"]) and not again.seen_before(["other"])
    again.close()
    first = cp.DiskStore(path, 10 ** 6, "first")
    assert not first.seen_before(["kept-digest"])           # its own: not a restart
    first.close()


def test_the_store_on_disk_lets_the_oldest_go(tmp_path):
    now = [1000.0]
    store = cp.DiskStore(str(tmp_path / "r.sqlite3"), 20000, "x", clock=lambda: now[0])
    for n in range(30):                                     # incompressible: ~1.1 KB each
        now[0] += 1
        store.put(f"r{n}", [cp.Message("user", os.urandom(800).hex())],
                  [{"id": f"i{n}", "type": "message"}])
    assert store.size() <= 20000 and store.get("r29") is not None
    assert store.get("r0") is None and store.item("i0") is None      # the oldest went first
    kept = len(store)
    now[0] += cp.STORE_DAYS * 86400 + 1                     # 30 days later
    assert store.get("r29") is None
    store.put("new", [cp.Message("user", "x")])
    assert len(store) == 1 < kept and store.item("i29") is None
    store.close()


def test_two_proxies_share_one_store_without_harm(tmp_path):
    path = str(tmp_path / "shared.sqlite3")
    script = tmp_path / "writer.py"
    script.write_text(STORE_WRITER)
    writers = [subprocess.Popen([sys.executable, str(script), HERE, path, name])
               for name in ("a", "b")]
    try:
        assert [w.wait(120) for w in writers] == [0, 0]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
    store = cp.DiskStore(path, 10 ** 8, "reader")
    assert store._sql("PRAGMA integrity_check") == [("ok",)]
    assert len(store) == 300 and store.get("a-149")[0].text == "text 149"
    assert store.item("b-item-7") == {"id": "b-item-7", "type": "message"}
    store.close()


def test_a_store_that_cannot_be_opened_keeps_responses_in_memory(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    config = cp.Config(state_dir=str(blocker / "state"))
    store = cp.open_store(config, "x", cp.LogBuffer(10))
    assert type(store) is cp.ResponseStore and "could not be opened" in store.error
    assert store.put("r", [cp.Message("user", "x")]) and store.get("r")[0].text == "x"
    assert "--store-size 0" in cp.open_store(cp.Config(store_size=0), "x", None).error


def test_response_store_keeps_a_response_for_an_hour_by_default():
    now = [0.0]
    store = cp.ResponseStore(clock=lambda: now[0])
    store.put("resp_a", [cp.Message("user", "x")])
    now[0] = 3599.0
    assert store.get("resp_a")[0].text == "x"
    now[0] = 3601.0
    assert store.get("resp_a") is None


def test_item_references_resolve_to_stored_items():
    store = cp.ResponseStore()
    store.put("resp_1", [cp.Message("user", "hi"), cp.Message("assistant", "hello")], [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "id": "msg_1", "role": "assistant",
         "content": [{"type": "output_text", "text": "hello"}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f",
         "arguments": "{}"}])
    request = cp.parse_responses_request({"input": [
        {"role": "user", "content": "hi"}, {"type": "item_reference", "id": "rs_1"},
        {"type": "item_reference", "id": "msg_1"}, {"type": "item_reference", "id": "fc_1"},
        {"type": "function_call_output", "call_id": "call_1", "output": "ok"}]}, store)
    assert [(m.role, m.text) for m in request.messages] == [
        ("user", "hi"), ("assistant", "hello"), ("tool", "ok")]
    assert request.messages[1].tool_calls[0].id == "call_1"
    with pytest.raises(cp.ProxyError) as error:
        cp.parse_responses_request({"input": [{"type": "item_reference", "id": "msg_x"}]}, store)
    assert error.value.status == 400 and "msg_x" in error.value.message


def test_responses_item_references_reach_codex(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"text": "answer to: {seen}"}, {"complete": {}}])
    first = json.loads(post_responses(proxy.base, {"model": "m", "input": "remember 42"})[2])
    reference = {"type": "item_reference", "id": first["output"][-1]["id"]}
    status, _, raw = post_responses(proxy.base, {"model": "m", "input": [
        {"role": "user", "content": "remember 42"}, reference,
        {"role": "user", "content": "what did I say?"}]})
    assert status == 200 and proxy.wait_event("conversation_continued")
    status, _, raw = post_responses(proxy.base, {"model": "m", "input": [
        {"type": "item_reference", "id": "msg_unknown"}]})
    assert status == 400 and "msg_unknown" in json.loads(raw)["error"]["message"]


def test_e2e_a_restart_keeps_previous_response_id_and_item_reference(e2e, openai_sdk):
    e2e.responder = lambda body, index: [upstream_message(
        "heard: " + " / ".join(i["content"][0]["text"] for i in body["input"]
                               if i.get("role") in ("user", "assistant")), index)]
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    first = client.responses.create(model="5.5-tpg", input="the code is 42")
    proxy.stop()
    e2e.proxies.remove(proxy)
    proxy = e2e.proxy()                     # the same state dir: a restart
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    second = client.responses.create(model="5.5-tpg", input="what is the code?",
                                     previous_response_id=first.id)
    assert second.output_text == "heard: the code is 42 / heard: the code is 42 / " \
        "what is the code?"
    third = client.responses.create(model="5.5-tpg", input=[
        {"role": "user", "content": "the code is 42"},
        {"type": "item_reference", "id": first.output[-1].id},
        {"role": "user", "content": "again?"}])
    assert "heard: the code is 42 / again?" in third.output_text
    assert proxy.events("conversation_started")[0]["reason"] == "proxy restarted"


def test_e2e_item_references_and_call_less_outputs_reach_the_model(e2e, openai_sdk):
    e2e.responder = lambda body, index: [upstream_message(f"answer {index}", index)]
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    first = client.responses.create(model="5.5-tpg", input="remember 42")
    client.responses.create(model="5.5-tpg", input=[
        {"role": "user", "content": "remember 42"},
        {"type": "item_reference", "id": first.output[-1].id},
        {"type": "function_call_output", "output": "CONTEXT-TEXT"},
        {"role": "user", "content": "what did I say?"}])
    items = e2e.upstream.bodies()[-1]["input"]
    texts = json.dumps(items)
    assert "answer 0" in texts and "CONTEXT-TEXT" in texts and "what did I say?" in texts
    with pytest.raises(openai_sdk.BadRequestError) as error:
        client.responses.create(model="5.5-tpg", input=[
            {"type": "item_reference", "id": "msg_nobody_knows"}])
    assert "msg_nobody_knows" in str(error.value)


# ---------------------------------------------------------------------------
# Web search
# ---------------------------------------------------------------------------

def test_web_search_is_off_unless_asked_and_fails_closed(proxy, fake_codex):
    fake_codex.scenario(SEARCH_TURN)
    status, _, raw = post_chat(proxy.base, chat_body("search, uninvited"))
    assert status == 502 and json.loads(raw)["error"]["code"] == "codex_tool_used"
    record = fake_codex.wait_records(1)[0]
    assert record["thread"]["config"]["web_search"] == "disabled"
    assert "tools.web_search" not in record["thread"]["config"]


@pytest.mark.parametrize("stream", [False, True])
def test_responses_web_search_gives_its_items_annotations_and_events(both, fake_codex,
                                                                       stream):
    fake_codex.scenario(SEARCH_TURN)
    status, _, raw = post_responses(both.base, {"model": "5.5-tpg", "input": "when?",
                                                "tools": [SEARCH_TOOL], "stream": stream})
    assert status == 200, raw
    if stream:
        events = response_events(raw)
        kinds = [e["type"] for e in events]
        for kind in ("response.web_search_call.in_progress", "response.web_search_call.searching",
                     "response.web_search_call.completed"):
            assert kind in kinds
        output = events[-1]["response"]["output"]
    else:
        output = json.loads(raw)["output"]
    search, message = output[0], output[-1]
    assert search.pop("id").startswith("ws_") and search == {
        "type": "web_search_call", "status": "completed",
        "action": {"type": "search", "query": "python 3.14 release",
                   "queries": ["python 3.14 release"]}}
    record = fake_codex.wait_records(1)[0]
    if record["engine"] == "app-server":
        assert message["content"][0]["annotations"] == [{
            "type": "url_citation", "url": "https://python.org/3.14", "title": "Python 3.14",
            "start_index": 0, "end_index": 11}]
        if stream:
            added = [e for e in events if e["type"] == "response.output_text.annotation.added"]
            assert added[0]["annotation"]["url"] == "https://python.org/3.14"
    config = record["thread"]["config"] if record["engine"] == "app-server" else {
        k: cp.read_toml("v = " + v)["v"] for k, v in record["conf"].items()
        if k in ("web_search", "tools.web_search")}
    assert config["web_search"] == "live"
    catalog = record["thread"]["config"]["model_catalog_json"] \
        if record["engine"] == "app-server" else \
        cp.read_toml("v = " + record["conf"]["model_catalog_json"])["v"]
    assert catalog.endswith("-search.json")         # Codex's lite format drops hosted tools
    assert all(m["use_responses_lite"] is False for m in json.load(open(catalog))["models"])
    assert config["tools.web_search"] == {"context_size": "high", "allowed_domains":
                                          ["python.org"], "location": {"country": "DE",
                                                                       "city": "Berlin"}}
    assert "search the web" in record["instructions"]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_web_search_options_give_url_citations(proxy, fake_codex, stream):
    fake_codex.scenario(SEARCH_TURN)
    status, _, raw = post_chat(proxy.base, chat_body("when?", stream=stream,
                                                      web_search_options={}))
    assert status == 200, raw
    if stream:
        deltas = [e["choices"][0]["delta"] for e in sse_events(raw)
                  if e != "[DONE]" and e.get("choices")]
        annotations = [a for d in deltas for a in d.get("annotations") or []]
    else:
        annotations = json.loads(raw)["choices"][0]["message"]["annotations"]
    assert annotations == [{"type": "url_citation", "url_citation": {
        "url": "https://python.org/3.14", "title": "Python 3.14", "start_index": 0,
        "end_index": 11}}]


@pytest.mark.parametrize("stream", [True, False])
def test_anthropic_web_search_gives_anthropics_blocks(proxy, fake_codex, stream):
    fake_codex.scenario(SEARCH_TURN)
    status, _, raw = http_request(proxy.base, "POST", "/v1/messages?beta=true",
                                  claude_search_body(stream=stream))
    assert status == 200, raw
    if stream:
        events = sse_events(raw, named=True)
        kinds = [e["content_block"]["type"] for e in events
                 if e["type"] == "content_block_start"]
        assert kinds == ["server_tool_use", "web_search_tool_result", "text"]
        usage = [e for e in events if e["type"] == "message_delta"][0]["usage"]
        starts = [e for e in events if e["type"] == "content_block_start"]
        assert starts[0]["content_block"]["input"] == {}
        deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
        assert deltas[0] == {"type": "input_json_delta",
                             "partial_json": '{"query": "python 3.14 release"}'}
        blocks = [starts[1]["content_block"]]
        assert [d["type"] for d in deltas[1:]] == ["citations_delta", "text_delta"]
    else:
        message = json.loads(raw)
        usage, blocks = message["usage"], message["content"]
        assert [b["type"] for b in blocks] == ["server_tool_use", "web_search_tool_result",
                                               "text"]
        assert blocks[0]["input"] == {"query": "python 3.14 release"}
        assert blocks[2]["citations"][0]["cited_text"] == "Python 3.14"
        blocks = blocks[1:]
    result = blocks[0]
    assert result["tool_use_id"].startswith("srvtoolu_")
    assert [(r["type"], r["url"], r["title"]) for r in result["content"]] == [
        ("web_search_result", "https://python.org/3.14", "Python 3.14")]
    assert result["content"][0]["encrypted_content"]
    assert usage["server_tool_use"] == {"web_search_requests": 1}
    record = fake_codex.wait_records(1)[0]
    assert "Search the web for the user's query before you answer" in record["instructions"]
    assert not proxy.server.turns.parked and record["thread"]["config"]["web_search"] == "live"


def test_anthropic_max_uses_and_blocked_domains(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"search": "one"}, {"search": "two"},
                         {"text": "never"}, {"complete": {}}])
    body = claude_search_body(stream=False, tools=[{"type": "web_search_20250305",
                                                    "name": "web_search", "max_uses": 1}])
    status, _, raw = http_request(proxy.base, "POST", "/v1/messages", body)
    blocks = json.loads(raw)["content"]
    assert status == 200 and [b["type"] for b in blocks] == [
        "server_tool_use", "web_search_tool_result", "server_tool_use",
        "web_search_tool_result"]
    assert blocks[3]["content"] == {"type": "web_search_tool_result_error",
                                    "error_code": "max_uses_exceeded"}
    assert fake_codex.run_ended(fake_codex.wait_records(1)[0])       # the turn went no further
    blocked = claude_search_body(tools=[{"type": "web_search_20250305", "name": "web_search",
                                         "blocked_domains": ["evil.example"]}])
    status, _, raw = http_request(proxy.base, "POST", "/v1/messages", blocked)
    assert status == 400 and "blocked_domains" in json.loads(raw)["error"]["message"]


def test_no_web_search_refuses_every_api_that_asks(make_proxy, fake_codex):
    proxy = make_proxy(no_web_search=True)
    for path, body in (("/v1/responses", {"input": "x", "tools": [{"type": "web_search"}]}),
                       ("/v1/chat/completions", chat_body(web_search_options={})),
                       ("/v1/messages", claude_search_body(stream=False))):
        status, _, raw = http_request(proxy.base, "POST", path, body)
        assert status == 400 and "--no-web-search" in raw.decode(), path
    assert fake_codex.records() == []


def test_e2e_web_search_in_each_api(e2e, openai_sdk, anthropic_sdk):
    e2e.responder = searching
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    response = client.responses.create(model="5.5-tpg", input="when did 3.14 come out?",
                                       tools=[SEARCH_TOOL])
    assert [o.type for o in response.output] == ["web_search_call", "message"]
    assert response.output[0].action.query == "python 3.14 release"
    assert response.output[1].content[0].annotations[0].url == "https://python.org/3.14"
    tool = e2e.upstream.bodies()[0]["tools"][0]
    assert tool["type"] == "web_search" and tool["external_web_access"] is True
    assert tool["search_context_size"] == "high"
    assert tool["filters"] == {"allowed_domains": ["python.org"]}
    assert tool["user_location"]["country"] == "DE"
    chunks = list(client.chat.completions.create(
        model="5.5-tpg", messages=[{"role": "user", "content": "when?"}], stream=True,
        extra_body={"web_search_options": {}}))
    annotations = [a for c in chunks if c.choices for a in
                   (getattr(c.choices[0].delta, "annotations", None) or [])]
    assert annotations[0]["url_citation"]["url"] == "https://python.org/3.14"
    message = anthropic_sdk.Anthropic(base_url=proxy.base, api_key="x", max_retries=0).messages \
        .create(model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "q"}],
                tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}])
    assert [b.type for b in message.content] == ["server_tool_use", "web_search_tool_result",
                                                 "text"]
    assert message.content[1].content[0].url == "https://python.org/3.14"
    assert message.content[2].citations[0].url == "https://python.org/3.14"
    assert message.usage.server_tool_use.web_search_requests == 1
    plain = client.chat.completions.create(model="5.5-tpg", messages=[
        {"role": "user", "content": "no search, please"}])
    assert plain.choices[0].message.content == "no search tool"       # off unless asked
    assert e2e.upstream.bodies()[-1]["tools"] == []


def test_e2e_claude_codes_web_search_tool_works(e2e, claude_code, tmp_path):
    """Claude Code's WebSearch is a second /v1/messages request with the
    web_search server tool: it gets Anthropic's blocks, searches once, and
    the main turn goes on with the links."""
    def responder(body, index):
        outputs = [i for i in body["input"] if i.get("type") == "function_call_output"]
        if outputs:
            return [upstream_message(f"FOUND: {json.dumps(outputs[-1])[:400]}", index)]
        if any(t.get("type") == "web_search" for t in body.get("tools", [])):
            return SEARCHED
        return [offered_call(body, "WebSearch", {"query": "python 3.14 release"}, "call_ws")]
    e2e.responder = responder
    proxy = e2e.proxy()
    project, home = tmp_path / "project", tmp_path / "claude-home"
    project.mkdir()
    home.mkdir()
    code, result, output = run_claude(claude_code, proxy, "when did python 3.14 come out?",
                                      project, home, extra=("--allowedTools", "WebSearch"))
    assert code == 0 and "FOUND" in result.get("result", ""), output[-3000:]
    assert "python.org/3.14" in result["result"]                    # the links reached it
    searches = [b for b in e2e.upstream.bodies()
                if any(t.get("type") == "web_search" for t in b.get("tools", []))]
    assert len(searches) == 1                                        # searched once, no loop
    assert [e["name"] for e in proxy.events("tool_call_forwarded")] == ["WebSearch"]


# ---------------------------------------------------------------------------
# The plan's usage windows and limits
# ---------------------------------------------------------------------------

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


def test_plan_limits_show_in_health_and_name_the_reset_in_a_429(make_proxy, fake_codex):
    limits = json.loads(json.dumps(LIMITS))
    limits["primary"]["resetsAt"] = int(time.time()) + 3600
    limits["secondary"]["resetsAt"] = int(time.time()) + 7200
    fake_codex.write("rate_limits.json", limits)
    proxy = make_proxy(api_keys=(KEY,))
    auth = {"Authorization": f"Bearer {KEY}"}
    health = json.loads(http_request(proxy.base, "GET", "/health", headers=auth)[2])
    windows = {w["name"]: w for w in health["rate_limits"]["windows"]}
    assert health["rate_limits"]["plan"] == "plus"
    assert windows["primary"]["used_percent"] == 42 and windows["primary"]["window_minutes"] == 300
    assert 3500 <= windows["primary"]["resets_in_seconds"] <= 3600
    assert "rate_limits" not in json.loads(http_request(proxy.base, "GET", "/health")[2])
    fake_codex.scenario([{"thread": True}, {"rate_limits": {"primary": {
        "usedPercent": 43, "windowDurationMins": 300, "resetsAt": limits["primary"]["resetsAt"]}}},
        {"fail": "You've hit your usage limit.", "info": "usageLimitExceeded"}])
    status, hdrs, raw = post_chat(proxy.base, chat_body(), auth)
    assert status == 429 and 7000 <= int(hdrs["retry-after"]) <= 7200
    assert re.search(r"resets in about (1 h 5\d min|2 h 0 min)", json.loads(raw)["error"]["message"])
    health = json.loads(http_request(proxy.base, "GET", "/health", headers=auth)[2])
    assert health["rate_limits"]["windows"][0]["used_percent"] == 43


def test_a_whole_answer_carries_the_windows_after_its_own_turn(proxy, fake_codex):
    reset = int(time.time()) + 3600
    fake_codex.scenario(("first", [{"thread": True}, {"text": "a"}, plan_step(42.5, 12, reset),
                                   {"complete": {}}]),
                        [{"thread": True}, {"text": "b"}, plan_step(93, 12, reset),
                         {"complete": {}}])
    status, headers, _ = post_chat(proxy.base, chat_body("first"))
    assert status == 200
    assert (headers["x-codex-primary-used-percent"], headers["x-codex-primary-window-minutes"],
            headers["x-codex-primary-reset-at"]) == ("42.5", "300", str(reset))
    assert (headers["x-codex-secondary-used-percent"], headers["x-codex-secondary-window-minutes"],
            headers["x-codex-secondary-reset-at"]) == ("12", "10080", str(reset + 86400))
    status, headers, _ = post_responses(proxy.base, {"model": "m", "input": "second"})
    assert status == 200 and headers["x-codex-primary-used-percent"] == "93"
    status, headers, _ = post_messages(proxy.base, messages_body("third"))
    prefix = "anthropic-ratelimit-unified-"
    assert status == 200 and not any(h.startswith("x-codex-") for h in headers)
    assert {k[len(prefix):]: v for k, v in headers.items() if k.startswith(prefix)} == {
        "5h-utilization": "0.93", "5h-reset": str(reset),
        "7d-utilization": "0.12", "7d-reset": str(reset + 86400),
        "status": "allowed_warning", "reset": str(reset), "representative-claim": "five_hour"}


def test_a_stream_carries_the_last_known_windows(proxy, fake_codex):
    reset = int(time.time()) + 3600
    # the streamed turns ("quiet") report no windows of their own: what their
    # headers carry was known before they started, whenever Codex speaks
    fake_codex.scenario(("first", [{"thread": True}, {"text": "a"}, plan_step(10, 60, reset),
                                   {"complete": {}}]),
                        ("quiet", [{"thread": True}, {"text": "q"}, {"complete": {}}]),
                        [{"thread": True}, {"text": "b"}, plan_step(50, 70, reset),
                         {"complete": {}}])
    status, headers, _ = post_chat(proxy.base, chat_body("quiet: not yet known", stream=True))
    assert status == 200 and not any(h.startswith("x-codex-") for h in headers)
    assert post_chat(proxy.base, chat_body("first"))[0] == 200
    status, headers, raw = post_messages(proxy.base, messages_body("quiet later", stream=True))
    prefix = "anthropic-ratelimit-unified-"
    assert status == 200 and sse_events(raw, named=True)[-1]["type"] == "message_stop"
    assert (headers[prefix + "5h-utilization"], headers[prefix + "7d-utilization"],
            headers[prefix + "status"], headers[prefix + "representative-claim"]) == (
        "0.1", "0.6", "allowed", "seven_day")
    assert post_chat(proxy.base, chat_body("second"))[0] == 200
    status, headers, _ = post_chat(proxy.base, chat_body("quiet after", stream=True))
    assert headers["x-codex-primary-used-percent"] == "50"       # the turn before's


def test_the_plans_429_carries_retry_after_and_the_windows(make_proxy, fake_codex):
    proxy = make_proxy(api_keys=(KEY,))
    auth = {"Authorization": f"Bearer {KEY}", "x-api-key": KEY}
    reset = int(time.time()) + 3600
    fake_codex.scenario([{"thread": True}, plan_step(100, 40, reset),
                         {"fail": "You've hit your usage limit.", "info": "usageLimitExceeded"}])
    status, headers, _ = post_messages(proxy.base, messages_body("x"), auth)
    prefix = "anthropic-ratelimit-unified-"
    assert status == 429 and 3500 <= int(headers["retry-after"]) <= 3600
    assert (headers[prefix + "status"], headers[prefix + "reset"],
            headers[prefix + "5h-utilization"]) == ("rejected", str(reset), "1")
    status, headers, _ = post_chat(proxy.base, chat_body(), auth)
    assert status == 429 and headers["x-codex-primary-used-percent"] == "100"
    status, headers, _ = http_request(proxy.base, "POST", "/api/chat", {
        "model": "m", "messages": [{"role": "user", "content": "x"}], "stream": False}, auth)
    assert status == 429 and not any("ratelimit" in h or h.startswith("x-codex") for h in headers)
    for path in ("/v1/chat/completions", "/v1/messages"):     # no key: no windows
        status, headers, _ = http_request(proxy.base, "POST", path, {})
        assert status == 401 and not any("ratelimit" in h or h.startswith("x-codex")
                                         for h in headers)


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


def test_e2e_the_plans_windows_reach_each_dialects_headers(e2e):
    reset = int(time.time()) + 3600
    e2e.upstream.headers = {
        "x-codex-primary-used-percent": "42.5", "x-codex-primary-window-minutes": "300",
        "x-codex-primary-reset-at": str(reset), "x-codex-secondary-used-percent": "12.4",
        "x-codex-secondary-window-minutes": "10080",
        "x-codex-secondary-reset-at": str(reset + 86400)}
    e2e.write_config('model = "gpt-5.5"\n')
    proxy = e2e.proxy()
    status, headers, _ = post_chat(proxy.base, chat_body(model="5.5-tpg"))
    assert status == 200
    assert ({k: v for k, v in headers.items() if k.startswith("x-codex-")} == {   # as Codex read them
        "x-codex-primary-used-percent": "43", "x-codex-primary-window-minutes": "300",
        "x-codex-primary-reset-at": str(reset), "x-codex-secondary-used-percent": "12",
        "x-codex-secondary-window-minutes": "10080",
        "x-codex-secondary-reset-at": str(reset + 86400)})
    status, headers, _ = post_messages(proxy.base, messages_body("x", stream=True))
    prefix = "anthropic-ratelimit-unified-"
    assert status == 200
    assert (headers[prefix + "5h-utilization"], headers[prefix + "7d-utilization"],
            headers[prefix + "7d-reset"], headers[prefix + "status"]) == (
        "0.43", "0.12", str(reset + 86400), "allowed")


def test_e2e_a_usage_limit_is_an_anthropic_rate_limit_error(e2e, anthropic_sdk):
    e2e.responder = lambda body, index: ("status", 429, {"error": {
        "type": "usage_limit_reached", "message": "The usage limit has been reached",
        "resets_in_seconds": 120}})
    proxy = e2e.proxy()
    with pytest.raises(anthropic_sdk.RateLimitError) as error:
        anthropic_client(anthropic_sdk, proxy).messages.create(
            model="claude-opus-4-8", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert error.value.body["error"]["type"] == "rate_limit_error"


# ---------------------------------------------------------------------------
# Models: names, context windows, the default, refused models
# ---------------------------------------------------------------------------

def test_a_model_outside_the_catalog_is_warned_about_once(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"notice": "Model metadata for `foo` not found."},
                         {"text": "ok"}, {"complete": {}}])
    for text in ("one", "two", "three"):
        assert post_chat(proxy.base, chat_body(text, model="foo"))[0] == 200
    proxy.wait_event("cursor_response", 3)
    warnings = [e["message"] for e in proxy.events("codex_warning")]
    assert warnings == ["Model metadata for `foo` not found."]


def test_models_health_and_cors_for_local_pages(make_proxy):
    proxy = make_proxy(aliases={"fast": "gpt-5.4-low"})
    page = {"Origin": "http://localhost:5173"}
    for path in ("/v1/models", "/models"):
        status, hdrs, raw = http_request(proxy.base, "GET", path, headers=page)
        body = json.loads(raw)
        assert status == 200 and body["object"] == "list"
        assert hdrs["access-control-allow-origin"] == "http://localhost:5173"
        ids = [m["id"] for m in body["data"]]
        assert {"fast", "tsaf", "gpt-5.5", "5.5-tpg"} <= set(ids)
        assert all(m["object"] == "model" for m in body["data"])
    status, _, raw = http_request(proxy.base, "GET", "/v1/health")
    health = json.loads(raw)
    assert status == 200 and health["status"] == "ok"
    assert health["codex_version"] == "codex-cli 0.0.0-fake" and health["logged_in"] is True
    assert health["engine"] == "app-server" and health["rate_limits"] is None
    status, hdrs, _ = http_request(proxy.base, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,x-evil"})
    assert status == 204
    assert hdrs["access-control-allow-origin"] == "http://localhost:5173"
    assert hdrs["access-control-allow-methods"] == "POST, OPTIONS"
    assert hdrs["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"


def test_v1_models_carries_each_names_context_window(make_proxy):
    proxy = make_proxy(aliases={"fast": "gpt-5.5-low"})
    models = {m["id"]: m for m in
              json.loads(http_request(proxy.base, "GET", "/v1/models")[2])["data"]}
    assert [models[n]["context_length"] for n in ("gpt-5.5", "5.5-tpg", "fast", "gpt-6-sol")] \
        == [272000, 272000, 272000, 500000]
    assert "secret-model" not in models


def test_v1_models_answers_an_anthropic_caller_in_anthropics_shape(make_proxy):
    proxy = make_proxy()
    status, _, raw = http_request(proxy.base, "GET", "/v1/models",
                                  headers={"anthropic-version": "2023-06-01"})
    listed = json.loads(raw)
    assert status == 200 and listed["has_more"] is False
    assert {"type": "model", "id": "gpt-5.5", "display_name": "GPT-5.5",
            "created_at": "1970-01-01T00:00:00Z"} in listed["data"]
    assert {"type": "model", "id": "gpt-6-sol", "display_name": "gpt-6-sol",
            "created_at": "1970-01-01T00:00:00Z"} in listed["data"]
    assert (listed["first_id"], listed["last_id"]) == (listed["data"][0]["id"],
                                                       listed["data"][-1]["id"])
    assert set(listed) == {"data", "has_more", "first_id", "last_id"}


@pytest.mark.parametrize("name, window, capabilities", [
    ("gpt-5.5", 272000, ["completion", "tools", "thinking", "vision"]),
    ("5.5-tpg:latest", 272000, ["completion", "tools", "thinking", "vision"]),
    ("gpt-6-sol", 500000, ["completion", "tools"]),
    ("claude-sonnet-4-5", 500000, ["completion", "tools"]),     # Codex's default
    ("llama3", None, ["completion", "tools"]),                  # the catalog knows nothing
])
def test_api_show_says_the_context_window_and_capabilities(make_proxy, name, window,
                                                          capabilities):
    proxy = make_proxy()
    status, _, raw = http_request(proxy.base, "POST", "/api/show", {"model": name})
    shown = json.loads(raw)
    assert status == 200 and shown["capabilities"] == capabilities
    assert shown["model_info"].get("codex.context_length") == window


def test_the_banner_names_the_default_model_and_its_window(make_proxy):
    proxy = make_proxy()
    lines = cp.banner(proxy.server).splitlines()
    assert "  model: gpt-6-sol (Codex's default, a 500,000-token context; a request's " \
           "model picks another)" in lines
    with open(os.path.join(proxy.server.config.codex_home_dir, "config.toml"), "w") as f:
        f.write('model = "gpt-5.5"\n')
    assert "  model: gpt-5.5 (config.toml's default, a 272,000-token context; a request's " \
           "model picks another)" in cp.banner(proxy.server).splitlines()


@pytest.mark.parametrize("path, body, shape", [
    ("/v1/chat/completions", chat_body(model="gpt-4o"), "openai"),
    ("/v1/messages", {"model": "gpt-4o", "max_tokens": 9,
                      "messages": [{"role": "user", "content": "x"}]}, "anthropic"),
    ("/api/chat", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}],
                   "stream": False}, "ollama"),
])
def test_a_refused_model_is_a_400_naming_the_models_codex_offers(proxy, fake_codex, path,
                                                                 body, shape):
    fake_codex.scenario([{"thread": True}, {"fail": json.dumps({"detail": REFUSED})}])
    status, _, raw = http_request(proxy.base, "POST", path, body)
    error = json.loads(raw)
    message = f"{REFUSED} Models Codex offers: gpt-5.5, gpt-6-sol."
    assert status == 400
    if shape == "openai":
        assert error["error"]["message"] == message
        assert (error["error"]["code"], error["error"]["param"]) == ("model_not_supported",
                                                                    "model")
    elif shape == "anthropic":
        assert error == {"type": "error", "error": {"type": "invalid_request_error",
                                                    "message": message}}
    else:
        assert error == {"error": message}


def test_e2e_the_catalogs_default_is_the_model_codex_uses(e2e):
    e2e.responder = lambda body, index: [upstream_message("hi", index)]
    proxy = e2e.proxy()
    assert wait_until(lambda: pool_ready(proxy), 20)
    launcher = proxy.server.launcher
    listed = launcher.pool.processes()[0].call("model/list", {}, 20)["data"]
    assert [m["id"] for m in listed if m["isDefault"]] == [launcher.catalog.default()]
    assert post_messages(proxy.base, messages_body("x"))[0] == 200     # a claude name
    assert e2e.upstream.bodies()[-1]["model"] == launcher.catalog.default()
    window = launcher.catalog.model(launcher.catalog.default())["context_window"]
    shown = json.loads(http_request(proxy.base, "POST", "/api/show",
                                    {"model": "claude-sonnet-4-5"})[2])
    assert shown["model_info"]["codex.context_length"] == window


def test_e2e_a_model_the_plan_refuses_names_the_models_codex_offers(e2e, openai_sdk):
    e2e.responder = lambda body, index: ("status", 400, {"detail": REFUSED})
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    # streamed, the answer's head has gone out: the error comes as a stream event
    for stream, kind in ((False, openai_sdk.BadRequestError), (True, openai_sdk.APIError)):
        with pytest.raises(kind) as caught:
            list(client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=stream))
        assert caught.value.code == "model_not_supported"
        assert (REFUSED + " Models Codex offers: gpt-") in caught.value.message


def test_e2e_a_model_outside_the_catalog_is_warned_about_once(e2e, openai_sdk):
    e2e.responder = lambda body, index: [upstream_message("ok", index)]
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    for text in ("one", "two", "three"):
        client.chat.completions.create(model="not-in-any-catalog", messages=[
            {"role": "user", "content": text}])
    warnings = [e["message"] for e in proxy.events("codex_warning")
                if "metadata" in e["message"].lower()]
    assert len(warnings) == 1 and not any(w.startswith("{") or '\\"' in w for w in warnings)


# ---------------------------------------------------------------------------
# Codex's failures, as clients see them
# ---------------------------------------------------------------------------

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


@pytest.mark.parametrize("error, status, code, retry", [
    ({"message": "You've hit your usage limit.", "codexErrorInfo": "usageLimitExceeded"},
     429, "usage_limit_reached", "900"),
    ({"message": "limit", "codexErrorInfo": {"httpConnectionFailed": {"httpStatusCode": 429}}},
     429, "usage_limit_reached", "900"),
    ({"message": "too long", "codexErrorInfo": "contextWindowExceeded"}, 400,
     "context_length_exceeded", None),
    ({"message": "who are you", "codexErrorInfo": "unauthorized"}, 401, "codex_unauthorized", None),
    ({"message": "no such model", "codexErrorInfo": "modelNotFound"}, 404, "model_not_found", None),
    ({"message": "busy", "codexErrorInfo": "serverOverloaded"}, 503, "server_overloaded", None),
    ({"message": "boom", "codexErrorInfo": "internalServerError"}, 502, "codex_error", None),
    ({"message": "odd", "codexErrorInfo": "somethingNew"}, 502, "codex_error", None),
    ({"message": json.dumps({"detail": "The 'gpt-4o' model is not supported when using "
                                       "Codex with a ChatGPT account."})},
     400, "model_not_supported", None),
    ({"message": "The model `o9` does not exist", "codexErrorInfo": "badRequest"},
     400, "model_not_supported", None),
    ({"message": "Model metadata for `o9` not found."}, 502, "codex_error", None),
    ({"message": "You've hit your usage limit. Try again in 2 minutes."}, 429,
     "usage_limit_reached", "120"),
])
def test_classify_codex_error_info(error, status, code, retry):
    err = cp.classify_codex_error(error, reset_seconds=900)
    assert (err.status, err.code, err.headers.get("Retry-After")) == (status, code, retry)
    if status == 429 and "Try again" not in error["message"]:
        assert "resets in about 15 min" in err.message


def test_codex_output_for_clients_has_no_backtrace_or_paths():
    text = ("Error: prompt is empty\n/home/me/.codex/config.toml: bad\nstack backtrace:\n"
            "   0: codex::main\n             at /rustc/abc/src/main.rs:1\n")
    cleaned = cp.clean_codex_output(text, ["/home/me/.codex", "/home/me"])
    assert cleaned == "Error: prompt is empty\n<path>/config.toml: bad"


def test_responders_fail_in_their_own_shape():
    error = cp.ProxyError(429, "limit", "rate_limit_error", "usage_limit_reached")
    handler = FakeHandler()
    cp.ChatResponder(handler, chat_request(), "content").fail(error)
    assert handler.error is error and not handler.chunks
    handler = FakeHandler()
    out = cp.ChatResponder(handler, chat_request(stream=True), "content")
    out.open()
    out.fail(error)
    events = sse_events(handler.body())
    assert events[-2]["error"]["code"] == "usage_limit_reached" and events[-1] == "[DONE]"
    handler = FakeHandler()
    out = cp.ResponsesResponder(handler, cp.parse_responses_request(
        {"input": "hi", "stream": True}), "content")
    out.open()
    out.text("m1", "partial")
    out.fail(error)
    events = sse_events(handler.body())
    assert [e["type"] for e in events][-1] == "response.failed" and handler.ended
    assert events[-1]["response"]["error"]["code"] == "usage_limit_reached"


@pytest.mark.parametrize("events, config, status, code", [
    ([("failed", {"message": "limit", "codexErrorInfo": "usageLimitExceeded"})], {}, 429,
     "usage_limit_reached"),
    ([("text", ("m", "x")), ("exit", (-9, ""))], {}, 502, "codex_error"),
    ([("text", ("m", "x"))], {"idle_timeout": 0.2}, 504, "codex_idle_timeout"),
    # warnings are not progress: a backend that never answers is unreachable
    ([("thread", "t"), ("warning", "Reconnecting... 1/5")], {"idle_timeout": 0.2}, 504,
     "backend_unreachable"),
])
def test_pump_turns_failures_exits_and_silence_into_errors(events, config, status, code):
    end = pump(events, **config)[0].pump()
    assert (end.kind, end.error.status, end.error.code) == ("failed", status, code)
    if code == "codex_error":
        assert "killed by signal SIGKILL" in end.error.message


def test_each_dialect_answers_errors_in_its_own_shape(proxy, fake_codex):
    status, _, raw = http_request(proxy.base, "POST", "/v1/messages?beta=true", {"messages": 5})
    assert status == 400 and json.loads(raw)["type"] == "error"
    status, _, raw = http_request(proxy.base, "POST", "/api/chat", {"messages": 5})
    assert status == 400 and set(json.loads(raw)) == {"error"}
    status, _, raw = http_request(proxy.base, "GET", "/api/embed")
    assert status == 404 and set(json.loads(raw)) == {"error"}
    assert http_request(proxy.base, "HEAD", "/")[0] == 200
    fake_codex.scenario([{"thread": True}, {"fail": "You've hit your usage limit.",
                                            "info": "usageLimitExceeded"}])
    status, headers, raw = http_request(proxy.base, "POST", "/v1/messages", {
        "model": "claude-x", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}]})
    assert status == 429 and json.loads(raw)["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("steps, status, code", [
    ([{"thread": True}, {"fail": "You've hit your usage limit. Try again in 5 minutes.",
                         "info": "usageLimitExceeded"}], 429, "usage_limit_reached"),
    ([{"thread": True}, {"fail": "unexpected status 401 Unauthorized", "info": "unauthorized"}],
     401, "codex_unauthorized"),
    ([{"thread": True}, {"fail": "exceeds the context window", "info": "contextWindowExceeded"}],
     400, "context_length_exceeded"),
    ([{"thread": True}, {"fail": "upstream exploded"}], 502, "codex_error"),
    ([{"thread": True}, {"text": "partial"}, {"exit": 1}], 502, "codex_error"),
])
def test_failed_turns_map_to_statuses(both, fake_codex, steps, status, code):
    fake_codex.scenario(steps)
    got, hdrs, raw = post_chat(both.base, chat_body())
    assert got == status and json.loads(raw)["error"]["code"] == code
    if status == 429:
        assert hdrs["retry-after"] == "300"
    assert both.events("stream_codex_error")


def test_exec_plain_text_errors_reach_the_client_without_paths(make_proxy, fake_codex,
                                                               tmp_path):
    home = str(tmp_path / "home")
    fake_codex.scenario([{"plain": f"Error loading config {home}/config.toml: bad key"},
                         {"plain": "stack backtrace:"}, {"plain": "   0: codex::main"},
                         {"exit": 1}])
    got, _, raw = post_chat(make_proxy(engine="exec").base, chat_body())
    message = json.loads(raw)["error"]["message"]
    assert got == 502 and "bad key" in message and home not in message
    assert "backtrace" not in message and "codex::main" not in message


def test_streamed_failure_is_one_error_event_then_done(both, fake_codex):
    fake_codex.scenario([{"thread": True}, {"fail": "You've hit your usage limit.",
                                            "info": "usageLimitExceeded"}])
    status, _, raw = post_chat(both.base, chat_body(stream=True))
    events = sse_events(raw)
    assert status == 200 and events[-1] == "[DONE]"
    errors = [e for e in events[:-1] if "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "usage_limit_reached"
    assert not any(e.get("choices") and e["choices"][0]["finish_reason"] for e in events[:-1]
                   if isinstance(e, dict))


def test_codex_not_found_gives_503_with_install_hint_and_no_path(make_proxy, tmp_path):
    missing = str(tmp_path / "no-such-codex")
    proxy = make_proxy(codex_bin=missing)
    status, _, raw = post_chat(proxy.base, chat_body())
    error = json.loads(raw)["error"]
    assert status == 503 and error["code"] == "codex_not_found"
    assert "npm install" in error["message"] and str(tmp_path) not in error["message"]
    assert json.loads(http_request(proxy.base, "GET", "/health")[2])["codex_version"] is None
    assert proxy.events("request_rejected")[0]["status"] == 503


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
    proxy.server.launcher.codex.expire()
    assert post_chat(proxy.base, chat_body())[0] == 200      # a stale "no" is rechecked at once
    fake_codex.set_logged_out()
    (tmp_path / "home" / "config.toml").write_text('model_provider = "mock"\n')
    assert post_chat(make_proxy().base, chat_body())[0] == 200


def test_a_backend_that_stays_down_ends_the_request_by_the_idle_timeout(make_proxy, fake_codex):
    proxy = make_proxy(idle_timeout=1.0)
    fake_codex.scenario([{"thread": True}] + [
        {"warning": f"Reconnecting... {n}/99 (stream disconnected)"} if n % 2 == 0 else
        {"sleep": 0.2} for n in range(200)])
    started = time.monotonic()
    status, _, raw = post_chat(proxy.base, chat_body())
    error = json.loads(raw)["error"]
    assert status == 504 and error["code"] == "backend_unreachable", error
    assert "unreachable" in error["message"] and time.monotonic() - started < 10


def test_e2e_a_dead_backend_ends_the_request_by_the_idle_timeout(e2e, openai_sdk):
    (e2e.home / "config.toml").write_text(
        'model_provider = "mock"\n[model_providers.mock]\nname = "mock"\n'
        'base_url = "http://127.0.0.1:9/v1"\nwire_api = "responses"\nenv_key = "MOCK_KEY"\n'
        'request_max_retries = 50\nstream_max_retries = 50\n')      # port 9: nobody answers
    proxy = e2e.proxy(idle_timeout=5.0)
    started = time.monotonic()
    with pytest.raises(openai_sdk.APIStatusError) as error:
        sdk_client(openai_sdk, proxy.base + "/v1").chat.completions.create(
            model="5.5-tpg", messages=[{"role": "user", "content": "anyone there?"}])
    assert time.monotonic() - started < 30
    assert error.value.status_code in (502, 504) and "unreachable" in str(error.value), error.value


# ---------------------------------------------------------------------------
# Codex processes: engines, the pool, deaths and cleanup
# ---------------------------------------------------------------------------

def test_translate_codex_event_table():
    t = cp.translate_codex_event
    assert t({"type": "thread.started", "thread_id": "T"}) == [("thread", "T")]
    assert t({"type": "item.completed", "item": {"id": "i", "type": "agent_message",
                                                  "text": "hi"}}) == [("text", ("i", "hi"))]
    assert t({"type": "item.updated", "item": {"type": "agent_message", "text": "h"}}) == []
    assert t({"type": "error", "message": "Reconnecting... 1/5"}) == [("warning", "Reconnecting... 1/5")]
    assert t({"type": "turn.failed", "error": {"message": "boom"}}) == \
        [("failed", {"message": "boom"})]
    assert t({"type": "item.completed", "item": {"id": "r", "type": "reasoning",
                                                  "text": "hm"}}) == [("reasoning", ("r", 0, "hm"))]
    assert t({"type": "turn.completed", "usage": {"input_tokens": 1}}) == \
        [("usage", {"input_tokens": 1}), ("completed", None)]
    assert t({"type": "item.completed", "item": {"type": "command_execution"}}) == \
        [("codex_tool", "command_execution")]
    assert t({"type": "item.started", "item": {"type": "mcp_tool_call", "server": "client",
                                                "tool": "read_file", "arguments": {"p": 1}}}) == \
        [("call_announced", ("read_file", {"p": 1}))]
    assert t({"type": "item.started", "item": {"type": "mcp_tool_call", "server": "other",
                                                "tool": "x"}}) == []


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
    binary = (tmp_path / modules_dir / "@openai" / "codex-win32-x64" / "vendor" /
              "x86_64-pc-windows-msvc" / "bin" / "codex.exe")
    binary.parent.mkdir(parents=True)
    binary.write_text("")
    binary.chmod(0o755)
    if cp.native_codex(str(script), "win32", "AMD64"):     # the platform package wins
        assert cp.resolve_codex(str(shim), windows=True) in ([str(binary)], argv)


@pytest.mark.parametrize("layout", ["sibling", "nested", "vendor"])
def test_the_native_binary_behind_the_npm_launcher_is_found(tmp_path, layout):
    modules = tmp_path / "lib" / "node_modules"
    script = modules / "@openai" / "codex" / "bin" / "codex.js"
    script.parent.mkdir(parents=True)
    script.write_text("#!/usr/bin/env node\n")
    script.chmod(0o755)
    link = tmp_path / "bin" / "codex"
    link.parent.mkdir()
    link.symlink_to(script)
    assert cp.resolve_codex(str(link), windows=False) == [str(link)]    # no binary yet
    vendor = {"sibling": modules / "@openai" / "codex-linux-x64" / "vendor",
              "nested": modules / "@openai" / "codex" / "node_modules" / "@openai" /
              "codex-linux-x64" / "vendor",
              "vendor": modules / "@openai" / "codex" / "vendor"}[layout]
    binary = vendor / "x86_64-unknown-linux-musl" / "bin" / "codex"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert cp.native_codex(str(script), "linux", "x86_64") == str(binary)
    assert cp.native_codex(str(script), "linux", "mips") is None
    if cp.native_codex(str(script)) is not None:       # this machine is linux x86_64
        assert cp.resolve_codex(str(link), windows=False) == [str(binary)]
    assert cp.resolve_codex(str(link), windows=False, native=False) == [str(link)]


def test_app_server_notifications_become_the_runs_events():
    events = cp.AppServerEvents(cp.ToolNames([cp.ToolSpec("read_file")], True))
    n = events.notification
    assert n("item/agentMessage/delta", {"itemId": "m1", "delta": "Hi"}) == [("text", ("m1", "Hi"))]
    assert n("item/completed", {"item": {"type": "agentMessage", "id": "m1", "text": "Hi"}}) == []
    assert n("item/completed", {"item": {"type": "agentMessage", "id": "m2", "text": "Yo"}}) == \
        [("text", ("m2", "Yo"))]                     # no deltas came: the whole text
    assert n("item/reasoning/summaryTextDelta", {"itemId": "r", "delta": "a",
                                                  "summaryIndex": 1}) == [("reasoning", ("r", 1, "a"))]
    assert n("item/completed", {"item": {"type": "reasoning", "id": "r2",
                                         "summary": ["x", "", "y"]}}) == \
        [("reasoning", ("r2", 0, "x")), ("reasoning", ("r2", 2, "y"))]
    assert n("thread/tokenUsage/updated", {"tokenUsage": {
        "total": {"inputTokens": 9, "outputTokens": 3}, "last": {"inputTokens": 1}}}) == \
        [("usage", {"input_tokens": 9, "cached_input_tokens": 0, "output_tokens": 3,
                    "reasoning_output_tokens": 0})]
    assert not events.signals_responses
    assert n("rawResponseItem/completed", {"item": {"type": "function_call", "name": "read_file",
                                                    "call_id": "c1"}}) == []
    assert n("rawResponseItem/completed", {"item": {"type": "function_call", "name": "other",
                                                    "call_id": "c2"}}) == []
    assert n("rawResponse/completed", {}) == [("model_call", ()),
                                              ("response_done", frozenset({"c1"}))]
    assert n("rawResponse/completed", {}) == [("model_call", ())] and events.signals_responses
    assert n("rawResponseItem/completed", {"item": {"type": "function_call", "name": "nobody",
                                                    "call_id": "c3"}}) == []
    assert n("rawResponse/completed", {}) == [("model_call", ("nobody",))]   # Codex answers it
    assert n("turn/completed", {"turn": {"status": "completed"}}) == [("completed", None)]
    assert n("turn/completed", {"turn": {"status": "interrupted"}}) == [("interrupted", None)]
    assert n("turn/completed", {"turn": {"status": "failed", "error": {"message": "x"}}}) == \
        [("failed", {"message": "x"})]
    assert n("error", {"error": {"message": "slow"}, "willRetry": True}) == \
        [("warning", "retrying: slow")]
    assert n("error", {"error": {"message": "dead"}, "willRetry": False}) == []
    assert n("item/started", {"item": {"type": "commandExecution"}}) == \
        [("codex_tool", "commandExecution")]
    assert n("something/new", {}) == []


def test_an_app_server_that_cannot_report_its_config_is_not_used(make_proxy, fake_codex):
    fake_codex.write("no_config_read", True)
    proxy = make_proxy()
    health = json.loads(http_request(proxy.base, "GET", "/health")[2])
    assert health["engine"] == "exec" and "configuration" in health["engine_reason"]


def test_exec_runs_codex_as_a_pure_forwarder(make_proxy, fake_codex, run_tmp):
    proxy = make_proxy(engine="exec")
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


def test_app_server_thread_runs_codex_as_a_pure_forwarder(proxy, fake_codex, run_tmp):
    post_chat(proxy.base, {"messages": [{"role": "system", "content": "SYSTEM RULES"},
                                        {"role": "developer", "content": "DEV RULES"},
                                        {"role": "user", "content": "hello"}]})
    record = fake_codex.wait_records(1)[0]
    assert record["engine"] == "app-server" and record["argv"][0] == "app-server"
    assert record["initialize"]["capabilities"]["experimentalApi"] is True
    thread = record["thread"]
    assert (thread["sandbox"], thread["approvalPolicy"], thread["ephemeral"],
            thread["environments"]) == ("read-only", "never", True, [])
    for key, value in cp.FORWARDER_THREAD_CONFIG.items():
        assert thread["config"][key] == value, key
    process = argv_config(record)       # given once to the process, for every thread
    assert process["model_catalog_json"].endswith('.json"')
    assert process["thread_unload_delay_secs"] == "0"      # a thread let go is unloaded
    assert thread["baseInstructions"].startswith(cp.INSTRUCTIONS_PREAMBLE)
    assert "SYSTEM RULES\n\nDEV RULES" in thread["baseInstructions"]
    assert thread["cwd"].startswith(str(run_tmp)) and record["cwd_files"] == []
    assert "model" not in thread and record["prompt"] == "hello"    # Codex's default model
    assert record["methods"][:5] == ["initialize", "initialized", "config/read", "thread/start",
                                     "turn/start"]
    assert "model_catalog_json" not in thread["config"]


def test_a_new_codex_version_gets_its_own_catalog(proxy, fake_codex, tmp_path):
    assert (tmp_path / "state" / "model-catalog-codex-cli-0.0.0-fake.json").exists()
    (fake_codex.dir / "version").write_text("codex-cli 9.9.9")
    proxy.server.launcher.codex.expire()
    post_chat(proxy.base, chat_body())
    catalog = tmp_path / "state" / "model-catalog-codex-cli-9.9.9.json"
    assert wait_until(catalog.exists, 10)
    models = json.loads(catalog.read_text())["models"]
    assert all(m["supports_search_tool"] is False and m["apply_patch_tool_type"] is None
               and m["tool_mode"] is None and m["experimental_supported_tools"] == []
               for m in models)        # the client's tools directly, none of Codex's own
    assert wait_until(lambda: proxy.server.launcher.catalog.path == str(catalog), 10)
    post_chat(proxy.base, chat_body())
    assert argv_config(fake_codex.wait_records(2)[-1])["model_catalog_json"] == \
        cp.toml_value(str(catalog))         # a process of the new version, with its catalog


def test_the_bridge_relay_checks_the_secret_before_reading_more(make_proxy, fake_codex,
                                                                monkeypatch):
    monkeypatch.setattr(cp.BridgeRelayHandler, "timeout", 0.3)
    proxy = make_proxy(engine="exec")
    fake_codex.scenario([{"thread": True}, {"wait_file": "go"}, {"complete": {}}])
    thread = threading.Thread(target=lambda: tool_round(proxy, [{"role": "user", "content": "x"}]))
    thread.start()
    fake_codex.wait_records(1)
    run_id = wait_until(lambda: next((r.id for r in proxy.server.runs.all()), None))
    relay = proxy.server.launcher.engines["exec"].bridge.server_address[:2]
    with socket.create_connection(relay, timeout=5) as sock:
        sock.sendall(json.dumps({"run": run_id, "secret": "guess"}).encode() + b"\n")
        answer = json.loads(sock.makefile("rb").readline())
    assert answer["is_error"] and "secret" in answer["text"]
    with socket.create_connection(relay, timeout=5) as sock:     # a huge first line
        sock.sendall(b'{"run": "' + b"x" * 5000)
        assert sock.recv(100) == b""
    with socket.create_connection(relay, timeout=5) as sock:     # a silent connection
        assert sock.recv(100) == b""
    (fake_codex.dir / "go").write_text("")
    thread.join(20)


def test_a_child_that_died_is_gone_even_while_another_thread_waits_for_it():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        with proc._waitpid_lock:        # what a reader thread inside wait() holds
            assert wait_until(lambda: not pid_alive(proc.pid), 10)     # a zombie now
            assert proc.poll() is None      # the trap: poll() cannot look
            assert cp.process_gone(proc)
    finally:
        proc.wait(10)
    assert cp.process_gone(proc)


def test_what_a_codex_that_exits_by_itself_leaves_behind_is_stopped(tmp_path):
    """Codex exits on its own but leaves a child in its group (the exec
    bridge, say): stopping its tree still kills the child."""
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_MAKER], stdout=subprocess.PIPE,
                            **cp.popen_group_kwargs())
    child = int(proc.stdout.readline())
    proc.stdout.close()
    try:
        assert proc.wait(20) == 0 and pid_alive(child)      # the parent is gone, not the child
        cp.stop_process_tree(proc)
        assert wait_until(lambda: not pid_alive(child), 10)
    finally:
        if pid_alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_codex_killed_mid_turn_is_named_by_its_signal(proxy, fake_codex):
    """Once the model has said something, a turn whose Codex dies cannot
    start again unseen: the client hears how Codex ended."""
    fake_codex.scenario([{"thread": True}, {"text": "partial"}, {"touch": "started"},
                         {"sleep": 30}])
    replies = []
    thread = threading.Thread(target=lambda: replies.append(post_chat(proxy.base, chat_body())))
    thread.start()
    assert wait_until(lambda: (fake_codex.dir / "started").exists(), 10)
    os.kill(fake_codex.records()[0]["pid"], signal.SIGKILL)
    thread.join(20)
    error = json.loads(replies[0][2])["error"]
    assert replies[0][0] == 502 and "killed by signal SIGKILL" in error["message"]


def test_a_codex_without_app_server_falls_back_to_exec(make_proxy, fake_codex):
    (fake_codex.dir / "no_app_server").write_text("")
    proxy = make_proxy()
    health = json.loads(http_request(proxy.base, "GET", "/health")[2])
    assert health["engine"] == "exec" and "probe failed" in health["engine_reason"]
    assert post_chat(proxy.base, chat_body())[0] == 200
    fake_codex.scenario(TOOL_TURN)
    messages = [{"role": "user", "content": "read a.py"}]
    _, message, finish, _ = tool_round(proxy, messages)
    assert finish == "tool_calls"
    _, final, finish, _ = tool_round(proxy, messages + [message, *results_for(message)])
    assert finish == "stop" and "RESULT:read_file" in final["content"]
    assert {r["engine"] for r in fake_codex.records()} == {"exec"}
    assert proxy.events("engine_selected")[0]["engine"] == "exec"


def test_engine_exec_is_chosen_without_a_probe(make_proxy, fake_codex):
    proxy = make_proxy(engine="exec", codex_processes=2)
    health = json.loads(http_request(proxy.base, "GET", "/health")[2])
    assert health["engine"] == "exec" and health["codex_processes"] == []
    assert post_chat(proxy.base, chat_body())[0] == 200
    assert [r["engine"] for r in fake_codex.all_records()] == ["exec"]


def test_a_call_to_a_codex_whose_pipe_broke_waits_to_see_it_exit():
    class Exited(threading.Event):
        def wait(self, timeout=None):       # the reader sees EOF while the call waits
            self.set()
            return True

    class BrokenStdin:
        def write(self, data):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    exited = Exited()
    pipe = cp.JsonRpcPipe(BrokenStdin(), exited, ["codex: killed"])
    with pytest.raises(cp.ProxyError) as caught:
        pipe.call("thread/start", {}, timeout=20)
    assert "did not answer thread/start (it exited)" in caught.value.message
    assert exited.is_set()      # so the pool and a kept thread see it gone


def test_one_process_hosts_many_conversations_each_on_its_own_thread(make_proxy, fake_codex):
    fake_codex.scenario(CHAT_TURN)
    proxy = make_proxy(codex_processes=1)
    assert wait_until(lambda: len(proxy.server.launcher.pool) == 1, 10)
    for text in ("first conversation", "second conversation", "third conversation"):
        converse(proxy, [{"role": "user", "content": text}])
    records = fake_codex.wait_records(3)
    assert len({r["pid"] for r in records}) == 1 == len(pool_pids(proxy))
    assert len({r["thread_id"] for r in records}) == 3
    assert all(e["warm"] for e in proxy.events("codex_forward"))      # no start on the path
    health = json.loads(http_request(proxy.base, "GET", "/health")[2])
    assert health["conversations"] == 3
    assert [(p["threads"], p["served"]) for p in health["codex_processes"]] == [(3, 3)]


def test_new_threads_go_to_the_least_busy_process(make_proxy, fake_codex):
    fake_codex.scenario(CHAT_TURN)
    proxy = make_proxy(codex_processes=2)
    assert wait_until(lambda: len(proxy.server.launcher.pool) == 2, 10)
    for n in range(4):
        converse(proxy, [{"role": "user", "content": f"conversation {n}"}])
    counts = collections.Counter(r["pid"] for r in fake_codex.wait_records(4))
    assert sorted(counts.values()) == [2, 2]


def test_processes_retire_when_the_config_changes_and_their_threads_move(make_proxy,
                                                                       fake_codex, tmp_path):
    fake_codex.scenario(CHAT_TURN)
    proxy = make_proxy(codex_processes=1)
    assert wait_until(lambda: len(proxy.server.launcher.pool) == 1, 10)
    old = pool_pids(proxy)[0]
    messages = [{"role": "user", "content": "one"}]
    answer, _ = converse(proxy, messages)
    (tmp_path / "home" / "config.toml").write_text('model = "gpt-5.4"\n')
    proxy.server.launcher.pool.refresh()
    assert wait_until(lambda: pool_pids(proxy) and pool_pids(proxy)[0] != old, 10)
    assert pid_alive(old)                   # it still hosts the kept conversation
    converse(proxy, messages + [answer, {"role": "user", "content": "two"}])
    started = proxy.wait_event("conversation_started", 2)[1]
    assert started["reason"] == "recycled (its process retired)"
    second = fake_codex.wait_records(2)[1]
    assert second["pid"] != old and [i["role"] for i in second["injected"]] == \
        ["user", "assistant"]               # the history went to the fresh thread
    assert wait_until(lambda: not pid_alive(old), 10)      # empty now: it stops


def test_a_process_that_hosted_enough_threads_is_recycled(make_proxy, fake_codex, monkeypatch):
    monkeypatch.setattr(cp, "PROCESS_RECYCLE_THREADS", 2)
    fake_codex.scenario(CHAT_TURN)
    proxy = make_proxy(codex_processes=1, keep_conversations=0)
    assert wait_until(lambda: len(proxy.server.launcher.pool) == 1, 10)
    old = pool_pids(proxy)[0]
    for n in range(2):
        converse(proxy, [{"role": "user", "content": f"conversation {n}"}])
    proxy.server.launcher.pool.refresh()
    assert wait_until(lambda: not pid_alive(old), 10)
    assert wait_until(lambda: len(proxy.server.launcher.pool) == 1, 10)
    converse(proxy, [{"role": "user", "content": "after"}])
    assert fake_codex.wait_records(3)[2]["pid"] != old


def test_a_dead_process_is_replaced(make_proxy, fake_codex):
    fake_codex.scenario(CHAT_TURN)
    proxy = make_proxy(codex_processes=1)
    assert wait_until(lambda: len(proxy.server.launcher.pool) == 1, 10)
    dead = pool_pids(proxy)[0]
    os.kill(dead, signal.SIGKILL)
    assert wait_until(lambda: pool_pids(proxy) and pool_pids(proxy)[0] != dead, 10)
    converse(proxy, [{"role": "user", "content": "hello"}])
    assert proxy.wait_event("codex_forward")[0]["pid"] != dead


def test_a_process_that_dies_takes_no_conversation_with_it(make_proxy, fake_codex):
    """Three kept conversations and a turn in flight (nothing written yet) on
    one process, killed: the turn starts again on a fresh thread and is
    answered; each conversation's next turn continues on a fresh thread
    with its history, and no client sees an error."""
    fake_codex.scenario(("in flight", [{"thread": True}, {"touch": "holding"},
                                       {"wait_file": "go"}, {"text": "answer to: {prompt}"},
                                       {"complete": {}}]), CHAT_TURN)
    proxy = make_proxy(codex_processes=1)
    assert wait_until(lambda: len(proxy.server.launcher.pool) == 1, 10)
    talks = []
    for n in range(3):
        messages = [{"role": "user", "content": f"conversation {n}"}]
        talks.append(messages + [converse(proxy, messages)[0]])
    replies = []
    flight = threading.Thread(target=lambda: replies.append(
        converse(proxy, [{"role": "user", "content": "in flight"}])))
    flight.start()
    assert wait_until((fake_codex.dir / "holding").exists, 10)
    victim = pool_pids(proxy)[0]
    (fake_codex.dir / "holding").unlink()
    os.kill(victim, signal.SIGKILL)
    assert wait_until((fake_codex.dir / "holding").exists, 10)    # started again, elsewhere
    (fake_codex.dir / "go").write_text("")
    flight.join(20)
    assert replies[0][0]["content"] == "answer to: in flight"
    for n, messages in enumerate(talks):
        answer, _ = converse(proxy, messages + [{"role": "user", "content": f"more {n}"}])
        assert answer["content"] == f"answer to: more {n}"
    reasons = [e["reason"] for e in proxy.events("conversation_started")]
    assert reasons.count("process died") == 3
    assert "process died (the turn starts again)" in reasons
    last = fake_codex.records()[-3:]
    assert {r["pid"] for r in last} != {victim} and all(len(r["injected"]) == 2 for r in last)


def test_a_process_that_dies_as_a_thread_opens_is_passed_over(make_proxy, fake_codex):
    fake_codex.scenario(CHAT_TURN)
    proxy = make_proxy(codex_processes=1)
    pool = proxy.server.launcher.pool
    assert wait_until(lambda: len(pool) == 1, 10)
    doomed = pool.processes()[0]
    os.kill(doomed.proc.pid, signal.SIGKILL)
    assert doomed.exited.wait(10)
    handed_out, take = iter([(doomed, True)]), pool.take
    pool.take = lambda: next(handed_out, None) or take()        # it dies just as it is taken
    converse(proxy, [{"role": "user", "content": "hello"}])
    assert proxy.wait_event("codex_forward")[0]["pid"] != doomed.proc.pid


def test_an_app_server_that_exits_mid_turn_is_a_502(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"deltas": ["half"]}, {"exit": 3}])
    status, _, raw = post_chat(proxy.base, chat_body())
    assert status == 502 and "exited" in json.loads(raw)["error"]["message"]


def test_codex_asks_for_approval_it_is_declined():
    """approvalPolicy is never, but an approval request must not hang a turn."""
    events = cp.AppServerEvents(cp.ToolNames([cp.ToolSpec("read_file")], True))
    assert events.request("item/commandExecution/requestApproval", {}) == \
        ({"result": {"decision": "decline"}}, [("unexpected", "item/commandExecution/requestApproval")])
    assert events.request("item/fileChange/requestApproval", {})[0] == \
        {"result": {"decision": "decline"}}
    assert events.request("applyPatchApproval", {})[0] == {"result": {"decision": "denied"}}
    assert events.request("something/new", {})[0]["error"]["code"] == -32601
    reply, _ = events.request("item/tool/call", {"tool": "not_declared", "callId": "c"})
    assert reply["result"]["success"] is False and "not_declared" in json.dumps(reply)
    assert events.request("item/tool/call", {"tool": "read_file", "callId": "c"}) == (None, [])


def test_the_mcp_bridge_speaks_json_rpc(tmp_path):
    conf = tmp_path / "bridge.json"
    conf.write_text(json.dumps({"relay": "127.0.0.1:1", "run": "r", "secret": "s",
                                "tools": cp.mcp_tool_list(cp.ToolNames(cp.normalize_tools(TOOLS), False))}))
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


@pytest.mark.parametrize("engine_name", ENGINES)
def test_e2e_upstream_sees_client_text_and_no_codex_prompt_or_host_tools(e2e, openai_sdk,
                                                                        engine_name):
    proxy = e2e.proxy(engine=engine_name)
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    client.chat.completions.create(model="5.5-tpg", messages=[
        {"role": "system", "content": "CLIENT SYSTEM TEXT"}, {"role": "user", "content": "hi"}])
    client.chat.completions.create(model="5.5-tpg", tools=TOOLS[:1], messages=[
        {"role": "user", "content": "hi"}])
    for body in e2e.upstream.bodies():
        text = json.dumps(body["input"])
        assert "coding agent" not in text and "environment_context" not in text
        assert "AGENTS.md" not in text and "sandbox" not in text.lower()
        names = tool_names(body)
        assert not names & CODEX_HOST_TOOLS, names
        assert engine_name == "exec" or not names & MCP_RESOURCE_TOOLS, names
    first, second = e2e.upstream.bodies()
    assert "CLIENT SYSTEM TEXT" in developer_text(first)
    assert developer_text(first).startswith(cp.INSTRUCTIONS_PREAMBLE)
    expected = "mcp__client/read_file" if engine_name == "exec" else "read_file"
    assert expected in tool_names(second)


def test_e2e_exec_waits_for_a_slow_bridge_so_the_client_tools_reach_the_model(
        e2e, openai_sdk, tmp_path, monkeypatch):
    slow = tmp_path / "slow-python.sh"          # a loaded machine: the bridge starts late
    slow.write_text(f"#!/bin/sh\nsleep 2\nexec '{sys.executable}' \"$@\"\n")
    slow.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(slow))     # the bridge's interpreter
    proxy = e2e.proxy(engine="exec")
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    client.chat.completions.create(model="5.5-tpg", tools=TOOLS[:1], messages=[
        {"role": "user", "content": "hi"}])
    assert "mcp__client/read_file" in tool_names(e2e.upstream.bodies()[0])


def test_e2e_a_codex_without_a_working_app_server_is_run_with_exec(e2e, openai_sdk, tmp_path):
    wrapper = tmp_path / "old-codex"
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = app-server ] && exit 2\nexec "{e2e.codex_path}" "$@"\n')
    wrapper.chmod(0o755)
    e2e.responder = agent_responder
    for proxy in (e2e.proxy(codex_bin=str(wrapper)), e2e.proxy(engine="exec")):
        health = json.loads(http_request(proxy.base, "GET", "/health")[2])
        assert health["engine"] == "exec"
        client = sdk_client(openai_sdk, proxy.base + "/v1")
        messages = [{"role": "user", "content": "read gamma.py"}]
        choice = client.chat.completions.create(model="5.5-tpg", messages=messages,
                                                tools=TOOLS).choices[0]
        assert choice.finish_reason == "tool_calls"
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id,
                      "content": "CONTENT-gamma.py"}]
        final = client.chat.completions.create(model="5.5-tpg", messages=messages, tools=TOOLS)
        assert final.choices[0].message.content == "The file holds CONTENT-gamma.py"
        e2e.responder = lambda body, index: [message_item("plain answer")]
        plain = client.chat.completions.create(model="5.5-tpg",
                                               messages=[{"role": "user", "content": "hi"}])
        assert plain.choices[0].message.content == "plain answer"
        e2e.responder = agent_responder
        assert {e["engine"] for e in proxy.events("codex_forward")} == {"exec"}


def test_e2e_two_conversations_share_one_process_each_with_its_own_tools(e2e, openai_sdk):
    gate = threading.Event()

    def responder(body, index):
        if "hold" in json.dumps(body["input"][-1]):
            gate.wait(30)           # both turns are running at once
        return [upstream_message(f"tools: {sorted(tool_names(body))}", index)]
    e2e.responder = responder
    proxy = e2e.proxy(codex_processes=1)
    assert wait_until(lambda: pool_ready(proxy), 20)
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    offers = {"alice": [TOOLS[0]], "bob": [TOOLS[1]]}
    answers = {}

    def talk(who):
        answers[who] = client.chat.completions.create(
            model="5.5-tpg", tools=offers[who], messages=[
                {"role": "system", "content": f"You help {who}."},
                {"role": "user", "content": f"hold for {who}"}]).choices[0].message.content
    threads = [threading.Thread(target=talk, args=(who,)) for who in offers]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: len(e2e.upstream.requests) == 2, 30)
    gate.set()
    for thread in threads:
        thread.join(60)
    assert answers == {"alice": "tools: ['read_file']", "bob": "tools: ['list_dir']"}
    forwards = proxy.events("codex_forward")
    assert len({f["pid"] for f in forwards}) == 1 and len({f["thread_id"] for f in forwards}) == 2
    for key, bodies in by_cache_key(e2e.upstream.bodies()).items():
        who = "alice" if "alice" in developer_text(bodies[0]) else "bob"
        other = "bob" if who == "alice" else "alice"
        assert other not in json.dumps(bodies) and key in {f["thread_id"] for f in forwards}


def test_e2e_killing_a_process_with_three_conversations_loses_none(e2e, openai_sdk):
    e2e.responder = lambda body, index: [upstream_message(
        "seen: " + " / ".join(i["content"][0]["text"] for i in body["input"]
                              if i.get("role") == "user"), index)]
    proxy = e2e.proxy(codex_processes=1)
    assert wait_until(lambda: pool_ready(proxy), 20)
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    talks = []
    for n in range(3):
        messages = [{"role": "user", "content": f"talk {n}"}]
        reply = client.chat.completions.create(model="5.5-tpg", messages=messages)
        talks.append(messages + [reply.choices[0].message.model_dump(exclude_none=True)])
    victim = {e["pid"] for e in proxy.events("codex_forward")}
    assert len(victim) == 1
    os.kill(victim.pop(), signal.SIGKILL)
    for n, messages in enumerate(talks):
        messages.append({"role": "user", "content": f"more {n}"})
        reply = client.chat.completions.create(model="5.5-tpg", messages=messages)
        assert reply.choices[0].message.content == f"seen: talk {n} / more {n}"
    reasons = [e["reason"] for e in proxy.events("conversation_started")[3:]]
    assert reasons == ["process died"] * 3


# ---------------------------------------------------------------------------
# Access: keys, tunnels, browser origins, Host names
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:11435", True), ("localhost:1", True), ("LOCALHOST", True),
    ("app.localhost:80", True), ("[::1]:11435", True), ("127.8.9.1", True),
    ("listed.example:9", True), ("localhost.", True),
    # the machine's own name, a .local name, its LAN address: with a key only
    ("myhost:11435", False), ("myhost.local", False), ("192.168.1.5:11435", False),
    ("evil.example", False), ("evil.example:11435", False), ("localhost.evil.example", False),
    ("127.0.0.1:abc", False), ("[::1", False), ("8.8.8.8", False), ("10.0.0.9:11435", False),
    ("[2001:db8::1]:80", False), ("evillocalhost", False), ("evillocalhost:11435", False),
    ("xlocalhost.example", False),
])
def test_host_rules(host, allowed):
    """Without a key, loopback names only: an IP literal other than loopback
    means a forward (ssh -R names the far machine), and a machine or .local
    name can be answered by any neighbour (rebinding)."""
    assert cp.host_allowed(host, ("listed.example",)) is allowed


@pytest.mark.parametrize("origin, allowed", [
    ("http://localhost:5173", True), ("https://127.0.0.1", True), ("http://[::1]:3000", True),
    ("http://app.localhost", True), ("https://chat.example", True), ("null", False),
    ("https://evil.example", False), ("http://localhost.evil.example", False),
    ("file://", False), ("http://localhost:99999", False), ("ftp://localhost", False),
    ("http://evil@localhost", False), ("http://localhost x", False),
    ("http://localhost/path", False), ("http://localhost\r\n", False), ("", False),
])
def test_origin_rules(origin, allowed):
    assert cp.origin_allowed(origin, ("https://chat.example",)) is allowed


def test_a_second_foreign_origin_header_is_refused():
    policy = cp.AccessPolicy(cp.Config())
    local = [("Host", "127.0.0.1:11435"), ("Origin", "http://localhost:3000")]
    policy.check(headers_of(local))                     # one local origin: fine
    for second in ("https://evil.example", "null"):
        with pytest.raises(cp.ProxyError) as refused:
            policy.check(headers_of(local + [("Origin", second)]))
        assert refused.value.code == "origin_not_allowed"
    with pytest.raises(cp.ProxyError):                  # a second Host: refused too
        policy.check(headers_of(local + [("Host", "evil.example")]))


def test_tunnel_headers_count_when_empty_or_repeated():
    pairs = [("X-Forwarded-For", ""), ("Via", "1.1 x"), ("X-Forwarded-Host", "a"),
             ("CF-Ray", "1"), ("True-Client-IP", "1.2.3.4"), ("Accept", "*/*")]
    assert cp.tunnel_headers(headers_of(pairs)) == [
        "cf-ray", "true-client-ip", "via", "x-forwarded-for", "x-forwarded-host"]
    assert cp.tunnel_headers(headers_of([("Accept", "*/*")])) == []


def test_child_environment_drops_the_keys():
    env = cp.child_environment({"PATH": "/bin", "CODEX_PROXY_API_KEY": "k1,k2",
                                "OTHER": "k2", "HOME": "/h"}, ("k1", "k2"), "/codex")
    assert env == {"PATH": "/bin", "HOME": "/h", "CODEX_HOME": "/codex"}


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/responses"), ("GET", "/v1/models"),
    ("GET", "/models"), ("GET", "/logs?format=json"), ("GET", "/logs/stream"), ("GET", "/v1/logs"),
])
def test_key_required_on_every_route_but_health(make_proxy, method, path):
    proxy = make_proxy(api_keys=(KEY, "second-key"))
    body = None if method == "GET" else {"input": "hello"} if "responses" in path else chat_body()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": f"Bearer {KEY}x"},
                    {"Authorization": f"Basic {KEY}"}, {"x-api-key": KEY.upper()}):
        status, _, raw = http_request(proxy.base, method, path, body, headers, timeout=10)
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key", headers
    status, head, _ = http_request(proxy.base, method, path, body, {"x-api-key": KEY},
                                   timeout=10, head_only=True)     # a stream never ends
    assert status == 200, path
    assert http_request(proxy.base, "GET", "/health")[0] == 200
    assert http_request(proxy.base, "OPTIONS", path.split("?")[0],
                        headers={"Origin": "https://anywhere.example"})[0] == 204
    assert proxy.events("auth_rejected")[0]["status"] == 401


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"api-key": KEY},
                                     {"x-api-key": KEY}, {"Authorization": "Bearer second-key"},
                                     {"Authorization": f"bearer {KEY}"},
                                     {"Authorization": f"BEARER   {KEY}  "}])
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
        assert proxy.events("auth_rejected") and proxy.events("request_rejected")
    finally:
        proxy.stop()
        stream.seek(0)
        text = stream.read() + raw.decode()
        stream.close()
    assert KEY not in text and "wrong-key-5678" not in text and "auth_rejected" in text


def test_the_key_never_reaches_codex(make_proxy, fake_codex, monkeypatch, engine):
    monkeypatch.setenv("CODEX_PROXY_API_KEY", KEY)
    monkeypatch.setenv("SOME_TOOL_TOKEN", KEY)
    proxy = make_proxy(api_keys=(KEY,), engine=engine)
    assert post_chat(proxy.base, chat_body(), {"Authorization": f"Bearer {KEY}"})[0] == 200
    record = fake_codex.wait_records(1)[0]
    assert "CODEX_PROXY_API_KEY" not in record["env_keys"]
    assert not any(KEY in value for value in record["env_values"])


def test_keys_come_from_a_file(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("# the proxy's keys\nfile-key-1\n\n  file-key-2  \n")
    config = cp.config_from_args(cp.build_parser().parse_args(["--api-key-file", str(keys)]))
    assert config.api_keys == ("file-key-1", "file-key-2")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(SystemExit):
        cp.main(["--api-key-file", str(tmp_path / "empty")])


@pytest.mark.parametrize("headers", [
    {"CF-Connecting-IP": "203.0.113.9"}, {"X-Forwarded-For": "203.0.113.9"},
    {"Forwarded": "for=1.2.3.4"}, {"X-Real-IP": "1.2.3.4"}, {"X-Forwarded-For": ""},
    {"Via": "1.1 proxy"}, {"X-Forwarded-Host": "x.example"}, {"True-Client-IP": "1.2.3.4"},
    {"CF-Ray": "abc"}, {"X-Forwarded-Proto": "https"},
    {"Tailscale-Funnel-Request": "?1"}, {"Tailscale-User-Login": "a@b.example"},
    {"Fly-Client-IP": "1.2.3.4"}, {"X-Railway-Edge": "railway/us-west2"},
    {"Rndr-Id": "abc"}, {"Ngrok-Skip-Browser-Warning": "1"}, {"CF-Visitor": "{}"},
])
def test_tunnelled_request_without_key_gets_403(proxy, headers):
    for path in ("/v1/chat/completions", "/health"):
        status, _, raw = http_request(proxy.base, "POST" if "chat" in path else "GET", path,
                                      chat_body() if "chat" in path else None, headers)
        error = json.loads(raw)["error"]
        assert status == 403 and "--api-key" in error["message"]
    assert proxy.events("auth_rejected")[0]["code"] == "api_key_required"


def test_a_repeated_empty_tunnel_header_counts(proxy):
    raw = raw_exchange(proxy.base, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   b"X-Forwarded-For:\r\nX-Forwarded-For:\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 403")


def test_tunnelled_cross_origin_request_with_key_is_served(make_proxy, fake_codex):
    proxy = make_proxy(api_keys=(KEY,))
    headers = {"X-Forwarded-For": "203.0.113.9", "Origin": "https://cursor.example",
               "Host": "abc.trycloudflare.com", "Authorization": f"Bearer {KEY}"}
    status, hdrs, _ = post_chat(proxy.base, chat_body(), headers)
    assert status == 200 and hdrs["access-control-allow-origin"] == "https://cursor.example"


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://localhost.evil.example",
                                    "file://"])
def test_foreign_origins_get_403_on_every_route_without_a_key(proxy, fake_codex, origin):
    for method, path, body, ctype in (
            ("POST", "/v1/chat/completions", json.dumps(chat_body()).encode(), "application/json"),
            ("POST", "/v1/chat/completions", json.dumps(chat_body()).encode(), "text/plain"),
            ("GET", "/logs", None, None), ("GET", "/logs?format=json", None, None),
            ("GET", "/health", None, None), ("OPTIONS", "/v1/chat/completions", None, None)):
        headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
        if ctype:
            headers["Content-Type"] = ctype
        status, hdrs, raw = http_request(proxy.base, method, path, body, headers)
        assert status == 403, (method, path)
        assert "access-control-allow-origin" not in hdrs
    assert fake_codex.records() == []
    assert proxy.events("auth_rejected")[0]["code"] == "origin_not_allowed"


def test_local_pages_and_listed_origins_are_served_without_a_key(make_proxy):
    proxy = make_proxy(allow_origins=("https://chat.example",))
    for origin in ("http://localhost:5173", "http://127.0.0.1:8080", "https://chat.example"):
        status, hdrs, _ = post_chat(proxy.base, chat_body(), {"Origin": origin})
        assert status == 200 and hdrs["access-control-allow-origin"] == origin


@pytest.mark.parametrize("host, status", [
    ("evil.example", 403), ("evil.example:11435", 403), ("localhost:{port}", 200),
    ("127.0.0.1:{port}", 200), ("api.localhost:{port}", 200), ("allowed.example", 200),
    ("8.8.8.8", 403), ("8.8.8.8:{port}", 403),
])
def test_host_names_are_checked_without_a_key(make_proxy, host, status):
    proxy = make_proxy(allow_hosts=("allowed.example",))
    headers = {"Host": host.format(port=port_of(proxy.base))}
    assert http_request(proxy.base, "GET", "/v1/models", headers=headers)[0] == status
    assert post_chat(proxy.base, chat_body(), headers)[0] == status


def test_the_machines_own_names_need_a_key(make_proxy):
    """A LAN neighbour can answer for the machine's name or a .local name
    (and rebind it): without a key, only loopback names are served."""
    name = socket.gethostname().split(".")[0]
    open_proxy, keyed = make_proxy(), make_proxy(api_keys=(KEY,))
    for host in (f"{name}:1", f"{name}.local:1"):
        assert http_request(open_proxy.base, "GET", "/v1/models",
                            headers={"Host": host})[0] == 403
        assert http_request(keyed.base, "GET", "/v1/models", headers={
            "Host": host, "Authorization": f"Bearer {KEY}"})[0] == 200


def test_a_foreign_page_cannot_resume_another_clients_parked_turn(proxy, fake_codex):
    fake_codex.scenario(TOOL_TURN)
    messages = [{"role": "user", "content": "read a.py"}]
    _, message, _, _ = tool_round(proxy, messages)
    stolen = messages + [message, *results_for(message, "EVIL")]
    status, _, _ = post_chat(proxy.base, {"model": "m", "messages": stolen, "tools": TOOLS},
                             {"Origin": "https://evil.example", "Content-Type": "text/plain"})
    assert status == 403 and len(proxy.server.turns.parked) == 1
    assert fake_codex.records()[0]["results"] == []


def test_keys_are_read_alike_from_every_header(make_proxy, fake_codex):
    proxy = make_proxy(api_keys=(KEY,))
    for headers in ({"x-api-key": f"  {KEY}  "}, {"api-key": f"{KEY} "},
                    {"Authorization": f"Bearer {KEY}  "},
                    {"Authorization": "Bearer wrong", "x-api-key": KEY}):
        assert http_request(proxy.base, "GET", "/v1/models", headers=headers)[0] == 200, headers
    assert http_request(proxy.base, "GET", "/v1/models",
                        headers={"Authorization": "Bearer wrong"})[0] == 401


def test_non_loopback_bind_without_key_refuses_to_start(capsys):
    assert cp.main(["--addr", "0.0.0.0:0", "--codex-bin", "none"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_a_wildcard_origin_needs_a_key(capsys, make_proxy, fake_codex):
    assert cp.main(["--addr", "127.0.0.1:0", "--codex-bin", "none", "--allow-origin", "*"]) == 2
    assert "--api-key-file" in capsys.readouterr().err
    assert not cp.origin_allowed("https://evil.example", ("*",))     # it means nothing alone
    keyed = make_proxy(api_keys=(KEY,), allow_origins=("*",))
    status, headers, _ = post_chat(keyed.base, chat_body(), {
        "Origin": "https://chat.example", "Authorization": f"Bearer {KEY}"})
    assert status == 200 and headers["access-control-allow-origin"] == "https://chat.example"


# ---------------------------------------------------------------------------
# HTTP: framing, floods, fuzz, limits, deadlines, memory
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("value, code", [
    ("ok \ud800 lone", "invalid_text"),
    ({"k\udfff": 1}, "invalid_text"),
    (json.loads("[" * 100 + "]" * 100), "too_deep"),
])
def test_hostile_json_values_are_refused(value, code):
    with pytest.raises(cp.ProxyError) as info:
        cp.check_json_value(value)
    assert info.value.status == 400 and info.value.code == code


@pytest.mark.parametrize("pairs, framing", [
    ([], ("none", 0)),
    ([("Content-Length", "12")], ("length", 12)),
    ([("Content-Length", "0")], ("none", 0)),
    ([("Content-Length", "5"), ("Content-Length", "5")], ("length", 5)),
    ([("Transfer-Encoding", "Chunked")], ("chunked", None)),
    ([("Content-Length", "-1")], None), ([("Content-Length", "+5")], None),
    ([("Content-Length", "0x10")], None), ([("Content-Length", "1e3")], None),
    ([("Content-Length", "5"), ("Content-Length", "6")], None),
    ([("Content-Length", "\u0661")], None),
    ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], None),
    ([("Transfer-Encoding", "gzip, chunked")], None),
    ([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], None),
])
def test_body_framing_is_unambiguous(pairs, framing):
    if framing is None:
        with pytest.raises(cp.ProxyError) as info:
            cp.body_framing(headers_of(pairs))
        assert info.value.status == 400
    else:
        assert cp.body_framing(headers_of(pairs)) == framing


def test_pump_notices_a_client_that_left():
    assert pump([], gone=True)[0].pump().kind == "gone"


def test_a_hundred_headers_are_fine_and_a_hundred_and_one_are_not(proxy, fake_codex):
    for count, status in ((98, b"HTTP/1.1 200"), (101, b"HTTP/1.1 431")):
        extra = b"".join(b"X-H%d: v\r\n" % n for n in range(count))   # with Host: count + 1
        raw = raw_exchange(proxy.base, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
                           extra + b"\r\n", half_close=False)
        assert raw.startswith(status), (count, raw[:60])


def test_small_chunks_cannot_slip_past_the_body_budget(make_proxy):
    proxy = make_proxy(max_body_memory=200 * 1024, max_body=4 * 1024 * 1024)
    stalled = socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=10)
    try:
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Length: 150000\r\n\r\n" + b"x" * 1000)
        assert wait_until(lambda: proxy.server.body_budget._used >= 150000, 10)
        chunk = b"%x\r\n%s\r\n" % (30000, b" " * 30000)
        body = chunk * 10 + b"0\r\n\r\n"
        raw = raw_exchange(proxy.base, request_bytes(b"Transfer-Encoding: chunked\r\n", body),
                           half_close=False)
        assert raw.startswith(b"HTTP/1.1 503") and b"busy_receiving" in raw
    finally:
        stalled.close()
    assert wait_until(lambda: proxy.server.body_budget._used == 0, 10)


def test_idle_connections_are_closed(make_proxy, monkeypatch):
    monkeypatch.setattr(cp, "KEEPALIVE_IDLE_SECONDS", 1.0)
    monkeypatch.setattr(cp, "REQUEST_READ_SECONDS", 1.0)
    proxy = make_proxy()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.server.server_address[1], timeout=10)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().read()
        assert conn.sock.recv(1) == b""          # kept-alive, then idle: closed
    finally:
        conn.close()
    # A request that never comes, or never ends, meets two deadlines at once:
    # the read's timeout closes quietly, the reaper answers 408 first.
    with socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=10) as sock:
        assert_closed_maybe_408(sock)            # a connection that never sends
    with socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert_closed_maybe_408(sock)            # headers that never end


def test_http_servers_own_errors_are_json(proxy):
    status, _, raw = http_request(proxy.base, "PROPFIND", "/v1/models")
    assert status == 501 and json.loads(raw)["error"]["message"]


def test_unknown_path_404_wrong_method_405_and_head(proxy):
    status, _, raw = http_request(proxy.base, "GET", "/v1/nothing")
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"
    status, hdrs, raw = http_request(proxy.base, "GET", "/v1/chat/completions")
    assert status == 405 and json.loads(raw)["error"]["message"]
    assert hdrs["allow"] == "POST, OPTIONS"
    assert http_request(proxy.base, "DELETE", "/models")[0] == 405
    status, hdrs, raw = http_request(proxy.base, "HEAD", "/v1/models")
    assert status == 405 and hdrs["allow"] == "GET, OPTIONS" and raw == b""


def test_body_over_max_body_gets_413(make_proxy):
    proxy = make_proxy(max_body=1000)
    status, _, raw = post_chat(proxy.base, chat_body("x" * 2000))
    assert status == 413 and json.loads(raw)["error"]["code"] == "request_too_large"
    assert post_chat(proxy.base, chat_body("small"))[0] == 200


def test_idle_and_request_timeouts_end_the_run(make_proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"deltas": ["half "]}, {"sleep": 30}])
    proxy = make_proxy(idle_timeout=0.5)
    status, _, raw = post_chat(proxy.base, chat_body())
    assert status == 504 and json.loads(raw)["error"]["code"] == "codex_idle_timeout"
    proxy = make_proxy(request_timeout=0.5, keepalive=0.1)
    status, _, raw = post_chat(proxy.base, chat_body(stream=True))
    errors = [e for e in sse_events(raw)[:-1] if "error" in e]
    assert errors[0]["error"]["code"] == "codex_request_timeout"
    assert all(fake_codex.run_ended(r) for r in fake_codex.wait_records(2))


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


def test_a_burst_with_a_stale_login_check_is_answered_without_waiting_for_it(
        make_proxy, fake_codex):
    """The 429s of a burst all arrive while the (stale) login check that the
    burst starts is still blocked: no check runs on the request path."""
    slow = fake_codex.dir / "slow-codex"
    slow.write_text(SLOW_LOGIN)
    slow.chmod(0o755)
    (fake_codex.dir / "release_login").write_text("")     # the start-up check passes
    proxy = make_proxy(codex_bin=str(slow), max_concurrent=1)
    (fake_codex.dir / "release_login").unlink()
    (fake_codex.dir / "login_check_started").unlink()
    fake_codex.scenario([{"wait_file": "go"}, {"thread": True}, {"text": "x"}, {"complete": {}}])
    proxy.server.launcher.codex.expire()
    results = []
    threads = [threading.Thread(target=lambda: results.append(post_chat(proxy.base, chat_body())))
               for _ in range(30)]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(results) >= 29, 20), len(results)
    assert all(r[0] == 429 for r in results[:29])
    assert not (fake_codex.dir / "release_login").exists()   # the check cannot have finished
    assert wait_until((fake_codex.dir / "login_check_started").exists, 10)   # but it runs
    (fake_codex.dir / "release_login").write_text("")
    (fake_codex.dir / "go").write_text("")
    for t in threads:
        t.join(20)
    assert sorted(r[0] for r in results) == [200] + [429] * 29


@pytest.mark.parametrize("ignore_term", [False, True])
def test_client_disconnect_terminates_codex(both, fake_codex, ignore_term):
    steps = [{"ignore_term": True}] if ignore_term else []
    fake_codex.scenario(("again", [{"thread": True}, {"text": "ok"}, {"complete": {}}]),
                        steps + [{"thread": True}, {"touch": "started"}, {"sleep": 60},
                                 {"text": "never"}])
    sock = open_raw_stream(both, chat_body(stream=True))
    assert b"role" in recv_until(sock, b"role")
    assert wait_until((fake_codex.dir / "started").exists, 10)      # Codex is mid-turn
    sock.close()                                                    # and the client leaves
    assert fake_codex.run_ended(fake_codex.wait_records(1)[0])
    assert wait_until(lambda: both.events("client_disconnected"), 5)
    if fake_codex.records()[0]["engine"] == "app-server":
        assert fake_codex.records()[0]["interrupted"] is True     # turn/interrupt went first
    assert post_chat(both.base, chat_body("again"))[0] == 200


def test_client_disconnect_of_a_non_streaming_request_terminates_codex(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"sleep": 60}])
    sock = socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=20)
    body = json.dumps(chat_body()).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d"
                 b"\r\n\r\n%s" % (len(body), body))
    record = fake_codex.wait_records(1)[0]
    sock.close()
    assert fake_codex.run_ended(record)


@pytest.mark.parametrize("head, body", [
    (b"Content-Length: -1\r\n", b"{}"),
    (b"Content-Length: +2\r\n", b"{}"),
    (b"Content-Length: 0x2\r\n", b"{}"),
    (b"Content-Length: 2\r\nContent-Length: 3\r\n", b"{}"),
    (b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", b"{}"),
    (b"Transfer-Encoding: gzip\r\n", b"{}"),
    (b"Transfer-Encoding: chunked, identity\r\n", b"{}"),
    (b"Transfer-Encoding: chunked\r\n", b"-1\r\n{}\r\n0\r\n\r\n"),
    (b"Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n"),
    (b"Transfer-Encoding: chunked\r\n", b"1\r\n{}\r\n0\r\n\r\n"),
    (b"Transfer-Encoding: chunked\r\n", b"ffffffffff\r\n{}\r\n0\r\n\r\n"),
])
def test_bad_framing_gets_400_and_the_connection_closes(proxy, head, body):
    raw = raw_exchange(proxy.base, request_bytes(head, body), timeout=10)
    assert raw.startswith(b"HTTP/1.1 400") and b"connection: close" in raw.lower()
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1].split(b"\r\n\r\n")[0] or b"{}")["error"]
    assert http_request(proxy.base, "GET", "/health")[0] == 200


def test_a_body_that_would_parse_into_too_many_values_is_refused_unparsed(proxy, fake_codex):
    lists = b'{"model": "m", "metadata": {"x": [' + b",".join([b"[]"] * 300000) + b']}}'
    status, _, raw = post_chat(proxy.base, lists)
    error = json.loads(raw)["error"]
    assert status == 413 and str(cp.MAX_JSON_VALUES) in error["message"]
    commas = chat_body("a," * 300000)                  # commas inside a string are text
    assert post_chat(proxy.base, commas)[0] == 200
    assert cp.json_values(json.dumps(commas).encode()) < 20


def test_the_limits_readme_states_hold(proxy, fake_codex):
    many = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 5001
    status, _, raw = post_chat(proxy.base, {"model": "m", "messages": many})
    assert status == 400 and json.loads(raw)["error"]["code"] == "too_many_messages"
    long_history = [{"role": "user", "content": "x" * 500000},
                    {"role": "assistant", "content": "y" * 500000}] * 5
    status, _, raw = post_chat(proxy.base, {"model": "m", "messages": long_history + [
        {"role": "user", "content": "short question"}]})
    assert status == 400 and "4194304" in json.loads(raw)["error"]["message"]
    fine = long_history[:4] + [{"role": "user", "content": "short question"}]
    assert post_chat(proxy.base, {"model": "m", "messages": fine})[0] == 200   # 2 MB history
    readme = open(os.path.join(HERE, "README.md")).read()
    for figure in ("16 MiB", "250,000 JSON values", "10,000 messages", "4 MiB",
                   "1 MiB"):
        assert figure in readme, figure


def test_a_chunked_body_is_read(proxy, fake_codex):
    data = json.dumps(chat_body("chunked hello")).encode()
    body = b"%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (len(data), data)
    raw = raw_exchange(proxy.base, request_bytes(b"Transfer-Encoding: chunked\r\n"
                                                 b"Content-Type: application/json\r\n", body),
                       half_close=False)
    assert raw.startswith(b"HTTP/1.1 200") and b"fake answer" in raw
    assert fake_codex.wait_records(1)[0]["prompt"] == "chunked hello"


@pytest.mark.parametrize("first", [
    request_bytes(b"Content-Length: 8\r\n", b'{"a": 1}', path=b"/v1/nothing"),
    request_bytes(b"Content-Length: 8\r\n", b'{"a": 1}', path=b"/v1/models", method=b"DELETE"),
    request_bytes(b"Content-Length: 8\r\n", b'{"a": 1}', path=b"/v1/responses", method=b"PUT"),
    request_bytes(b"Content-Length: 8\r\n", b'{"a": 1}', path=b"/v1/models", method=b"GET"),
    request_bytes(b"Content-Length: 9\r\nOrigin: https://evil.example\r\n", b'{"a": 1}x'),
])
def test_an_early_error_leaves_the_connection_usable(proxy, first):
    body = json.dumps(chat_body("second")).encode()
    second = request_bytes(b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
                           body)
    sock = socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=10)
    try:
        sock.sendall(first)
        answer = recv_response(sock)
        assert answer.split(b" ")[1] in (b"200", b"403", b"404", b"405")
        sock.sendall(second)
        answer = recv_response(sock)
        assert answer.startswith(b"HTTP/1.1 200") and b"fake answer" in answer
    finally:
        sock.close()


def test_hostile_requests_get_4xx_never_5xx_and_the_proxy_stays_up(make_proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"text": "ok"}, {"complete": {}}])
    proxy = make_proxy(max_body=4096)
    tried, statuses, hangs = fuzz(proxy.base, seed=8, count=300)
    assert tried == 300 and hangs == 0
    assert all(400 <= s < 500 or s == 200 for s in statuses), statuses     # each one answered
    assert http_request(proxy.base, "GET", "/health")[0] == 200
    assert post_chat(proxy.base, chat_body())[0] == 200


def test_a_flood_of_idle_connections_does_not_stop_chat(make_proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"sleep": 1.0}, {"text": "slow hello"},
                         {"complete": {}}])
    proxy = make_proxy(max_connections=1000)
    socks = []
    try:
        for _ in range(1100):
            socks.append(socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=10))
        status, _, raw = post_chat(proxy.base, chat_body())
        assert status == 200 and b"slow hello" in raw
        assert http_request(proxy.base, "GET", "/health")[0] == 200
    finally:
        for sock in socks:
            sock.close()


def test_past_the_connection_cap_with_none_idle_a_newcomer_gets_503(make_proxy):
    proxy = make_proxy(max_connections=2)
    streams = []
    try:
        for _ in range(2):          # two busy connections: log tails
            sock = socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=10)
            sock.sendall(b"GET /logs/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert b"connected" in recv_until(sock, b"connected")
            streams.append(sock)
        raw = raw_exchange(proxy.base, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 503") and b"too_many_connections" in raw
    finally:
        for sock in streams:
            sock.close()
    assert wait_until(lambda: http_request(proxy.base, "GET", "/health")[0] == 200, 10)


def test_running_out_of_descriptors_closes_idle_connections_instead_of_failing(fake_codex,
                                                                               tmp_path):
    """With 96 descriptors and 150 idle connections, accept() fails: the proxy
    closes idle connections to make room, and chat and /health still answer."""
    env = dict(os.environ, CODEX_HOME=str(tmp_path), CODEX_PROXY_STATE_DIR=str(tmp_path / "s"),
               CODEX_PROXY_QUIET="1", CODEX_PROXY_WARM="0", **fake_codex.env)
    proc = subprocess.Popen([sys.executable, "-c", LOW_FD_PROXY, PROXY_SCRIPT,
                             "--addr", "127.0.0.1:0", "--codex-bin", str(fake_codex.script)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    socks = []
    try:
        base = re.search(r"listening on (http://\S+)", read_banner(proc)[0]).group(1)
        for _ in range(150):
            socks.append(socket.create_connection(("127.0.0.1", port_of(base)), timeout=10))
        assert wait_until(lambda: http_request(base, "GET", "/health", timeout=5)[0] == 200, 20)
        status, _, raw = post_chat(base, chat_body())
        assert status == 200 and b"fake answer" in raw
    finally:
        for sock in socks:
            sock.close()
        stop_process(proc)
    assert proc.returncode == 0
    assert wait_until(lambda: not any(pid_alive(p) for p in fake_codex.pids()), 10)


def test_connections_leave_descriptors_for_codex():
    config = cp.Config(max_connections=1000, max_concurrent=4, max_parked=16,
                       codex_processes=2)
    assert cp.connection_budget(config, soft_limit=20000) == 1000
    assert cp.connection_budget(config, soft_limit=1024) == 1024 - 32 - 4 * 22
    assert cp.connection_budget(config, soft_limit=96) == 8


@pytest.mark.parametrize("phase", ["head", "body"])
def test_a_trickled_request_is_cut_whole_not_per_read(make_proxy, monkeypatch, phase):
    monkeypatch.setattr(cp, "REQUEST_READ_SECONDS", 1.0)
    monkeypatch.setattr(cp, "BODY_READ_SECONDS", 1.0)
    proxy = make_proxy()
    body = json.dumps(chat_body("x" * 2000)).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n" \
        b"X-Slow: " % len(body) + b"a" * 200 + b"\r\n\r\n"
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=10) as sock:
        if phase == "body":
            sock.sendall(head)
            seen = trickle(sock, body, 0.05, 8)
        else:
            seen = trickle(sock, head, 0.05, 8)
    assert seen.startswith(b"HTTP/1.1 408") and b"request_timeout" in seen, seen
    assert time.monotonic() - started < 5            # one deadline, not one per byte
    assert proxy.wait_event("request_rejected")[0]["status"] == 408


def test_a_kept_alive_connections_next_request_has_the_same_deadline(make_proxy,
                                                                     monkeypatch):
    monkeypatch.setattr(cp, "REQUEST_READ_SECONDS", 1.0)
    proxy = make_proxy()
    with socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert recv_response(sock).startswith(b"HTTP/1.1 200")
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 400 + b"\r\n\r\n"
        seen = trickle(sock, head, 0.05, 8)             # the second one trickles
    assert seen.startswith(b"HTTP/1.1 408"), seen


def test_a_body_is_held_to_its_average_rate_not_to_each_pause(make_proxy, fake_codex,
                                                               monkeypatch):
    """Past BODY_READ_SECONDS a body must keep up BODY_FLOOR_RATE on average:
    a pause longer than that is fine when what came before covers it."""
    monkeypatch.setattr(cp, "BODY_READ_SECONDS", 0.5)
    monkeypatch.setattr(cp, "BODY_FLOOR_RATE", 100)
    proxy = make_proxy()
    body = json.dumps(chat_body("x" * 3000)).encode()
    with socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=20) as sock:
        sock.sendall(request_bytes(b"Content-Length: %d\r\n" % len(body), b""))
        sock.sendall(body[:2000])                       # 2000 bytes: 20 s at the floor
        assert recv_some(sock, time.monotonic() + 1.5) == b""       # a long pause: no cut
        sock.sendall(body[2000:])
        assert recv_response(sock, 20).startswith(b"HTTP/1.1 200")


def test_slow_header_connections_cannot_lock_clients_out(make_proxy, fake_codex):
    proxy = make_proxy(max_connections=20)
    slow = []
    try:
        for _ in range(25):
            sock = socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=10)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: ")
            slow.append(sock)
        answered = sum(post_chat(proxy.base, chat_body(), timeout=20)[0] == 200
                       for _ in range(5))
        assert answered == 5
    finally:
        for sock in slow:
            sock.close()


def test_bodies_in_flight_share_a_memory_budget(make_proxy, fake_codex):
    proxy = make_proxy(max_body_memory=1024 * 1024, max_body=2 * 1024 * 1024)
    stalled = []
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 600000\r\n\r\n"
    try:
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=10)
            sock.sendall(head + b"x" * 100000)          # then nothing more
            stalled.append(sock)
        assert wait_until(lambda: proxy.server.body_budget._used >= 600000, 10)
        status, headers, raw = post_chat(proxy.base, chat_body("y" * 600000))
        assert status == 503 and headers["retry-after"] and \
            json.loads(raw)["error"]["code"] == "busy_receiving"
        assert post_chat(proxy.base, chat_body())[0] == 200         # small bodies still pass
    finally:
        for sock in stalled:
            sock.close()
    assert wait_until(lambda: proxy.server.body_budget._used == 0, 10)


@pytest.mark.parametrize("line", [
    b"X-No-Colon\r\n", b"X-Space : 1\r\n", b"X-A: 1\r\n folded\r\n", b"X-Ctl: a\x01b\r\n",
    b"Content-Length: 2\x0b\r\n", b"Origin: http://localhost\r\n \r\n",
])
def test_malformed_header_lines_get_400_and_a_closed_connection(proxy, line):
    data = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + line + \
        b"X-Forwarded-For: 1.2.3.4\r\nContent-Length: 2\r\n\r\n{}"
    raw = raw_exchange(proxy.base, data)
    assert raw.startswith(b"HTTP/1.1 400") and b"Connection: close" in raw, raw
    assert b"Access-Control-Allow-Origin" not in raw


def test_expect_100_continue_comes_only_after_the_checks(make_proxy, fake_codex):
    proxy = make_proxy(api_keys=(KEY,))
    body = json.dumps(chat_body()).encode()
    for key, first in ((b"wrong", b"HTTP/1.1 401"), (KEY.encode(), b"HTTP/1.1 100 Continue")):
        with socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Authorization: Bearer " + key + b"\r\nExpect: 100-continue\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            seen = recv_until(sock, b"\r\n\r\n")
            assert seen.startswith(first), seen
            if first.endswith(b"Continue"):
                sock.sendall(body)
                assert recv_response(sock).startswith(b"HTTP/1.1 200")


def test_http_1_0_gets_a_stream_without_chunks(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"deltas": ["one ", "two"]}, {"complete": {}}])
    data = json.dumps(chat_body(stream=True)).encode()
    with socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(data) + data)
        raw = recv_until(sock, b"[DONE]")
        raw += recv_until(sock, b"never")               # then the proxy closes
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert assemble_stream(sse_events(body))["content"] == "one two"


def test_a_whole_oversized_upload_sees_the_413(make_proxy):
    proxy = make_proxy(max_body=1024 * 1024)
    request = urllib.request.Request(proxy.base + "/v1/chat/completions", method="POST",
                                     data=b"x" * (3 * 1024 * 1024),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == 413


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_reads_nothing_is_cut_and_frees_its_slot(make_proxy, fake_codex, stream):
    """It takes no byte for --send-timeout: cut, its Codex turn ended, its
    slot free again (with one slot, the next request is served)."""
    fake_codex.scenario(("next", [{"thread": True}, {"text": "served"}, {"complete": {}}]),
                        [{"thread": True}, {"deltas": ["x" * 65536] * 200}, {"complete": {}}])
    proxy = make_proxy(send_timeout=1.0, max_concurrent=1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port_of(proxy.base)))
    try:
        data = json.dumps(chat_body(stream=stream)).encode()
        sock.sendall(request_bytes(b"Content-Length: %d\r\n" % len(data), data))
        stalled = proxy.wait_event("client_stalled", timeout=30)[0]     # it never reads
        if stream:                          # cut mid-turn: the turn ends
            assert fake_codex.run_ended(fake_codex.wait_records(1)[0])
        else:                               # the turn was done: its thread stays kept
            assert len(proxy.server.turns.kept) == 1
        assert stalled["run"] and post_chat(proxy.base, chat_body("next"))[0] == 200
    finally:
        sock.close()


def test_a_non_streaming_client_that_leaves_is_noticed_while_tokens_flow(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"touch": "started"},
                         {"deltas": [f"w{n} " for n in range(400)], "pause": 0.05},
                         {"complete": {}}])
    sock = socket.create_connection(("127.0.0.1", port_of(proxy.base)), timeout=10)
    data = json.dumps(chat_body()).encode()
    sock.sendall(request_bytes(b"Content-Length: %d\r\n" % len(data), data))
    assert wait_until(lambda: (fake_codex.dir / "started").exists(), 10)
    sock.close()
    left = time.monotonic()
    assert proxy.wait_event("client_disconnected", timeout=10)
    record = fake_codex.records()[0]
    assert fake_codex.run_ended(record)
    assert time.monotonic() - left < 3


def test_every_answer_carries_the_browser_headers(make_proxy, fake_codex):
    proxy = make_proxy()
    answers = [http_request(proxy.base, "GET", "/health"),
               http_request(proxy.base, "GET", "/nothing"),
               post_chat(proxy.base, chat_body()),
               post_chat(proxy.base, chat_body(stream=True)),
               http_request(proxy.base, "POST", "/v1/messages", {"messages": 1}),
               http_request(proxy.base, "GET", "/logs", headers={"Accept": "text/html"})]
    for status, headers, _ in answers:
        assert headers["x-content-type-options"] == "nosniff", status
        assert headers["cross-origin-resource-policy"] == "same-origin", status
    page = answers[-1][1]
    assert "frame-ancestors 'none'" in page["content-security-policy"]
    assert page["x-frame-options"] == "DENY"


def test_e2e_a_client_that_leaves_releases_codex_and_nothing_is_retried(e2e):
    e2e.responder = lambda body, index: ("sleep", 60, [message_item("too late")])
    proxy = e2e.proxy()
    sock = open_raw_stream(proxy, chat_body(stream=True, model="5.5-tpg"))
    assert b"role" in recv_until(sock, b"role")
    assert wait_until(lambda: e2e.upstream.requests, 20)     # Codex is waiting upstream
    thread = proxy.wait_event("codex_forward")[0]["thread_id"]
    assert thread in loaded_threads(proxy)
    sock.close()
    assert wait_until(lambda: thread not in loaded_threads(proxy), 5)    # Codex unloaded it
    assert proxy.wait_event("client_disconnected")
    assert len(e2e.upstream.requests) == 1            # the turn is gone: no retry can follow


# ---------------------------------------------------------------------------
# Start-up, banner, command line and config
# ---------------------------------------------------------------------------

def test_the_small_toml_reader_reads_what_codex_configs_hold():
    data = cp._TomlReader(TOML_SAMPLE).parse()
    when = data.pop("when")
    assert data == TOML_EXPECTED
    assert str(when).startswith("1979-05-27")
    for bad in ('a = "unterminated', "a = [1, 2", "= 1", "a = 1 b", 'a = "\\q"'):
        with pytest.raises(cp.TomlError):
            cp._TomlReader(bad).parse()


def test_toml_values_round_trip_through_both_readers():
    value = {"a b": [1, 2.5, True], "path": "C:\\dir\\\"q\"", "nested": {"x": "y"},
             "text": "caf\u00e9 \U0001f600 tab\there\nnew \x7f \x00"}
    text = "v = " + cp.toml_value(value)
    assert cp._TomlReader(text).parse()["v"] == value
    assert cp.read_toml(text)["v"] == value


def test_user_config_additions_become_switches():
    overrides = cp.user_config_overrides({
        "mcp_servers": {"evil": {"command": "rm"}, "my server": {}},
        "notify": ["notify-send"], "developer_instructions": "be evil", "model": "x"})
    assert overrides == {"mcp_servers": {"evil": {"enabled": False},
                                         "my server": {"enabled": False}},
                         "notify": [], "developer_instructions": ""}
    assert cp.user_config_overrides({"mcp_servers": {}, "notify": None}) == {}


def test_what_the_users_config_adds_is_switched_off(make_proxy, fake_codex):
    fake_codex.write("effective_config.json", {
        "mcp_servers": {"evil": {"command": "rm", "enabled": True}},
        "notify": ["/bin/notify"], "developer_instructions": "USER TEXT", "model": "gpt-5.4"})
    proxy = make_proxy()
    post_chat(proxy.base, chat_body())
    config = fake_codex.wait_records(1)[0]["thread"]["config"]
    assert config["mcp_servers"] == {"evil": {"enabled": False}}
    assert config["notify"] == [] and config["developer_instructions"] == ""


def test_exec_forwards_config_toml_keys_and_nothing_else(make_proxy, fake_codex, tmp_path):
    (tmp_path / "home" / "config.toml").write_text(
        'model = "gpt-5.4"\nmodel_reasoning_summary = "detailed"\nservice_tier = "fast"\n'
        '[mcp_servers.evil]\ncommand = "rm"\n')
    proxy = make_proxy(engine="exec", codex_config=['model_verbosity="high"'])
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


def test_app_server_gets_extra_codex_config_on_its_command_line(make_proxy, fake_codex):
    proxy = make_proxy(codex_config=['model_verbosity="high"'])
    post_chat(proxy.base, chat_body())
    record = fake_codex.wait_records(1)[0]
    assert record["argv"][0] == "app-server"
    assert argv_config(record)["model_verbosity"] == '"high"'


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


def test_a_request_on_a_connection_that_outlived_the_server_gets_503(make_proxy):
    proxy = make_proxy()
    proxy.server.stopping.set()                 # the moment between stop and close
    status, hdrs, raw = http_request(proxy.base, "GET", "/health")
    assert status == 503 and hdrs["connection"] == "close"
    assert json.loads(raw)["error"]["code"] == "shutting_down"


def test_a_shutdown_mid_stream_is_told_as_a_shutdown(make_proxy, fake_codex):
    proxy = make_proxy()
    fake_codex.scenario([{"thread": True}, {"deltas": ["partial "]}, {"touch": "started"},
                         {"sleep": 30}])
    sock = open_raw_stream(proxy, chat_body(stream=True))
    assert wait_until(lambda: (fake_codex.dir / "started").exists(), 10)
    threading.Thread(target=proxy.stop).start()
    seen = recv_until(sock, b"0\r\n\r\n", 20)
    sock.close()
    assert b"shutting_down" in seen and b"interrupted" not in seen, seen


def test_an_unwritable_state_dir_is_named_in_the_banner_not_the_log(make_proxy, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    proxy = make_proxy(state_dir=str(blocker / "state"))
    assert wait_until(lambda: proxy.server.launcher.catalog_error, 10)
    banner = cp.banner(proxy.server)
    assert "could not be written" in banner and str(blocker) in banner
    logged = json.dumps(proxy.events())
    assert "could not be written" in logged and str(tmp_path) not in logged


def test_main_prints_a_banner_and_sigterm_ends_parked_codex(fake_codex, tmp_path):
    fake_codex.scenario(TOOL_TURN)
    proc = spawn_proxy_process(fake_codex.script, tmp_path, **fake_codex.env)
    try:
        banner = read_banner(proc)
        base = re.search(r"listening on (http://\S+)", banner[0]).group(1)
        assert banner[1].strip() == f"base URL for Cursor / OpenAI clients: {base}/v1"
        assert "codex-cli 0.0.0-fake" in banner[2] and "logged in" in banner[2]
        assert "API key: none" in banner[3]
        assert "engine: app-server" in banner[4] and "2 Codex process(es)" in banner[4]
        assert tool_round(types.SimpleNamespace(base=base),
                          [{"role": "user", "content": "x"}])[2] == "tool_calls"
        record = fake_codex.wait_records(1)[0]
        stop_process(proc)
        assert proc.returncode == 0
        pids = fake_codex.pids()
        assert record["pid"] in pids and len(pids) >= 3     # the probe, the pool's two
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), 8)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_banner_names_a_global_agents_file_and_an_unreadable_config(make_proxy, tmp_path):
    proxy = make_proxy()
    home = proxy.server.config.codex_home_dir
    assert "AGENTS" not in cp.banner(proxy.server) and "note:" not in cp.banner(proxy.server)
    with open(os.path.join(home, "AGENTS.md"), "w") as f:
        f.write("be terse")
    with open(os.path.join(home, "AGENTS.override.md"), "w") as f:
        pass                                         # empty: Codex skips it, so do we
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write("model = [unclosed\n")
    notes = [line for line in cp.banner(proxy.server).splitlines() if "note:" in line]
    assert "could not be read" in notes[0]
    assert notes[1].startswith("  note: Codex sends") and os.path.join(home, "AGENTS.md") in notes[1]


def test_an_old_python_gets_a_clear_message():
    code = ("import sys; sys.version_info = (3, 8, 10); "
            "exec(compile(open(sys.argv[1]).read(), sys.argv[1], 'exec'))")
    done = subprocess.run([sys.executable, "-c", code, PROXY_SCRIPT], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1 and "needs Python 3.9 or newer" in done.stderr


def test_the_file_is_python_39_source():
    """No syntax newer than 3.9 (CI also runs the whole suite on 3.9)."""
    import ast
    source = open(PROXY_SCRIPT).read()
    ast.parse(source, feature_version=(3, 9))
    assert "import tomllib" in source.split("except ImportError")[0]   # optional, not required


def test_bad_environment_values_are_usage_errors(monkeypatch, capsys):
    monkeypatch.setenv("CODEX_PROXY_MAX_BODY", "lots")
    with pytest.raises(SystemExit) as info:
        cp.main([])
    assert info.value.code == 2 and "--max-body" in capsys.readouterr().err


def test_help_lists_an_environment_variable_for_every_flag():
    text = cp.build_parser().format_help()
    flags = re.findall(r"^\s+(--[a-z-]+)", text, re.M)
    assert len(flags) >= 24
    for action in cp.build_parser()._actions:
        if action.help not in (None, cp.argparse.SUPPRESS) and action.option_strings != ["-h", "--help"]:
            assert "env " in action.help, action.option_strings


def test_every_flag_reads_its_variable_and_is_clamped(monkeypatch):
    for flag in cp.FLAGS:
        if flag.kind in ("int", "float") and flag.low is not None:
            monkeypatch.setenv(flag.env, "-5")
    config = cp.config_from_args(cp.build_parser().parse_args([]))
    for flag in cp.FLAGS:
        if flag.kind in ("int", "float") and flag.low is not None:
            assert getattr(config, flag.field) == flag.low * flag.scale, flag.flag
    monkeypatch.setenv("CODEX_PROXY_TOOL_QUIET_MS", "250")
    monkeypatch.setenv("CODEX_PROXY_CODEX_CONFIG", "a=1; b=2")
    monkeypatch.setenv("CODEX_PROXY_ALIASES", "fast=gpt-5.5-low")
    config = cp.config_from_args(cp.build_parser().parse_args(["--max-concurrent", "7"]))
    assert config.tool_quiet == 0.25 and config.codex_config == ("a=1", "b=2")
    assert config.aliases == {"fast": "gpt-5.5-low"} and config.max_concurrent == 7


def test_addr_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CODEX_OPENAI_PROXY_ADDR", "127.0.0.1:9")
    args = cp.build_parser().parse_args([])
    assert cp.config_from_args(args).port == 9


def test_e2e_the_users_own_mcp_servers_and_hooks_stay_off(e2e, openai_sdk, tmp_path):
    marker = tmp_path / "mcp-server-ran"
    server = tmp_path / "evil-mcp.sh"
    server.write_text(f"#!/bin/sh\ntouch '{marker}'\nexec cat\n")
    server.chmod(0o755)
    e2e.write_config(f'notify = ["{server}"]\ndeveloper_instructions = "USER DEV TEXT"\n'
                     f'[mcp_servers.evil]\ncommand = "{server}"\n'
                     '[mcp_servers."other one"]\ncommand = "/bin/false"\n')
    proxy = e2e.proxy()
    client = sdk_client(openai_sdk, proxy.base + "/v1")
    client.chat.completions.create(model="5.5-tpg", messages=[{"role": "user", "content": "hi"}])
    client.chat.completions.create(model="5.5-tpg", tools=TOOLS[:1],
                                   messages=[{"role": "user", "content": "hi"}])
    assert json.loads(http_request(proxy.base, "GET", "/health")[2])["engine"] == "app-server"
    for body in e2e.upstream.bodies():
        assert not any("mcp" in name or "evil" in name for name in tool_names(body))
        assert "USER DEV TEXT" not in json.dumps(body["input"])
    assert not proxy.events("codex_warning"), proxy.events("codex_warning")
    assert not marker.exists()


# ---------------------------------------------------------------------------
# Logs: the buffer, /logs and the log page
# ---------------------------------------------------------------------------

def test_notices_read_as_words_and_metadata_warnings_come_once():
    assert cp.notice_text("warning", {"threadId": "t", "message": "Model metadata for `x` not "
                                      "found."}) == "Model metadata for `x` not found."
    assert cp.notice_text("model/rerouted", {"threadId": "t", "fromModel": "a",
                                             "toModel": "b"}) == \
        "model/rerouted: fromModel a, toModel b"
    launcher = types.SimpleNamespace(_noted_lock=threading.Lock(), _noted=set(),
                                     ONCE=cp.CodexLauncher.ONCE)
    worth_logging = functools.partial(cp.CodexLauncher.worth_logging, launcher)
    assert worth_logging("Model metadata for `x` not found. Defaulting")
    assert not worth_logging("Model metadata for `x` not found. Defaulting")
    assert worth_logging("Model metadata for `y` not found.") and worth_logging("other") and \
        worth_logging("other")


def test_warnings_are_logged_not_shown(both, fake_codex):
    fake_codex.scenario([{"thread": True}, {"warning": "Reconnecting... 1/5"},
                         {"text": "ok"}, {"complete": {}}])
    _, _, raw = post_chat(both.base, chat_body(stream=True))
    assert b"Reconnecting" not in raw and b"ok" in raw
    messages = [e["message"] for e in both.wait_event("codex_warning")]
    assert any("Reconnecting... 1/5" in m for m in messages)


def test_every_answered_error_is_logged_without_secrets(make_proxy, fake_codex, tmp_path):
    proxy = make_proxy(api_keys=(KEY,))
    auth = {"Authorization": f"Bearer {KEY}"}
    post_chat(proxy.base, b"{bad", auth)
    http_request(proxy.base, "GET", "/v1/nothing", headers=auth)
    post_chat(proxy.base, chat_body(), {"Authorization": "Bearer nope"})
    kinds = {(e["type"], e["status"]) for e in proxy.events()
             if e["type"] in ("request_rejected", "auth_rejected")}
    assert kinds == {("request_rejected", 400), ("request_rejected", 404), ("auth_rejected", 401)}
    text = json.dumps(proxy.events())
    assert KEY not in text and "nope" not in text and str(tmp_path) not in text


def test_logs_hold_the_event_kinds_without_bodies(proxy, fake_codex):
    fake_codex.scenario([{"thread": True}, {"reasoning": "r"}, {"text": "SECRET ANSWER"},
                         {"complete": {}}])
    assert wait_until(lambda: len(proxy.server.launcher.pool) == 1, 10)
    post_chat(proxy.base, chat_body("SECRET PROMPT"))
    fake_codex.scenario([{"thread": True}, {"fail": "boom"}])
    post_chat(proxy.base, chat_body())
    proxy.wait_event("stream_codex_error")
    proxy.wait_event("cursor_response")     # logged just after its answer went out
    status, _, raw = http_request(proxy.base, "GET", "/logs?format=json")
    events = json.loads(raw)["events"]
    kinds = {e["type"] for e in events}
    assert {"incoming_request", "codex_forward", "reasoning_detected", "cursor_response",
            "stream_codex_error", "engine_selected"} <= kinds
    assert all({"seq", "ts", "type", "request_id"} <= set(e) for e in events)
    incoming = [e for e in events if e["type"] == "incoming_request"][0]
    assert incoming["model"] == "xedoc-2.5-tpg" and incoming["messages"] == 1
    assert incoming["stream"] is False and incoming["client"] == "127.0.0.1"
    forward = [e for e in events if e["type"] == "codex_forward"][0]
    assert forward["mapped_model"] == "gpt-5.2-codex" and forward["thread_id"].startswith("thread-")
    assert forward["engine"] == "app-server" and forward["warm"] is True     # a pool process
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
    conn = http.client.HTTPConnection("127.0.0.1", port_of(proxy.base), timeout=10)
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
    with open(tmp_path / "err.txt", "w+") as stream:
        logs = cp.LogBuffer(3, stream)
        logs.add("incoming_request", "req_1", model="evil\x1b[31m\nname")
        for n in range(5):
            logs.add("x", None, n=n)
        stream.seek(0)
        first = stream.readline()
    assert "\x1b" not in first and "incoming_request" in first and first.count("\n") == 1
    assert [e["n"] for e in logs.since(0)] == [2, 3, 4]      # a ring of --log-size


def test_log_lines_survive_a_stream_that_cannot_encode_them(tmp_path):
    with open(tmp_path / "err.txt", "w+", encoding="cp1252") as stream:     # as on Windows
        logs = cp.LogBuffer(3, stream)
        logs.add("incoming_request", "req_1", model="caf\u00e9 \U0001f600")
        stream.seek(0)
        assert "incoming_request req_1" in stream.read()


def test_logs_page_renders_events_live_in_a_browser(make_proxy, fake_codex, browser):
    limits = json.loads(json.dumps(LIMITS))
    limits["primary"]["resetsAt"] = int(time.time()) + 3600
    fake_codex.write("rate_limits.json", limits)
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
    forward = next(r for r in rows if r["cells"][1] == "codex_forward")
    assert "app-server" in forward["cells"][4]
    assert KEY not in json.dumps(rows)
    assert wait_until(lambda: "plan plus" in browser.js(
        "return document.getElementById('limits').textContent"), 10)
    header = browser.js("return document.getElementById('limits').textContent")
    assert "5 h: 42% used" in header and "week: 100% used" in header
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
    turn = proxy.wait_event("turn_resumed")[0]["run"]
    proxy.wait_event("cursor_response", 3)
    browser.go(proxy.base + "/logs")
    assert wait_until(lambda: [r["cells"][1] for r in browser.js(ROWS_JS)].count(
        "cursor_response") == 3, 15), json.dumps([r["cells"][1] for r in browser.js(ROWS_JS)])
    browser.js("[...document.querySelectorAll('td.run a')]"
               ".find(a => a.textContent === arguments[0]).click();", turn)
    assert wait_until(lambda: all(r["cells"][3] == turn for r in browser.js(ROWS_JS)), 5)
    rows = browser.js(ROWS_JS)
    by_request = {}
    for row in rows:                       # each request's rows keep their own order;
        by_request.setdefault(row["cells"][2], []).append(row["cells"][1])   # the two
    assert sorted(by_request.values()) == sorted([        # requests' rows may interleave
        ["conversation_started", "codex_forward", "tool_call_forwarded",      # round 1
         "cursor_response"],
        ["tool_result_received", "turn_resumed", "cursor_response"]])         # round 2
    call_row = next(r for r in rows if r["cells"][1] == "tool_call_forwarded")
    assert "read_file (call_m1)" in call_row["cells"][4] and call_row["cls"] == "tool"


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


def test_logs_page_sums_up_the_buffer_and_keeps_it_live(make_proxy, browser):
    proxy = make_proxy()
    logs = proxy.server.logs
    for n, (tokens_in, tokens_out, first) in enumerate([(100, 20, 100), (200, 30, 300),
                                                        (50, 5, 200)]):
        logs.add("incoming_request", f"req_{n}", api="chat", model="m", stream=False,
                 messages=1, tools=0, client="127.0.0.1")
        logs.add("cursor_response", f"req_{n}", run=f"run_{n}", finish_reason="stop",
                 duration_ms=first + 50, first_token_ms=first, tool_calls=0,
                 usage={"prompt_tokens": tokens_in, "completion_tokens": tokens_out})
    logs.add("tool_call_forwarded", "req_0", run="run_0", name="f", call_id="c1",
             argument_bytes=2)
    logs.add("stream_codex_error", "req_1", run="run_1", status=502, code="codex_error",
             message="boom")
    browser.go(proxy.base + "/logs")
    assert wait_until(lambda: page_text(browser, "s-requests") == "3", 15)
    assert page_text(browser, "s-errors") == "1" and page_text(browser, "s-tools") == "1"
    assert page_text(browser, "s-tokens-in") == "350" and page_text(browser, "s-tokens-out") == "55"
    assert page_text(browser, "s-p50") == "200 ms" and page_text(browser, "s-p95") == "300 ms"
    text = page_text(browser, "summary")
    assert "requests 3" in text and "errors 1" in text and "350 in / 55 out" in text
    logs.add("incoming_request", "req_9", api="messages", model="claude-x", stream=True,
             messages=2, tools=0, client="127.0.0.1")                  # live, as it comes
    assert wait_until(lambda: page_text(browser, "s-requests") == "4", 10)
    assert wait_until(lambda: "Codex processes 1 (threads 0)" in page_text(browser, "s-codex"), 10)
    assert "conversations 0" in page_text(browser, "s-codex")
    assert "stored 0 (0.0 MiB)" in page_text(browser, "s-codex")


def test_logs_page_draws_a_tool_round_trip_as_a_timeline(make_proxy, fake_codex, browser):
    proxy = make_proxy()
    fake_codex.scenario(TOOL_TURN)
    messages = [{"role": "user", "content": "read a.py"}]
    _, message, _, _ = tool_round(proxy, messages)
    assert tool_round(proxy, messages + [message, *results_for(message)])[2] == "stop"
    turn = proxy.wait_event("turn_resumed")[0]["run"]
    proxy.wait_event("cursor_response", 2)
    browser.go(proxy.base + "/logs")
    assert wait_until(lambda: page_text(browser, "s-requests") == "2", 15)
    browser.js("[...document.querySelectorAll('td.run a')]"
               ".find(a => a.textContent === arguments[0]).click();", turn)
    assert wait_until(lambda: browser.js(
        "return document.querySelectorAll('#timeline .round').length") == 2, 5)
    steps = browser.js("return [...document.querySelectorAll('#timeline .steps')]"
                       ".map(s => s.textContent)")
    assert "Codex starts" in steps[0] and "first token" in steps[0]
    assert "tool call out read_file" in steps[0] and "end (tool_calls)" in steps[0]
    assert "result back call_m1" in steps[1] and "end (stop)" in steps[1]
    assert re.search(r"\+\d+ ms", steps[1])                  # durations are printed
    marks = browser.js("return document.querySelectorAll('#timeline .mark').length")
    assert marks >= 6


def test_logs_page_collapses_a_repeated_warning_into_one_row(make_proxy, fake_codex, browser):
    proxy = make_proxy()
    fake_codex.scenario([{"thread": True}] + [{"notice": "The model was rerouted."}] * 3 +
                        [{"text": "ok"}, {"complete": {}}])
    assert post_chat(proxy.base, chat_body())[0] == 200
    proxy.wait_event("codex_warning", 3)
    assert not [e for e in proxy.events("codex_warning")
                if e["message"].startswith("{") or '\\"' in e["message"]]
    browser.go(proxy.base + "/logs")
    assert wait_until(lambda: [r for r in browser.js(ROWS_JS)
                               if r["cells"][1] == "codex_warning"], 15)
    warnings = [r for r in browser.js(ROWS_JS) if r["cells"][1] == "codex_warning"]
    assert len(warnings) == 1 and warnings[0]["cells"][4] == "×3 The model was rerouted."


def test_opening_the_logs_page_logs_no_error_of_its_own(make_proxy, browser):
    proxy = make_proxy()
    browser.go(proxy.base + "/logs")
    assert wait_until(lambda: page_text(browser, "status") == "live", 15)
    assert http_request(proxy.base, "GET", "/favicon.ico")[0] == 204
    assert browser.js("return document.querySelector('link[rel=icon]').href"
                      ).startswith("data:image/png;base64,")
    events = json.loads(http_request(proxy.base, "GET", "/logs?format=json")[2])["events"]
    assert not [e for e in events if e["type"] in ("request_rejected", "auth_rejected")]


def test_logs_page_draws_the_last_300_rows_of_a_full_buffer_and_live_ones(make_proxy,
                                                                           browser):
    proxy = make_proxy(log_size=2000)
    for n in range(2000):
        proxy.server.logs.add("tool_result_received", f"req_{n}", run=f"run_{n % 7}",
                              call_id=f"c{n}", result_chars=n)
    browser.go(proxy.base + "/logs")
    assert wait_until(lambda: "of 2000 events" in page_text(browser, "count"), 20)
    assert browser.js("return document.querySelectorAll('#rows tr').length") == 300
    for n in range(60):                                 # more come in while it is open
        proxy.server.logs.add("tool_result_received", f"req_live_{n}", call_id="c",
                              result_chars=1)
    assert wait_until(lambda: browser.js(ROWS_JS)[-1]["cells"][2] == "req_live_59", 10)
    assert browser.js("return document.querySelectorAll('#rows tr').length") == 300
    browser.js("document.getElementById('more').click()")
    assert browser.js("return document.querySelectorAll('#rows tr').length") == 600
    html = open(os.path.join(HERE, "logs.html")).read()
    assert "http://" not in html and "https://" not in html      # nothing from outside


# ---------------------------------------------------------------------------
# The code's shape: one table of APIs, flags once, docstrings
# ---------------------------------------------------------------------------

def test_a_new_api_is_one_row_plus_its_parser_and_responder(make_proxy, fake_codex):
    toy = cp.Api("toy", {"/toy": cp.TURN}, cp.ProxyError.body, parse_toy, ToyResponder)
    proxy = make_proxy(apis=cp.APIS + (toy,))
    for path in ("/toy", "/v1/toy"):
        status, _, raw = http_request(proxy.base, "POST", path, {"say": "hello"})
        assert (status, raw) == (200, b"toy says: fake answer")
    assert fake_codex.wait_records(2)[-1]["turn"]["input"][0]["text"].endswith("hello")
    assert [e["api"] for e in proxy.events("incoming_request")] == ["toy", "toy"]
    status, _, raw = http_request(proxy.base, "POST", "/toy", {"say": 5})
    assert status == 400 and json.loads(raw)["error"]["param"] == "say"
    with pytest.raises(ValueError, match="two APIs serve /toy"):
        cp.route_table(cp.APIS + (toy, toy))


def test_readme_documents_every_flag_and_variable():
    """README's table is FLAGS written out: regenerate it with
    python3 -c "import codex_proxy; print(codex_proxy.flag_table())"."""
    readme = open(os.path.join(HERE, "README.md")).read()
    assert cp.flag_table() in readme
    shown = [action.option_strings[-1] for action in cp.build_parser()._actions
             if action.help not in (None, cp.argparse.SUPPRESS)
             and "--help" not in action.option_strings]
    assert shown == [f.flag for f in cp.FLAGS]
    for flag in cp.FLAGS:
        assert f"| `{flag.flag}" in readme and f"`{flag.env}" in readme, flag.flag


def test_readme_lists_every_log_event():
    readme = open(os.path.join(HERE, "README.md")).read()
    paragraph = readme[readme.index("Event types:"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    reasons = " ".join(re.findall(r"\(with the reason: ([^)]*)\)", paragraph))
    listed = set(re.findall(r"`([a-z_]+)`", paragraph)) - set(re.findall(r"`([a-z_]+)`", reasons))
    assert listed == set(cp.LOG_EVENTS)
    html = open(os.path.join(HERE, "logs.html")).read()
    assert [name for name in cp.LOG_EVENTS if name not in html] == []


def test_ci_runs_exactly_the_readme_test_command():
    readme = open(os.path.join(HERE, "README.md")).read()
    command = re.search(r"^Test it:\n\n    (.+)$", readme, re.M).group(1)
    ci = open(os.path.join(HERE, ".ci", "run")).read()
    assert re.search(r"^\s*" + re.escape(command) + r"$", ci, re.M)
    assert "3.9" in ci       # and under the oldest Python the proxy supports


# ---------------------------------------------------------------------------
# Benchmarks: python3 test_codex_proxy.py --bench    (figures, no assertions)
# Stress:     python3 test_codex_proxy.py --stress
# ---------------------------------------------------------------------------

INSTANT_CODEX = """#!/bin/sh
case "$1" in
  --version) echo "codex-cli 0.0.0-instant"; exit 0;;
  login) exit 0;;
  debug) echo '{"models": []}'; exit 0;;
  app-server) exit 2;;
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


def p50_p99(values):
    return f"p50 {ms(percentile(values, 50))}  p99 {ms(percentile(values, 99))}"


def bench_proxy_overhead(folder, count=200):
    script = folder / "instant-codex"
    script.write_text(INSTANT_CODEX)
    script.chmod(0o755)
    # The proxy runs in its own process, as a user runs it, so that the
    # benchmark's client threads do not share its interpreter lock.
    proc = spawn_proxy_process(script, folder, CODEX_PROXY_MAX_CONCURRENT="16")
    try:
        proxy = types.SimpleNamespace(base=re.search(
            r"listening on (http://\S+)", read_banner(proc)[0]).group(1))
        for concurrency in (1, 8):
            direct = direct_runs([str(script), "exec", "--json", "-"], os.environ, "hi", count,
                                 concurrency)
            print(f"instant fake codex (exec) run directly, concurrency {concurrency}: "
                  f"{p50_p99(direct)}  ({count} runs)")
            lat = timed_requests(proxy.base, chat_body(), count, concurrency)
            added50 = percentile(lat, 50) - percentile(direct, 50)
            added99 = percentile(lat, 99) - percentile(direct, 99)
            print(f"through the proxy, concurrency {concurrency}: {p50_p99(lat)}  "
                  f"-> added p50 {ms(added50)}  p99 {ms(added99)}")
        ttfb = []
        for _ in range(50):
            start = time.perf_counter()
            sock = open_raw_stream(proxy, chat_body(stream=True))
            recv_until(sock, b"role")
            ttfb.append(time.perf_counter() - start)
            recv_until(sock, b"0\r\n\r\n")
            sock.close()
        print(f"stream time to first byte: {p50_p99(ttfb)}  (50 streams)")
    finally:
        stop_process(proc)


def rss_kib(pid, field="VmRSS", source="status"):
    """Memory of a process and its descendants, in KiB (Linux): resident
    (VmRSS), or proportional (Pss, shared pages split among their users)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/{source}") as f:
                total += int(re.search(field + r":\s+(\d+)", f.read()).group(1))
        except (OSError, AttributeError):
            pass
        todo += children_of(current)
    return total


def pss_kib(pid):
    return rss_kib(pid, "Pss", "smaps_rollup")


def stream_times(proxy, body):
    """(first content, last content) seconds of one streamed answer."""
    start = time.perf_counter()
    sock = open_raw_stream(proxy, body)
    first = last = None
    seen = b""
    try:
        while b"0\r\n\r\n" not in seen:
            data = sock.recv(65536)
            if not data:
                break
            seen += data
            if b'"content":"w' in data:
                now = time.perf_counter() - start
                first = first if first is not None else now
                last = now
    finally:
        sock.close()
    return first, last


def bench_real_codex(folder, runs=20):
    codex = shutil.which("codex")
    if not codex:
        print("real Codex benchmarks skipped: codex is not on PATH")
        return
    env = E2E(folder, codex)
    try:
        proxy = env.proxy(tool_result_timeout=120)
        exec_proxy = env.proxy(tool_result_timeout=120, engine="exec")
        argv_prefix, user_config = proxy.server.launcher.check_ready()
        run = cp.ExecRun("bench", proxy.server.env, str(folder / "direct-run"))
        instructions, _, _ = cp.write_run_files(run, cp.render_instructions([], [], "auto"), [],
                                                None)
        argv = cp.codex_argv(argv_prefix, model="gpt-5.5", effort=None, user_config=user_config,
                             extra_config=[], workdir=run.workdir,
                             instructions_path=instructions, catalog=proxy.server.launcher.catalog.path)
        env.responder = lambda body, index: [message_item("ok")]
        via, direct = [], []
        for _ in range(runs):       # interleaved, so both see the same machine load
            assert wait_until(lambda: pool_ready(proxy), 20)
            via += timed_requests(proxy.base, chat_body(model="5.5-tpg"), 1, 1)
            direct += direct_runs(argv, dict(proxy.server.env), "hello", 1)
        print(f"plain request, real codex: through the proxy (app-server, warm) {p50_p99(via)}; "
              f"bare `codex exec` {p50_p99(direct)} -> p50 ratio "
              f"{percentile(via, 50) / percentile(direct, 50):.3f} (target <= 0.5; {runs} each)")
        env.responder = lambda body, index: ("drip", 0.05, WORDS, "Thinking.")
        firsts, lasts = [], []
        for _ in range(3):
            assert wait_until(lambda: pool_ready(proxy), 20)
            first, last = stream_times(proxy, chat_body(model="5.5-tpg", stream=True))
            firsts.append(first)
            lasts.append(last)
        print(f"slow answer (40 deltas over ~2 s): first content {ms(percentile(firsts, 50))}, "
              f"last content {ms(percentile(lasts, 50))} -> first/last "
              f"{percentile(firsts, 50) / percentile(lasts, 50):.3f} (target <= 0.2; p50 of 3)")
        bench_tools(env, proxy, exec_proxy, runs, percentile(direct, 50))
        bench_conversations(env)
        bench_shared_processes(env)
    finally:
        env.close()


def bench_tools(env, proxy, exec_proxy, runs, direct_p50):
    def responder(body, index):
        if any(i.get("type") == "function_call_output" for i in body["input"]):
            return ("drip", 0.0, ["w-done"], None)
        return [call_for(body, "read_file", {"path": "f.py"}, f"call_{index}")]
    env.responder = responder
    for name, target in (("app-server", proxy), ("exec", exec_proxy)):
        to_call, to_token = [], []
        for n in range(runs):
            if name == "app-server":
                assert wait_until(lambda: pool_ready(target), 20)
            messages = [{"role": "user", "content": f"read f{n}.py"}]
            start = time.perf_counter()
            _, message, finish, _ = tool_round(target, messages)
            to_call.append(time.perf_counter() - start)
            assert finish == "tool_calls"
            messages += [message, *results_for(message, "CONTENT-x")]
            start = time.perf_counter()
            sock = open_raw_stream(target, {"model": "5.5-tpg", "messages": messages,
                                            "tools": TOOLS, "stream": True})
            seen = recv_until(sock, b'"content":"w-done"', 30)
            to_token.append(time.perf_counter() - start)
            if not seen.endswith(b"0\r\n\r\n"):
                recv_until(sock, b"0\r\n\r\n")
            sock.close()
        print(f"{name}: request -> tool call {p50_p99(to_call)} (bare exec plain p50 "
              f"{ms(direct_p50)} -> ratio {percentile(to_call, 50) / direct_p50:.3f}, target "
              f"<= 0.5); tool result -> next token {p50_p99(to_token)}  ({runs} each)")
    env.responder = lambda body, index: [call_for(body, "read_file", {"path": "x"}, f"c{index}")]
    before = len(proxy.events("codex_forward"))
    for n in range(5):
        assert wait_until(lambda: pool_ready(proxy), 20)
        assert tool_round(proxy, [{"role": "user", "content": f"park {n}"}])[2] == "tool_calls"
    pids = [e["pid"] for e in proxy.events("codex_forward")[before:]]
    print(f"memory per parked turn (app-server process tree): RSS "
          f"{sum(rss_kib(p) for p in pids) / len(pids) / 1024:.1f} MiB, PSS "
          f"{sum(pss_kib(p) for p in pids) / len(pids) / 1024:.1f} MiB (5 parked)")


def bench_conversations(env, sessions=3):
    """Three-turn sessions with a tool round each, on kept threads and with
    none kept: cache keys per session, whether each upstream input extends
    the one before, turn 3's time to first token, and the memory of a kept
    conversation as its history grows."""
    import openai

    def responder(body, index):
        last = body["input"][-1]
        if last.get("type") == "function_call_output":
            return [encrypted_reasoning(index), upstream_message(f"read {index}", index)]
        if "stream now" in json.dumps(last):
            return ("drip", 0.02, ["w1 ", "w2 ", "w3"], None)
        return session_responder(body, index)
    env.responder = responder
    for label, proxy in (("kept threads", env.proxy()),
                         ("none kept", env.proxy(keep_conversations=0))):
        keys, prefixes, firsts = [], [], []
        for n in range(sessions):
            before = len(env.upstream.bodies())
            client = sdk_client(openai, proxy.base + "/v1")
            messages = [{"role": "system", "content": "You read files."}]
            chat_session(client, messages, [f"s{n}a.py", f"s{n}b.py"])
            messages.append({"role": "user", "content": "stream now"})
            assert wait_until(lambda: pool_ready(proxy), 20)
            first, _ = stream_times(proxy, {"model": "5.5-tpg", "messages": messages,
                                            "tools": TOOLS, "stream": True})
            firsts.append(first)
            bodies = env.upstream.bodies()[before:]
            keys.append(len({b["prompt_cache_key"] for b in bodies}))
            prefixes += [without_ids(b["input"][:len(a["input"])]) == without_ids(a["input"])
                         for a, b in zip(bodies, bodies[1:])]
        print(f"3-turn session, {label}: {sum(keys) / len(keys):.1f} cache keys per session "
              f"(5 upstream requests each); {sum(prefixes)} of {len(prefixes)} inputs extend "
              f"the one before; turn 3 first token {p50_p99(firsts)} ({sessions} sessions)")
    proxy = env.proxy()
    env.responder = lambda body, index: [upstream_message("ok", index)]
    for size in (2, 100, 400):
        messages = []
        for n in range(size // 2):
            messages += [{"role": "user", "content": f"question {n}: " + "x" * 400},
                         {"role": "assistant", "content": f"answer {n}: " + "y" * 400}]
        messages.append({"role": "user", "content": "last"})
        assert wait_until(lambda: pool_ready(proxy), 20)
        before = len(proxy.events("codex_forward"))
        assert post_chat(proxy.base, {"model": "5.5-tpg", "messages": messages})[0] == 200
        pid = proxy.events("codex_forward")[before]["pid"]
        print(f"kept conversation with {len(messages)} messages (~{len(messages) * 0.4:.0f} KB "
              f"of text): PSS {pss_kib(pid) / 1024:.1f} MiB, RSS {rss_kib(pid) / 1024:.1f} MiB")


def stress(folder, bodies=1000, connections=1100):
    """Fuzz and flood a proxy process on the fake codex; print what happened."""
    fake = FakeCodex(folder / "fake")
    fake.scenario([{"thread": True}, {"text": "ok"}, {"complete": {}}])
    proc = spawn_proxy_process(fake.script, folder, "--max-body", "65536", **fake.env)
    try:
        base = re.search(r"listening on (http://\S+)", read_banner(proc)[0]).group(1)
        post_chat(base, chat_body())
        before = own_rss_kib(proc.pid)
        start = time.perf_counter()
        tried, statuses, hangs = fuzz(base, seed=2026, count=bodies, deadline_seconds=600)
        errors_5xx = sum(n for s, n in statuses.items() if s >= 500)
        print(f"fuzz: {tried} hostile requests in {time.perf_counter() - start:.1f} s, "
              f"statuses {dict(sorted(statuses.items()))}, 5xx {errors_5xx}, hangs {hangs}")
        socks = []
        for _ in range(connections):
            socks.append(socket.create_connection(("127.0.0.1", port_of(base)), timeout=10))
        start = time.perf_counter()
        status, _, _ = post_chat(base, chat_body())
        health = http_request(base, "GET", "/health")[0]
        print(f"flood: {connections} idle connections open; chat {status} and /health {health} "
              f"in {ms(time.perf_counter() - start)}")
        for sock in socks:
            sock.close()
        after = own_rss_kib(proc.pid)
        print(f"proxy RSS (its own process) before {before / 1024:.1f} MiB, after "
              f"{after / 1024:.1f} MiB")
    finally:
        stop_process(proc)
    leaked = [p for p in fake.pids() if pid_alive(p)]
    print(f"leaked codex processes after shutdown: {len(leaked)}")
    stress_burst(folder / "burst")
    stress_uploads(folder / "uploads")
    stress_soak(folder / "soak")


def stress_soak(folder, total=20000, concurrency=8):
    """A long mixed run against a proxy process: chats (streamed or not) on
    an instant exec Codex, model lists, health checks and refused requests;
    the proxy's RSS every tenth of the way, to see whether it levels off."""
    codex = folder / "instant-codex"
    codex.write_text(INSTANT_CODEX)
    codex.chmod(0o755)
    folder.mkdir(exist_ok=True)
    proc = spawn_proxy_process(codex, folder, "--engine", "exec", "--max-concurrent", "16")
    try:
        base = re.search(r"listening on (http://\S+)", read_banner(proc)[0]).group(1)
        jobs = [("POST", "/v1/chat/completions", chat_body()),
                ("POST", "/v1/chat/completions", chat_body(stream=True)),
                ("POST", "/v1/responses", {"model": "m", "input": "hi", "store": False}),
                ("GET", "/v1/models", None), ("GET", "/health", None),
                ("GET", "/v1/nothing", None), ("POST", "/v1/chat/completions", {"messages": 5})]
        counts, lock, done = {}, threading.Lock(), [0]
        samples = [(0, own_rss_kib(proc.pid))]

        def worker(index):
            rng = random.Random(index)
            while True:
                with lock:
                    if done[0] >= total:
                        return
                    done[0] += 1
                    n = done[0]
                method, path, body = rng.choice(jobs)
                status = http_request(base, method, path, body, timeout=60)[0]
                with lock:
                    counts[status] = counts.get(status, 0) + 1
                    if n % (total // 10) == 0:
                        samples.append((n, own_rss_kib(proc.pid)))
        start = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(1800)
        print(f"soak: {done[0]} requests in {time.perf_counter() - start:.0f} s, statuses "
              f"{dict(sorted(counts.items()))}; proxy RSS (MiB) by requests done: " +
              ", ".join(f"{n}: {kib / 1024:.1f}" for n, kib in samples))
    finally:
        stop_process(proc)


def stress_uploads(folder, count=40, size=16 * 1024 * 1024, sent=15 * 1024 * 1024):
    """Uploads that stall near their end, against the body budget: the
    proxy's memory, and whether it still answers meanwhile."""
    fake = FakeCodex(folder / "fake")
    fake.scenario([{"thread": True}, {"text": "ok"}, {"complete": {}}])
    proc = spawn_proxy_process(fake.script, folder, **fake.env)
    socks = []
    try:
        base = re.search(r"listening on (http://\S+)", read_banner(proc)[0]).group(1)
        post_chat(base, chat_body())
        before = own_rss_kib(proc.pid)
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Length: %d\r\n\r\n" % size)
        refused = 0
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port_of(base)), timeout=30)
            sock.sendall(head)
            try:
                sock.sendall(b"x" * sent)
            except OSError:
                refused += 1                    # answered 503 and closed
            socks.append(sock)
        peak = own_rss_kib(proc.pid)
        start = time.perf_counter()
        status = post_chat(base, chat_body())[0]
        print(f"{count} uploads stalled at {sent >> 20} of {size >> 20} MiB ({refused} refused "
              f"while sending): proxy RSS {before / 1024:.0f} MiB before, {peak / 1024:.0f} MiB "
              f"with them (+{(peak - before) / 1024:.0f} MiB); a chat meanwhile: {status} in "
              f"{ms(time.perf_counter() - start)}")
    finally:
        for sock in socks:
            sock.close()
        stop_process(proc)


def own_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def stress_burst(folder, count=30):
    """30 requests at once while the login check is stale (and held back):
    how long the 429s take."""
    fake = FakeCodex(folder / "fake")
    slow = fake.dir / "slow-codex"
    slow.write_text(SLOW_LOGIN)
    slow.chmod(0o755)
    (fake.dir / "release_login").write_text("")
    (folder / "home").mkdir()
    proxy = start_proxy(cp.Config(port=0, codex_bin=str(slow), codex_home=str(folder / "home"),
                                  state_dir=str(folder / "state"), quiet=True, codex_processes=1,
                                  max_concurrent=1), fake.env)
    try:
        (fake.dir / "release_login").unlink()
        fake.scenario([{"wait_file": "go"}, {"thread": True}, {"text": "x"}, {"complete": {}}])
        proxy.server.launcher.codex.expire()
        times, lock = [], threading.Lock()

        def one():
            start = time.perf_counter()
            status = post_chat(proxy.base, chat_body())[0]
            with lock:
                times.append((status, time.perf_counter() - start))
        threads = [threading.Thread(target=one) for _ in range(count)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        wait_until(lambda: len(times) >= count - 1, 30)
        rejected = [s for s in times if s[0] == 429]
        print(f"burst of {count} with a stale login check: {len(rejected)} got 429, the last "
              f"after {ms(time.perf_counter() - start)} (the check still running: "
              f"{not (fake.dir / 'release_login').exists()})")
        (fake.dir / "release_login").write_text("")
        (fake.dir / "go").write_text("")
        for t in threads:
            t.join(30)
    finally:
        proxy.stop()


def serve_for_bench(overrides):
    """`python3 test_codex_proxy.py --serve-proxy JSON`: a proxy in its own
    process (so that its CPU is its own), with Config fields a flag does not
    reach (process_threads: the old design); prints its port, serves until
    SIGTERM."""
    server = cp.ProxyServer(cp.Config(**dict({"port": 0, "quiet": True}, **overrides)),
                            log_stream=None)
    server.start_background()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"port {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.close()


def tree_cpu(pid):
    """CPU seconds of a process, its live descendants and the ones it reaped."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15])
        except OSError:
            pass
        todo += children_of(current)
    return total / os.sysconf("SC_CLK_TCK")


def children_of(pid):
    """A process's children, whichever of its threads started them (Linux)."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return found


class BenchProxy:
    """A proxy process on the real Codex against the E2E fake upstream."""

    def __init__(self, env, **overrides):
        fields = dict(codex_bin=env.codex_path, codex_home=str(env.home),
                      state_dir=str(env.tmp_path / f"state-{id(self)}"), **overrides)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve-proxy", json.dumps(fields)],
            env=dict(os.environ, MOCK_KEY="mock-key"), stdout=subprocess.PIPE, text=True)
        self.base = f"http://127.0.0.1:{int(self.proc.stdout.readline().split()[1])}"
        assert wait_until(lambda: self.health()["codex_processes"], 30)

    def health(self):
        return json.loads(http_request(self.base, "GET", "/health")[2])

    def events(self, kind):
        raw = http_request(self.base, "GET", "/logs?format=json")[2]
        return [e for e in json.loads(raw)["events"] if e["type"] == kind]

    def codex_pss_mib(self):
        return sum(pss_kib(pid) for pid in children_of(self.proc.pid)) / 1024

    def stop(self):
        stop_process(self.proc)


def bench_shared_processes(env, conversations=40):
    """Issue 22's figures, old design (a process per conversation, 4 kept,
    one spare) beside new (threads on 2 processes, 64 kept), one run."""
    import openai
    env.responder = lambda body, index: (
        ("drip", 0.02, WORDS[:10], None) if "stream" in json.dumps(body["input"][-1])
        else [upstream_message(f"answer {index}", index)])
    designs = (("old design", dict(process_threads=1, codex_processes=1, keep_conversations=4)),
               ("new design", {}))
    for label, overrides in designs:
        proxy = BenchProxy(env, **overrides)
        try:
            client = sdk_client(openai, proxy.base + "/v1")
            talks = [[{"role": "user", "content": f"conversation {n}"}]
                     for n in range(conversations)]
            cpu = tree_cpu(proxy.proc.pid)
            for messages in talks:
                reply = client.chat.completions.create(model="5.5-tpg", messages=messages)
                messages += [reply.choices[0].message.model_dump(exclude_none=True),
                             {"role": "user", "content": "and then?"}]
            new_cpu, cpu = (tree_cpu(proxy.proc.pid) - cpu) / conversations, \
                tree_cpu(proxy.proc.pid)
            pss = proxy.codex_pss_mib()
            for messages in talks:
                client.chat.completions.create(model="5.5-tpg", messages=messages)
            next_cpu = (tree_cpu(proxy.proc.pid) - cpu) / conversations
            pids = {e["pid"] for e in proxy.events("codex_forward")}
            continued = len(proxy.events("conversation_continued"))
            firsts = []
            for n in range(8):
                time.sleep(0.5)             # the old design's spare is ready, as users meet it
                firsts.append(stream_times(proxy, chat_body(
                    f"stream {n}", model="5.5-tpg", stream=True))[0])
            print(f"{label}: {conversations} conversations of two turns: follow-ups continued "
                  f"{continued}/{conversations} ({100 * continued / conversations:.0f} %); Codex "
                  f"processes {len(pids)}; Codex PSS {pss:.0f} MiB with them kept; CPU (proxy "
                  f"and Codex) {new_cpu:.3f} s a new conversation, {next_cpu:.3f} s a continued "
                  f"turn; a new conversation's first token {p50_p99(firsts)}")
        finally:
            proxy.stop()
    bench_client_sessions(env)


def bench_client_sessions(env):
    """aider's hint and a chat UI's side requests: follow-ups continued."""
    import openai
    env.responder = lambda body, index: [upstream_message(f"answer {index}", index)]
    proxy = BenchProxy(env)
    try:
        client = sdk_client(openai, proxy.base + "/v1")
        history = [{"role": "system", "content": "Act as an expert software developer."}]
        for question in ("fix the bug", "add a test", "rename it", "document it"):
            reply = client.chat.completions.create(model="5.5-tpg", messages=history + [
                {"role": "user", "content": question + "\n\nReply in English.\n"}])
            history += [{"role": "user", "content": question},
                        reply.choices[0].message.model_dump(exclude_none=True)]
        aider = len(proxy.events("conversation_continued"))
        chat = [{"role": "user", "content": "tell me about tides"}]
        for turn in range(4):
            reply = client.chat.completions.create(model="5.5-tpg", messages=chat)
            chat += [reply.choices[0].message.model_dump(exclude_none=True),
                     {"role": "user", "content": f"and then {turn}?"}]
            for task in ("title", "tags", "follow-ups", "search query", "emoji", "summary"):
                client.chat.completions.create(model="5.5-tpg", messages=[
                    {"role": "user", "content": f"### Task: {task} for the chat ({turn})"}])
        ui = len(proxy.events("conversation_continued")) - aider
        print(f"aider-style session: {aider} of 3 follow-ups continued; chat-UI-style session "
              f"with 6 side requests a turn: {ui} of 3 follow-ups continued")
    finally:
        proxy.stop()


def peak_rss_mib(pid):
    """The high-water mark of a process's resident memory (Linux VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def stress_memory_attacks(folder):
    """Issue 23's three memory attacks on the real Codex, each on a fresh
    proxy process: the proxy's peak RSS and the largest upstream request."""
    codex = shutil.which("codex")
    if not codex:
        print("memory attacks skipped: codex is not on PATH")
        return
    env = E2E(folder, codex)
    env.responder = lambda body, index: [upstream_message("ok", index)]

    def attack(label, send):
        before = len(env.upstream.bodies())
        proxy = BenchProxy(env, max_concurrent=8)
        try:
            send(proxy)
            peak = peak_rss_mib(proxy.proc.pid)
        finally:
            proxy.stop()
        sizes = [len(json.dumps(b)) for b in env.upstream.bodies()[before:]] or [0]
        print(f"{label}: proxy peak RSS {peak:.0f} MiB; largest upstream request "
              f"{max(sizes) / 1048576:.2f} MiB")

    def signatures(proxy):
        data = json.dumps({"summary": [], "encrypted_content": "A" * (4 << 20)}).encode()
        forged = "cxp2." + base64.urlsafe_b64encode(zlib.compress(data)).decode() + ".x"
        thinking = [{"type": "thinking", "thinking": "t", "signature": forged}] * 40
        status = http_request(proxy.base, "POST", "/v1/messages", {
            "model": "m", "max_tokens": 10, "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": thinking + [{"type": "text", "text": "a"}]},
                {"role": "user", "content": "more"}]}, timeout=120)[0]
        assert status == 200, status

    def stored_reasoning(proxy):
        for n in range(16):
            status = http_request(proxy.base, "POST", "/v1/responses", {
                "model": "5.5-tpg", "store": True, "input": [
                    {"role": "user", "content": f"q{n}"},
                    {"type": "reasoning", "summary": [],
                     "encrypted_content": "E" * (14 << 20)},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "more"}]}, timeout=120)[0]
            assert status == 200, status

    def empty_lists(proxy):
        body = b'{"model": "m", "metadata": {"x": [' + b",".join([b"[]"] * 4900000) + b"]}}"
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            post_chat(proxy.base, body, timeout=120)[0])) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(150)
        assert results == [413] * 3, results
    try:
        attack("40 forged 4 MiB thinking signatures in one /v1/messages body", signatures)
        attack("16 stored responses each with a 14 MB reasoning item", stored_reasoning)
        attack("three 14.7 MB bodies of 4.9 M empty lists at once", empty_lists)
    finally:
        env.close()


if __name__ == "__main__" and sys.argv[1:2] == ["--serve-proxy"]:
    serve_for_bench(json.loads(sys.argv[2]))
elif __name__ == "__main__" and ("--bench" in sys.argv or "--stress" in sys.argv):
    import pathlib
    import tempfile
    with tempfile.TemporaryDirectory(prefix="codex-proxy-bench-") as tmp:
        base = pathlib.Path(tmp)
        for name in ("a", "b", "c"):
            (base / name).mkdir()
        if "--bench" in sys.argv:
            bench_proxy_overhead(base / "a")
            bench_real_codex(base / "b")
        if "--stress" in sys.argv:
            stress(base / "c")
            (base / "d").mkdir()
            stress_memory_attacks(base / "d")
