#!/usr/bin/env python3
"""codex-openai-proxy: the OpenAI, Anthropic and Ollama APIs on top of Codex.

Use a ChatGPT Plus/Pro subscription from any AI client: Cursor, the openai SDK,
the Agents SDK, LangChain (Chat Completions and Responses APIs), Claude Code
and the Anthropic SDKs (Messages API), JetBrains AI, Zed, Open WebUI (Ollama
API), all on one port.  Sign in once with `codex login`, then run:

    python3 codex_proxy.py            # serves http://127.0.0.1:11435/v1

The default engine is `codex app-server` (JSON-RPC on stdio): a few
long-lived processes host every conversation, each as its own Codex thread,
stream the answer token by token, take the client's tools as plain
functions, and keep the thread for the conversation's next turn.  The
fallback engine is `codex exec --json`, one process per request, whose
client tools reach the model through an MCP server that is this same file
(`--mcp-bridge`).  Either way Codex runs with every setting that leaves the
model no tool of Codex's own (no shell, no file reads, none of the user's
MCP servers), and when the model calls a client tool the call goes back to
the client as `tool_calls`; the Codex turn waits ("parks") on the unanswered
call, and the client's next request, carrying the results, resumes the same
turn.  Codex itself never runs a tool.

Standard library only, Python 3.9+.  `python3 codex_proxy.py --help` lists
every flag and its environment variable.

SECURITY: whoever can reach the proxy spends your subscription.  It listens on
loopback by default and, without a key, answers only local pages and local
Host names (browsers and DNS rebinding are real attackers) and refuses
requests that carry tunnel headers.  Before exposing it (a Cloudflare Tunnel
or ngrok for Cursor), set a key with `--api-key-file` / CODEX_PROXY_API_KEY.

One request's trip, a streamed chat whose model calls a client tool:

     1. ProxyServer accepts the connection; ConnectionTable admits it.
     2. HttpHandler reads the head strictly; a RequestBody knows the framing.
     3. ProxyHandler.dispatch: AccessPolicy.check, then the path's row of APIS.
     4. endpoint_turn: RequestBody.read_json, the row's parser
        (parse_chat_request) -> a ProxyRequest.
     5. Turns.serve: no parked run to resume (ParkedTurns.resumed_by), so
        admit: a --max-concurrent slot, then no kept thread to continue
        (KeptThreads.claim), so CodexLauncher.start_run ->
        AppServerEngine.new_run: a thread on the ProcessPool's least busy
        AppServerProcess, the history injected as items, the turn started.
     6. The row's responder (ChatResponder) opens the stream.
     7. TurnPump.pump relays the run's events (AppServerEvents makes them of
        Codex's notifications): text streams; the call arrives; when the
        model's response ends, the pump returns TurnEnd("calls").
     8. Turns.settle: the run is parked, the calls written, the slot given
        back, the stream finished (the last bytes).
     9. The client's next request carries the result: Turns.resume finds the
        parked run, the run takes the result (CodexRun.take_results), and
        6-8 again, to TurnEnd("answered"): settle keeps the thread
        (KeptThreads) for the conversation's next turn.

The sections (a map: read the trip above for the flow):

    Defaults                 fixed numbers and settings (flags: see FLAGS)
    Errors                   ProxyError and ClientGone
    The request model        ToolSpec, ToolCall, Message, ProxyRequest
    Parsing requests         JSON checks; Chat Completions, Responses
                             (web search asked in OpenAI's ways),
                             Anthropic Messages (Room: what opened thinking
                             signatures may grow to; Seal: only ours open)
                             and Ollama bodies -> ProxyRequest (pure)
    Instructions             what the model is told, search included (pure)
    Tool names               ToolNames: names Codex takes, aliases, and back
    Conversation keys        conversation_key, ThreadSettings: what a kept
                             thread has seen and was started with (pure)
    Configuration            TOML, $CODEX_HOME/config.toml, the environment
    The log                  LogEvent names, LogBuffer (/logs, stderr)
    Codex failures           Codex's errors -> ProxyError (pure)
    Processes                process trees, finding Codex, CodexInfo, the
                             Catalog (and model_facts: context windows)
    Runs                     the engine interface: CodexRun and its events,
                             Engine, RunSpec, PendingCall
    The pump                 TurnPump: one run's events -> one responder,
                             and how the turn ended (TurnEnd)
    Engine: exec             the transcript (render_prompt), ExecRun,
                             ExecEngine, the MCP bridge
    Engine: app-server       native history (history_items), JsonRpcPipe,
                             AppServerEvents, AppServerProcess, AppServerRun
                             (a thread), AppServerEngine, ProcessPool; ENGINES
    Launching Codex          RunTable, CodexLauncher: the engine choice,
                             starting runs, what failures mean, the models
    Parked, kept and stored  ParkedTurns, KeptThreads, ResponseStore, DiskStore
    Responders               one per API: Responder (the contract), Chat,
                             Responses, Messages, Ollama; error bodies
    Turns                    serve, settle (park, keep, store, release)
    Access, connections and rate limits
                             AccessPolicy, ConnectionTable, BodyBudget,
                             RateLimits (the plan's windows, and the
                             headers each dialect reads)
    HTTP                     framing (pure), RequestBody, HttpHandler
    APIs                     endpoints, the APIS table, ProxyHandler
    The server               ProxyServer: wiring and lifecycle
    Command line             FLAGS, Config, the parser, the banner, main()
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 9):
    sys.exit(f"codex_proxy.py needs Python 3.9 or newer; this is {sys.version.split()[0]}. "
             "Install a newer Python (python.org, Homebrew, winget) and run it with that.")

import argparse
import base64
import binascii
import collections
import contextlib
import dataclasses
import datetime
import errno
import functools
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import json
import os
import queue
import re
import secrets
import selectors
import shutil
import signal
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib

try:                        # Python 3.11+; older ones use read_toml() below
    import tomllib
except ImportError:         # pragma: no cover - exercised on 3.9/3.10
    tomllib = None
try:
    import sqlite3          # stored responses on disk; some Pythons are built without it
except ImportError:         # pragma: no cover - such a Python keeps them in memory
    sqlite3 = None
try:
    import resource         # POSIX only: raising the descriptor limit
except ImportError:         # pragma: no cover - Windows
    resource = None

__version__ = "0.3.0"


# ---------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------

LOGIN_CACHE_SECONDS = 30.0
KILL_GRACE_SECONDS = 2.0
SHUTDOWN_ANSWER_SECONDS = 5.0      # at a shutdown, requests may say so this long before closing
POLL_SECONDS = 0.25                # how often a waiting handler looks around
CLIENT_LOOK_SECONDS = 0.5          # how often a turn checks that its client is still there
REQUEST_READ_SECONDS = 30.0        # a request's line and headers must arrive within this, in all
BODY_READ_SECONDS = 30.0           # a body gets this long, then must keep up BODY_FLOOR_RATE
BODY_FLOOR_RATE = 64 * 1024        # bytes per second, on average, a slow upload must keep up
DRAIN_LIMIT = 64 * 1024            # an unread body this small is read and dropped
LINGER_SECONDS = 10.0              # after an early answer, how long a client may still send
MAX_HEADER_LINES = 100
KEEPALIVE_IDLE_SECONDS = 60.0      # a kept-alive connection may wait this long for its next request
PROCESS_RECYCLE_THREADS = 1000     # an app-server process that hosted this many threads retires
PROCESS_RECYCLE_BYTES = 2 << 30    # ... or that grew to this much resident memory
INJECT_BATCH_BYTES = 256 * 1024    # a long history goes in batches, so one never holds the pipe
APP_SERVER_START_SECONDS = 30.0    # initialize must answer within this
RPC_SECONDS = 30.0                 # thread/start, turn/start... must answer within this
EXIT_NOTICE_SECONDS = 5.0          # a child whose stdin broke is seen to exit within this
MAX_INPUT_CHARS = 1048576          # Codex refuses a turn input longer than this
MAX_CONVERSATION_CHARS = 4 << 20   # all a conversation's text: past any model's context
MAX_MESSAGES = 10000               # messages in one request's history
MAX_JSON_VALUES = 250000           # values one body may hold: parsing makes an object of each
PARSED_VALUE_BYTES = 120           # about what one parsed value costs (the body budget counts it)
MAX_JSON_DEPTH = 64
MAX_STOP_SEQUENCES = 4
RESPONSES_KEPT = 256               # responses kept in memory, when not on disk
RESPONSES_TTL_SECONDS = 3600.0     # ... and for this long
RESPONSES_KEPT_BYTES = 64 * 1024 * 1024    # ... and in this many bytes, all they hold
STORE_DAYS = 30                    # stored responses on disk live this long, as OpenAI's
ONE_SHOT_GRACE = 120.0             # a kept one-shot this fresh yields to older ones (see KeptThreads)
MCP_PROTOCOL_VERSION = "2025-06-18"
OLLAMA_VERSION = "0.13.0"          # what /api/version says: clients check for a recent Ollama
INSTALL_HINT = "npm install -g @openai/codex"
EFFORTS = ("minimal", "low", "medium", "high", "xhigh")
SUMMARIES = ("auto", "concise", "detailed", "none")
# Any copy of one of these, even empty, means the request came through a tunnel
# or a proxy: without a key such requests are refused.
TUNNEL_HEADERS = ("forwarded", "x-real-ip", "cdn-loop", "true-client-ip", "via",
                  "x-client-ip", "fastly-client-ip", "x-cluster-client-ip",
                  "x-original-forwarded-for", "x-vercel-forwarded-for", "x-azure-clientip")
# Cloudflare (cf-connecting-ip, cf-ray...), Fly (fly-client-ip...), Tailscale
# Funnel and Serve (tailscale-funnel-request, tailscale-user-login...), ngrok,
# Railway (x-railway-edge...), Render (rndr-id), Envoy-based gateways.
TUNNEL_HEADER_PREFIXES = ("x-forwarded-", "cf-", "fly-", "tailscale-", "ngrok-", "x-railway-",
                          "rndr-", "x-envoy-")
# Request headers a browser page may send (CORS preflight); never echoed blindly.
CORS_HEADERS = ("authorization", "content-type", "api-key", "x-api-key", "openai-organization",
                "openai-project", "openai-beta", "accept", "cache-control")
CORS_HEADER_PREFIXES = ("x-stainless-", "anthropic-")
# Keys of $CODEX_HOME/config.toml that still apply although `codex exec` runs
# with --ignore-user-config (which keeps the user's own MCP servers off the host).
FORWARDED_CONFIG_KEYS = ("model", "model_provider", "model_providers",
                         "model_reasoning_effort", "model_reasoning_summary",
                         "model_verbosity", "service_tier")
# Together these leave the model no tool of Codex's that runs or reads
# anything on the host (the exec engine; checked against the real CLI).
FORWARDER_FLAGS = (
    "--json", "-s", "read-only", "--skip-git-repo-check", "--ephemeral",
    "--ignore-user-config",
    "--disable", "shell_tool", "--disable", "view_image", "--disable", "goals",
    "--disable", "apps", "--disable", "plugins",
    "-c", 'web_search="disabled"', "-c", "agents.enabled=false",
    "-c", "tools.experimental_request_user_input.enabled=false",
    "-c", "include_environment_context=false",
    "-c", "include_permissions_instructions=false",
    "-c", "skills.include_instructions=false", "-c", "project_doc_max_bytes=0",
)
# The same settings for an app-server thread, plus the
# features that could run or read something on the host or add to the prompt
# on their own (hooks, memories, notify commands...).  app-server reads the
# user's config.toml: what it adds on top (MCP servers, notify, developer
# instructions) is switched off per thread from what `config/read` reports.
FORWARDER_THREAD_CONFIG = {
    "features.shell_tool": False, "features.view_image": False, "features.goals": False,
    "features.apps": False, "features.plugins": False, "features.hooks": False,
    "features.memories": False, "features.shell_snapshot": False,
    "features.unified_exec": False, "features.multi_agent": False,
    "features.image_generation": False, "features.tool_suggest": False,
    "features.sleep_tool": False, "features.computer_use": False,
    "features.browser_use": False,
    "web_search": "disabled", "agents.enabled": False,
    "tools.experimental_request_user_input.enabled": False,
    "include_environment_context": False, "include_permissions_instructions": False,
    "skills.include_instructions": False, "project_doc_max_bytes": 0,
}
INSTRUCTIONS_PREAMBLE = (
    "You are a model answering a client application through an API. Reply to "
    "the conversation you are given. You have no tools except those the "
    "client declares in this request, if any: you cannot run commands or read "
    "files yourself. When you need a declared tool, call it and wait for its "
    "result."
)

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class ProxyError(Exception):
    """Every failure a client sees: an HTTP status, an error type and code,
    and the message.  The body is written in the shape of the API the
    request came through (OpenAI's `body()`, anthropic_error, ollama_error;
    see Api.errors)."""

    def __init__(self, status, message, type="invalid_request_error",
                 code=None, param=None, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self):
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


# SDKs (openai, anthropic) and Claude Code retry 5xx and even 401: not these,
# whose retry would only spend the plan's quota again or fail again.
NO_RETRY = {"x-should-retry": "false"}


def bad_request(message, param=None, code=None):
    return ProxyError(400, message, "invalid_request_error", code, param)


class ClientGone(Exception):
    """The HTTP client closed its connection."""


DISCONNECT_ERRORS = (BrokenPipeError, ConnectionResetError,
                     ConnectionAbortedError, ClientGone)

# ---------------------------------------------------------------------------
# The request model (pure): every API parses into these
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ToolSpec:
    """A tool the client declared.  `custom` tools take one raw string; a
    Responses `namespace` tool's children carry the namespace's name."""
    name: str
    description: str = ""
    parameters: dict = dataclasses.field(default_factory=dict)
    custom: bool = False
    namespace: str | None = None


@dataclasses.dataclass
class ToolCall:
    id: str
    name: str               # the client's name (never an alias)
    arguments: str          # as the client sees it: JSON, or raw text for custom
    custom: bool = False
    namespace: str | None = None


@dataclasses.dataclass
class Message:
    role: str               # system | user | assistant | tool
    text: str = ""
    tool_calls: list = dataclasses.field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    images: list = dataclasses.field(default_factory=list)   # data: URLs
    # assistant: reasoning items a Responses client sent back, each with the
    # encrypted_content that gives the model its own reasoning again
    reasoning: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ProxyRequest:
    """One request, whichever API it came through."""
    model: str | None               # exactly as the client sent it
    messages: list
    api: str = ""                   # the name of the API (the row of APIS) it came through
    made_up_ids: bool = False       # its call ids were made up here (the client drops them)
    notes: list = dataclasses.field(default_factory=list)   # what the log should say of it
    stream: bool = False
    include_usage: bool = False
    tools: list = dataclasses.field(default_factory=list)
    tool_choice: object = "auto"
    reasoning_effort: str | None = None
    reasoning_summary: str | None = None
    parallel_tool_calls: bool = True
    output_schema: dict | None = None   # strict JSON schema the answer must follow
    output_instruction: str = ""        # what the model is told instead, when not strict
    output_note: str = ""               # for the log: how the format was honoured
    stop: list = dataclasses.field(default_factory=list)
    store: bool = True
    ignored_tools: list = dataclasses.field(default_factory=list)   # hosted: no client side
    web_search: dict | None = None  # the hosted search asked for: web_search_config()
    echo: dict = dataclasses.field(default_factory=dict)   # fields a Response repeats

    def images(self):
        return [url for m in self.messages for url in m.images]

    def history_ids(self):
        return {c.id for m in self.messages for c in m.tool_calls}

    def fingerprint(self):
        """What a parked turn must share with a request that resumes it: the
        system text and the tools (a handoff to another agent changes them)."""
        data = json.dumps([[m.text for m in self.messages if m.role == "system"],
                           [dataclasses.astuple(t) for t in self.tools]],
                          sort_keys=True, default=str, ensure_ascii=False)
        return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Parsing requests (pure): JSON, fields, tools, Chat Completions, Responses
# ---------------------------------------------------------------------------

SURROGATE = re.compile("[\ud800-\udfff]")


def too_deep(max_depth):
    return bad_request(f"the request body is nested deeper than {max_depth} levels",
                       code="too_deep")


def check_json_value(value, max_depth=MAX_JSON_DEPTH):
    """Refuse JSON nested deeper than max_depth or holding text that cannot be
    encoded (lone surrogates); iterative, so hostile input cannot recurse."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                raise bad_request("the request holds text that is not valid Unicode "
                                  "(a lone surrogate); send UTF-8 text", code="invalid_text")
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > max_depth:
            raise too_deep(max_depth)
        if isinstance(item, dict):
            stack.extend((k, depth) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        else:
            stack.extend((v, depth + 1) for v in item)


def parse_json_body(data):
    try:
        value = json.loads(data or b"null")
    except RecursionError:
        raise too_deep(MAX_JSON_DEPTH)
    except ValueError as exc:
        raise bad_request(f"request body is not valid JSON: {str(exc)[:200]}")
    check_json_value(value)
    return value


def field(body, key, kinds, where=None, default=None):
    """body[key] if it has one of `kinds` (None allowed); else a clear 400."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join({str: "a string", bool: "a boolean", int: "an integer",
                             float: "a number", list: "a list", dict: "an object"}[k]
                            for k in kinds)
        raise bad_request(f"{where or key} must be {names}", key)
    return value


def objects(values, name, param):
    """(where, value) for each entry of a list that must hold objects."""
    for n, value in enumerate(values):
        where = f"{name}[{n}]"
        if not isinstance(value, dict):
            raise bad_request(f"{where} must be an object", param)
        yield where, value


def image_url_of(part, where):
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if part.get("file_id") is not None and url is None:
        raise bad_request("image file_id is not supported; send the image inline as a "
                          "base64 data: URL", where)
    if not isinstance(url, str) or not url.startswith("data:"):
        raise bad_request("only data: image URLs are supported (Codex cannot fetch "
                          "remote images); send the image inline as base64", where)
    if not re.match(r"data:image/[a-zA-Z0-9.+-]+;base64,", url):
        raise bad_request("an image must be a data:image/...;base64, URL", where)
    return url


def content_to_text(content, images=None, where="content"):
    """Flatten a message content (string, null or list of parts) to text.

    Image parts with data: URLs are appended to `images` (None: images are
    not allowed here) and leave a placeholder in the text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string, null or a list of parts")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise bad_request(f"{where} parts must be objects")
        kind = part.get("type")
        if kind in ("image_url", "input_image"):
            url = image_url_of(part, where)
            if images is None:
                raise bad_request(f"images are only accepted in user messages ({where})")
            images.append(url)
            texts.append(f"[image #{len(images)}]")
        elif kind in ("input_file", "file", "input_audio"):
            raise bad_request(f"{kind} parts are not supported; send text or images", where)
        elif "text" in part:
            texts.append(field(part, "text", (str,), f"{where} text"))
        elif "refusal" in part:
            texts.append(field(part, "refusal", (str,), f"{where} refusal"))
        elif "content" in part:
            texts.append(content_to_text(part["content"], images, where))
    return "\n".join(t for t in texts if t)


HOSTED_TOOLS = ("web_search", "web_search_preview", "file_search", "code_interpreter",
                "computer_use_preview", "computer_use", "image_generation", "mcp",
                "local_shell", "tool_search")


def tool_spec(tool, where, namespace=None):
    """One declared tool (Chat, flat Responses or custom form) -> [ToolSpec]:
    one, or a namespace's children, or none for a hosted tool (web_search...),
    which has no client side (the request's log names it)."""
    if not isinstance(tool, dict):
        raise bad_request(f"{where} must be an object", "tools")
    kind = field(tool, "type", (str,), f"{where}.type", "function")
    if kind == "namespace" and namespace is None:
        name = tool_name(tool.get("name"), where)
        children = field(tool, "tools", (list,), f"{where}.tools", [])
        return [spec for n, child in enumerate(children)
                for spec in tool_spec(child, f"{where}.tools[{n}]", name)]
    if kind not in ("function", "custom"):
        if kind in HOSTED_TOOLS and namespace is None:
            return []
        raise bad_request(f"{where} has type {kind!r}, which has no client side here; "
                          "send function or custom tools", "tools")
    fn = tool.get("function") if tool.get("function") is not None else tool
    if not isinstance(fn, dict):
        raise bad_request(f"{where}.function must be an object", "tools")
    name = tool_name(fn.get("name"), where)
    description = field(fn, "description", (str,), f"{where}.description", "")
    if kind == "custom":
        fmt = tool.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "grammar":
            description += ("\n\nThe `input` must follow this "
                            f"{field(fmt, 'syntax', (str,), 'format.syntax', '')} grammar:\n"
                            f"{field(fmt, 'definition', (str,), 'format.definition', '')}")
        return [ToolSpec(name, description.strip(), {
            "type": "object",
            "properties": {"input": {"type": "string", "description":
                                     "The raw input text for this tool."}},
            "required": ["input"], "additionalProperties": False}, custom=True,
            namespace=namespace)]
    params = field(fn, "parameters", (dict,), f"{where}.parameters")
    if not params or params.get("type") != "object":
        params = {"type": "object", "properties": {}}
    check_schema(params, f"{where}.parameters", "tools")
    return [ToolSpec(name, description, params, namespace=namespace)]


def tool_name(name, where):
    if not isinstance(name, str) or not name.strip() or len(name) > 256:
        raise bad_request(f"{where} needs a name: a non-empty string of at most 256 "
                          "characters", "tools")
    return name


def hosted_tools(tools):
    """The hosted tools a request declares that the proxy cannot offer (all
    but web search): they have no client side, so the model is not offered
    them, and the log names them."""
    return [t.get("type") for t in tools or [] if isinstance(t, dict) and
            t.get("type") in HOSTED_TOOLS and t.get("type") not in WEB_SEARCH_TOOLS]


WEB_SEARCH_TOOLS = ("web_search", "web_search_preview")
SEARCH_SIZES = ("low", "medium", "high")
LOCATION_KEYS = ("country", "region", "city", "timezone")


def web_search_config(where, context_size=None, location=None, domains=None, max_uses=None,
                      required=False):
    """A request's hosted web search, checked -> what Codex's thread config
    takes (tools.web_search: context_size, location, allowed_domains), and
    what the proxy enforces itself (max_uses, required)."""
    if context_size is not None and context_size not in SEARCH_SIZES:
        raise bad_request(f"{where}: search_context_size must be low, medium or high", where)
    location = location if location is not None else {}
    if not isinstance(location, dict) or not all(
            isinstance(location.get(k), (str, type(None))) for k in LOCATION_KEYS):
        raise bad_request(f"{where}: user_location must be an object of strings "
                          "(country, region, city, timezone)", where)
    if domains is not None and not (isinstance(domains, list) and len(domains) <= 100 and
                                    all(isinstance(d, str) and d for d in domains)):
        raise bad_request(f"{where}: allowed_domains must be a list of up to 100 domain names",
                          where)
    if max_uses is not None and (type(max_uses) is not int or max_uses < 1):
        raise bad_request(f"{where}: max_uses must be a whole number of at least 1", where)
    config = {"mode": "live", "context_size": context_size, "max_uses": max_uses,
              "required": required, "allowed_domains": domains,
              "location": {k: location[k] for k in LOCATION_KEYS if location.get(k)} or None}
    return {k: v for k, v in config.items() if v not in (None, False)}


def openai_web_search(tools, options=None):
    """A Responses `web_search` (or `_preview`) tool, or Chat Completions'
    `web_search_options` -> web_search_config(), or None when not asked."""
    for n, tool in enumerate(tools or []):
        if isinstance(tool, dict) and tool.get("type") in WEB_SEARCH_TOOLS:
            where = f"tools[{n}]"
            location = field(tool, "user_location", (dict,), f"{where}.user_location")
            filters = field(tool, "filters", (dict,), f"{where}.filters", {})
            return web_search_config(where, tool.get("search_context_size"), location,
                                     filters.get("allowed_domains"))
    if options is None:
        return None
    location = field(options, "user_location", (dict,), "web_search_options.user_location", {})
    inner = location.get("approximate", location)
    return web_search_config("web_search_options", options.get("search_context_size"),
                             inner if isinstance(inner, dict) else None)


def normalize_tools(tools):
    """Chat style, flat Responses style, `custom` and `namespace` tools ->
    [ToolSpec].  A name declared twice the same way is one tool; declared
    twice differently it is a 400 that names it."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request("tools must be a list", "tools")
    specs = {}
    for n, tool in enumerate(tools):
        for spec in tool_spec(tool, f"tools[{n}]"):
            key = (spec.namespace, spec.name)
            if key in specs and specs[key] != spec:
                raise bad_request(f"two different tools are named {spec.name!r}", "tools")
            specs.setdefault(key, spec)
    return list(specs.values())


SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
SCHEMA_ONES = ("items", "not", "additionalProperties", "additionalItems", "contains",
               "if", "then", "else", "propertyNames", "unevaluatedProperties")


def check_schema(schema, where, param):
    """A JSON Schema checked as data, so Codex never gets one it would choke
    on: maps of schemas are objects, lists of schemas lists, `required` a
    list of strings, `type` a string or a list of strings (400 otherwise)."""
    stack = [(schema, where)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            raise bad_request(f"{at} must be a JSON Schema object", param)
        for key in SCHEMA_MAPS:
            value = node.get(key)
            if value is not None and not isinstance(value, dict):
                raise bad_request(f"{at}.{key} must be an object of schemas", param)
            stack += [(v, f"{at}.{key}.{k}") for k, v in (value or {}).items()]
        for key in SCHEMA_LISTS:
            value = node.get(key)
            if value is not None and not isinstance(value, list):
                raise bad_request(f"{at}.{key} must be a list of schemas", param)
            stack += [(v, f"{at}.{key}[{n}]") for n, v in enumerate(value or [])]
        for key in SCHEMA_ONES:
            value = node.get(key)
            if isinstance(value, list) and key == "items":
                stack += [(v, f"{at}.items[{n}]") for n, v in enumerate(value)]
            elif value is not None:
                stack.append((value, f"{at}.{key}"))
        required = node.get("required")
        if required is not None and not (isinstance(required, list) and
                                         all(isinstance(r, str) for r in required)):
            raise bad_request(f"{at}.required must be a list of property names", param)
        kind = node.get("type")
        if kind is not None and not (isinstance(kind, str) or (
                isinstance(kind, list) and all(isinstance(k, str) for k in kind))):
            raise bad_request(f"{at}.type must be a string or a list of strings", param)


def parse_tool_choice(choice):
    """-> "auto" | "none" | "required" | {"name": NAME}."""
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise bad_request('tool_choice must be "auto", "none", "required" or a named '
                              "function", "tool_choice")
        return choice
    if isinstance(choice, dict):
        if choice.get("type") == "allowed_tools":
            mode = choice.get("mode", "auto")
            return mode if mode in ("auto", "required") else "auto"
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        if isinstance(name, str) and name:
            return {"name": name}
    raise bad_request('tool_choice must be "auto", "none", "required" or '
                      '{"type": "function", "function": {"name": ...}}', "tool_choice")


def parse_stop(stop):
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES or \
            not all(isinstance(s, str) for s in stop):
        raise bad_request(f"stop must be a string or a list of up to {MAX_STOP_SEQUENCES} "
                          "strings", "stop")
    return [s for s in stop if s]


def parse_effort(value, param):
    if value is None or value == "none":
        return None
    if value not in EFFORTS:
        raise bad_request(f"{param} must be one of {', '.join(EFFORTS)}", param)
    return value


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
INSTRUCTIONS_MESSAGE = "<instructions>"     # Message.name of a Responses `instructions`
CONTEXT_MESSAGE = "<context>"   # Message.name of a call-less output: context, not a result
THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.S)


def parse_model(body):
    model = body.get("model") or None       # "" too means Codex's default
    if model is not None and not (isinstance(model, str) and MODEL_NAME.fullmatch(model)):
        raise bad_request("model must be a name of letters, digits and . _ - : / @ +",
                          "model", "invalid_model")
    return model


def call_arguments(value):
    if isinstance(value, str):
        return value
    return json.dumps(value if value is not None else {}, ensure_ascii=False)


def parse_message(raw, index, reasoning_mode):
    """One Chat Completions message -> Message."""
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise bad_request(f"{where} must be an object", "messages")
    role = raw.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool", "function"):
        raise bad_request(f"{where}.role must be one of system, developer, "
                          f"user, assistant, tool", "messages")
    images = []
    text = content_to_text(raw.get("content"), images if role in ("user", "tool") else None,
                           where)
    msg = Message(role="system" if role == "developer" else role, text=text, images=images)
    name = field(raw, "name", (str,), f"{where}.name")
    if role == "function":      # legacy function results
        msg.role, msg.tool_call_id, msg.name = "tool", name or "", name
    elif role == "tool":
        msg.tool_call_id = raw.get("tool_call_id")
        if not isinstance(msg.tool_call_id, str) or not msg.tool_call_id:
            raise bad_request(f"{where}.tool_call_id is required", "messages")
    elif role == "assistant":
        if reasoning_mode == "think":
            msg.text = THINK_BLOCK.sub("", msg.text)
        calls = field(raw, "tool_calls", (list,), f"{where}.tool_calls", [])
        legacy = field(raw, "function_call", (dict,), f"{where}.function_call")
        if legacy is not None:
            calls = [{"id": legacy.get("name"), "function": legacy}]
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_request(f"{where}.tool_calls entries need a function "
                                  f"name", "messages")
            call_id = field(call, "id", (str,), f"{where}.tool_calls[].id", "")
            msg.tool_calls.append(ToolCall(call_id, fn["name"],
                                           call_arguments(fn.get("arguments"))))
    return msg


def parse_input_items(items, lookup=None):
    """Responses API input items -> ([Message], [ToolSpec]): a Chat-shaped
    conversation, and the tools that `additional_tools` items declare.
    `lookup(item_id)` resolves an `item_reference` to a stored output item."""
    if isinstance(items, str):
        return [Message("user", items)], []
    if not isinstance(items, list):
        raise bad_request("input must be a string or a list of items", "input")
    messages, tools = [], []
    for where, item in objects(items, "input", "input"):
        kind = field(item, "type", (str,), f"{where}.type", "message")
        if kind == "item_reference":
            item, kind = resolve_reference(item, where, lookup)
        if kind == "message":
            input_message(messages, item, where)
        elif kind in ("function_call", "custom_tool_call"):
            input_call(messages, item, kind, where)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            images = []
            output = item.get("output")
            text = output if isinstance(output, str) else content_to_text(output, images, where)
            call_id = field(item, "call_id", (str,), f"{where}.call_id")
            if call_id:
                messages.append(Message("tool", text, tool_call_id=call_id, images=images))
            else:       # context a client adds (the Codex CLI after its goal tool)
                messages.append(Message("user", "Tool output:\n" + text, images=images,
                                        name=CONTEXT_MESSAGE))
        elif kind == "reasoning":
            reasoning = reasoning_item(item, where)
            if reasoning is not None:
                last = messages[-1] if messages else None
                if last is None or last.role != "assistant" or last.text or last.tool_calls:
                    messages.append(Message("assistant"))
                messages[-1].reasoning.append(reasoning)
        elif kind == "additional_tools":       # the Codex CLI's tools, in its input
            tools += field(item, "tools", (list,), f"{where}.tools", [])
        # hosted-tool items carry nothing the model needs again
    return messages, tools


def resolve_reference(item, where, lookup):
    """An item_reference -> (the stored item it names, its type)."""
    item_id = field(item, "id", (str,), f"{where}.id")
    found = lookup(item_id) if item_id and lookup is not None else None
    if found is None:
        raise bad_request(f"{where} refers to item {item_id!r}, which this proxy does not "
                          "know (it keeps the output of responses stored in the last hour); "
                          "send the item itself", "input", "item_not_found")
    return found, found.get("type", "message")


def input_message(messages, item, where):
    role = item.get("role", "user")
    if role not in ("user", "assistant", "system", "developer"):
        raise bad_request(f"{where}.role must be user, assistant, system or developer",
                          "input")
    images = []
    text = content_to_text(item.get("content"), images if role == "user" else None, where)
    last = messages[-1] if messages else None
    if role == "assistant" and last is not None and last.role == "assistant" and \
            last.reasoning and not last.text and not last.tool_calls:
        last.text = text            # the message its reasoning item led to
    else:
        messages.append(Message("system" if role == "developer" else role, text,
                                images=images))


def input_call(messages, item, kind, where):
    """A Responses function_call or custom_tool_call item -> a ToolCall on the
    assistant message it belongs to (a new one when none is open)."""
    call_id = field(item, "call_id", (str,), f"{where}.call_id") or \
        field(item, "id", (str,), f"{where}.id", "")
    name = field(item, "name", (str,), f"{where}.name")
    if not name:
        raise bad_request(f"{where}.name is required", "input")
    args = item.get("arguments") if kind == "function_call" else \
        field(item, "input", (str,), f"{where}.input", "")
    call = ToolCall(call_id, name, call_arguments(args), custom=kind != "function_call",
                    namespace=field(item, "namespace", (str,), f"{where}.namespace"))
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant":
        last.tool_calls.append(call)
    else:
        messages.append(Message("assistant", tool_calls=[call]))


def reasoning_item(item, where):
    """A reasoning input item -> the item for Codex's history, or None when it
    carries no encrypted_content (then it holds nothing the model can use)."""
    encrypted = field(item, "encrypted_content", (str,), f"{where}.encrypted_content")
    if not encrypted:
        return None
    summary = field(item, "summary", (list,), f"{where}.summary", [])
    texts = [part.get("text") for part in summary if isinstance(part, dict)]
    if not all(isinstance(t, str) for t in texts):
        raise bad_request(f"{where}.summary must be a list of summary_text parts", "input")
    return {"type": "reasoning", "summary": [{"type": "summary_text", "text": t} for t in texts],
            "encrypted_content": encrypted}


def parse_text_format(fmt, param):
    """Chat `response_format` / Responses `text.format` -> (schema, instruction, note)."""
    if fmt is None:
        return None, "", ""
    if not isinstance(fmt, dict):
        raise bad_request(f"{param} must be an object", param)
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None, "", ""
    if kind == "json_object":
        return None, JSON_OBJECT_INSTRUCTION, "json_object: told the model to answer in JSON"
    if kind != "json_schema":
        raise bad_request(f"{param}.type must be text, json_object or json_schema", param)
    spec = fmt.get("json_schema") if isinstance(fmt.get("json_schema"), dict) else fmt
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise bad_request(f"{param} json_schema needs a schema object", param)
    check_schema(schema, f"{param}.schema", param)
    strict = strict_schema(schema)
    if strict is not None:
        return strict, "", "json_schema: sent as the output schema"
    return None, schema_instruction(schema), ("json_schema: not valid for strict mode "
                                              "(optional or open properties), told the "
                                              "model instead")


JSON_OBJECT_INSTRUCTION = ("Reply with exactly one valid JSON object and nothing else: no "
                           "prose and no Markdown code fences.")


def schema_instruction(schema):
    return ("Reply with exactly one JSON value that conforms to this JSON Schema, and "
            "nothing else (no prose, no Markdown code fences):\n"
            + json.dumps(schema, ensure_ascii=False))


def strict_schema(schema):
    """A copy of `schema` that Codex's strict output format accepts, or None
    when making it strict would change what it allows.

    Strict mode wants every object closed (`additionalProperties: false`) and
    every property required.  Closing an object that left it open by default
    keeps the answers the client accepts; an optional property or an
    explicitly open object cannot be expressed, so those give None."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return None
    try:
        return _strict(schema)
    except ValueError:
        return None


def _strict(node):
    """strict_schema's walk: closes every object and requires every property;
    raises ValueError where strict mode would change what the schema allows."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "$defs", "definitions", "patternProperties"):
            out[key] = {k: _strict(v) for k, v in value.items()} if isinstance(value, dict) \
                else value
        elif key in ("items", "anyOf", "allOf", "oneOf", "prefixItems", "not",
                     "additionalItems"):
            out[key] = _strict(value)
        else:
            out[key] = value
    is_object = node.get("type") == "object" or (
        isinstance(node.get("type"), list) and "object" in node["type"]) or "properties" in node
    if is_object:
        if node.get("additionalProperties") not in (None, False) or "patternProperties" in node:
            raise ValueError("open object")
        props = node.get("properties") or {}
        if set(node.get("required") or []) != set(props):
            raise ValueError("optional property")
        out["additionalProperties"] = False
        out["required"] = list(props)
        out.setdefault("properties", {})
    return out


def common_fields(body, request):
    """Fields both APIs share, validated into `request`."""
    request.stream = bool(field(body, "stream", (bool,), default=False))
    request.parallel_tool_calls = field(body, "parallel_tool_calls", (bool,), default=True)
    request.tool_choice = parse_tool_choice(body.get("tool_choice"))
    if body.get("n") not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    return request


def parse_chat_request(body, reasoning_mode="content", store=None):
    """Validate a Chat Completions (or Responses-shaped) body -> ProxyRequest."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    options = field(body, "stream_options", (dict,), default={})
    if "messages" not in body and "input" in body:     # Cursor's agent may send these
        request = parse_responses_request(body, store, strict_previous=False)
        request.include_usage = bool(options.get("include_usage"))
        return request
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    request = ProxyRequest(model=parse_model(body),
                           messages=[parse_message(m, i, reasoning_mode)
                                     for i, m in enumerate(messages)])
    common_fields(body, request)
    request.include_usage = bool(options.get("include_usage"))
    request.tools = normalize_tools(body.get("tools"))
    request.ignored_tools = hosted_tools(body.get("tools"))
    request.web_search = openai_web_search(body.get("tools"), field(
        body, "web_search_options", (dict,)))
    reasoning = field(body, "reasoning", (dict,), default={})     # Cursor sends this shape too
    request.reasoning_effort = parse_effort(body.get("reasoning_effort"), "reasoning_effort") \
        or parse_effort(reasoning.get("effort"), "reasoning.effort")
    request.output_schema, request.output_instruction, request.output_note = \
        parse_text_format(body.get("response_format"), "response_format")
    request.stop = parse_stop(body.get("stop"))
    return check_request(request)


def parse_responses_request(body, store=None, strict_previous=True):
    """Validate a Responses API body -> ProxyRequest.

    `store` (a ResponseStore) gives the stored conversation a
    `previous_response_id` continues, or None when it is unknown: a 400 on
    /responses; on /chat/completions (Cursor's agent sends ids of its own
    there, along with the whole history) it is ignored.  It also resolves
    `item_reference` input items."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    if body.get("input") is None:
        raise bad_request("input is required: a string or a list of items", "input")
    if body.get("background"):
        raise bad_request("background responses are not supported", "background")
    if body.get("conversation") is not None:
        raise bad_request("conversation is not supported; use previous_response_id",
                          "conversation")
    messages = []
    previous = field(body, "previous_response_id", (str,))
    if previous is not None:
        earlier = store.get(previous) if store is not None else None
        if earlier is None and strict_previous:
            raise bad_request(f"Previous response with id '{previous}' not found (this "
                              "proxy keeps recent responses in memory for a while).",
                              "previous_response_id", "previous_response_not_found")
        # an earlier request's `instructions` do not carry over (as upstream)
        messages += [m for m in earlier or [] if m.name != INSTRUCTIONS_MESSAGE]
    instructions = field(body, "instructions", (str,))
    if instructions:
        messages.insert(0, Message("system", instructions, name=INSTRUCTIONS_MESSAGE))
    items, extra_tools = parse_input_items(body.get("input"),
                                           store.item if store is not None else None)
    messages += items
    request = ProxyRequest(model=parse_model(body), messages=messages)
    common_fields(body, request)
    tools = field(body, "tools", (list,), default=[]) + extra_tools
    request.tools = normalize_tools(tools)
    request.ignored_tools = hosted_tools(tools)
    request.web_search = openai_web_search(tools)
    reasoning = field(body, "reasoning", (dict,), default={})
    request.reasoning_effort = parse_effort(reasoning.get("effort"), "reasoning.effort") or \
        parse_effort(body.get("reasoning_effort"), "reasoning_effort")
    summary = reasoning.get("summary") or reasoning.get("generate_summary")
    if summary is not None and summary not in SUMMARIES:
        raise bad_request(f"reasoning.summary must be one of {', '.join(SUMMARIES)}",
                          "reasoning")
    request.reasoning_summary = summary
    text = field(body, "text", (dict,), default={})
    request.output_schema, request.output_instruction, request.output_note = \
        parse_text_format(text.get("format"), "text.format")
    request.stop = parse_stop(body.get("stop"))
    request.store = field(body, "store", (bool,), default=True)
    request.echo = {k: body.get(k) for k in (
        "instructions", "tools", "tool_choice", "parallel_tool_calls", "text", "reasoning",
        "metadata", "temperature", "top_p", "max_output_tokens", "previous_response_id",
        "store", "user", "truncation")}
    return check_request(request, "input")


def check_request(request, param="messages"):
    """What Codex would refuse or answer badly, refused here with a clear
    400: an empty conversation, more than MAX_MESSAGES messages, or more
    than MAX_CONVERSATION_CHARS characters of text in all."""
    convo = [m for m in request.messages if m.role != "system"]
    if not any(m.text.strip() or m.tool_calls or m.images or m.role == "tool"
               for m in convo):
        raise bad_request("the conversation is empty: send at least one message with text",
                          param, "empty_prompt")
    if len(request.messages) > MAX_MESSAGES:
        raise bad_request(f"the conversation has {len(request.messages)} messages; at most "
                          f"{MAX_MESSAGES} are taken", param, "too_many_messages")
    chars = message_chars(request.messages)
    if chars > MAX_CONVERSATION_CHARS:
        raise ProxyError(400, f"the conversation holds {chars} characters of text; at most "
                         f"{MAX_CONVERSATION_CHARS} are taken (no model reads more). "
                         "Shorten it.", "invalid_request_error", "context_length_exceeded",
                         param)
    return request


def resolve_model(name, aliases):
    """Client model name -> (Codex model or None for the default, effort or None).

    An alias wins; a name whose reverse starts with `gpt-` is reversed
    (`xedoc-2.5-tpg` -> `gpt-5.2-codex`); a `claude...` name (Claude Code's
    defaults) is Codex's default model; Ollama's `:latest` tag is dropped;
    anything else passes through.  A trailing `-low`, `-high`... on the
    result sets the reasoning effort."""
    if not name:
        return None, None
    model = aliases.get(name)
    if model is None and name.lower().startswith("claude"):
        return None, None
    if model is None:
        name = name[:-len(":latest")] if name.endswith(":latest") else name
        model = name[::-1] if name[::-1].startswith("gpt-") else name
    effort = None
    head, sep, tail = model.rpartition("-")
    if sep and head and tail in EFFORTS:
        model, effort = head, tail
    return model, effort


def trailing_tool_results(messages):
    """The tool messages after the last assistant message, or [].  Context a
    client adds after them (the Codex CLI's goal objective, a call-less
    output) does not hide them: see trailing_context."""
    results = []
    for msg in reversed(messages[:len(messages) - len(trailing_context(messages))]):
        if msg.role != "tool":
            break
        results.append(msg)
    return results[::-1]


def trailing_context(messages):
    """The context messages (call-less tool outputs) the request ends with."""
    count = 0
    for msg in reversed(messages):
        if msg.role != "user" or msg.name != CONTEXT_MESSAGE:
            break
        count += 1
    return messages[len(messages) - count:]


# ---------------------------------------------------------------------------
# Parsing requests (pure): the Anthropic Messages API and the Ollama API
# ---------------------------------------------------------------------------

ANTHROPIC_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "xhigh",
                     "xhigh": "xhigh"}
SIGNATURE_PREFIX = "cxp2."      # a thinking block's signature that holds Codex's reasoning


class Room:
    """What one request may grow to as it is parsed (thinking signatures
    opened with `seal`): at most `limit` bytes more, each reserved from the
    body budget (--max-body-memory) until the request is parsed.  Past the
    limit, a 413 that names --max-body; with the budget spent, a 503.  It
    counts the signatures it could not open."""

    def __init__(self, limit, budget=None, max_body=None, seal=None):
        self.limit, self.budget, self.max_body, self.seal = limit, budget, max_body, seal
        self.used = 0
        self.dropped = 0            # signatures this proxy did not make (or altered)

    def reasoning(self, signature):
        """A thinking block's signature -> its reasoning item, or None."""
        item = self.seal.open(signature, self) if self.seal is not None else None
        if item is None and signature:
            self.dropped += 1
        return item

    def take(self, size):
        if self.used + size > self.limit:
            raise ProxyError(413, "the request holds more than --max-body "
                             f"({self.max_body or self.limit} bytes) once its thinking "
                             "signatures are opened; send fewer thinking blocks",
                             code="request_too_large")
        if self.budget is not None and not self.budget.reserve(size, DRAIN_LIMIT + 1):
            raise busy_receiving()
        self.used += size

    def release(self):
        if self.budget is not None:
            self.budget.release(self.used)
        self.used = 0


class Seal:
    """Thinking signatures the proxy hands out, and opens again.  A signature
    carries Codex's encrypted reasoning (compressed) and an HMAC made with a
    secret of the proxy's, kept in the state dir: only a signature this proxy
    made is opened (Anthropic too drops signatures it did not issue), so a
    forged one costs nothing to refuse.  A lost secret only means that old
    thinking blocks come back without their reasoning."""

    def __init__(self, secret):
        self._secret = secret

    @classmethod
    def in_folder(cls, folder):
        """The seal of the secret in `folder` (made on first start) -> (Seal,
        why the secret is only in memory, or None)."""
        path = os.path.join(folder, "signature.key")
        try:
            os.makedirs(folder, exist_ok=True)
            if not os.path.exists(path):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
            with open(path) as f:
                return cls(bytes.fromhex(f.read().strip())), None
        except (OSError, ValueError) as exc:
            return cls(secrets.token_bytes(32)), f"{path}: {getattr(exc, 'strerror', None) or exc}"

    def _mac(self, payload):
        return base64.urlsafe_b64encode(hmac.new(self._secret, payload.encode(),
                                                 hashlib.sha256).digest()[:18]).decode()

    def sign(self, item):
        """An encrypted reasoning item -> the signature of the thinking block
        that shows it, which brings it back when the client returns the block."""
        data = json.dumps({"summary": item.get("summary") or [],
                           "encrypted_content": item.get("encrypted_content")}).encode()
        payload = base64.urlsafe_b64encode(zlib.compress(data)).decode()
        return f"{SIGNATURE_PREFIX}{payload}.{self._mac(payload)}"

    def open(self, signature, room):
        """A thinking block's signature -> the reasoning item it holds, or
        None when this proxy did not make it (or it was altered).  What it
        inflates to is taken from `room`."""
        if not isinstance(signature, str) or not signature.startswith(SIGNATURE_PREFIX):
            return None
        payload, _, mac = signature[len(SIGNATURE_PREFIX):].rpartition(".")
        if not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            return None
        try:
            raw = zlib.decompress(base64.urlsafe_b64decode(payload.encode()))
            room.take(len(raw))
            data = json.loads(raw)
        except (ValueError, zlib.error, binascii.Error):
            return None
        return reasoning_of(data)


def reasoning_of(data):
    """An opened signature's data -> the reasoning item, its summary only
    summary_text parts; None when it holds anything else (a 4xx, never a
    thread that Codex refuses)."""
    if not isinstance(data, dict) or not isinstance(data.get("encrypted_content"), str):
        return None
    summary = data.get("summary") or []
    if not isinstance(summary, list) or not all(
            isinstance(p, dict) and p.get("type") == "summary_text" and
            isinstance(p.get("text"), str) for p in summary):
        return None
    return {"type": "reasoning", "encrypted_content": data["encrypted_content"],
            "summary": [{"type": "summary_text", "text": p["text"]} for p in summary]}


def anthropic_image(block, where):
    source = field(block, "source", (dict,), f"{where}.source") or {}
    if source.get("type") != "base64":
        raise bad_request("only base64 images are supported (Codex cannot fetch remote "
                          "images); send the image inline", where)
    media = field(source, "media_type", (str,), f"{where}.source.media_type", "image/png")
    data = field(source, "data", (str,), f"{where}.source.data", "")
    if not re.fullmatch(r"image/[a-zA-Z0-9.+-]+", media) or not data:
        raise bad_request(f"{where} needs a media_type image/... and base64 data", where)
    return f"data:{media};base64,{data}"


def anthropic_text(content, where, images=None):
    """A string or a list of text (and image) blocks -> text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of blocks", "messages")
    texts = []
    for n, block in enumerate(content):
        at = f"{where}[{n}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(field(block, "text", (str,), f"{at}.text", ""))
        elif kind == "image" and images is not None:
            images.append(anthropic_image(block, at))
        else:
            raise bad_request(f"{at} must be a text block" + (" or an image" if images is not None
                                                               else ""), "messages")
    return "\n".join(t for t in texts if t)


def anthropic_message(raw, index, room=None):
    """One Messages API message -> [Message]: a user turn's tool results
    first (as tool messages), then its text and images; thinking blocks
    bring back the reasoning their signature holds (`room` opens them)."""
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise bad_request(f"{where} must be an object", "messages")
    role = raw.get("role")
    if role not in ("user", "assistant", "system"):
        raise bad_request(f"{where}.role must be user, assistant or system", "messages")
    content = raw.get("content")
    if role == "system" or isinstance(content, str):
        return [Message(role, anthropic_text(content, f"{where}.content"))]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of blocks", "messages")
    out, main = [], Message(role)
    texts = []
    for n, block in enumerate(content):
        at = f"{where}.content[{n}]"
        if not isinstance(block, dict):
            raise bad_request(f"{at} must be an object", "messages")
        kind = field(block, "type", (str,), f"{at}.type")
        if kind == "text":
            texts.append(field(block, "text", (str,), f"{at}.text", ""))
        elif kind == "image" and role == "user":
            main.images.append(anthropic_image(block, at))
        elif kind == "tool_result" and role == "user":
            images = []
            text = anthropic_text(block.get("content") or "", f"{at}.content", images)
            call_id = field(block, "tool_use_id", (str,), f"{at}.tool_use_id")
            if not call_id:
                raise bad_request(f"{at}.tool_use_id is required", "messages")
            if block.get("is_error") is True:
                text = "Error: " + text
            out.append(Message("tool", text, tool_call_id=call_id, images=images))
        elif kind == "tool_use" and role == "assistant":
            name = field(block, "name", (str,), f"{at}.name")
            if not name:
                raise bad_request(f"{at}.name is required", "messages")
            tool_input = field(block, "input", (dict,), f"{at}.input", {})
            main.tool_calls.append(ToolCall(field(block, "id", (str,), f"{at}.id", ""), name,
                                            json.dumps(tool_input, ensure_ascii=False)))
        elif kind in ("server_tool_use", "web_search_tool_result") and role == "assistant":
            pass        # a search the model made: its answer's text holds what it found
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            reasoning = (room or Room(0)).reasoning(block.get("signature") or block.get("data"))
            if reasoning is not None:
                main.reasoning.append(reasoning)
        else:
            raise bad_request(f"{at} has type {kind!r}, which a {role} message cannot carry "
                              "here (text, image, tool_use, tool_result and thinking can)",
                              "messages")
    main.text = "\n".join(t for t in texts if t)
    if main.text or main.images or main.tool_calls or main.reasoning or not out:
        out.append(main)
    return out


ANTHROPIC_SEARCH = re.compile(r"web_search_\d{8}")


def anthropic_tools(tools):
    """Messages API tools -> (the OpenAI tool shape normalize_tools reads,
    the server tools the proxy cannot offer, the web search asked for as a
    web_search_config() with the tool's name, or None)."""
    if tools is None:
        return [], [], None
    if not isinstance(tools, list):
        raise bad_request("tools must be a list", "tools")
    shaped, hosted, search = [], [], None
    for n, (where, tool) in enumerate(objects(tools, "tools", "tools")):
        kind = tool.get("type")
        if isinstance(kind, str) and ANTHROPIC_SEARCH.fullmatch(kind):
            search = anthropic_web_search(tool, where)
            continue
        if kind not in (None, "custom"):
            hosted.append(str(kind))
            continue
        schema = field(tool, "input_schema", (dict,), f"tools[{n}].input_schema", {})
        schema = {k: v for k, v in schema.items() if k != "$schema"}
        shaped.append({"type": "function", "name": tool.get("name"),
                       "description": field(tool, "description", (str,),
                                            f"tools[{n}].description", ""),
                       "parameters": schema})
    return shaped, hosted, search


def anthropic_web_search(tool, where):
    """The web_search_2025xxxx server tool -> web_search_config() and its
    name.  Codex's search takes allowed domains, not blocked ones."""
    if tool.get("blocked_domains"):
        raise bad_request(f"{where}.blocked_domains cannot be honoured: Codex's web search "
                          "takes allowed_domains only", "tools")
    location = field(tool, "user_location", (dict,), f"{where}.user_location")
    config = web_search_config(where, None, location, tool.get("allowed_domains"),
                               tool.get("max_uses"))
    config["name"] = field(tool, "name", (str,), f"{where}.name", "web_search")
    return config


def anthropic_tool_choice(choice):
    """-> (tool_choice as the other APIs say it, parallel calls allowed)."""
    if choice is None:
        return "auto", True
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise bad_request('tool_choice must be {"type": "auto" | "any" | "tool" | "none"}',
                          "tool_choice")
    parallel = not choice.get("disable_parallel_tool_use")
    kind = choice["type"]
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request('tool_choice of type "tool" needs a name', "tool_choice")
        return {"name": name}, parallel
    return {"auto": "auto", "any": "required", "none": "none"}[kind], parallel


def anthropic_reasoning(body):
    """thinking and output_config.effort -> (effort, summary)."""
    thinking = field(body, "thinking", (dict,), default={})
    config = field(body, "output_config", (dict,), default={})
    kind = thinking.get("type")
    if kind not in (None, "enabled", "adaptive", "disabled"):
        raise bad_request("thinking.type must be enabled, adaptive or disabled", "thinking")
    effort = None
    if kind == "enabled":
        budget = field(thinking, "budget_tokens", (int,), "thinking.budget_tokens", 8192)
        effort = "low" if budget < 2048 else "medium" if budget < 16384 else "high"
    elif kind == "disabled":
        effort = "low"
    wanted = field(config, "effort", (str,), "output_config.effort")
    effort = ANTHROPIC_EFFORTS.get(wanted, effort)
    return effort, "auto" if kind in ("enabled", "adaptive") else None


def parse_messages_request(body, room=None):
    """Validate an Anthropic Messages API body -> ProxyRequest.  `room`
    opens the thinking blocks' signatures (none are opened without it)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise bad_request("messages must be a non-empty list", "messages")
    system = body.get("system")
    messages = [Message("system", anthropic_text(system, "system"))] if system else []
    room = room or Room(0)
    for n, raw in enumerate(raw_messages):
        messages += anthropic_message(raw, n, room)
    field(body, "max_tokens", (int,), "max_tokens")
    field(body, "metadata", (dict,), "metadata")
    request = ProxyRequest(model=parse_model(body), messages=messages)
    if room.dropped:
        request.notes.append(f"{room.dropped} thinking signature(s) this proxy did not make "
                             "(or altered) were dropped: their reasoning is not sent")
    request.stream = bool(field(body, "stream", (bool,), default=False))
    tools, request.ignored_tools, request.web_search = anthropic_tools(body.get("tools"))
    request.tools = normalize_tools(tools)
    request.tool_choice, request.parallel_tool_calls = anthropic_tool_choice(
        body.get("tool_choice"))
    search = request.web_search
    if search and request.tool_choice == {"name": search["name"]}:
        request.tool_choice, search["required"] = "auto", True   # Claude Code's WebSearch
    request.reasoning_effort, request.reasoning_summary = anthropic_reasoning(body)
    fmt = field(body, "output_config", (dict,), default={}).get("format")
    if fmt is not None:
        fmt = {"type": "json_schema", "json_schema": fmt} if isinstance(fmt, dict) and \
            fmt.get("type") == "json_schema" else fmt
    request.output_schema, request.output_instruction, request.output_note = \
        parse_text_format(fmt, "output_config.format")
    request.stop = parse_stop(field(body, "stop_sequences", (list,), "stop_sequences"))
    return check_request(request)


def count_tokens_estimate(body):
    """An honest estimate of a Messages request's input tokens: about four
    characters a token over everything the model would read."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    request = parse_messages_request(dict(body, max_tokens=1))
    chars = sum(len(m.text) for m in request.messages) + \
        sum(len(c.arguments) for m in request.messages for c in m.tool_calls) + \
        len(json.dumps([dataclasses.astuple(t) for t in request.tools], default=str))
    images = sum(len(m.images) for m in request.messages)
    return max(1, chars // 4 + 1500 * images)


IMAGE_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
               (b"RIFF", "image/webp"))


def ollama_image(data, where):
    """Ollama's base64 image (no data: prefix) -> a data URL with its type."""
    if not isinstance(data, str) or not data:
        raise bad_request(f"{where} must be base64 image data", "messages")
    try:
        head = base64.b64decode(data[:64] + "=" * (-len(data[:64]) % 4))
    except (binascii.Error, ValueError):
        raise bad_request(f"{where} is not base64 image data", "messages")
    media = next((kind for magic, kind in IMAGE_MAGIC if head.startswith(magic)), "image/png")
    return f"data:{media};base64,{data}"


def ollama_messages(raw_messages):
    """Ollama chat messages -> [Message].  The library drops call ids, so a
    call gets an id from its place, and a tool result is matched to its
    call by tool_name, else by order."""
    if not isinstance(raw_messages, list) or not raw_messages:
        raise bad_request("messages must be a non-empty list", "messages")
    messages, open_calls = [], []
    for n, (where, raw) in enumerate(objects(raw_messages, "messages", "messages")):
        role = raw.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise bad_request(f"{where}.role must be system, user, assistant or tool",
                              "messages")
        text = field(raw, "content", (str,), f"{where}.content", "")
        images = [ollama_image(d, f"{where}.images[{i}]") for i, d in
                  enumerate(field(raw, "images", (list,), f"{where}.images", []))]
        msg = Message(role, text, images=images if role in ("user", "tool") else [])
        if role == "assistant":
            calls = field(raw, "tool_calls", (list,), f"{where}.tool_calls", [])
            for i, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad_request(f"{where}.tool_calls[{i}] needs a function name",
                                      "messages")
                msg.tool_calls.append(ToolCall(f"ollama_{n}_{i}", fn["name"],
                                               call_arguments(fn.get("arguments"))))
            open_calls = list(msg.tool_calls)
        elif role == "tool":
            name = field(raw, "tool_name", (str,), f"{where}.tool_name")
            match = next((c for c in open_calls if c.name == name), None) if name else None
            match = match or (open_calls[0] if open_calls else None)
            if match is None:
                msg = Message("user", f"Tool output ({name or 'a tool'}):\n{text}",
                              images=images)
            else:
                open_calls.remove(match)
                msg.tool_call_id = match.id
        messages.append(msg)
    return messages


def ollama_reasoning(think):
    """think: true, false or a level -> (effort, summary)."""
    if think is None or think is False:
        return None, None
    if think is True:
        return None, "auto"
    if think in ("low", "medium", "high"):
        return think, "auto"
    raise bad_request('think must be true, false, "low", "medium" or "high"', "think")


def ollama_common(body, request):
    """What /api/chat and /api/generate share."""
    request.model = parse_model(body)
    request.stream = field(body, "stream", (bool,), default=True)   # Ollama streams by default
    request.reasoning_effort, request.reasoning_summary = ollama_reasoning(body.get("think"))
    fmt = body.get("format")
    if fmt == "json":
        fmt = {"type": "json_object"}
    elif isinstance(fmt, dict):
        fmt = {"type": "json_schema", "json_schema": {"schema": fmt}}
    elif fmt not in (None, ""):
        raise bad_request('format must be "json" or a JSON schema object', "format")
    request.output_schema, request.output_instruction, request.output_note = \
        parse_text_format(fmt or None, "format")
    options = field(body, "options", (dict,), default={})
    request.stop = parse_stop(options.get("stop"))
    return check_request(request)


def parse_ollama_chat(body):
    """Validate an Ollama /api/chat body -> ProxyRequest."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    request = ProxyRequest(model=None, messages=ollama_messages(body.get("messages")),
                           made_up_ids=True)
    tools = field(body, "tools", (list,), default=[])
    request.tools = normalize_tools(tools)
    request.ignored_tools = hosted_tools(tools)
    return ollama_common(body, request)


CONTEXT_MARK = 5803         # the first number of a `context` this proxy handed out


def context_numbers(context_id):
    """A stored conversation's id -> the `context` /api/generate returns: a
    list of small ints, as Ollama's clients keep it."""
    raw = bytes.fromhex(context_id[len("ctx_"):])
    return [CONTEXT_MARK] + [int.from_bytes(raw[i:i + 3], "big") for i in range(0, 12, 3)]


def context_id_of(numbers):
    """A `context` a client sent back -> the stored conversation's id, or
    None when it is not one of this proxy's."""
    if not (isinstance(numbers, list) and len(numbers) == 5 and numbers[0] == CONTEXT_MARK and
            all(type(n) is int and 0 <= n < 1 << 24 for n in numbers[1:])):
        return None
    return "ctx_" + b"".join(n.to_bytes(3, "big") for n in numbers[1:]).hex()


def parse_ollama_generate(body, store=None):
    """Validate an Ollama /api/generate body -> ProxyRequest.  A `context`
    this proxy handed out brings back the conversation it ended (from
    `store`), which the prompt continues."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    system = field(body, "system", (str,), default="")
    prompt = field(body, "prompt", (str,), default="")
    images = [ollama_image(d, f"images[{i}]") for i, d in
              enumerate(field(body, "images", (list,), default=[]))]
    earlier, notes = [], []
    context = field(body, "context", (list,), default=[])
    if context:
        context_id = context_id_of(context)
        found = store.get(context_id) if store is not None and context_id else None
        if found is None:
            notes.append("the context is not one this proxy knows (expired, or from "
                         "another server): answered without it")
        earlier = [m for m in found or [] if m.role != "system" or not system]
    messages = ([Message("system", system)] if system else []) + earlier + \
        [Message("user", prompt, images=images)]
    return ollama_common(body, ProxyRequest(model=None, messages=messages, notes=notes))


# ---------------------------------------------------------------------------
# Instructions (pure): what the model is told, whichever engine runs it
# ---------------------------------------------------------------------------

def tool_choice_instruction(tool_choice, tools):
    if not tools or tool_choice in ("auto", "none"):
        return ""
    if tool_choice == "required":
        return "You must call at least one of the declared tools in your reply."
    if isinstance(tool_choice, dict) and tool_choice.get("name"):
        return f"You must call the tool `{tool_choice['name']}` in your reply."
    return ""


def render_instructions(messages, tools, tool_choice, extras=()):
    """The model's instructions: a neutral preamble, then the client's system
    and developer text verbatim, then what `tool_choice`, the output format
    or `parallel_tool_calls` ask for."""
    parts = [INSTRUCTIONS_PREAMBLE]
    parts += [m.text for m in messages if m.role == "system" and m.text]
    parts += [text for text in (tool_choice_instruction(tool_choice, tools), *extras) if text]
    return "\n\n".join(parts) + "\n"


def search_instruction(search):
    """What the model is told of the hosted web search it may use."""
    if not search:
        return ""
    text = "You can search the web with your web_search tool; cite the pages you use."
    if search.get("max_uses"):
        text += f" Search at most {search['max_uses']} times."
    if search.get("required"):
        text += " Search the web for the user's query before you answer."
    return text


def request_instructions(request, tools, names=None):
    extras = [request.output_instruction, search_instruction(request.web_search)]
    if tools and not request.parallel_tool_calls:
        extras.append("Call at most one tool per reply, then wait for its result.")
    choice = request.tool_choice
    if isinstance(choice, dict) and names is not None:     # the name the model knows
        choice = {"name": names.to_codex(None, choice["name"])[1]}
    return render_instructions(request.messages, tools, choice, extras)


# ---------------------------------------------------------------------------
# Tool names (pure): the names Codex takes, and back to the client's
# ---------------------------------------------------------------------------

CODEX_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CODEX_SHADOWED = ("exec_command", "shell_command")     # Codex's own tools win over these
RESERVED_NAMESPACES = ("functions", "multi_tool_use", "web", "browser", "python", "container",
                       "image_gen", "file_search", "computer", "api_tool", "tool_search")


def codex_safe(name, taken, extra_reserved=()):
    """`name` if Codex takes it, else a readable alias: other characters
    become _, a reserved or shadowed name gets a client_ prefix, a long one
    is cut and keeps a short hash; unique among `taken`."""
    reserved = name == "mcp" or name.startswith("mcp__") or name in extra_reserved
    if CODEX_NAME.fullmatch(name) and not reserved and name not in taken:
        return name
    alias = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    if reserved or alias == "mcp" or alias.startswith("mcp__") or alias in extra_reserved:
        alias = "client_" + alias
    if len(alias) > 64:
        alias = alias[:55] + "_" + hashlib.sha256(name.encode("utf-8", "surrogatepass")
                                                  ).hexdigest()[:8]
    base, n = alias, 2
    while alias in taken:
        alias = f"{base[:60]}_{n}"
        n += 1
    return alias


class ToolNames:
    """The names a request's tools go to Codex under, and back.

    Codex takes a dynamic tool name of letters, digits, _ and - (64 at most,
    as the upstream API), keeps `mcp` and `mcp__...` for itself, and answers
    calls of tools named like its own (exec_command, shell_command) itself.
    A name it takes is sent as it is; any other gets a readable alias,
    unique within the request and the same for the same tools every time.
    Namespace tools are sent as namespaces when the engine takes them
    (`nested`), else flattened to `namespace__tool`.  Calls come back under
    the client's exact names."""

    def __init__(self, tools, nested):
        """Name every tool: plain ones first (a name Codex takes keeps it), then
        namespaces and their children, each unique where Codex looks."""
        self.tools = tools
        self.nested = nested
        self._to = {}               # (client namespace, client name) -> (namespace, name)
        self._back = {}             # (Codex namespace, Codex name) -> ToolSpec
        plain = [t for t in tools if t.namespace is None or not nested]
        taken = {t.name for t in plain if t.namespace is None and CODEX_NAME.fullmatch(t.name)
                 and t.name not in CODEX_SHADOWED and t.name != "mcp"
                 and not t.name.startswith("mcp__")}
        for tool in plain:          # names Codex takes as they are keep them
            flat = tool.name if tool.namespace is None else f"{tool.namespace}__{tool.name}"
            mine = {flat} if tool.namespace is None else set()
            name = codex_safe(flat, taken - mine, CODEX_SHADOWED)
            taken.add(name)
            self._add(tool, None, name)
        spaces = {}
        for tool in tools:
            if tool.namespace is not None and nested:
                spaces.setdefault(tool.namespace, []).append(tool)
        for space, children in spaces.items():
            ns = codex_safe(space, taken, RESERVED_NAMESPACES)
            taken.add(ns)
            inner = set()
            for tool in children:
                name = codex_safe(tool.name, inner)
                inner.add(name)
                self._add(tool, ns, name)

    def _add(self, tool, namespace, name):
        self._to[(tool.namespace, tool.name)] = (namespace, name)
        self._back[(namespace, name)] = tool

    def to_codex(self, namespace, name):
        """A client's tool -> (Codex namespace or None, Codex name); a tool
        the request does not declare (an old call in the history) gets a
        name Codex takes."""
        found = self._to.get((namespace, name))
        if found is not None:
            return found
        flat = name if namespace is None else f"{namespace}__{name}"
        return None, codex_safe(flat, set(), CODEX_SHADOWED)

    def from_codex(self, namespace, name):
        """(namespace, name) as Codex reports a call -> the client's ToolSpec, or None."""
        return self._back.get((namespace or None, name))

    def offered(self):
        """[(Codex namespace or None, Codex name, ToolSpec)] in the request's order."""
        back = {id(tool): key for key, tool in self._back.items()}
        return [back[id(tool)] + (tool,) for tool in self.tools]


# ---------------------------------------------------------------------------
# Conversation keys (pure): what a thread has seen, and what it was started with
# ---------------------------------------------------------------------------


def message_chars(messages):
    return sum(len(m.text) + sum(len(c.arguments) for c in m.tool_calls) for m in messages)


def canonical_arguments(text):
    """Tool-call arguments compared as JSON when they are JSON."""
    try:
        return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    except ValueError:
        return text


def image_digests(message):
    return [hashlib.sha256(url.encode()).hexdigest() for url in message.images]


def entry_digest(kind, first, second):
    """One entry of a conversation key."""
    data = json.dumps([kind, first, second], ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).digest()[:16]


def conversation_key(messages):
    """What a conversation holds, normalized so that a client's faithful echo
    of it matches -> (key, ends): one digest per entry, and for each entry
    the index in `messages` just past it.

    Consecutive assistant messages are one entry (an API may split an answer
    into several, and a client may join them any way); an assistant entry
    with calls is known by its calls (some clients drop the text beside
    them), otherwise by its text without think blocks and whitespace;
    reasoning, empty versus null content and surrounding whitespace do not
    count, nor do call ids (calls and results are known by their place).
    Every image counts, in a user message or a tool result alike.  System
    messages are not part of it (they are the thread's instructions, part
    of its ThreadSettings)."""
    entries, ends = [], []
    for index, m in enumerate(messages):
        if m.role == "system":
            continue
        if m.role == "assistant":       # an answer split in parts joins any way
            text = re.sub(r"\s+", "", THINK_BLOCK.sub("", m.text))
            calls = [(c.name, canonical_arguments(c.arguments)) for c in m.tool_calls]
            if entries and entries[-1][0] == "assistant":
                _, last_text, last_calls = entries.pop()
                ends.pop()
                text = last_text + text
                calls = last_calls + calls
            entries.append(("assistant", text, calls))
        elif m.role == "user":
            entries.append(("user", m.text.strip(), image_digests(m)))
        else:       # call ids do not count: some clients (Ollama's) drop them
            entries.append(("tool", image_digests(m), m.text.strip()))
        ends.append(index + 1)
    key = []
    for kind, first, second in entries:
        if kind == "assistant":
            first, second = ("", second) if second else (first, [])
        elif kind == "tool" and not first:
            first = ""                  # the digest without images stays what it was
        key.append(entry_digest(kind, first, second))
    return tuple(key), ends


HINT_CHARS = 500        # how far from its end a client's appended hint may start


def hint_candidates(message):
    """A user message that may end in a hint its client appends to the
    newest message only (aider's "Reply in English."), which the next
    request drops -> {digest of the message without the hint: the hint}.
    A hint starts at a line break in the last HINT_CHARS characters."""
    text, found, images = message.text, {}, image_digests(message)
    for match in re.finditer(r"\n", text[-HINT_CHARS:]):
        cut = len(text) - min(len(text), HINT_CHARS) + match.start()
        before, hint = text[:cut].strip(), text[cut:].strip()
        if before and hint:
            found[entry_digest("user", before, images)] = hint
    return found


@dataclasses.dataclass(frozen=True)
class ThreadSettings:
    """What a thread was started with (its instructions and tools) and what
    a turn sets (model, effort, summary): a kept thread continues only a
    request with the same."""
    instructions: str           # digest of the instructions as the model reads them
    tools: tuple                # ((name as Codex knows it, digest of the tool), ...)
    model: str | None = None
    effort: str | None = None
    summary: str | None = None
    web_search: str | None = None   # digest of the hosted search's settings, when on

    def differences(self, other):
        """What changed from `other` to these, in words."""
        said = []
        if self.instructions != other.instructions:
            said.append("instructions changed")
        if self.tools != other.tools:
            mine, theirs = dict(self.tools), dict(other.tools)
            changes = [f"+{n}" for n in mine if n not in theirs] + \
                [f"\u2212{n}" for n in theirs if n not in mine] + \
                [f"~{n}" for n in mine if n in theirs and mine[n] != theirs[n]]
            said.append(f"tools changed ({' '.join(changes) or 'order'})")
        for name in ("model", "effort", "summary", "web_search"):
            if getattr(self, name) != getattr(other, name):
                said.append({"model": "model changed", "effort": "reasoning effort changed",
                             "summary": "reasoning summary changed",
                             "web_search": "web search changed"}[name])
        return said


# ---------------------------------------------------------------------------
# Configuration: flags, TOML, $CODEX_HOME/config.toml, the child environment
# ---------------------------------------------------------------------------

def toml_value(value):
    """A Python value as a TOML literal for `codex -c key=value`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, except that TOML has no
        # surrogate escapes and wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = []
        for key, val in value.items():
            key = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
            items.append(f"{key} = {toml_value(val)}")
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


class TomlError(ValueError):
    pass


class _TomlReader:
    """Just enough TOML for Codex's config.toml when tomllib is missing:
    tables, arrays of tables, dotted and quoted keys, strings of all four
    kinds, numbers, booleans, arrays and inline tables.  Dates stay text."""

    ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\",
               "e": "\x1b"}
    BARE = re.compile(r"[A-Za-z0-9_-]+")
    NUMBER = re.compile(r"[+-]?(0x[0-9A-Fa-f_]+|0o[0-7_]+|0b[01_]+|inf|nan|"
                        r"[0-9_]+(\.[0-9_]+)?([eE][+-]?[0-9_]+)?)")
    DATE = re.compile(r"\d{4}-\d{2}-\d{2}([Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?"
                      r"([Zz]|[+-]\d{2}:\d{2})?)?|\d{2}:\d{2}:\d{2}(\.\d+)?")

    def __init__(self, text):
        self.s, self.i = text, 0

    def error(self, what):
        line = self.s.count("\n", 0, self.i) + 1
        raise TomlError(f"{what} (line {line})")

    def skip(self, newlines=False):
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t" or (newlines and c in "\r\n"):
                self.i += 1
            elif c == "#":
                end = self.s.find("\n", self.i)
                self.i = len(self.s) if end < 0 else end
            else:
                return

    def parse(self):
        """The whole document -> a dict: key/value lines, [tables] and
        [[arrays of tables]]."""
        root = current = {}
        while True:
            self.skip(newlines=True)
            if self.i >= len(self.s):
                return root
            if self.s.startswith("[[", self.i):
                self.i += 2
                path = self.key()
                self.expect("]]")
                parent = self.table(root, path[:-1])
                array = parent.setdefault(path[-1], [])
                if not isinstance(array, list):
                    self.error("not an array of tables")
                current = {}
                array.append(current)
            elif self.s[self.i] == "[":
                self.i += 1
                current = self.table(root, self.key())
                self.expect("]")
            else:
                path = self.key()
                self.expect("=")
                self.skip()
                self.table(current, path[:-1])[path[-1]] = self.value()
            self.skip()
            if self.i < len(self.s) and self.s[self.i] not in "\r\n":
                self.error("expected the end of the line")

    def table(self, root, path):
        node = root
        for part in path:
            node = node.setdefault(part, {})
            if isinstance(node, list):
                node = node[-1]
            if not isinstance(node, dict):
                self.error(f"{part} is not a table")
        return node

    def expect(self, token):
        self.skip()
        if not self.s.startswith(token, self.i):
            self.error(f"expected {token!r}")
        self.i += len(token)

    def key(self):
        """A dotted key of bare and quoted parts -> [part, ...]."""
        parts = []
        while True:
            self.skip()
            c = self.s[self.i:self.i + 1]
            if c in ('"', "'"):
                parts.append(self.string())
            else:
                match = self.BARE.match(self.s, self.i)
                if not match:
                    self.error("expected a key")
                parts.append(match.group())
                self.i = match.end()
            self.skip()
            if self.s[self.i:self.i + 1] != ".":
                return parts
            self.i += 1

    def string(self):
        """One of TOML's four kinds of string, at the reader's place."""
        s, quote = self.s, self.s[self.i]
        if s.startswith(quote * 3, self.i):
            end = s.find(quote * 3, self.i + 3)
            if end < 0:
                self.error("unterminated string")
            while s.startswith(quote, end + 3) and end + 3 < len(s):
                end += 1           # up to two quotes may end the content
            raw = s[self.i + 3:end]
            self.i = end + 3
            raw = raw[1:] if raw.startswith("\n") else raw[2:] if raw.startswith("\r\n") else raw
            if quote == "'":
                return raw
            raw = re.sub(r"\\[ \t]*\r?\n\s*", "", raw)     # line-ending backslash
            return self.unescape(raw)
        end = self.i + 1
        while end < len(s) and s[end] != quote and s[end] != "\n":
            end += 2 if (quote == '"' and s[end] == "\\") else 1
        if end >= len(s) or s[end] != quote:
            self.error("unterminated string")
        raw = s[self.i + 1:end]
        self.i = end + 1
        return raw if quote == "'" else self.unescape(raw)

    def unescape(self, raw):
        """A basic string's escapes (\\n, \\uXXXX...) -> the characters."""
        out, i = [], 0
        while True:
            j = raw.find("\\", i)
            if j < 0:
                out.append(raw[i:])
                return "".join(out)
            out.append(raw[i:j])
            kind = raw[j + 1:j + 2]
            if kind in self.ESCAPES:
                out.append(self.ESCAPES[kind])
                i = j + 2
                continue
            size = {"u": 4, "U": 8}.get(kind)
            digits = raw[j + 2:j + 2 + size] if size else ""
            if not size or not re.fullmatch(r"[0-9A-Fa-f]+", digits) or len(digits) != size:
                self.error("invalid escape")
            code = int(digits, 16)
            if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
                self.error("invalid escape")
            out.append(chr(code))
            i = j + 2 + size

    def value(self):
        """Any value at the reader's place: a string, number, boolean, date (as
        text), array or inline table."""
        s, c = self.s, self.s[self.i:self.i + 1]
        if c in ('"', "'"):
            return self.string()
        if c == "[":
            self.i += 1
            items = []
            while True:
                self.skip(newlines=True)
                if s[self.i:self.i + 1] == "]":
                    self.i += 1
                    return items
                items.append(self.value())
                self.skip(newlines=True)
                if s[self.i:self.i + 1] == ",":
                    self.i += 1
                elif s[self.i:self.i + 1] != "]":
                    self.error("expected , or ] in an array")
        if c == "{":
            self.i += 1
            table = {}
            self.skip()
            if s[self.i:self.i + 1] == "}":
                self.i += 1
                return table
            while True:
                path = self.key()
                self.expect("=")
                self.skip()
                self.table(table, path[:-1])[path[-1]] = self.value()
                self.skip()
                if s[self.i:self.i + 1] == "}":
                    self.i += 1
                    return table
                self.expect(",")
        for word, value in (("true", True), ("false", False)):
            if s.startswith(word, self.i):
                self.i += len(word)
                return value
        match = self.DATE.match(s, self.i)
        if match:
            self.i = match.end()
            return match.group()
        match = self.NUMBER.match(s, self.i)
        if not match:
            self.error("expected a value")
        self.i = match.end()
        text = match.group().replace("_", "")
        body = text.lstrip("+-")
        if body[:2] in ("0x", "0o", "0b"):
            number = int(body, {"0x": 16, "0o": 8, "0b": 2}[body[:2]])
            return -number if text.startswith("-") else number
        if body in ("inf", "nan") or "." in text or "e" in text.lower():
            return float(text)
        return int(text)


def read_toml(text):
    """Parse TOML text: tomllib when there is one, else the small reader."""
    if tomllib is not None:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise TomlError(str(exc))
    return _TomlReader(text).parse()


class CodexConfigFile:
    """The keys of $CODEX_HOME/config.toml the proxy needs, re-read when the
    file changes.  `error` says why it could not be read, if it could not."""

    def __init__(self, codex_home):
        self.path = os.path.join(codex_home, "config.toml")
        # _lock guards the cached fields; the file is read outside it.
        self._lock = threading.Lock()
        self._stamp, self._data, self.error = None, {}, None

    def stamp(self):
        try:
            st = os.stat(self.path)
            return (st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    def read(self):
        """The forwarded keys (FORWARDED_CONFIG_KEYS) as a dict."""
        stamp = self.stamp()
        with self._lock:
            if stamp == self._stamp:
                return self._data
        data, error = {}, None
        if stamp is not None:
            try:
                with open(self.path, encoding="utf-8") as f:
                    parsed = read_toml(f.read())
                data = {k: parsed[k] for k in FORWARDED_CONFIG_KEYS if k in parsed}
            except (OSError, UnicodeDecodeError, TomlError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._stamp, self._data, self.error = stamp, data, error
        return data


def global_agents_file(codex_home):
    """The global AGENTS file Codex adds to every prompt, or None.

    `--ignore-user-config` does not stop Codex from reading it: the first
    non-empty one of AGENTS.override.md and AGENTS.md in CODEX_HOME."""
    for name in ("AGENTS.override.md", "AGENTS.md"):
        path = os.path.join(codex_home, name)
        try:
            if os.path.getsize(path) > 0:
                return path
        except OSError:
            pass
    return None


def uses_custom_provider(user_config, extra_config):
    provider = user_config.get("model_provider")
    for item in extra_config:
        key, _, value = item.partition("=")
        if key.strip() == "model_provider":
            provider = value.strip().strip('"')
    return provider not in (None, "openai")


def default_state_dir():
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~")
    else:
        base = os.environ.get("XDG_STATE_HOME") or \
            os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "codex-openai-proxy")


def child_environment(environ, api_keys, codex_home=None):
    """The environment Codex runs with: the proxy's, without its keys."""
    env = {k: v for k, v in environ.items()
           if k != "CODEX_PROXY_API_KEY" and not any(key and key in v for key in api_keys)}
    if codex_home:
        env["CODEX_HOME"] = codex_home
    return env


# ---------------------------------------------------------------------------
# The log: event names and the buffer behind /logs, /logs/stream and stderr
# ---------------------------------------------------------------------------

class LogEvent:
    """Every event name the log uses, in one place: logs.html colours them,
    the README lists them, a test checks that the two agree."""
    ENGINE_SELECTED = "engine_selected"             # which engine runs, and why
    INCOMING_REQUEST = "incoming_request"           # API, model, output format
    CODEX_FORWARD = "codex_forward"                 # a Codex thread took the turn
    REASONING_DETECTED = "reasoning_detected"
    CURSOR_RESPONSE = "cursor_response"             # a response ended: finish, usage
    STREAM_CODEX_ERROR = "stream_codex_error"       # a turn failed
    CODEX_WARNING = "codex_warning"
    CLIENT_DISCONNECTED = "client_disconnected"
    CLIENT_STALLED = "client_stalled"               # cut: it took no byte (--send-timeout)
    AUTH_REJECTED = "auth_rejected"                 # an access error answered
    REQUEST_REJECTED = "request_rejected"           # any other error answered
    TOOL_CALL_FORWARDED = "tool_call_forwarded"
    TOOL_RESULT_RECEIVED = "tool_result_received"
    TURN_RESUMED = "turn_resumed"
    PARKED_EXPIRED = "parked_expired"
    FALLBACK_TRANSCRIPT = "fallback_transcript"     # results no parked turn took
    CONVERSATION_STARTED = "conversation_started"   # a new thread, and why no kept one fit
    CONVERSATION_CONTINUED = "conversation_continued"   # a kept thread's next turn
    CONVERSATION_EXPIRED = "conversation_expired"   # a kept thread let go
    INTERNAL_ERROR = "internal_error"               # a bug: a 500 was answered


LOG_EVENTS = tuple(value for key, value in vars(LogEvent).items() if key.isupper())


def escape_controls(text):
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)


class LogBuffer:
    """The last N events, for /logs, /logs/stream and a line each on stderr."""

    def __init__(self, size, stream=None, clock=time.time):
        self._clock = clock
        self._stream = stream          # None: no stderr lines (--quiet)
        # _cond guards _events and _seq; add() notifies /logs/stream readers.
        self._cond = threading.Condition()
        self._events = collections.deque(maxlen=max(1, size))
        self._seq = 0

    def add(self, type, request_id=None, **fields):
        with self._cond:
            self._seq += 1
            event = {"seq": self._seq, "ts": round(self._clock(), 3), "type": type,
                     "request_id": request_id, **fields}
            self._events.append(event)
            self._cond.notify_all()
        if self._stream is not None:
            self._write_line(event)
        return event

    def _write_line(self, event):
        """One event as one line on stderr: time, type, request, fields;
        control characters escaped, cut at 2000 characters."""
        stamp = time.strftime("%H:%M:%S", time.localtime(event["ts"]))
        extras = " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}"
                          for k, v in event.items()
                          if k not in ("seq", "ts", "type", "request_id") and v is not None)
        line = escape_controls(f"{stamp} {event['type']} {event['request_id'] or '-'} "
                               f"{extras}"[:2000]) + "\n"
        try:
            try:
                self._stream.write(line)
            except UnicodeEncodeError:    # e.g. a Windows console or file in cp1252
                self._stream.write(line.encode("ascii", "backslashreplace").decode())
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def since(self, seq=0):
        with self._cond:
            return [e for e in self._events if e["seq"] > seq]

    def wait_since(self, seq, timeout):
        """Events newer than seq, waiting up to timeout for the first one."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > seq, timeout)
            return [e for e in self._events if e["seq"] > seq]


# ---------------------------------------------------------------------------
# Codex failures -> ProxyError (pure)
# ---------------------------------------------------------------------------

RETRY_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")


def retry_after_seconds(message, now=None):
    """Seconds until the time a usage-limit message names, or None.

    Codex writes either a duration ("try again in 2 hours 5 minutes") or a
    local clock time ("try again at 2:36 AM", "try again at Nov 27th, 2026
    1:34 AM")."""
    match = re.search(r"try again in ((?:\s*\d+\s*(?:second|minute|hour|day)s?,?"
                      r"(?:\s*and)?)+)", message, re.I)
    if match:
        total = sum(int(n) * RETRY_UNITS[unit.lower()] for n, unit in re.findall(
            r"(\d+)\s*(second|minute|hour|day)", match.group(1), re.I))
        return max(1, total)
    match = re.search(r"try again at (?:([A-Za-z]{3})[a-z]* (\d{1,2})(?:st|nd|rd|th)?,? "
                      r"(\d{4}),? )?(\d{1,2}):(\d{2})\s*([AP]M)", message, re.I)
    if not match:
        return None
    month, day, year, hour, minute, half = match.groups()
    now = now or datetime.datetime.now()
    hour = int(hour) % 12 + (12 if half.upper() == "PM" else 0)
    try:
        if month:
            target = datetime.datetime(int(year), MONTHS.index(month.lower()) + 1,
                                       int(day), hour, int(minute))
        else:
            target = now.replace(hour=hour, minute=int(minute), second=0, microsecond=0)
            if target <= now:
                target += datetime.timedelta(days=1)
    except ValueError:
        return None
    return max(1, int((target - now).total_seconds()))


def usage_limit_error(message, reset_seconds=None):
    seconds = retry_after_seconds(message) or reset_seconds
    if seconds and "try again" not in message.lower():
        message += f" The limit resets in about {format_duration(seconds)}."
    headers = {"Retry-After": str(int(seconds))} if seconds else {}
    return ProxyError(429, message, "rate_limit_error", "usage_limit_reached",
                      headers=headers)


def format_duration(seconds):
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{max(1, seconds // 60)} min"


def classify_failure(message, reset_seconds=None):
    """A failed Codex turn's message -> the ProxyError a client should see."""
    lower = message.lower()
    if "usage limit" in lower or "usage_limit" in lower or "rate limit" in lower:
        return usage_limit_error(message, reset_seconds)
    if ("401" in lower and "unauthorized" in lower) or "not logged in" in lower \
            or "authentication" in lower or "token_expired" in lower:
        return ProxyError(401, message + " (run `codex login` on the proxy's "
                          "machine)", "authentication_error", "codex_unauthorized")
    if "context window" in lower or "context_length" in lower \
            or "maximum context" in lower or "exceeds the maximum length" in lower:
        return ProxyError(400, message, "invalid_request_error",
                          "context_length_exceeded")
    return ProxyError(502, message, "api_error", "codex_error")


# The backend's words for a model this login may not use ("The 'gpt-4o' model
# is not supported when using Codex with a ChatGPT account.").
MODEL_REFUSED = re.compile(r"\bmodel\b(?! metadata)[^.]{0,200}?\b(?:is not supported|"
                           r"not supported|unsupported|does not exist|not found|"
                           r"is not available|not enabled)", re.IGNORECASE)


def backend_words(message):
    """Codex passes some backend errors on as their JSON body
    ({"detail": "..."} or {"error": {"message": "..."}}) -> the words in it."""
    try:
        body = json.loads(message) if message.lstrip().startswith("{") else None
    except ValueError:
        return message
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        for key in ("detail", "message"):
            if isinstance(inner.get(key), str) and inner[key].strip():
                return inner[key].strip()
    return message


# codexErrorInfo (app-server) -> status, type, code
CODEX_ERROR_INFO = {
    "contextWindowExceeded": (400, "invalid_request_error", "context_length_exceeded"),
    "usageLimitExceeded": (429, "rate_limit_error", "usage_limit_reached"),
    "sessionBudgetExceeded": (429, "rate_limit_error", "usage_limit_reached"),
    "rateLimitExceeded": (429, "rate_limit_error", "rate_limit_exceeded"),
    "unauthorized": (401, "authentication_error", "codex_unauthorized"),
    "badRequest": (400, "invalid_request_error", "codex_bad_request"),
    "modelNotFound": (404, "invalid_request_error", "model_not_found"),
    "serverOverloaded": (503, "api_error", "server_overloaded"),
    "flexUnavailable": (503, "api_error", "server_overloaded"),
    "policyCapacityUnavailable": (503, "api_error", "server_overloaded"),
    "cyberPolicy": (400, "invalid_request_error", "content_policy_violation"),
    "bioPolicy": (400, "invalid_request_error", "content_policy_violation"),
    "misalignmentPolicyViolation": (400, "invalid_request_error", "content_policy_violation"),
    "internalServerError": (502, "api_error", "codex_error"),
}


def classify_codex_error(error, reset_seconds=None):
    """An app-server TurnError {message, codexErrorInfo, additionalDetails}
    -> ProxyError; unknown kinds fall back to reading the message."""
    error = error if isinstance(error, dict) else {}
    message = backend_words(str(error.get("message") or "Codex turn failed"))
    details = error.get("additionalDetails")
    if isinstance(details, str) and details and details not in message:
        message = f"{message} ({details[:300]})"
    info = error.get("codexErrorInfo")
    if isinstance(info, dict) and info:      # {"httpConnectionFailed": {"httpStatusCode": 429}}
        status = next(iter(info.values()))
        status = status.get("httpStatusCode") if isinstance(status, dict) else None
        if status == 429:
            return usage_limit_error(message, reset_seconds)
        if status == 401:
            info = "unauthorized"
    if info in ("usageLimitExceeded", "sessionBudgetExceeded"):
        return usage_limit_error(message, reset_seconds)
    if info != "modelNotFound" and MODEL_REFUSED.search(message):
        return ProxyError(400, message, "invalid_request_error", "model_not_supported", "model")
    if isinstance(info, str) and info in CODEX_ERROR_INFO:
        status, kind, code = CODEX_ERROR_INFO[info]
        if code == "codex_unauthorized":
            message += " (run `codex login` on the proxy's machine)"
        return ProxyError(status, message, kind, code)
    return classify_failure(message, reset_seconds)


BACKTRACE_LINE = re.compile(r"^\s*(\d+:\s|at\s|stack backtrace:|note: run with|thread '.*' panicked)")


def clean_codex_output(text, private_paths=()):
    """Codex's own plain-text output, fit for a client: no backtrace lines,
    no paths of the proxy's machine."""
    lines = [line for line in text.splitlines() if line.strip() and
             not BACKTRACE_LINE.match(line)]
    return redact_paths("\n".join(lines[:8])[:1000], private_paths)


def redact_paths(text, private_paths=()):
    for path in sorted({p for p in private_paths if p and len(p) > 3}, key=len, reverse=True):
        text = text.replace(path, "<path>")
    return text


# ---------------------------------------------------------------------------
# Processes: process trees, finding Codex, its version and login, the catalog
# ---------------------------------------------------------------------------

def popen_group_kwargs():
    """Start children in their own group so the whole tree can be stopped."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def process_gone(proc):
    """Has the child exited?  poll() says "not yet" while another thread sits
    in wait() for it (it holds Popen's wait lock), so a child that died a
    moment ago is looked at with waitid(WNOWAIT), which does not reap it."""
    if proc.poll() is not None:
        return True
    if not hasattr(os, "waitid"):
        return False
    try:
        return os.waitid(os.P_PID, proc.pid,
                         os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:       # the thread in wait() has just reaped it
        return True


def stop_process_tree(proc, grace=KILL_GRACE_SECONDS):
    """SIGTERM the child's group, SIGKILL it after `grace` seconds, reap it."""
    if os.name == "nt":
        if proc.poll() is None:
            subprocess.run(["taskkill", "/PID", str(proc.pid), "/T", "/F"],
                           capture_output=True, check=False)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:    # also whatever the child left in its group (the MCP bridge)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# The npm launcher (bin/codex.js) runs this native binary of its platform
# package; starting it directly saves a node process per request.
NPM_PLATFORM_PACKAGES = {
    ("linux", "x86_64"): ("codex-linux-x64", "x86_64-unknown-linux-musl"),
    ("linux", "aarch64"): ("codex-linux-arm64", "aarch64-unknown-linux-musl"),
    ("darwin", "x86_64"): ("codex-darwin-x64", "x86_64-apple-darwin"),
    ("darwin", "aarch64"): ("codex-darwin-arm64", "aarch64-apple-darwin"),
    ("win32", "x86_64"): ("codex-win32-x64", "x86_64-pc-windows-msvc"),
    ("win32", "aarch64"): ("codex-win32-arm64", "aarch64-pc-windows-msvc"),
}


def native_codex(script, platform=None, machine=None):
    """The native binary beside an npm `@openai/codex/bin/codex.js`, or None."""
    import platform as platform_module
    platform = platform or ("win32" if os.name == "nt" else sys.platform)
    machine = (machine or platform_module.machine()).lower()
    machine = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    platform = "linux" if platform.startswith("linux") else platform
    package, triple = NPM_PLATFORM_PACKAGES.get((platform, machine), (None, None))
    if package is None:
        return None
    root = os.path.dirname(os.path.dirname(script))      # .../@openai/codex
    name = "codex.exe" if platform == "win32" else "codex"
    for vendor in (os.path.join(root, "node_modules", "@openai", package, "vendor"),
                   os.path.join(os.path.dirname(root), package, "vendor"),
                   os.path.join(root, "vendor")):
        binary = os.path.join(vendor, triple, "bin", name)
        if os.path.isfile(binary) and os.access(binary, os.X_OK):
            return binary
    return None


def resolve_codex(codex_bin, windows=os.name == "nt", native=True):
    """The argv prefix that runs Codex, or None when it cannot be found.

    An npm install is a node launcher (`codex.js`, reached through a symlink
    or, on Windows, a `codex.cmd` shim) in front of a native binary: the
    binary is started directly where it can be found.  Otherwise a Windows
    shim's node script is run with node, so that our arguments are not
    re-quoted by cmd.exe, and anything else is run as it is."""
    path = shutil.which(codex_bin) or (codex_bin if os.path.isfile(codex_bin) else None)
    if path is None:
        return None
    path = os.path.abspath(path)
    script = os.path.realpath(path)
    if windows and path.lower().endswith((".cmd", ".bat")):
        folder = os.path.dirname(path)
        script = None
        for modules in (os.path.join(folder, "node_modules"), os.path.dirname(folder)):
            candidate = os.path.join(modules, "@openai", "codex", "bin", "codex.js")
            if os.path.isfile(candidate):
                script = candidate
                break
        if script is None:
            return [path]
    if script.endswith(os.path.join("@openai", "codex", "bin", "codex.js")) or \
            script.replace("\\", "/").endswith("@openai/codex/bin/codex.js"):
        binary = native_codex(script, "win32" if windows else None) if native else None
        if binary:
            return [binary]
        if windows:
            node = shutil.which("node") or os.path.join(os.path.dirname(path), "node.exe")
            if os.path.isfile(node):
                return [node, script]
    return [path]


def run_quick(argv, env, timeout=20.0):
    """Run a short Codex command -> (returncode, stdout); (None, '') on failure."""
    try:
        done = subprocess.run(argv, env=env, capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None, ""
    return done.returncode, done.stdout.decode("utf-8", "replace")


class CodexInfo:
    """Where Codex is, its version and its login state, as last checked.

    `check()` runs the commands (outside the cache's lock); `cached()` reads
    the answer; `due()` says whether the answer should be checked again:
    "now" when there is none or a stale "not logged in" (a user who just ran
    `codex login` is not refused), "background" when it is merely stale."""

    def __init__(self, config, env, clock=time.monotonic):
        self._config = config
        self._env = env
        self._clock = clock
        # _lock guards the cached fields below; checks run outside it.
        self._lock = threading.Lock()
        # _check_lock makes checks one at a time; a waiter gets the fresh result.
        self._check_lock = threading.Lock()
        self.argv = None
        self.version = None
        self.logged_in = None
        self._checked_at = None
        self._checking = False

    def check(self):
        """Find Codex and ask its version and login state -> (argv, version)."""
        with self._check_lock:
            argv = resolve_codex(self._config.codex_bin)
            version = logged_in = None
            if argv:
                rc, out = run_quick(argv + ["--version"], self._env)
                version = out.strip().splitlines()[-1] if rc == 0 and out.strip() else None
                rc, _ = run_quick(argv + ["login", "status"], self._env)
                logged_in = rc == 0 if rc is not None else None
            with self._lock:
                self.argv, self.version, self.logged_in = argv, version, logged_in
                self._checked_at = self._clock()
                self._checking = False
        return argv, version

    def due(self, max_age=LOGIN_CACHE_SECONDS):
        """None, "now" or "background" (see the class docstring); a
        background check is claimed by the caller that gets it."""
        with self._lock:
            age = None if self._checked_at is None else self._clock() - self._checked_at
            if age is None or (age > max_age and not self.logged_in):
                return "now"
            if age > max_age and not self._checking:
                self._checking = True
                return "background"
            return None

    def cached(self):
        """(argv, version, logged_in) as last checked."""
        with self._lock:
            return self.argv, self.version, self.logged_in

    def current(self):
        """(argv, version) as last checked."""
        with self._lock:
            return self.argv, self.version

    def expire(self):
        """Make the next look check again (tests, and after a 401 from Codex)."""
        with self._lock:
            if self._checked_at is not None:
                self._checked_at -= LOGIN_CACHE_SECONDS + 1


@dataclasses.dataclass
class Catalog:
    """The proxy's copy of Codex's model catalog: the file every Codex gets,
    the one for threads with web search, and what each model says of
    itself (context window, input kinds, efforts)."""
    path: str | None = None
    search_path: str | None = None  # "lite" wire format off: Codex drops hosted tools in it
    models: list = dataclasses.field(default_factory=list)

    def listed(self):
        """The slugs Codex shows users."""
        return [m.get("slug") for m in self.models if m.get("visibility") == "list"]

    def model(self, slug):
        return next((m for m in self.models if m.get("slug") == slug), None)

    def default(self):
        """The slug Codex takes when neither the request nor config.toml names
        one: the listed model it ranks first (lowest `priority`), as
        app-server's model/list marks isDefault."""
        listed = [(m.get("priority") if isinstance(m.get("priority"), (int, float))
                   and not isinstance(m.get("priority"), bool) else float("inf"), n, m)
                  for n, m in enumerate(self.models) if m.get("visibility") == "list"]
        return min(listed, key=lambda entry: entry[:2])[2].get("slug") if listed else None


def model_facts(model):
    """A catalog entry -> what clients look for: the context window, and
    what the model takes and does (Ollama's capability words)."""
    model = model if isinstance(model, dict) else {}
    window = model.get("context_window")
    inputs = model.get("input_modalities")
    efforts = model.get("supported_reasoning_levels")
    capabilities = ["completion", "tools"] + (["thinking"] if efforts else []) + \
        (["vision"] if isinstance(inputs, list) and "image" in inputs else [])
    return {"context_length": window if isinstance(window, int) and
            not isinstance(window, bool) and window > 0 else None,
            "display_name": model.get("display_name") if
            isinstance(model.get("display_name"), str) else None,
            "capabilities": capabilities}


def build_model_catalog(codex_argv, env, state_dir, version):
    """Write Codex's model catalog with tool search, apply_patch, code mode and
    Codex's experimental tools turned off -> a Catalog (empty when Codex
    could not say and no earlier copy exists).

    Catalog models otherwise see MCP tools only behind `tool_search` (exec),
    would be offered Codex's own apply_patch and experimental tools (both
    engines), and newer ones would reach the client's tools only through a
    JavaScript `exec` tool of Codex's (code mode).  A second copy has
    Codex's "lite" wire format off too, for threads with web search: in it
    Codex offers no hosted tool."""
    safe = re.sub(r"[^A-Za-z0-9.]+", "-", version or "unknown")
    path = os.path.join(state_dir, f"model-catalog-{safe}.json")
    search_path = os.path.join(state_dir, f"model-catalog-{safe}-search.json")
    data = None
    for extra in ([], ["--bundled"]):
        rc, out = run_quick(codex_argv + ["debug", "models"] + extra, env, timeout=30)
        try:
            data = json.loads(out) if rc == 0 else None
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("models"), list):
            break
        data = None
    if data is None:
        if os.path.isfile(path) and os.path.isfile(search_path):   # an earlier copy
            with open(path, encoding="utf-8") as f:
                return Catalog(path, search_path, json.load(f).get("models", []))
        return Catalog()
    data["models"] = [m for m in data["models"] if isinstance(m, dict)]
    for model in data["models"]:
        model["supports_search_tool"] = False
        model["apply_patch_tool_type"] = None
        # "code mode" would hide the client's tools inside a JavaScript tool
        # of Codex's own, and the experimental tools are Codex's own too.
        model["tool_mode"] = None
        model["experimental_supported_tools"] = []
    os.makedirs(state_dir, exist_ok=True)
    write_json_file(path, data)
    write_json_file(search_path, {"models": [dict(m, use_responses_lite=False)
                                             for m in data["models"]]})
    return Catalog(path, search_path, data["models"])


def write_json_file(path, data):
    """Write a JSON file whole: readers see the old one or the new one."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Runs: the interface every engine adapter implements
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class PendingCall:
    """A client tool call Codex is waiting on."""
    call: ToolCall
    sent: bool = False                  # reached the client in a response
    result: tuple | None = None         # (text, is_error, [image data: URLs])
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    rpc_id: object = None               # app-server: the request id to answer
    announced: bool = False             # a raw item of the model's response named it
    codex_id: object = None             # the call id as Codex gave it (the client's may differ)


@dataclasses.dataclass
class RunSpec:
    """What a run needs from a request, whichever engine runs it."""
    model: str | None               # the Codex model, None for Codex's default
    effort: str | None
    summary: str | None
    instructions: str
    messages: list                  # the conversation (no system messages); each
                                    # engine renders it its own way
    names: ToolNames                # the tools, under the names Codex takes
    output_schema: dict | None
    fingerprint: str = ""           # ProxyRequest.fingerprint() of its conversation
    known_ids: frozenset = frozenset()  # the call ids its conversation holds
    web_search: dict | None = None  # the hosted search the request asked for

    @property
    def tools(self):
        return self.names.tools

    @functools.cached_property
    def match(self):
        """What a kept thread shares with a request that continues it
        (worked out once: a spec is not changed after it is made)."""
        def digest(value):
            data = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
            return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return ThreadSettings(
            digest(self.instructions),
            tuple((name, digest(dataclasses.astuple(tool)))
                  for _, name, tool in self.names.offered()),
            self.model, self.effort, self.summary,
            digest(self.web_search) if self.web_search else None)


def run_spec(request, aliases, nested=False, messages=None):
    """What Codex gets for a request (or, with `messages`, for what it adds
    to a kept thread); a conversation Codex would refuse is refused here,
    before any Codex starts.  `nested`: the engine takes namespace tools."""
    model, effort = resolve_model(request.model, aliases)
    tools = request.tools if request.tool_choice != "none" else []
    names = ToolNames(tools, nested)
    if messages is None:
        messages = [m for m in request.messages if m.role != "system"]
    spec = RunSpec(model=model, effort=request.reasoning_effort or effort,
                   summary=request.reasoning_summary,
                   instructions=request_instructions(request, tools, names), messages=messages,
                   names=names, output_schema=request.output_schema,
                   fingerprint=request.fingerprint(), known_ids=frozenset(request.history_ids()),
                   web_search=request.web_search)
    last = messages[-1] if messages and messages[-1].role == "user" else None
    check_input_size(len(last.text) if last else 0)      # the turn's own input
    return spec


def check_input_size(chars, what="the turn's input (the newest user message)"):
    """Codex refuses a turn whose input is over MAX_INPUT_CHARS."""
    if chars > MAX_INPUT_CHARS:
        raise ProxyError(400, f"{what} is {chars} characters; Codex takes at most "
                         f"{MAX_INPUT_CHARS}. Shorten it.", "invalid_request_error",
                         "context_length_exceeded", "messages")


class CodexRun:
    """Codex answering one conversation: a turn, and with app-server the
    turns after it on the same thread.  It holds the turn's events, the
    client's tool calls Codex waits on, and its files.  Each engine has a
    subclass.

    The engine's reader threads put (kind, payload) pairs on `events`; the
    pump of the request that owns the run at the moment takes them.  Every
    engine speaks the same kinds:

        thread         Codex's thread id (the run has started its turn)
        text           (item key, delta): answer text; the key changes
                       between Codex's messages
        reasoning      (item key, part index, delta): the reasoning summary
        reasoning_item the model's reasoning as an item with encrypted_content,
                       which gives it back to a later thread (app-server)
        usage          the turn's usage so far, as a dict with Codex's names
                       (input_tokens, cached_input_tokens, output_tokens,
                       reasoning_output_tokens)
        tool_call      a PendingCall: the model called a client tool
        call_announced (client's tool name, arguments): exec is about to call
                       a client tool; its tool_call follows through the bridge
        response_done  frozenset of call ids: the model finished a response
                       holding these calls (only when `signals_responses`)
        model_call     names of undeclared tools Codex answered itself, or ():
                       the model answered one request (app-server) or Codex
                       refused its call of a tool nobody declared (exec)
        warning        text worth logging (Codex retries, notices)
        unexpected     what Codex should not ask here (an approval, which is
                       declined; one of the user's MCP servers starting)
        codex_tool     Codex ran a tool of its own: the turn is stopped
        completed      None: the turn ended
        interrupted    None: the turn was interrupted
        failed         {"message", "codexErrorInfo"?, "additionalDetails"?}
        exit           (exit code, plain output): the process ended

    A run outlives an HTTP response when it parks on tool calls, and when
    its thread is kept for the conversation's next turn."""

    engine = None                   # the name of the adapter that runs it
    signals_responses = False       # sends response_done, so calls need no quiet wait
    can_continue = False            # takes a conversation's next turn (continue_turn)

    def __init__(self, run_id, env):
        """A run with no process yet: its events queue, its calls, its state."""
        self.id = run_id
        self.env = env
        self.events = queue.Queue()
        self.stderr_tail = collections.deque(maxlen=40)
        self.proc = None
        self.thread_id = None
        self.model = None           # as given to Codex, for the log
        self.effort = None
        self.warm = False           # started ahead of its request
        self.fingerprint = None     # ProxyRequest.fingerprint() of its conversation
        self.match = None           # ... and its settings: what a continuation shares
        self.parked_key = None      # conversation_key() of what a parked run has seen
        self.names = ToolNames([], False)   # the client's tools, as Codex knows them
        self.runs = None            # the RunTable: call ids stay unique across runs
        self.exited = threading.Event()
        self._stopped = threading.Event()       # set once stop() has finished
        # _lock guards _calls, _used_ids and _stopping; reader threads and
        # handlers share them.
        self._lock = threading.Lock()
        self._stopping = False
        self._calls = {}
        self._used_ids = set()

    @property
    def retired(self):
        """Its Codex takes no new turn (an app-server process being recycled)."""
        return False

    def assign(self, spec, runs):
        """Give the run its request (a RunSpec): the client's tools as Codex
        knows them, the call ids its conversation holds, what a continuation
        must share; and the table of live runs, which it joins."""
        self.names = spec.names
        self.fingerprint, self.match = spec.fingerprint, spec.match
        self.model, self.effort = spec.model, spec.effort
        self.runs = runs
        with self._lock:
            self._used_ids.update(spec.known_ids)
        runs.add(self)

    def _start_readers(self):
        threading.Thread(target=self._read_stdout, name=f"codex-out-{self.id}",
                         daemon=True).start()
        threading.Thread(target=self._read_stderr, name=f"codex-err-{self.id}",
                         daemon=True).start()

    def _read_stderr(self):
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self.stderr_tail.append(line)
            self._stderr_line(line)
        self.proc.stderr.close()

    def _stderr_line(self, line):
        """What an engine reads from Codex's log lines (nothing, by default)."""

    def _read_stdout(self):
        raise NotImplementedError

    # -- tool calls --------------------------------------------------------
    @staticmethod
    def client_arguments(spec, arguments):
        """A call's arguments as Codex gives them -> as the client sees them:
        JSON, or a custom tool's raw input text."""
        if spec.custom and isinstance(arguments, dict):
            text = arguments.get("input")
            return text if isinstance(text, str) else json.dumps(arguments)
        return call_arguments(arguments)

    def add_call(self, call_id, spec, arguments, rpc_id=None, announced=False):
        """Register a call of a client tool and queue it for the client."""
        custom = spec.custom
        arguments = self.client_arguments(spec, arguments)
        codex_id = call_id
        taken = self.runs is not None and self.runs.call_known(call_id)
        if not isinstance(call_id, str) or not call_id or taken:
            call_id = None      # ids are unique across runs: a result finds one turn
        with self._lock:
            if call_id is None or call_id in self._used_ids:
                call_id = "call_" + secrets.token_hex(12)
            self._used_ids.add(call_id)
            pending = PendingCall(ToolCall(call_id, spec.name, arguments, custom,
                                           spec.namespace), rpc_id=rpc_id, announced=announced,
                                  codex_id=codex_id)
            self._calls[call_id] = pending
        self.events.put(("tool_call", pending))
        return pending

    def remember_ids(self, ids):
        with self._lock:
            self._used_ids.update(ids)

    def knows_call(self, call_id):
        with self._lock:
            return call_id in self._used_ids

    def open_calls(self):
        """The calls the client has and has not answered, in the order made."""
        with self._lock:
            return [p.call for p in self._calls.values() if p.sent and not p.done.is_set()]

    def open_call_ids(self, sent_only=True):
        with self._lock:
            return {cid for cid, p in self._calls.items()
                    if not p.done.is_set() and (p.sent or not sent_only)}

    def answer(self, call_id, text, is_error=False, images=()):
        with self._lock:
            pending = self._calls.get(call_id)
            if pending is None or pending.done.is_set():
                return False
            pending.result = (text, is_error, list(images))
            pending.done.set()
        self._deliver(pending)
        return True

    def take_results(self, results, context=()):
        """The client's results (tool Messages) to the calls Codex waits on ->
        [(call id, characters)] answered.  Context the client added after
        them goes with the last one; a call left without a result is
        answered with an error."""
        notes = "\n\n".join(m.text for m in context)
        answered = []
        for n, result in enumerate(results):
            text = result.text + ("\n\n" + notes if notes and n == len(results) - 1 else "")
            if self.answer(result.tool_call_id, text, images=result.images):
                answered.append((result.tool_call_id, len(result.text)))
        for missing in self.open_call_ids():
            self.answer(missing, "The client sent no result for this call.", True)
        return answered

    def _deliver(self, pending):
        """Hand an answered call back to Codex (the exec bridge waits on `done`)."""

    # -- ending ------------------------------------------------------------
    def answer_open_calls(self, reason):
        """Answer every call Codex still waits on with an error."""
        for call_id in self.open_call_ids(sent_only=False):
            self.answer(call_id, reason, True)

    def stop(self, reason="The request ended before the tool result arrived.", grace=0.0):
        """End the run: the calls Codex waits on are answered with an error,
        and the engine lets Codex go (_end).  Once: a second caller (a
        shutdown racing a handler) waits for the first.  `grace`: the turn
        is done, so Codex may finish on its own first."""
        with self._lock:
            first, self._stopping = not self._stopping, True
        if not first:
            self._stopped.wait(2 * KILL_GRACE_SECONDS + 5)
            return
        try:
            self._end(reason, grace)
        finally:
            self._stopped.set()

    def _end(self, reason, grace):
        raise NotImplementedError


class Engine:
    """One way of running Codex: the adapter the launcher picks by name.

    An engine starts runs for requests (`start`), knows its command line
    (`argv`), says whether Codex can run it (`probe`) and, when it keeps
    long-lived processes that host many runs (`pooled`), builds them
    (`spawn`) and says what they depend on (`process_key`).  Its runs emit the events that
    CodexRun lists, failures included, so nothing after it knows which
    engine ran."""

    name = None
    pooled = False                  # its runs live on long-lived processes (ProcessPool)
    namespaces = False              # offers namespace tools as namespaces

    def __init__(self, launcher):
        self.launcher = launcher

    def argv(self, prefix):
        """The command line that starts this engine's Codex process."""
        raise NotImplementedError

    def probe(self, argv):
        """-> (ok, reason): whether the Codex at `argv` runs this engine."""
        return True, f"chosen with --engine {self.name}"

    def new_run(self, spec):
        """A run for `spec` (a RunSpec), its turn started -> the CodexRun.
        The run joins the run table before its process starts, so that
        whatever Codex starts (the exec bridge) finds it at once."""
        raise NotImplementedError

    def spawn(self):
        """A long-lived process for the pool (pooled engines only)."""
        raise NotImplementedError

    def process_key(self):
        """What a spare depends on; None when no spare should be kept."""
        return None

    def open(self):
        """Start what the engine needs beside its runs (the exec bridge)."""

    def close(self):
        """Stop it again."""

# ---------------------------------------------------------------------------
# The pump: one run's events -> one responder, and how the turn ended
# ---------------------------------------------------------------------------


def signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def forces_tool(request):
    """Does the request force one tool (tool_choice names it, or requires a
    call with one tool offered)?  Extraction clients do, and send no result."""
    choice = request.tool_choice
    return isinstance(choice, dict) or (choice == "required" and len(request.tools) == 1)


@dataclasses.dataclass
class TurnEnd:
    """How a run's turn ended for one response: the value TurnPump returns.
    Turns.settle decides from it what becomes of the run and writes the
    response's last bytes."""
    kind: str                       # answered | calls | failed | gone
    usage: dict = dataclasses.field(default_factory=dict)   # Codex's usage of the turn
    reason: str = "stop"            # the finish reason: stop | tool_calls
    calls: list = dataclasses.field(default_factory=list)   # [PendingCall] for the client
    error: object = None            # the ProxyError, when failed
    cut: bool = False               # answered, but cut at a stop sequence: Codex went on
    forced: bool = False            # calls the client forced: it answers them fresh, if at all
    first_output: float = None      # when the first text, reasoning or call was seen
    process_died: bool = False      # failed because Codex's process ended


class TurnPump:
    """Relays one run's events to one responder until the turn ends for
    this response, and says how it ended: a TurnEnd.

    It owns the timing rules of a response: --idle-timeout and
    --request-timeout, keepalives, noticing a client that has left, the
    loop guards, and which of the model's calls go out together.  It writes
    what streams (text, reasoning, keepalives); the last bytes (the calls,
    the finish or the error) are written by Turns.settle once it has
    decided what becomes of the run."""

    NOT_RUN = ("Not run: the client accepts one tool call at a time "
               "(parallel_tool_calls is false). Call it again after this result if "
               "you still need it.")

    def __init__(self, codex_run, responder, handler, launcher):
        """A pump for one run and one responder; `launcher` gives the config,
        the log, what failures mean and whether a warning is worth logging."""
        self.codex_run, self.responder, self.handler = codex_run, responder, handler
        self.request = responder.request
        self.launcher = launcher
        self.config, self.logs = launcher.config, launcher.logs
        self.calls = []             # [PendingCall] of the batch being collected
        self.usage = None
        self.last_warning = None
        self.reasoning_chars = 0
        self.expected = None        # the calls of a response the model has finished
        self.announced = []         # (name, arguments) of calls Codex said it is making
        self.stop = StopFilter(self.request.stop) if self.request.stop else None
        self.heard_model = False    # anything from the model since this response began
        self.first_output = None    # when the first text, reasoning or call was seen
        self.exit_seen = False      # the run's process ended
        self.searches = 0           # hosted web searches done
        self.unknown_streak = 0     # model calls in a row of tools nobody declared
        self.silent_calls = 0       # model calls since something reached the client
        self._text_key = None

    def pump(self):
        """-> TurnEnd: answered, calls for the client, failed (with the
        ProxyError) or gone (the client left)."""
        try:
            return self._relay()
        except ProxyError as error:
            return TurnEnd("failed", error=error, first_output=self.first_output,
                           process_died=self.exit_seen)
        except DISCONNECT_ERRORS:
            return TurnEnd("gone", first_output=self.first_output)

    def _relay(self):
        """The event loop.  Only progress (anything but Codex's warnings)
        keeps a turn alive past --idle-timeout: a backend that stays
        unreachable ends it however often Codex says it is reconnecting.
        The client's socket is watched all along, so one that leaves is
        noticed while tokens flow too."""
        cfg, clock = self.config, time.monotonic
        started = last_progress = next_keepalive = next_look = clock()
        next_keepalive += cfg.keepalive
        batch_end = None
        while True:
            now = clock()
            if batch_end is not None and now >= batch_end:
                return self.calls_end()
            if now - last_progress >= cfg.idle_timeout:
                raise self.idle_error()
            if now - started >= cfg.request_timeout:
                raise ProxyError(504, f"the request took over {cfg.request_timeout:g} s "
                                 "(--request-timeout)", "api_error", "codex_request_timeout")
            if now >= next_look:
                if self.handler.client_gone():
                    raise ClientGone()
                next_look = now + CLIENT_LOOK_SECONDS
            wait = min(POLL_SECONDS, next_keepalive - now,
                       (batch_end - now) if batch_end is not None else POLL_SECONDS)
            try:
                kind, payload = self.codex_run.events.get(timeout=max(0.0, wait))
            except queue.Empty:
                if clock() >= next_keepalive:
                    self.responder.keepalive()
                    next_keepalive = clock() + cfg.keepalive
                continue
            if kind not in ("warning", "unexpected"):
                last_progress = clock()
                self.heard_model = self.heard_model or kind not in ("thread",)
            if kind in ("tool_call", "response_done", "call_announced"):
                batch_end = self.batch_deadline(kind, payload, last_progress)
                continue
            end = self.handle_event(kind, payload)
            if end is not None:
                return end

    def idle_error(self):
        """Silence past --idle-timeout.  When the model has not answered at
        all, or Codex only said it was retrying, the backend is unreachable
        (Codex retries a refused connection without a word)."""
        cfg, warning = self.config, self.last_warning or ""
        retrying = re.search(r"reconnect|retrying|stream disconnected|error sending request",
                             warning, re.I)
        if retrying or not self.heard_model:
            why = f" (last: {warning[:200]})" if retrying else ""
            return ProxyError(504, f"the model backend is unreachable: no answer from it in "
                              f"{cfg.idle_timeout:g} s (--idle-timeout){why}", "api_error",
                              "backend_unreachable")
        return ProxyError(504, f"Codex sent nothing for {cfg.idle_timeout:g} s "
                          "(--idle-timeout)", "api_error", "codex_idle_timeout")

    def batch_deadline(self, kind, payload, now):
        """A call arrived, Codex announced one, or the model ended a
        response -> when to end this response with the calls collected so
        far (None: not yet).

        Calls the model makes together go out together.  app-server says
        when the model has finished a response, and which calls it made;
        exec announces each call before it reaches the bridge.  The batch
        ends once every call so named has arrived; a call nobody named (one
        from inside a tool of Codex's own) ends it after a quiet spell of
        --tool-quiet-ms."""
        if kind == "tool_call":
            self.silent_calls = 0
            self.first_output = self.first_output or time.monotonic()
            self.calls.append(payload)
            self.logs.add(LogEvent.TOOL_CALL_FORWARDED, self.handler.request_id,
                          run=self.codex_run.id, name=payload.call.name,
                          call_id=payload.call.id,
                          argument_bytes=len(payload.call.arguments))
        elif kind == "call_announced":
            self.announced.append(payload)
        else:
            self.expected = payload
        if not self.calls:
            return None
        if self.expected is not None:
            done = self.expected <= {p.codex_id for p in self.calls}
            return now if done else now + self.config.tool_quiet
        if self.announced:
            arrived = collections.Counter((p.call.name, canonical_arguments(p.call.arguments))
                                          for p in self.calls)
            waiting = collections.Counter((name, canonical_arguments(call_arguments(args)))
                                          for name, args in self.announced) - arrived
            return None if waiting else now + self.config.tool_quiet
        if self.codex_run.signals_responses and all(p.announced for p in self.calls):
            return None         # the model may still be writing more calls
        return now + self.config.tool_quiet

    def handle_event(self, kind, payload):
        """One event of the run (CodexRun lists the kinds) -> a TurnEnd when
        the turn has ended for this response, else None.  Text and reasoning
        go to the responder as they come; a failure, an interruption or an
        exit raises the ProxyError the client sees; Codex running a tool of
        its own stops the turn (fail closed)."""
        logs, rid, run = self.logs, self.handler.request_id, self.codex_run
        if kind == "thread":
            run.thread_id = payload
            logs.add(LogEvent.CODEX_FORWARD, rid, run=run.id, engine=run.engine,
                     warm=run.warm, thread_id=payload,
                     mapped_model=run.model or self.launcher.default_model(),
                     effort=run.effort, pid=run.proc.pid if run.proc else None)
        elif kind in ("text", "reasoning"):
            self.silent_calls = 0
            self.first_output = self.first_output or time.monotonic()
            if kind == "text":
                return self.text(*payload)
            self.reasoning_chars += len(payload[-1])
            self.responder.reasoning(*payload)
        elif kind == "search":
            return self.searched(payload)
        elif kind == "annotations":
            self.responder.annotate(*payload)
        elif kind == "model_call":
            self.model_called(payload)
        elif kind == "reasoning_item":
            self.responder.reasoning_items.append(payload)
        elif kind == "usage":
            self.usage = payload
        elif kind == "warning":
            self.last_warning = payload or self.last_warning
            if self.launcher.worth_logging(payload):
                logs.add(LogEvent.CODEX_WARNING, rid, run=run.id,
                         message=self.launcher.redact(payload)[:500])
        elif kind == "unexpected":
            logs.add(LogEvent.CODEX_WARNING, rid, run=run.id,
                     message=f"Codex produced {payload}; it should have no such tool")
        elif kind == "codex_tool":
            raise ProxyError(502, f"Codex ran a tool of its own ({payload}), which it must "
                             "never do here; the turn was stopped", "api_error",
                             "codex_tool_used", headers=NO_RETRY)
        elif kind == "completed":
            self.flush_text()
            return self.answered()
        elif kind in ("failed", "interrupted", "exit"):
            raise self.ended(kind, payload)
        return None

    def ended(self, kind, payload):
        """A turn that ended without completing -> the error the client sees:
        a shutdown as a shutdown, an exit with its status or signal."""
        launcher = self.launcher
        if launcher.stopping.is_set():
            return ProxyError(503, "the proxy is shutting down; retry when it is back",
                              "server_error", "shutting_down")
        if kind == "failed":
            return launcher.failure(payload)
        if kind == "interrupted":
            return launcher.failure({"message": "Codex interrupted the turn"})
        code, plain = payload
        self.exit_seen = True
        how = f"was killed by signal {signal_name(-code)}" if code is not None and code < 0 \
            else f"exited with status {code}"
        detail = plain or "\n".join(list(self.codex_run.stderr_tail)[-5:])
        return launcher.failure({"message": f"Codex {how} before finishing the turn"
                                            + (f": {detail}" if detail else "")})

    def searched(self, event):
        """A hosted web search: shown in the API's shape.  Past the request's
        max_uses (Anthropic's), the search is refused and the turn ends."""
        self.silent_calls = 0
        limit = (self.request.web_search or {}).get("max_uses")
        if limit and event["status"] == "in_progress" and self.searches >= limit:
            self.responder.search_refused(event, "max_uses_exceeded")
            return self.answered(cut=True)
        if event["status"] == "completed":
            self.searches += 1
        self.responder.search(event)
        return None

    def model_called(self, unknown):
        """No invisible loops on the user's quota: the model calling tools
        nobody declared (Codex answers those itself, and the model tries
        again), or calling on and on while nothing reaches the client, ends
        the turn with an error."""
        cfg = self.config
        self.unknown_streak = self.unknown_streak + 1 if unknown else 0
        self.silent_calls += 1
        if self.unknown_streak > cfg.max_unknown_calls:
            raise ProxyError(502, f"the model called {', '.join(sorted(set(unknown)))}, which "
                             f"the client did not declare, {self.unknown_streak} times in a "
                             "row; the turn was stopped so that it does not loop on your "
                             "plan's quota (--max-unknown-calls)", "api_error", "model_loop",
                             headers=NO_RETRY)
        if self.silent_calls > cfg.max_silent_calls:
            raise ProxyError(502, f"the model made {self.silent_calls} calls without anything "
                             "reaching the client; the turn was stopped so that it does not "
                             "loop on your plan's quota (--max-silent-calls)", "api_error",
                             "model_loop", headers=NO_RETRY)

    def text(self, key, delta):
        if self.stop is None:
            self.responder.text(key, delta)
            return None
        if key != self._text_key:
            self.flush_text()
            self._text_key = key
        emit = self.stop.feed(delta)
        if emit:
            self.responder.text(key, emit)
        if self.stop.hit:
            self.responder.stop_sequence = self.stop.matched
            return self.answered(cut=True)
        return None

    def flush_text(self):
        if self.stop is not None:
            held = self.stop.flush()
            if held:
                self.responder.text(self._text_key, held)

    def answered(self, cut=False):
        if self.reasoning_chars:
            self.logs.add(LogEvent.REASONING_DETECTED, self.handler.request_id,
                          run=self.codex_run.id, summary_chars=self.reasoning_chars)
        return TurnEnd("answered", self.usage or {}, "stop", cut=cut,
                       first_output=self.first_output)

    def calls_end(self):
        """The batch is complete: the calls for the client (one, when it
        takes one at a time; the others are answered "not run")."""
        calls = self.calls
        if not self.request.parallel_tool_calls and len(calls) > 1:
            for extra in calls[1:]:
                self.codex_run.answer(extra.call.id, self.NOT_RUN, True)
            calls = calls[:1]
        self.flush_text()
        return TurnEnd("calls", self.usage or {}, "tool_calls", calls=calls,
                       forced=forces_tool(self.request), first_output=self.first_output)


# ---------------------------------------------------------------------------
# Engine: exec (`codex exec --json`, client tools through the MCP bridge)
# ---------------------------------------------------------------------------


def render_prompt(messages, names=None):
    """The conversation as Codex's prompt.

    A conversation that is one user message is sent as its text.  Anything
    longer becomes a transcript, oldest first, one block per message:

        <transcript>
        <message role="user">
        Fix the bug in a.py
        </message>
        <message role="assistant">
        Let me look.
        <tool_call id="call_1" name="read_file">{"path": "a.py"}</tool_call>
        </message>
        <tool_result id="call_1" name="read_file">
        print('hi')
        </tool_result>
        </transcript>

    followed by one line asking the model to continue as the assistant.
    System and developer messages are not here: they are the instructions.
    """
    convo = [m for m in messages if m.role != "system"]
    if len(convo) == 1 and convo[0].role == "user":
        return convo[0].text
    def codex_name(call):
        return names.to_codex(call.namespace, call.name)[1] if names else call.name
    called = {c.id: codex_name(c) for m in convo for c in m.tool_calls}
    lines = ["<transcript>"]
    for m in convo:
        if m.role == "tool":
            name = called.get(m.tool_call_id) or m.name or ""
            lines += [f'<tool_result id="{m.tool_call_id}" name="{name}">',
                      m.text, "</tool_result>"]
            continue
        lines.append(f'<message role="{m.role}">')
        if m.text:
            lines.append(m.text)
        for c in m.tool_calls:
            lines.append(f'<tool_call id="{c.id}" name="{codex_name(c)}">'
                         f'{c.arguments}</tool_call>')
        lines.append("</message>")
    lines.append("</transcript>")
    lines.append("Continue this conversation: write the assistant's next "
                 "message (call a tool if you need one).")
    return "\n".join(lines)


def translate_codex_event(event, search=False):
    """One parsed `codex exec --json` line -> [(kind, payload)] (CodexRun's
    kinds); `search`: the hosted web search is on for this run.

    Text is taken from completed items only, so it goes out exactly once."""
    etype = event.get("type")
    if etype == "thread.started":
        return [("thread", event.get("thread_id"))]
    if etype == "turn.completed":
        return [("usage", event.get("usage") or {}), ("completed", None)]
    if etype == "turn.failed":
        error = event.get("error") or {}
        return [("failed", {"message": error.get("message") or "Codex turn failed"})]
    if etype == "error":
        return [("warning", event.get("message") or "")]
    if etype not in ("item.completed", "item.started"):
        return []
    item = event.get("item") or {}
    itype = item.get("type")
    if itype == "error":
        return [("warning", item.get("message") or "")] if etype == "item.completed" else []
    if itype == "web_search" and search:
        return [("search", search_of(item, etype == "item.completed"))]
    if etype != "item.completed":
        if itype == "mcp_tool_call" and item.get("server") == "client":
            return [("call_announced", (item.get("tool"), item.get("arguments")))]
        return []
    if itype == "agent_message":
        return [("text", (item.get("id"), item.get("text") or ""))]
    if itype == "reasoning":
        return [("reasoning", (item.get("id"), 0, item.get("text") or ""))]
    if itype in ("command_execution", "file_change", "web_search"):
        return [("codex_tool", itype)]
    return []


class ExecRun(CodexRun):
    """`codex exec --json`: the prompt on stdin, JSONL events on stdout, client
    tools through the MCP bridge (this file, started by Codex)."""

    engine = "exec"

    def __init__(self, run_id, env, tempdir):
        super().__init__(run_id, env)
        self.tempdir = tempdir
        self.workdir = os.path.join(tempdir, "work")    # Codex's empty working root
        os.makedirs(self.workdir, exist_ok=True)
        self.secret = secrets.token_hex(24)
        self.argv = []
        self.search = False         # the hosted web search is on (its items are expected)

    def _end(self, reason, grace):
        """Close Codex's input (with `grace`, wait that long for it to exit
        by itself), answer what it waits on, stop its process tree, and
        remove the run's files."""
        if grace:                   # its input is closed: a finished turn exits by itself
            self.exited.wait(grace)
        self.answer_open_calls(reason)
        if self.proc is not None:
            stop_process_tree(self.proc)
        shutil.rmtree(self.tempdir, ignore_errors=True)

    def launch(self, argv, prompt):
        """Start `codex exec` and give it the prompt."""
        self.argv = argv
        self.proc = subprocess.Popen(
            argv, env=self.env, cwd=self.workdir, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_group_kwargs())
        self._start_readers()
        try:
            self.proc.stdin.write(prompt.encode("utf-8"))
            self.proc.stdin.close()
        except OSError:
            pass    # Codex exited early; the reader reports why

    UNSUPPORTED = re.compile(r"unsupported call: ([^\s\"']+)")

    def _stderr_line(self, line):
        """exec says nothing on stdout of a call Codex refuses itself; its
        log has one line per model call of a tool nobody declared."""
        match = self.UNSUPPORTED.search(line)
        if match:
            self.events.put(("model_call", (match.group(1),)))

    def _read_stdout(self):
        """The reader thread: each JSONL line -> events (plain text lines are
        Config errors, kept for the exit's message); the exit last."""
        plain = []
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                plain.append(line)      # config errors come as plain text
                continue
            for kind, payload in translate_codex_event(event, self.search):
                if kind == "call_announced":    # under the client's name, as it will arrive
                    spec = self.names.from_codex(None, payload[0])
                    if spec is None:
                        continue
                    payload = (spec.name, self.client_arguments(spec, payload[1]))
                self.events.put((kind, payload))
        self.proc.stdout.close()
        self.proc.wait()
        self.exited.set()
        self.events.put(("exit", (self.proc.returncode, "\n".join(plain[-20:]))))


def write_run_files(run, instructions, images, output_schema):
    """The files an exec run needs: instructions, images, output schema."""
    instructions_path = os.path.join(run.tempdir, "instructions.md")
    with open(instructions_path, "w", encoding="utf-8") as f:
        f.write(instructions)
    image_paths = []
    for n, url in enumerate(images):
        header, _, payload = url.partition(",")
        ext = {"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif",
               "image/webp": ".webp"}.get(header[5:].split(";")[0], ".png")
        try:
            data = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError):
            raise bad_request(f"image #{n + 1} is not valid base64")
        path = os.path.join(run.tempdir, f"image-{n + 1}{ext}")
        with open(path, "wb") as f:
            f.write(data)
        image_paths.append(path)
    schema_path = None
    if output_schema is not None:
        schema_path = os.path.join(run.tempdir, "output-schema.json")
        with open(schema_path, "w", encoding="utf-8") as f:
            json.dump(output_schema, f)
    return instructions_path, image_paths, schema_path


def codex_argv(prefix, *, model, effort, user_config, extra_config, workdir,
               instructions_path, images=(), bridge_config=None, catalog=None,
               bridge_timeout, output_schema=None, summary=None, web_search=None):
    """The full `codex exec` command line for one run."""
    argv = [*prefix, "exec"]
    for path in images:
        argv += ["-i", path]
    flags = list(FORWARDER_FLAGS)
    if web_search:          # the hosted search, asked for: live, with its settings
        flags[flags.index('web_search="disabled"')] = 'web_search="live"'
        table = {k: web_search[k] for k in ("context_size", "location", "allowed_domains")
                 if k in web_search}
        if table:
            flags += ["-c", f"tools.web_search={toml_value(table)}"]
    argv += flags
    argv += ["-C", workdir]
    if output_schema:
        argv += ["--output-schema", output_schema]
    for key in FORWARDED_CONFIG_KEYS:
        if key == "model" or key not in user_config:
            continue
        if (key == "model_reasoning_effort" and effort) or \
                (key == "model_reasoning_summary" and summary):
            continue
        argv += ["-c", f"{key}={toml_value(user_config[key])}"]
    if effort:
        argv += ["-c", f"model_reasoning_effort={toml_value(effort)}"]
    if summary:
        argv += ["-c", f"model_reasoning_summary={toml_value(summary)}"]
    if catalog:
        argv += ["-c", f"model_catalog_json={toml_value(catalog)}"]
    if bridge_config:
        script = os.path.abspath(__file__)
        server = {"command": sys.executable,
                  "args": [script, "--mcp-bridge", bridge_config],
                  "default_tools_approval_mode": "approve",
                  "tool_timeout_sec": float(bridge_timeout) + 120.0,
                  "startup_timeout_sec": 30.0,
                  # Codex does not wait for an MCP server unless it is
                  # required: a bridge slower to start than Codex (a loaded
                  # machine) would leave the client's tools out of the turn.
                  "required": True,
                  "supports_parallel_tool_calls": True}
        for key, value in server.items():
            argv += ["-c", f"mcp_servers.client.{key}={toml_value(value)}"]
    for item in extra_config:
        argv += ["-c", item]
    argv += ["-c", f"model_instructions_file={toml_value(instructions_path)}"]
    model = model or user_config.get("model")
    if model:
        argv.append(f"--model={model}")     # one token: a name can never read as a flag
    argv.append("-")
    return argv


class ExecEngine(Engine):
    """`codex exec --json`, one process per request: the fallback when
    app-server does not work.  Whole messages, no token streaming.  Client
    tools reach the model through the MCP bridge (this same file, started by
    Codex), which relays each call to the proxy over loopback."""

    name = "exec"

    def __init__(self, launcher):
        super().__init__(launcher)
        self.bridge = BridgeListener(launcher.runs.get, launcher.stopping,
                                     launcher.config.max_body)
        self._thread = None

    def open(self):
        self._thread = threading.Thread(target=self.bridge.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="bridge-listener", daemon=True)
        self._thread.start()

    def close(self):
        if self._thread is not None:       # shutdown() waits for serve_forever
            self.bridge.shutdown()
        self.bridge.server_close()

    def new_run(self, spec):
        """A `codex exec` process for `spec`: its files, its bridge config, its
        command line; the prompt (the transcript) on its stdin."""
        launcher = self.launcher
        prompt = render_prompt(spec.messages, spec.names)
        check_input_size(len(prompt), "the conversation (exec sends it all as the "
                                      "turn's input)")
        run = ExecRun(new_run_id(), launcher.env, tempfile.mkdtemp(prefix="codex-proxy-"))
        run.assign(spec, launcher.runs)
        run.search = bool(spec.web_search)
        try:
            instructions, images, schema = write_run_files(
                run, spec.instructions, [url for m in spec.messages for url in m.images],
                spec.output_schema)
            bridge_path = self._write_bridge_config(run, spec.names) if spec.tools else None
            argv = codex_argv(
                launcher.codex.current()[0], model=spec.model, effort=spec.effort,
                user_config=launcher.user_config.read(),
                extra_config=launcher.config.codex_config, workdir=run.workdir,
                instructions_path=instructions, images=images, bridge_config=bridge_path,
                catalog=launcher.catalog.search_path if spec.web_search
                else launcher.catalog.path,
                bridge_timeout=launcher.config.tool_result_timeout,
                output_schema=schema, summary=spec.summary, web_search=spec.web_search)
            run.launch(argv, prompt)
        except OSError as exc:
            launcher.discard(run)
            raise ProxyError(503, f"could not start Codex: {exc.strerror or exc}",
                             "server_error", "codex_not_found")
        except BaseException:
            launcher.discard(run)
            raise
        return run

    def _write_bridge_config(self, run, names):
        path = os.path.join(run.tempdir, "bridge.json")
        host, port = self.bridge.server_address[:2]
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"relay": f"{host}:{port}", "run": run.id, "secret": run.secret,
                       "tools": mcp_tool_list(names)}, f)
        return path


BRIDGE_HELLO_LIMIT = 1024          # the first line, checked before anything else is read
BRIDGE_READ_SECONDS = 10.0
BRIDGE_MAX_CONNECTIONS = 256


class BridgeRelayHandler(socketserver.StreamRequestHandler):
    """Proxy side of the bridge: one connection per tool call.

    The bridge sends {"run", "secret"} on a short first line; only when they
    match does the proxy read the second line {"call_id", "name",
    "arguments"}.  The answer line {"text", "is_error"} is written when the
    client's result arrives (or the run ends)."""

    timeout = BRIDGE_READ_SECONDS

    def handle(self):
        """One relayed call: the hello checked (run and secret) before the call
        is read; the answer written when the client's result comes."""
        listener = self.server
        hello = self._line(BRIDGE_HELLO_LIMIT)
        if not isinstance(hello, dict):
            return
        run = listener.find_run(str(hello.get("run", "")))
        if not isinstance(run, ExecRun) or not hmac.compare_digest(
                run.secret.encode(), str(hello.get("secret", "")).encode()):
            self._reply("unknown run or bad secret", True)
            return
        request = self._line(listener.max_line)
        if not isinstance(request, dict):
            return
        self.connection.settimeout(None)
        spec = run.names.from_codex(None, str(request.get("name", "")))
        if spec is None:
            self._reply(f"unknown tool: {request.get('name')}", True)
            return
        pending = run.add_call(request.get("call_id"), spec, request.get("arguments"))
        while not pending.done.wait(1.0):
            if run.exited.is_set() or listener.stopping.is_set():
                return
        self._reply(*pending.result)

    def _line(self, limit):
        try:
            line = self.rfile.readline(limit + 1)
            if len(line) > limit or not line.endswith(b"\n"):
                return None
            return json.loads(line)
        except (OSError, ValueError):
            return None

    def _reply(self, text, is_error, images=()):
        try:
            self.wfile.write(json.dumps({"text": text, "is_error": is_error,
                                         "images": list(images)}).encode() + b"\n")
        except OSError:
            pass


class BridgeListener(socketserver.ThreadingTCPServer):
    """The loopback listener the bridges of exec runs call back to."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, find_run, stopping, max_line):
        self.find_run = find_run        # run id -> CodexRun or None
        self.stopping = stopping
        self.max_line = max_line
        # _lock guards _open, the relay connections being served.
        self._lock = threading.Lock()
        self._open = set()
        super().__init__(("127.0.0.1", 0), BridgeRelayHandler)

    def verify_request(self, request, client_address):
        with self._lock:
            if len(self._open) >= BRIDGE_MAX_CONNECTIONS:
                return False
            self._open.add(request)
        return True

    def shutdown_request(self, request):
        with self._lock:            # refused connections end here too: count only ours
            self._open.discard(request)
        super().shutdown_request(request)


def mcp_tool_list(names):
    """The client's tools as the bridge lists them (flat: exec nests nothing)."""
    return [{"name": name, "description": tool.description, "inputSchema": tool.parameters}
            for _, name, tool in names.offered()]


def run_mcp_bridge(config_path, stdin=None, stdout=None):
    """Serve the client's tools to Codex over MCP stdio, relaying each call.

    Started by Codex, never by a user.  Newline-delimited JSON-RPC 2.0 on
    stdin/stdout; each tools/call is relayed to the proxy on its own thread
    and answered when the proxy sends the client's result back."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    with open(config_path, encoding="utf-8") as f:
        conf = json.load(f)
    out_lock = threading.Lock()     # guards stdout: one JSON-RPC message per line

    def send(message):
        data = json.dumps(message).encode() + b"\n"
        with out_lock:
            try:
                stdout.write(data)
                stdout.flush()
            except (OSError, ValueError):
                pass        # Codex has gone; nobody is waiting for the answer

    calls = []
    for raw in iter(stdin.readline, b""):
        try:
            message = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        method, msg_id = message.get("method"), message.get("id")
        params = message.get("params") or {}
        if msg_id is None:
            continue                    # notifications need no answer
        if method == "initialize":
            send({"jsonrpc": "2.0", "id": msg_id, "result": {
                "protocolVersion": params.get("protocolVersion", MCP_PROTOCOL_VERSION),
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "codex-openai-proxy-client-tools",
                               "version": __version__}}})
        elif method == "tools/list":
            send({"jsonrpc": "2.0", "id": msg_id, "result": {"tools": conf["tools"]}})
        elif method == "tools/call":
            calls.append(threading.Thread(target=_bridge_call, name="bridge-call",
                                          args=(conf, msg_id, params, send), daemon=True))
            calls[-1].start()
        elif method == "ping":
            send({"jsonrpc": "2.0", "id": msg_id, "result": {}})
        else:
            send({"jsonrpc": "2.0", "id": msg_id, "error": {
                "code": -32601, "message": f"method not found: {method}"}})
    deadline = time.monotonic() + 5.0      # stdin closed: let answered calls go out
    for thread in calls:
        thread.join(max(0.0, deadline - time.monotonic()))
    return 0


def _bridge_call(conf, msg_id, params, send):
    """One tools/call, relayed to the proxy on its own connection; the
    client's result (text and images) back to Codex as the MCP result."""
    meta = params.get("_meta") or {}
    hello = {"run": conf["run"], "secret": conf["secret"]}
    request = {"call_id": meta.get("callId") or meta.get("call_id"),
               "name": params.get("name"), "arguments": params.get("arguments") or {}}
    host, _, port = conf["relay"].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(json.dumps(hello).encode() + b"\n" +
                         json.dumps(request).encode() + b"\n")
            sock.settimeout(None)
            line = sock.makefile("rb").readline()
        answer = json.loads(line)
    except (OSError, ValueError):
        answer = {"text": "The proxy did not return a result for this call.",
                  "is_error": True}
    content = [{"type": "text", "text": str(answer.get("text", ""))}]
    for url in answer.get("images") or []:         # data:image/png;base64,...
        header, _, data = str(url).partition(",")
        content.append({"type": "image", "data": data,
                        "mimeType": header[5:].split(";")[0] or "image/png"})
    send({"jsonrpc": "2.0", "id": msg_id, "result": {
        "content": content, "isError": bool(answer.get("is_error"))}})


# ---------------------------------------------------------------------------
# Engine: app-server (`codex app-server`: JSON-RPC on stdio, token streaming)
# ---------------------------------------------------------------------------

class RpcError(Exception):
    """An app-server JSON-RPC error answer."""

    def __init__(self, error):
        error = error if isinstance(error, dict) else {}
        super().__init__(str(error.get("message") or "app-server error"))
        self.data = error.get("data") if isinstance(error.get("data"), dict) else {}


def usage_from_app_server(total):
    """thread/tokenUsage/updated `total` -> Codex's usage dict (exec's names)."""
    total = total if isinstance(total, dict) else {}
    return {"input_tokens": total.get("inputTokens") or 0,
            "cached_input_tokens": total.get("cachedInputTokens") or 0,
            "output_tokens": total.get("outputTokens") or 0,
            "reasoning_output_tokens": total.get("reasoningOutputTokens") or 0}


class JsonRpcPipe:
    """JSON-RPC as app-server speaks it: one JSON object per line on the
    child's stdin and stdout, no `jsonrpc` field.  `call` sends a request and
    waits, with a deadline, for the answer that the reader hands to
    `answered`; everything else the child says is the run's business."""

    def __init__(self, stdin, exited, stderr_tail):
        self._stdin = stdin
        self._exited = exited               # set by the reader once the child is gone
        self._stderr_tail = stderr_tail     # for the message when a call goes unanswered
        # _write_lock keeps one JSON line at a time on stdin.
        self._write_lock = threading.Lock()
        # _lock guards _next_id and _waiting (request id -> [Event, answer]).
        self._lock = threading.Lock()
        self._next_id = 0
        self._waiting = {}

    def send(self, message):
        """Write one message -> False when the child has gone."""
        data = json.dumps(message, ensure_ascii=False).encode("utf-8") + b"\n"
        with self._write_lock:
            try:
                self._stdin.write(data)
                self._stdin.flush()
            except (OSError, ValueError):
                return False        # Codex has gone; the reader reports why
        return True

    def call(self, method, params, timeout=RPC_SECONDS):
        """Send a request and wait for its answer -> result; raises RpcError,
        or ProxyError when Codex exits or does not answer."""
        with self._lock:
            self._next_id += 1
            rid = self._next_id
            slot = self._waiting[rid] = [threading.Event(), None]
        # The reader sets `exited` before it wakes the waiting slots, so a
        # process that is already gone is noticed here, not after `timeout`.
        # A write that fails means the child is going: the reader is given
        # a moment to see it go, so that callers find `exited` set.
        if not self.send({"id": rid, "method": method, "params": params}):
            self._exited.wait(EXIT_NOTICE_SECONDS)
            slot[0].set()
        elif self._exited.is_set():
            slot[0].set()
        answered = slot[0].wait(timeout)
        with self._lock:
            self._waiting.pop(rid, None)
        if not answered or slot[1] is None:
            tail = " ".join(list(self._stderr_tail)[-3:])
            raise ProxyError(502, f"Codex app-server did not answer {method}"
                             + (" (it exited)" if self._exited.is_set() else "")
                             + (f": {tail[:300]}" if tail else ""), "api_error", "codex_error")
        if "error" in slot[1]:
            raise RpcError(slot[1]["error"])
        return slot[1].get("result") or {}

    def answered(self, message):
        """If `message` answers one of our requests, hand it over -> True."""
        if message.get("method") is not None:
            return False
        with self._lock:
            slot = self._waiting.get(message.get("id"))
        if slot is not None:
            slot[1] = message
            slot[0].set()
        return True

    def wake_all(self):
        """The child has gone: no waiting call waits any longer."""
        with self._lock:
            waiting = list(self._waiting.values())
        for slot in waiting:
            slot[0].set()

    def close(self):
        with self._write_lock:
            try:
                self._stdin.close()
            except (OSError, ValueError, AttributeError):
                pass


def notice_text(method, params):
    """A notice from app-server as words: its message, or its fields (no
    thread ids), never a JSON payload inside the log's own JSON."""
    message = params.get("message") or params.get("summary")
    if isinstance(message, str) and message:
        return message[:500]
    fields = ", ".join(f"{k} {v}" for k, v in params.items()
                       if k not in ("threadId", "turnId") and isinstance(v, (str, int, float)))
    return f"{method}: {fields}"[:500]


class AppServerEvents:
    """What app-server says -> CodexRun's events.  No process, no I/O: it
    keeps only what the translation needs (which items arrived as deltas,
    which client calls the response being written holds), so it is tested
    on its own.

    `notification(method, params)` -> [(kind, payload)].
    `request(method, params)` -> (reply, events): the reply to send at once,
    or None for a call of a client tool, which the run answers when the
    client's result arrives.
    `begin_turn()` before each turn/start: usage is the thread's running
    total, and a turn's usage is what it added."""

    # Codex runs with approvals off; should it ask anyway, the answer is no.
    DECLINE = {"item/commandExecution/requestApproval": {"decision": "decline"},
               "item/fileChange/requestApproval": {"decision": "decline"},
               "item/permissions/requestApproval": {"decision": "decline"},
               "applyPatchApproval": {"decision": "denied"},
               "execCommandApproval": {"decision": "denied"},
               "mcpServer/elicitation/request": {"action": "decline"}}
    CODEX_TOOL_ITEMS = ("commandExecution", "fileChange", "webSearch", "mcpToolCall",
                        "imageGeneration", "collabAgentToolCall")

    def __init__(self, names=None, clock=time.time, search=False):
        self.names = names or ToolNames([], False)     # the client's tools
        self.clock = clock
        self.search = search            # the hosted web search is on for this thread
        self.signals_responses = False  # Codex tells when the model ends a response
        self._deltas = set()            # items whose text arrived as deltas
        self._response_calls = set()    # client calls of the response being written
        self._unknown_calls = []        # ... and calls of tools nobody declared
        self._total = usage_from_app_server({})     # the thread's usage so far
        self._base = self._total                    # ... when this turn began

    def begin_turn(self):
        self._base = self._total

    def announced(self, call_id):
        """Did the response being written name this call?  (A call that comes
        from inside a tool of Codex's own was never in a response.)"""
        return call_id in self._response_calls

    def request(self, method, params):
        if method == "item/tool/call":
            name = params.get("tool")
            if self.names.from_codex(params.get("namespace"), name) is not None:
                return None, []
            return {"result": {"success": False, "contentItems": [
                {"type": "inputText", "text": f"unknown tool: {name}"}]}}, []
        if method == "currentTime/read":
            return {"result": {"currentTimeAt": int(self.clock())}}, []
        if method in self.DECLINE:
            return {"result": self.DECLINE[method]}, [("unexpected", method)]
        return {"error": {"code": -32601, "message": f"{method} is not supported here"}}, []

    def notification(self, method, params):
        """One notification -> [(kind, payload)] events."""
        if method == "item/agentMessage/delta":
            self._deltas.add(params.get("itemId"))
            return [("text", (params.get("itemId"), params.get("delta") or ""))]
        if method == "item/reasoning/summaryTextDelta":
            self._deltas.add(params.get("itemId"))
            return [("reasoning", (params.get("itemId"), params.get("summaryIndex", 0),
                                   params.get("delta") or ""))]
        if method in ("item/completed", "item/started"):
            item = params.get("item") or {}
            if item.get("type") == "webSearch" and self.search:
                return [("search", search_of(item, method == "item/completed"))]
            if method == "item/completed":
                return self._completed_item(item)
            return [("codex_tool", item.get("type"))] \
                if item.get("type") in self.CODEX_TOOL_ITEMS else []
        if method in ("rawResponseItem/completed", "rawResponse/completed"):
            return self._raw(method, params)
        if method == "thread/tokenUsage/updated":
            self._total = usage_from_app_server((params.get("tokenUsage") or {}).get("total"))
            return [("usage", {k: v - self._base.get(k, 0) for k, v in self._total.items()})]
        if method == "turn/completed":
            return self._turn_completed(params.get("turn") or {})
        if method == "error":
            error = params.get("error") or {}
            if params.get("willRetry"):
                return [("warning", f"retrying: {error.get('message') or ''}")]
            return []       # turn/completed carries the failure
        if method in ("warning", "model/rerouted", "deprecationNotice"):
            return [("warning", notice_text(method, params))]
        if method == "mcpServer/startupStatus/updated":
            return [("unexpected", f"MCP server {params.get('name')}")]
        return []

    def _raw(self, method, params):
        """experimentalRawEvents: the one sign that the model has finished a
        response, so that its calls can go out without a quiet wait; and
        each model call, with the calls of tools nobody declared, which
        Codex answers itself ("unsupported call") and the model repeats."""
        self.signals_responses = True
        if method == "rawResponseItem/completed":
            item = params.get("item") or {}
            cited = [a for part in item.get("content") or [] if isinstance(part, dict)
                     for a in part.get("annotations") or [] if isinstance(a, dict)
                     and a.get("type") == "url_citation"] if item.get("type") == "message" \
                else []
            if cited:           # only the raw item keeps them (the agentMessage has text)
                return [("annotations", (item.get("id"), cited))]
            if item.get("type") == "reasoning" and item.get("encrypted_content"):
                return [("reasoning_item", {"type": "reasoning",
                                            "summary": item.get("summary") or [],
                                            "encrypted_content": item["encrypted_content"]})]
            if item.get("type") in ("function_call", "custom_tool_call"):
                if self.names.from_codex(item.get("namespace"), item.get("name")):
                    self._response_calls.add(item.get("call_id"))
                else:
                    self._unknown_calls.append(str(item.get("name")))
            return []
        calls, self._response_calls = frozenset(self._response_calls), set()
        unknown, self._unknown_calls = self._unknown_calls, []
        events = [("model_call", tuple(unknown) if unknown and not calls else ())]
        return events + ([("response_done", calls)] if calls else [])

    @staticmethod
    def _turn_completed(turn):
        status = turn.get("status")
        if status == "completed":
            return [("completed", None)]
        if status == "interrupted":
            return [("interrupted", None)]
        return [("failed", turn.get("error") or {"message": f"turn {status}"})]

    def _completed_item(self, item):
        kind, item_id = item.get("type"), item.get("id")
        if kind == "agentMessage" and item_id not in self._deltas:
            return [("text", (item_id, item.get("text") or ""))]
        if kind == "reasoning" and item_id not in self._deltas:
            return [("reasoning", (item_id, n, text))
                    for n, text in enumerate(item.get("summary") or []) if text]
        return []


SEARCH_ACTIONS = {"search": "search", "openPage": "open_page", "open_page": "open_page",
                  "findInPage": "find", "find_in_page": "find", "find": "find"}


def search_of(item, done):
    """A web search item of Codex's (app-server's webSearch, or exec's
    web_search) -> the `search` event: {id, status, query, action}, the
    action as the Responses API names it."""
    action = item.get("action") if isinstance(item.get("action"), dict) else {}
    kind = SEARCH_ACTIONS.get(action.get("type"), "search")
    shaped = {"type": kind}
    for key in ("query", "queries", "url", "pattern"):
        if action.get(key):
            shaped[key] = action[key]
    if kind == "search" and item.get("query"):
        shaped["query"] = item["query"]
    return {"id": str(item.get("id") or "ws_" + secrets.token_hex(8)),
            "status": "completed" if done else "in_progress",
            "query": item.get("query") or action.get("query") or action.get("url") or "",
            "action": shaped}


def dynamic_tools(names):
    """The client's tools as thread/start's dynamicTools: functions, and
    namespaces holding their children."""
    tools, spaces = [], {}
    for namespace, name, tool in names.offered():
        entry = {"type": "function", "name": name, "description": tool.description,
                 "inputSchema": tool.parameters}
        if namespace is None:
            tools.append(entry)
        elif namespace not in spaces:
            spaces[namespace] = {"type": "namespace", "name": namespace,
                                 "description": f"Tools of {tool.namespace}", "tools": [entry]}
            tools.append(spaces[namespace])
        else:
            spaces[namespace]["tools"].append(entry)
    return tools


def turn_input(message):
    """The user message a turn starts with, as app-server's UserInput; none
    when the turn goes on from tool results."""
    if message is None:
        return []
    parts = [{"type": "text", "text": message.text, "text_elements": []}] \
        if message.text or not message.images else []
    return parts + [{"type": "image", "url": url} for url in message.images]


@contextlib.contextmanager
def refused_by_codex():
    """app-server's refusal of a thread or turn -> the ProxyError a client sees."""
    try:
        yield
    except RpcError as exc:
        if exc.data.get("input_error_code") == "input_too_large":
            raise ProxyError(400, f"{exc} Shorten the conversation.",
                             "invalid_request_error", "context_length_exceeded")
        raise ProxyError(502, f"Codex refused the request: {exc}", "api_error",
                         "codex_error")


def split_turn(messages):
    """A conversation -> (history, input): the turn's input is the last
    message when it is the user's; when the conversation ends otherwise (in
    tool results, say) the input is None and everything is history.  System
    messages are neither: they are the thread's instructions."""
    convo = [m for m in messages if m.role != "system"]
    if convo and convo[-1].role == "user":
        return convo[:-1], convo[-1]
    return convo, None


def history_items(messages, names):
    """Messages -> the raw Responses items a thread's history holds
    (thread/inject_items): messages with roles, the client's calls (under
    the names Codex knows them by) and results with the client's call ids,
    and reasoning sent back."""
    custom = {c.id for m in messages for c in m.tool_calls if c.custom}
    items = []
    for m in messages:
        if m.role == "user":
            items.append({"type": "message", "role": "user", "content": user_parts(m)})
        elif m.role == "assistant":
            items += m.reasoning
            if m.text:
                items.append({"type": "message", "role": "assistant",
                              "content": [{"type": "output_text", "text": m.text}]})
            items += [call_item(c, *names.to_codex(c.namespace, c.name)) for c in m.tool_calls]
        elif m.role == "tool":
            kind = "custom_tool_call_output" if m.tool_call_id in custom else \
                "function_call_output"
            output = m.text if not m.images else [{"type": "input_text", "text": m.text}] + [
                {"type": "input_image", "image_url": url} for url in m.images]
            items.append({"type": kind, "call_id": m.tool_call_id, "output": output})
    return items


def user_parts(message):
    parts = [{"type": "input_text", "text": message.text}] if message.text else []
    return parts + [{"type": "input_image", "image_url": url} for url in message.images]


def call_item(call, namespace, name):
    if call.custom:
        item = {"type": "custom_tool_call", "call_id": call.id, "name": name,
                "input": call.arguments}
    else:
        item = {"type": "function_call", "call_id": call.id, "name": name,
                "arguments": call.arguments}
    if namespace:
        item["namespace"] = namespace
    return item


def inject_batches(items, limit=INJECT_BATCH_BYTES):
    """History items for thread/inject_items, in batches of about `limit`
    bytes of JSON (an item larger than that goes alone): a long history
    goes in a few calls, and other threads' messages pass between them."""
    batch, size = [], 0
    for item in items:
        length = len(json.dumps(item, ensure_ascii=False))
        if batch and size + length > limit:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += length
    if batch:
        yield batch


class AppServerProcess:
    """One long-lived `codex app-server` process and the threads it hosts,
    one per conversation.

    It starts Codex and initializes it, reading back what the user's
    config.toml adds (each thread switches that off).  One reader thread
    takes everything Codex writes: answers go to the pipe's waiting calls;
    notifications and requests go to the run of the thread they name
    (`threadId`); the plan's windows go to RateLimits.  When the process
    exits, every thread it hosts hears of it."""

    def __init__(self, argv, env, rate_limits):
        """A process not started yet: its empty working folder, its pipe to
        come, no threads."""
        self.id = "codex_" + secrets.token_hex(4)
        self.argv, self.env = argv, env
        self.rate_limits = rate_limits
        self.tempdir = tempfile.mkdtemp(prefix="codex-proxy-")
        self.workdir = os.path.join(self.tempdir, "work")    # every thread's empty root
        os.makedirs(self.workdir)
        self.proc = self.pipe = None
        self.user_overrides = {}        # switches for what the user's config.toml adds
        self.exited = threading.Event()
        self.stderr_tail = collections.deque(maxlen=40)
        self.retired = False            # takes no new thread; stops once it hosts none
        # _lock guards _threads (thread id -> AppServerRun), _opening and `served`.
        self._lock = threading.Lock()
        self._threads = {}
        self._opening = 0               # threads being opened: it is in use already
        self.served = 0                 # threads it has hosted

    def launch(self):
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=self.workdir, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_group_kwargs())
        self.pipe = JsonRpcPipe(self.proc.stdin, self.exited, self.stderr_tail)
        threading.Thread(target=self._read_stdout, name=f"app-server-out-{self.id}",
                         daemon=True).start()
        threading.Thread(target=self._read_stderr, name=f"app-server-err-{self.id}",
                         daemon=True).start()
        return self

    def call(self, method, params, timeout=RPC_SECONDS):
        return self.pipe.call(method, params, timeout)

    def initialize(self, client_name="codex_openai_proxy", timeout=APP_SERVER_START_SECONDS):
        """The handshake, and the effective config: fail closed, for unread,
        the user's MCP servers could not be switched off."""
        self.call("initialize", {"clientInfo": {"name": client_name,
                                                "title": "codex-openai-proxy",
                                                "version": __version__},
                                 "capabilities": {"experimentalApi": True}}, timeout)
        self.pipe.send({"method": "initialized"})
        try:
            effective = self.call("config/read", {"includeLayers": False}, timeout)
        except RpcError as exc:
            raise ProxyError(502, "Codex app-server did not report its configuration, so what "
                             f"config.toml adds could not be switched off: {exc}", "api_error",
                             "codex_error")
        self.user_overrides = user_config_overrides(effective.get("config") or {})
        return self

    # -- its threads ----------------------------------------------------------
    def reserve(self, count=1):
        """A thread is about to be opened here (count=1), or has been or
        failed (-1): meanwhile the process counts as in use."""
        with self._lock:
            self._opening += count

    def attach(self, thread_id, run):
        with self._lock:
            self._threads[thread_id] = run
            self.served += 1

    def detach(self, thread_id):
        with self._lock:
            self._threads.pop(thread_id, None)

    def thread_count(self):
        """Its threads, those being opened included."""
        with self._lock:
            return len(self._threads) + self._opening

    def taken(self):
        """Threads it has served, those being opened included."""
        with self._lock:
            return self.served + self._opening

    def _run_of(self, params):
        thread_id = params.get("threadId") or (params.get("thread") or {}).get("id")
        with self._lock:
            return self._threads.get(thread_id)

    # -- what Codex says -------------------------------------------------------
    def _read_stdout(self):
        """The reader thread: every line Codex writes, to the pipe's waiting
        call or to the thread it names; when Codex exits, every thread hears."""
        for raw in iter(self.proc.stdout.readline, b""):
            try:
                message = json.loads(raw)
            except ValueError:
                self.stderr_tail.append(raw.decode("utf-8", "replace").rstrip()[:500])
                continue
            if isinstance(message, dict) and not self.pipe.answered(message):
                self._dispatch(message)
        self.proc.stdout.close()
        self.proc.wait()
        self.exited.set()
        self.pipe.wake_all()
        with self._lock:
            runs = list(self._threads.values())
        for run in runs:
            run.events.put(("exit", (self.proc.returncode, "")))

    def _read_stderr(self):
        for raw in iter(self.proc.stderr.readline, b""):
            self.stderr_tail.append(raw.decode("utf-8", "replace").rstrip())
        self.proc.stderr.close()

    def _dispatch(self, message):
        """A request or a notification from Codex, to the thread it names."""
        method, params = message["method"], message.get("params") or {}
        if method == "account/rateLimits/updated":
            self.rate_limits.seen(params.get("rateLimits"))
            return
        run = self._run_of(params)
        if "id" in message:
            if run is None:
                self.pipe.send({"id": message["id"], "error": {
                    "code": -32601, "message": f"{method} is not supported here"}})
            else:
                run.on_request(message["id"], method, params)
        elif run is not None:
            run.on_notification(method, params)

    def stop(self, grace=0.0):
        """Close its input (with `grace`, give it that long to exit by
        itself), stop its process tree and remove its folder."""
        if self.pipe is not None:
            self.pipe.close()
        if grace:
            self.exited.wait(grace)
        if self.proc is not None:
            stop_process_tree(self.proc)
        shutil.rmtree(self.tempdir, ignore_errors=True)


class AppServerRun(CodexRun):
    """One conversation's thread on a shared `codex app-server` process.

    `open_thread` starts the thread with the request's instructions, tools
    and settings (they never leak between threads), gives it the
    conversation so far as native items and starts a turn; a kept thread's
    next turn comes with `continue_turn`.  The process hands the thread's
    notifications here, and they become events through AppServerEvents; an
    `item/tool/call` request from Codex becomes a PendingCall whose answer
    is the reply.  Ending the run interrupts its turn and unsubscribes its
    thread, which Codex then unloads: the process lives on."""

    engine = "app-server"
    can_continue = True

    def __init__(self, run_id, process):
        super().__init__(run_id, process.env)
        self.process = process
        self.proc = process.proc
        self.exited = process.exited        # the thread goes with its process
        self.stderr_tail = process.stderr_tail
        self.turn_id = None
        self.turn_done = threading.Event()
        self.protocol = AppServerEvents()

    @property
    def signals_responses(self):
        return self.protocol.signals_responses

    @property
    def retired(self):
        return self.process.retired

    def assign(self, spec, runs):
        super().assign(spec, runs)
        self.protocol.names = spec.names
        self.protocol.search = bool(spec.web_search)

    def thread_params(self, instructions, names, thread_config, model=None):
        """thread/start for a pure forwarder: the client's instructions and
        tools, the forwarder settings, and the user's additions switched off."""
        # experimentalRawEvents adds rawResponse/completed: the one sign that the
        # model has finished a response, so its calls can go out without a wait.
        params = {"cwd": self.process.workdir, "sandbox": "read-only",
                  "approvalPolicy": "never", "ephemeral": True, "experimentalRawEvents": True,
                  "baseInstructions": instructions, "environments": [],
                  "dynamicTools": dynamic_tools(names),
                  "config": dict(thread_config, **self.process.user_overrides)}
        if model:
            params["model"] = model
        return params

    def open_thread(self, spec, thread_config):
        """Open the thread, give it the conversation so far as native items,
        and start the turn."""
        params = self.thread_params(spec.instructions, spec.names, thread_config, spec.model)
        with refused_by_codex():
            thread = self.process.call("thread/start", params).get("thread") or {}
        self.thread_id = thread.get("id")
        self.process.attach(self.thread_id, self)
        self.events.put(("thread", self.thread_id))
        self._turn(spec)

    def continue_turn(self, spec):
        """The next turn of a kept thread: what the conversation added since
        (spec.messages) goes in, and the turn starts."""
        while True:             # what the last turn left behind (notices)
            try:
                self.events.get_nowait()
            except queue.Empty:
                break
        self.turn_done.clear()
        self.turn_id = None
        self.events.put(("thread", self.thread_id))
        self._turn(spec)

    def _turn(self, spec):
        """The turn: history (in batches) into the thread, then turn/start with
        the turn's input and settings."""
        history, message = split_turn(spec.messages)
        with refused_by_codex():
            for batch in inject_batches(history_items(history, self.names)):
                self.process.call("thread/inject_items", {"threadId": self.thread_id,
                                                          "items": batch})
            turn = {"threadId": self.thread_id, "input": turn_input(message)}
            for key, value in (("model", spec.model), ("effort", spec.effort),
                               ("summary", spec.summary), ("outputSchema", spec.output_schema)):
                if value is not None:
                    turn[key] = value
            self.protocol.begin_turn()
            result = self.process.call("turn/start", turn)
        self.turn_id = self.turn_id or (result.get("turn") or {}).get("id")
        return self.turn_id

    # -- what Codex says of this thread (the process's reader thread) -------------
    def on_request(self, rpc_id, method, params):
        reply, events = self.protocol.request(method, params)
        for event in events:
            self.events.put(event)
        if reply is None:
            self.add_call(params.get("callId"),
                          self.names.from_codex(params.get("namespace"), params.get("tool")),
                          params.get("arguments"), rpc_id,
                          self.protocol.announced(params.get("callId")))
        else:
            self.process.pipe.send(dict(reply, id=rpc_id))

    def on_notification(self, method, params):
        if method == "turn/started":
            self.turn_id = (params.get("turn") or {}).get("id") or self.turn_id
        elif method == "turn/completed":
            self.turn_done.set()
        for event in self.protocol.notification(method, params):
            self.events.put(event)

    def _deliver(self, pending):
        if pending.rpc_id is None:
            return
        text, is_error, images = pending.result
        self.process.pipe.send({"id": pending.rpc_id, "result": {
            "contentItems": [{"type": "inputText", "text": text}] +
            [{"type": "inputImage", "imageUrl": url} for url in images],
            "success": not is_error}})

    def _end(self, reason, grace):
        """Interrupt a turn still running, answer what Codex waits on, and
        unsubscribe the thread, so that Codex unloads it at once."""
        alive = not self.exited.is_set()
        if alive and self.thread_id and self.turn_id and not self.turn_done.is_set():
            self.process.pipe.send({"id": f"interrupt-{self.id}", "method": "turn/interrupt",
                                    "params": {"threadId": self.thread_id,
                                               "turnId": self.turn_id}})
            self.turn_done.wait(1.0)
        self.answer_open_calls(reason)
        if alive and self.thread_id:
            try:
                self.process.call("thread/unsubscribe", {"threadId": self.thread_id}, 5.0)
            except (ProxyError, RpcError):
                pass            # gone with its process, or never fully opened
        if self.thread_id:
            self.process.detach(self.thread_id)


def user_config_overrides(effective):
    """Thread config that switches off what the user's config.toml adds on
    top of the forwarder settings: MCP servers (they would run on this host
    for a remote client), notify commands, developer instructions."""
    overrides = {}
    servers = effective.get("mcp_servers")
    if isinstance(servers, dict) and servers:
        # A nested table, not dotted keys: it merges into the user's servers,
        # and names that need quoting (spaces, dots) work too.
        overrides["mcp_servers"] = {name: {"enabled": False} for name in servers}
    if effective.get("notify"):
        overrides["notify"] = []
    if effective.get("developer_instructions"):
        overrides["developer_instructions"] = ""
    return overrides


class AppServerEngine(Engine):
    """`codex app-server`: a few long-lived processes (ProcessPool) host one
    thread per conversation.  Answers stream token by token, the client's
    tools are the thread's dynamic tools, and a completed turn's thread can
    take the conversation's next turn."""

    name = "app-server"
    pooled = True
    namespaces = True

    def argv(self, prefix):
        """The process's command line: threads unload as soon as they are let
        go, and the catalog copy is given once, for every thread."""
        argv = [*prefix, "app-server", "-c", "thread_unload_delay_secs=0"]
        if self.launcher.catalog.path:
            argv += ["-c", f"model_catalog_json={toml_value(self.launcher.catalog.path)}"]
        for item in self.launcher.config.codex_config:
            argv += ["-c", item]
        return argv

    def thread_config(self, spec=None):
        """The forwarder settings, and the hosted web search when the
        request asked for it (per thread: Codex takes it nowhere else)."""
        config = dict(FORWARDER_THREAD_CONFIG)
        search = spec.web_search if spec is not None else None
        if search:
            config["web_search"] = "live"
            table = {k: search[k] for k in ("context_size", "location", "allowed_domains")
                     if k in search}
            if table:
                config["tools.web_search"] = table
            if self.launcher.catalog.search_path:
                config["model_catalog_json"] = self.launcher.catalog.search_path
        return config

    def _new_process(self, argv):
        return AppServerProcess(self.argv(argv), self.launcher.env, self.launcher.rate_limits)

    def probe(self, argv):
        """Handshake plus a thread with one dynamic tool -> (ok, reason)."""
        try:
            process = self._new_process(argv)
        except OSError as exc:
            return False, str(exc)
        try:
            process.launch().initialize(timeout=20)
            probe_tool = ToolSpec("probe_tool", "probe", {"type": "object", "properties": {}})
            run = AppServerRun("probe", process)
            result = process.call("thread/start", run.thread_params(
                "probe", ToolNames([probe_tool], True), self.thread_config()), 20)
            if not (result.get("thread") or {}).get("id"):
                return False, "thread/start gave no thread"
            try:
                limits = process.call("account/rateLimits/read", None, 10)
                self.launcher.rate_limits.seen(limits.get("rateLimits"))
            except (RpcError, ProxyError):
                pass        # API-key and custom-provider logins have none
            return True, "app-server answered the probe"
        except (ProxyError, RpcError, OSError) as exc:
            return False, self.launcher.redact(str(exc))[:300]
        finally:
            process.stop()

    def process_key(self):
        """What a process depends on: the Codex binary and its version, the
        catalog copy, config.toml, the login and the extra config; a process
        whose key changed is retired.  None: Codex was not found."""
        launcher = self.launcher
        argv, version = launcher.codex.current()
        if argv is None:
            return None
        auth = os.path.join(launcher.config.codex_home_dir, "auth.json")
        try:
            auth_stamp = os.stat(auth).st_mtime_ns
        except OSError:
            auth_stamp = None
        return (tuple(argv), version, launcher.catalog.path, launcher.user_config.stamp(),
                auth_stamp, tuple(launcher.config.codex_config))

    def spawn(self):
        """A new app-server process, initialized."""
        argv, _ = self.launcher.codex.current()
        if argv is None:
            raise ProxyError(503, "the Codex CLI was not found", "server_error",
                             "codex_not_found")
        process = self._new_process(argv)
        try:
            with refused_by_codex():
                process.launch().initialize()
        except OSError as exc:
            process.stop()
            raise ProxyError(503, f"could not start Codex: {exc.strerror or exc}",
                             "server_error", "codex_not_found")
        except BaseException:
            process.stop()
            raise
        return process

    def new_run(self, spec):
        """A thread on the pool's least busy process.  A process that died
        before the thread opened is passed over once for another."""
        for attempt in (1, 2):
            process, warm = self.launcher.pool.take()
            run = AppServerRun(new_run_id(), process)
            run.warm = warm
            run.assign(spec, self.launcher.runs)
            try:
                run.open_thread(spec, self.thread_config(spec))
                return run
            except ProxyError:
                self.launcher.discard(run)
                if attempt == 2 or run.thread_id is not None or not process.exited.is_set():
                    raise
            finally:
                process.reserve(-1)             # taken from take(): attached, or failed
        raise AssertionError("unreachable")


class ProcessPool:
    """The app-server processes that host every conversation's thread.

    `size` of them (--codex-processes) are kept running for the current
    key (Codex, its config, the login).  A new thread goes to the live
    process with the fewest threads; with none ready (at start-up, or all
    full when `max_threads` caps them) one is started on the request path.
    A background thread replaces processes that died, and retires those
    whose key changed, that hosted PROCESS_RECYCLE_THREADS threads or grew
    past PROCESS_RECYCLE_BYTES: a retired process takes no new thread (its
    kept threads move to fresh ones when next used) and stops once it
    hosts none."""

    def __init__(self, size, spawn, key, max_threads=0, on_error=None):
        self.size = size
        self.max_threads = max_threads      # 0: as many as come
        self._spawn = spawn          # () -> initialized AppServerProcess
        self._key = key              # () -> hashable, or None when Codex is missing
        self._on_error = on_error
        # _lock guards _processes [(process, key)]; processes start and stop outside it.
        self._lock = threading.Lock()
        self._processes = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = None

    def start_filler(self):
        """Start the thread that keeps `size` processes running."""
        if self.size > 0:
            self._thread = threading.Thread(target=self._loop, name="process-pool",
                                            daemon=True)
            self._thread.start()
        return self

    def __len__(self):
        with self._lock:
            return sum(1 for p, _ in self._processes if not p.retired)

    def processes(self):
        with self._lock:
            return [p for p, _ in self._processes]

    def take(self):
        """-> (a live process for a new thread, whether it was running before)."""
        key = self._key()
        with self._lock:
            ready = [p for p, k in self._processes if k == key and not p.retired
                     and not p.exited.is_set() and not self._full(p)]
            if ready:
                process = min(ready, key=lambda p: p.thread_count())
                process.reserve()
                return process, True
        process = self._spawn()
        process.reserve()
        with self._lock:
            self._processes.append((process, key))
        self._wake.set()
        return process, False

    def _full(self, process):
        """With `max_threads`, a process serves that many threads, once each."""
        return self.max_threads and process.taken() >= self.max_threads

    def refresh(self):
        """Look at the processes again now (Codex or its config changed)."""
        self._wake.set()

    def _tidy(self, key):
        """Retire what must go, take out what can stop -> (to stop, missing)."""
        stop = []
        with self._lock:
            for process, k in self._processes:
                if k != key or process.served >= PROCESS_RECYCLE_THREADS or \
                        process_bytes(process.proc) > PROCESS_RECYCLE_BYTES or \
                        (self.max_threads and process.served >= self.max_threads):
                    process.retired = True
            live = [p for p, _ in self._processes if not p.retired and not p.exited.is_set()]
            for process, k in list(self._processes):
                extra = not process.retired and len(live) > self.size and process in live
                if process.exited.is_set() or (process.thread_count() == 0 and (
                        process.retired or extra)):
                    self._processes.remove((process, k))
                    stop.append(process)
                    if extra:
                        live.remove(process)
            missing = self.size - len(live) if key is not None else 0
        return stop, missing

    def _loop(self):
        """The filler: tidy (retire, stop what can stop), then start what is
        missing; a Codex that fails to start is retried with a growing pause."""
        failures = 0
        while not self._stopping.is_set():
            self._wake.wait(min(5.0, 0.5 * 2 ** failures) if failures else 1.0)
            self._wake.clear()
            if self._stopping.is_set():
                break
            key = self._key()
            stop, missing = self._tidy(key)
            for process in stop:
                process.stop(grace=0.5)
            for _ in range(missing):
                if self._stopping.is_set():
                    break
                try:
                    process = self._spawn()
                except Exception as exc:      # a broken Codex must not end the loop
                    failures = min(failures + 1, 4)
                    if self._on_error is not None:
                        self._on_error(exc)
                    break
                failures = 0
                with self._lock:
                    closed = self._stopping.is_set()
                    if not closed:
                        self._processes.append((process, key))
                if closed:
                    process.stop()

    def close(self):
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(APP_SERVER_START_SECONDS + 5)
        with self._lock:
            processes, self._processes = [p for p, _ in self._processes], []
        for process in processes:
            process.stop()


def process_bytes(proc):
    """A process's resident memory in bytes, where the system tells (Linux); else 0."""
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            match = re.search(r"VmRSS:\s+(\d+) kB", f.read())
        return int(match.group(1)) * 1024 if match else 0
    except (OSError, AttributeError):
        return 0


# The engines by name, in the order `--engine auto` tries them.
ENGINES = {engine.name: engine for engine in (AppServerEngine, ExecEngine)}

# ---------------------------------------------------------------------------
# Launching Codex: which engine, spares, starting runs, what failures mean
# ---------------------------------------------------------------------------


def new_run_id():
    return "run_" + secrets.token_hex(5)


class RunTable:
    """The runs alive now, by id: those answering a request, those parked on
    the client's tool calls, and the kept threads between a conversation's
    turns.  The exec bridge finds its run here, and a new call id is checked
    against every run's (RunTable.call_known)."""

    def __init__(self):
        # _lock guards _runs (run id -> CodexRun).
        self._lock = threading.Lock()
        self._runs = {}

    def add(self, run):
        with self._lock:
            self._runs[run.id] = run

    def pop(self, run):
        with self._lock:
            return self._runs.pop(run.id, None) is not None

    def get(self, run_id):
        with self._lock:
            return self._runs.get(run_id)

    def all(self):
        with self._lock:
            return list(self._runs.values())

    def call_known(self, call_id):
        """Does some live run know `call_id` (its conversation's history or
        its own calls)?  A new call gets a fresh id then, so that a result
        finds one turn only."""
        return any(run.knows_call(call_id) for run in self.all())


class CodexLauncher:
    """Everything about starting Codex: where it is and whether it is logged
    in (CodexInfo), the user's config.toml, the model catalog copy, which
    engine runs (probed at start-up and whenever Codex's version changes),
    the pool of app-server processes, and what Codex's failures mean for a
    client."""

    def __init__(self, config, env, logs, rate_limits, runs, stopping):
        """The launcher's parts; nothing starts until open()."""
        self.config = config
        self.env = env
        self.logs = logs
        self.rate_limits = rate_limits
        self.runs = runs
        self.stopping = stopping
        self.codex = CodexInfo(config, env)
        self.user_config = CodexConfigFile(config.codex_home_dir)
        self.catalog = Catalog()
        self.catalog_error = None       # why the catalog copy could not be written
        self.engines = {name: kind(self) for name, kind in ENGINES.items()}
        forced = self.engines.get(config.engine)
        self.engine = forced or next(iter(self.engines.values()))    # until the probe
        self.engine_reason = "not checked yet"
        self.pool = ProcessPool(config.codex_processes if forced is None or forced.pooled
                                else 0, lambda: self.engine.spawn(), self.process_key,
                                config.process_threads,
                                on_error=self._spawn_failed)
        # _catalog_lock guards _catalog_version and the engine choice; the
        # catalog build and the probe run under it, off the request path.
        self._catalog_lock = threading.Lock()
        self._catalog_version = None
        # _noted_lock guards _noted: warnings of Codex said once, not again.
        self._noted_lock = threading.Lock()
        self._noted = set()

    def open(self):
        """Check Codex (which builds the catalog and picks the engine), then
        start what the engines need and the pool's processes."""
        self.check_codex()
        for engine in self.engines.values():
            engine.open()
        self.pool.start_filler()

    def close(self):
        self.pool.close()
        for engine in self.engines.values():
            engine.close()

    def check_codex(self):
        """Look at Codex: where it is, its version, its login.  At start-up
        and whenever its version changes, the model catalog is built and
        the engine chosen again, here."""
        argv, version = self.codex.check()
        with self._catalog_lock:        # one build per version, even when checks race
            if argv is None or version == self._catalog_version:
                if argv is None:
                    self.engine_reason = "Codex not found"
                return
            self._catalog_version = version
            state_dir = self.config.state_dir or default_state_dir()
            try:
                self.catalog = build_model_catalog(
                    argv, self.env, state_dir, version)
                self.catalog_error = None
            except OSError as exc:      # the log never holds a path: the banner names it
                self.catalog_error = exc.strerror or type(exc).__name__
                self.logs.add(LogEvent.CODEX_WARNING, message="the model catalog copy could "
                              f"not be written to --state-dir ({self.catalog_error})")
            self._choose_engine(argv)
        self.pool.refresh()

    def _choose_engine(self, argv):
        """The engine --engine names, or with auto the first whose probe passes."""
        forced = self.engines.get(self.config.engine)
        if forced is not None:
            ok, why = forced.probe(argv)
            self.engine, self.engine_reason = forced, why if ok else \
                f"forced; its probe failed: {why}"
        else:
            failures = []
            for engine in self.engines.values():
                ok, why = engine.probe(argv)
                if ok:
                    break
                failures.append(f"{engine.name} probe failed: {why}")
            self.engine, self.engine_reason = engine, "; ".join(failures) or why
        self.logs.add(LogEvent.ENGINE_SELECTED, engine=self.engine.name,
                      reason=self.engine_reason[:300])

    def _spawn_failed(self, exc):
        self.logs.add(LogEvent.CODEX_WARNING, message=f"an app-server process failed to "
                      f"start: {self.redact(str(exc))[:300]}")

    def process_key(self):
        """What the pool's processes depend on; None when the engine keeps none."""
        return self.engine.process_key() if self.engine.pooled else None

    def codex_state(self):
        """(argv, version, logged_in) from the cached checks: a stale answer
        is checked again in the background, none (or a stale "not logged
        in") at once."""
        due = self.codex.due()
        if due == "now":
            self.check_codex()
        elif due == "background":
            threading.Thread(target=self.check_codex, name="codex-check", daemon=True).start()
        return self.codex.cached()

    ONCE = re.compile(r"Model metadata for .{0,200}? not found")

    def worth_logging(self, warning):
        """Whether to log a warning of Codex: those it repeats on every
        request for a model (outside its catalog) are logged once."""
        match = self.ONCE.search(warning or "")
        if match is None:
            return True
        with self._noted_lock:
            if match.group() in self._noted or len(self._noted) >= 1000:
                return False
            self._noted.add(match.group())
            return True

    def check_ready(self):
        argv, _, logged_in = self.codex_state()
        if argv is None:
            raise ProxyError(503, f"the Codex CLI was not found; install it with "
                             f"`{INSTALL_HINT}` (or point --codex-bin at it), then run "
                             "`codex login`", "server_error", "codex_not_found")
        user_config = self.user_config.read()
        if not logged_in and not uses_custom_provider(user_config, self.config.codex_config):
            raise ProxyError(401, "Codex is not logged in: run `codex login` on the "
                             "proxy's machine (with your ChatGPT account), then retry",
                             "authentication_error", "codex_not_logged_in", headers=NO_RETRY)
        return argv, user_config

    def start_run(self, spec):
        """A run on the current engine, its turn started (check_ready() first)."""
        return self.engine.new_run(spec)

    def discard(self, run, reason="spawn_failed"):
        """A run whose turn could not start: it leaves the run table and stops."""
        self.runs.pop(run)
        run.stop(f"The tool call was abandoned ({reason}).")

    def failure(self, payload):
        """A failed turn ({"message", "codexErrorInfo"...}) -> the ProxyError
        the client sees: the right status, no backtrace, no paths."""
        error = classify_codex_error(payload, self.rate_limits.reset_seconds())
        error.message = self.redact(clean_codex_output(error.message) or error.message)
        if error.code in ("model_not_supported", "model_not_found") and self.catalog.listed():
            error.message += f" Models Codex offers: {', '.join(self.catalog.listed())}."
        if error.status == 401:
            self.codex.expire()
            error.headers.update(NO_RETRY)      # a retry cannot log Codex in
        return error

    def redact(self, text):
        return redact_paths(text, (self.config.codex_home_dir, self.config.state_dir,
                                   tempfile.gettempdir(), os.path.expanduser("~")))

    def model_names(self):
        user_config = self.user_config.read()
        names = []
        base = [user_config.get("model")] + list(self.config.aliases) + \
            list(self.config.aliases.values()) + self.catalog.listed()
        for name in base:
            if not isinstance(name, str) or not name:
                continue
            for candidate in (name, name[::-1]):
                if candidate not in names:
                    names.append(candidate)
        return names

    def default_model(self):
        """The model Codex uses when a request names none: config.toml's, else
        the catalog's first."""
        return self.configured_model() or self.catalog.default()

    def configured_model(self):
        model = self.user_config.read().get("model")
        return model if isinstance(model, str) and model else None

    def facts(self, name):
        """What the catalog says of the model a client's name reaches (see
        model_facts); a name outside the catalog knows no window."""
        model, _ = resolve_model(name, self.config.aliases)
        return model_facts(self.catalog.model(model or self.default_model()))

# ---------------------------------------------------------------------------
# Parked turns, kept conversations and stored responses
# ---------------------------------------------------------------------------


class ParkedTurns:
    """Codex runs waiting on tool calls the client has not answered yet."""

    def __init__(self, max_parked, timeout, clock=time.monotonic):
        self.max_parked = max_parked
        self.timeout = timeout
        self._clock = clock
        # _lock guards _runs (run id -> (run, parked_at)), oldest first.
        self._lock = threading.Lock()
        self._runs = collections.OrderedDict()

    def __len__(self):
        with self._lock:
            return len(self._runs)

    def park(self, run):
        """Park a run; return the runs pushed out past max_parked."""
        with self._lock:
            self._runs[run.id] = (run, self._clock())
            evicted = []
            while len(self._runs) > self.max_parked:
                evicted.append(self._runs.popitem(last=False)[1][0])
        return evicted

    def resumed_by(self, request):
        """-> (the parked run a request's tool results answer, taken out, or
        None; the runs of its conversation that its history shows are stale,
        taken out).  The request's history up to the results must be what
        the run has seen: a call id alone never resumes another
        conversation's turn.  When the client made up the call ids (Ollama's
        drop them), the calls themselves are matched, and the request takes
        the run's ids."""
        results = trailing_tool_results(request.messages)
        asked = request.messages[:len(request.messages) - len(results) -
                                 len(trailing_context(request.messages))]
        key = conversation_key(asked)[0]
        run = self.claim((r.tool_call_id for r in results), key) if results else None
        if run is None and results and request.made_up_ids:
            run = self._claim_by_calls(asked, results, key)
        return run, self.take_mentioning(request.history_ids(), key)

    def _claim_by_calls(self, asked, results, key):
        last = next((m for m in reversed(asked) if m.role == "assistant"), None)
        if last is None or not last.tool_calls:
            return None
        run = self.claim_calls([(c.name, c.arguments) for c in last.tool_calls], key)
        if run is not None:
            ids = dict(zip([c.id for c in last.tool_calls], [c.id for c in run.open_calls()]))
            for call in last.tool_calls:
                call.id = ids.get(call.id, call.id)
            for result in results:
                result.tool_call_id = ids.get(result.tool_call_id, result.tool_call_id)
        return run

    def claim(self, call_ids, key):
        """Take out the run whose open calls these results answer, if any, in
        a conversation whose key is `key`: a call id alone never resumes
        another conversation's turn."""
        call_ids = set(call_ids)
        with self._lock:
            for run_id, (run, _) in self._runs.items():
                if run.parked_key == key and run.open_call_ids() & call_ids:
                    del self._runs[run_id]
                    return run
        return None

    def claim_calls(self, calls, key):
        """Take out the run whose open calls are these [(name, arguments)],
        in order, in a conversation whose key is `key`: for clients that drop
        call ids (Ollama's).  The key keeps one user's results from another
        user's run that happens to make the same calls."""
        wanted = [(name, canonical_arguments(args)) for name, args in calls]
        with self._lock:
            for run_id, (run, _) in self._runs.items():
                if run.parked_key == key and [(c.name, canonical_arguments(c.arguments))
                                              for c in run.open_calls()] == wanted:
                    del self._runs[run_id]
                    return run
        return None

    def take_mentioning(self, call_ids, key):
        """Take out the runs of this conversation (its first entry is `key`'s)
        whose open calls appear in its history: it was edited since."""
        call_ids = set(call_ids)
        with self._lock:
            stale = [rid for rid, (run, _) in self._runs.items()
                     if run.parked_key[:1] == key[:1] and run.open_call_ids() & call_ids]
            return [self._runs.pop(rid)[0] for rid in stale]

    def take_due(self):
        """Take out the runs parked longer than the timeout."""
        now = self._clock()
        with self._lock:
            due = [rid for rid, (_, at) in self._runs.items() if now - at >= self.timeout]
            return [self._runs.pop(rid)[0] for rid in due]

    def discard(self, run):
        """Take one run out again; False when a resume got to it first."""
        with self._lock:
            return self._runs.pop(run.id, None) is not None

    def take_all(self):
        with self._lock:
            runs = [run for run, _ in self._runs.values()]
            self._runs.clear()
        return runs


@dataclasses.dataclass
class KeptThread:
    """A kept conversation: a run whose thread has answered a turn."""
    run: object                     # the CodexRun, idle, its thread alive
    match: ThreadSettings           # what a continuation shares
    key: tuple                      # conversation_key() of all the thread has seen
    at: float                       # when it was kept or last used
    hints: dict = dataclasses.field(default_factory=dict)   # hint_candidates() of ...
    last_user: int = -1             # ... the entry of its newest user message

    @property
    def one_shot(self):
        """One question and its answer, never continued (a title, tags...)."""
        return len(self.key) <= 2


# Why a kept thread was let go, as the log says it when the conversation comes back.
GONE_WORDS = {"max_kept": "evicted (max_kept)", "ttl": "expired (ttl)",
              "exited": "process died", "recycled": "recycled (its process retired)",
              "continue_failed": "its thread failed"}


def conversation_digest(key):
    return hashlib.sha256(b"".join(key)).hexdigest()[:32]


def shared_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class KeptThreads:
    """Threads kept alive between a conversation's turns, so that the next
    turn continues the thread: the model keeps its own items and reasoning,
    and the prompt cache (keyed by the thread) stays warm.  At most `size`:
    past it, one-shot requests (a chat UI's titles and tags) go first, then
    the least recently used; each lives at most `ttl` seconds unused.  What
    was let go is remembered a while, so that the log can say why a
    conversation that comes back starts a fresh thread."""

    def __init__(self, size, ttl, clock=time.monotonic):
        self.size, self.ttl, self._clock = size, ttl, clock
        # _lock guards _kept (run id -> KeptThread), least recently used
        # first, and _gone (key -> why it was let go), oldest first.
        self._lock = threading.Lock()
        self._kept = collections.OrderedDict()
        self._gone = collections.OrderedDict()

    def __len__(self):
        with self._lock:
            return len(self._kept)

    def keep(self, run, match, key, hints=None, last_user=-1):
        """Keep a run -> the runs let go to make room (one-shots first)."""
        with self._lock:
            self._kept[run.id] = KeptThread(run, match, key, self._clock(), hints or {},
                                            last_user)
            self._kept.move_to_end(run.id)
            evicted = []
            while len(self._kept) > self.size:
                evicted.append(self._forget(self._victim(), "max_kept"))
        return evicted

    def _victim(self):
        """(under _lock) The thread to let go: one-shots before conversations.
        Of one-shots idle ONE_SHOT_GRACE or longer, the least recently used;
        else the newest one-shot, so that a chat UI's side requests (titles,
        tags...), which come right after an answer, push each other out and
        not the conversation they follow; with no one-shot, the least
        recently used."""
        now = self._clock()
        shots = [rid for rid, k in self._kept.items() if k.one_shot]
        idle = [rid for rid in shots if now - self._kept[rid].at >= ONE_SHOT_GRACE]
        return idle[0] if idle else shots[-1] if shots else next(iter(self._kept))

    def _forget(self, run_id, reason):
        """(under _lock) Take a thread out, remembering why -> its run."""
        kept = self._kept.pop(run_id)
        self._gone[kept.key] = GONE_WORDS.get(reason, reason)
        while len(self._gone) > max(64, 4 * self.size):
            self._gone.popitem(last=False)
        return kept.run

    def claim(self, match, key, ends, newest):
        """Take out the kept thread this conversation continues -> (KeptThread
        or None, why none fits, hinted).  A continuation holds all the
        thread has seen, then something new, with the same ThreadSettings;
        `hinted`: it differs only by the hint its client appended to the
        thread's newest user message and has dropped since (`newest`: the
        request's newest user message, which carries the hint now)."""
        best, why = None, (0, 0, "a new conversation" if len(key) <= 1 else None)
        with self._lock:
            for kept in self._kept.values():
                size, common = len(kept.key), shared_prefix(kept.key, key)
                hinted = common == kept.last_user and self._hinted(kept, key, newest)
                if hinted:
                    common = size
                if common < size:
                    said = f"message {ends[common - 1] if common else 0} edited" \
                        if common < len(key) else "an earlier point of the conversation"
                    why = max(why, (1, common, said)) if common else why
                elif size == len(key):
                    why = max(why, (2, size, "nothing new since its last turn"))
                elif (differences := match.differences(kept.match)):
                    why = max(why, (2, size, ", ".join(differences)))
                elif kept.run.exited.is_set():
                    why = max(why, (2, size, "process died"))
                elif best is None or size > len(best[0].key):
                    best = (kept, hinted)
            if best is not None:
                del self._kept[best[0].run.id]
                return best[0], None, best[1]
            if why[2] is None:
                gone = [(len(k), reason) for k, reason in self._gone.items() if key[:len(k)] == k]
                why = (0, 0, max(gone)[1] if gone else None)
        return None, why[2], False

    @staticmethod
    def _hinted(kept, key, newest):
        common = kept.last_user
        if len(key) <= len(kept.key) or key[common + 1:len(kept.key)] != kept.key[common + 1:]:
            return False
        hint = kept.hints.get(key[common])
        return bool(hint) and newest is not None and newest.text.strip().endswith(hint)

    def take_due(self):
        """Take out the threads kept longer than the ttl, or whose Codex died
        -> [(run, why)]."""
        now = self._clock()
        with self._lock:
            due = [(rid, "exited" if kept.run.exited.is_set() else "ttl")
                   for rid, kept in self._kept.items()
                   if now - kept.at >= self.ttl or kept.run.exited.is_set()]
            return [(self._forget(rid, why), why) for rid, why in due]

    def take_all(self):
        with self._lock:
            runs = [kept.run for kept in self._kept.values()]
            self._kept.clear()
        return runs


def messages_data(messages):
    """Messages as plain data, for the store."""
    return [dataclasses.asdict(m) for m in messages]


def messages_of(data):
    """Plain data from the store -> fresh Messages."""
    return [Message(**dict(m, tool_calls=[ToolCall(**c) for c in m["tool_calls"]]))
            for m in data]


class ResponseStore:
    """Stored responses in memory: for `previous_response_id` the
    conversation a response ended, for `item_reference` its output items,
    and the contexts /api/generate hands out.  Bounded in count and in bytes
    (everything an entry holds counts, encrypted reasoning included), and
    forgotten after a while.  DiskStore keeps them on disk instead; this is
    what serves when it cannot."""

    def __init__(self, keep=RESPONSES_KEPT, ttl=RESPONSES_TTL_SECONDS,
                 max_bytes=RESPONSES_KEPT_BYTES, clock=time.monotonic):
        self._keep, self._ttl, self._max_bytes, self._clock = keep, ttl, max_bytes, clock
        # _lock guards _entries (response id -> (data, size, stored_at)),
        # _by_item (output item id -> response id) and _bytes.
        self._lock = threading.Lock()
        self._entries = collections.OrderedDict()
        self._by_item = {}
        self._bytes = 0
        self.error = None

    def __len__(self):
        with self._lock:
            return len(self._entries)

    def size(self):
        with self._lock:
            return self._bytes

    def put(self, response_id, messages, output=()):
        """Store a response -> False when it is larger than the store."""
        data = json.dumps({"messages": messages_data(messages), "output": list(output)})
        if len(data) > self._max_bytes:
            return False
        items = [item["id"] for item in output if isinstance(item.get("id"), str)]
        with self._lock:
            self._drop(response_id)
            self._entries[response_id] = (data, len(data), self._clock())
            self._by_item.update((item_id, response_id) for item_id in items)
            self._bytes += len(data)
            self._trim()
        return True

    def get(self, response_id):
        """The conversation a response ended (fresh Messages), or None."""
        with self._lock:
            self._trim()
            entry = self._entries.get(response_id)
        return messages_of(json.loads(entry[0])["messages"]) if entry else None

    def item(self, item_id):
        """A copy of an output item of a stored response, or None."""
        with self._lock:
            self._trim()
            entry = self._entries.get(self._by_item.get(item_id))
        if entry is None:
            return None
        return next((i for i in json.loads(entry[0])["output"] if i.get("id") == item_id), None)

    def remember(self, digest):
        """A kept conversation's digest (see DiskStore.seen_before): in
        memory there is no restart to tell of, so nothing is kept."""

    def seen_before(self, digests):
        """In memory a restart forgets everything: never."""
        return False

    def close(self):
        """Nothing to close in memory (DiskStore closes its database)."""

    def _drop(self, response_id):
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self._bytes -= entry[1]
            for item_id in [k for k, v in self._by_item.items() if v == response_id]:
                del self._by_item[item_id]

    def _trim(self):
        now = self._clock()
        while self._entries:
            response_id, (_, _, at) = next(iter(self._entries.items()))
            if len(self._entries) <= self._keep and self._bytes <= self._max_bytes and \
                    now - at < self._ttl:
                break
            self._drop(response_id)


class DiskStore(ResponseStore):
    """Stored responses in a SQLite database in the state dir, so that
    `previous_response_id` and `item_reference` outlive a restart, as
    OpenAI's 30 days do: kept STORE_DAYS days and at most --store-size bytes,
    the oldest let go first.  Memory holds no bodies.  Several proxies may
    share the database (SQLite locks it).  A write that fails (a full disk)
    lands in memory instead, and is logged once; a request never fails
    because of the store.  It also remembers the digests of kept
    conversations, so that one that comes back after a restart is named so."""

    def __init__(self, path, max_bytes, instance, logs=None, clock=time.time):
        """Open (or create) the database at `path`; raises sqlite3.Error or
        OSError when it cannot be (open_store falls back to memory)."""
        super().__init__(clock=time.monotonic)
        self.path, self.max_disk, self.instance = path, max_bytes, instance
        self._logs, self._wall = logs, clock
        self._warned = False
        # _db_lock guards _db, one connection shared by the handler threads.
        self._db_lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=10, check_same_thread=False,
                                   isolation_level=None)
        deadline = time.monotonic() + 10
        while True:     # another proxy may be creating it this very moment
            try:
                self._setup()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    self._db.close()
                    raise
                time.sleep(0.05)

    def _setup(self):
        with self._db_lock:
            if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(
                "CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, created REAL, "
                "size INTEGER, body BLOB);"
                "CREATE INDEX IF NOT EXISTS responses_created ON responses(created);"
                "CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, response TEXT);"
                "CREATE TABLE IF NOT EXISTS conversations (digest TEXT PRIMARY KEY, "
                "instance TEXT, seen REAL);")

    def _sql(self, statement, args=(), many=False):
        with self._db_lock:
            cursor = (self._db.executemany if many else self._db.execute)(statement, args)
            return cursor.fetchall()

    def __len__(self):
        try:
            return self._sql("SELECT COUNT(*) FROM responses")[0][0] + super().__len__()
        except sqlite3.Error:
            return super().__len__()

    def size(self):
        try:
            return self._sql("SELECT COALESCE(SUM(size), 0) FROM responses")[0][0] + \
                super().size()
        except sqlite3.Error:
            return super().size()

    def put(self, response_id, messages, output=()):
        """Store a response, compressed; the oldest go past the size. A failed
        write lands in memory instead."""
        data = zlib.compress(json.dumps({"messages": messages_data(messages),
                                         "output": list(output)}).encode())
        if len(data) > self.max_disk:
            return False
        items = [(i["id"], response_id) for i in output if isinstance(i.get("id"), str)]
        try:
            self._sql("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                      (response_id, self._wall(), len(data), data))
            self._sql("INSERT OR REPLACE INTO items VALUES (?, ?)", items, many=True)
            self._prune()
            return True
        except sqlite3.Error as exc:
            self._failed(exc)
            return super().put(response_id, messages, output)

    def _body(self, response_id):
        try:
            rows = self._sql("SELECT body, created FROM responses WHERE id = ?", (response_id,))
        except sqlite3.Error as exc:
            self._failed(exc)
            return None
        if not rows or self._wall() - rows[0][1] > STORE_DAYS * 86400:
            return None
        return json.loads(zlib.decompress(rows[0][0]))

    def get(self, response_id):
        body = self._body(response_id)
        return messages_of(body["messages"]) if body else super().get(response_id)

    def item(self, item_id):
        try:
            rows = self._sql("SELECT response FROM items WHERE id = ?", (item_id,))
        except sqlite3.Error:
            rows = []
        body = self._body(rows[0][0]) if rows else None
        if body is None:
            return super().item(item_id)
        return next((i for i in body["output"] if i.get("id") == item_id), None)

    def _prune(self):
        """The oldest go: those past STORE_DAYS, then until --store-size holds."""
        old = self._wall() - STORE_DAYS * 86400
        self._sql("DELETE FROM items WHERE response IN (SELECT id FROM responses "
                  "WHERE created < ?)", (old,))
        self._sql("DELETE FROM responses WHERE created < ?", (old,))
        self._sql("DELETE FROM conversations WHERE seen < ?", (old,))
        total = self._sql("SELECT COALESCE(SUM(size), 0) FROM responses")[0][0]
        while total > self.max_disk:
            oldest = self._sql("SELECT id, size FROM responses ORDER BY created LIMIT 64")
            for response_id, size in oldest:
                self._sql("DELETE FROM items WHERE response = ?", (response_id,))
                self._sql("DELETE FROM responses WHERE id = ?", (response_id,))
                total -= size
                if total <= self.max_disk:
                    break

    def remember(self, digest):
        try:
            self._sql("INSERT OR REPLACE INTO conversations VALUES (?, ?, ?)",
                      (digest, self.instance, self._wall()))
        except sqlite3.Error as exc:
            self._failed(exc)

    def seen_before(self, digests):
        """Did a proxy before this one (a restart) keep one of these?"""
        try:
            return any(self._sql("SELECT 1 FROM conversations WHERE digest = ? AND "
                                 "instance != ?", (d, self.instance)) for d in digests)
        except sqlite3.Error:
            return False

    def _failed(self, exc):
        if not self._warned and self._logs is not None:
            self._warned = True
            self._logs.add(LogEvent.CODEX_WARNING, message="the response store on disk "
                           f"failed ({type(exc).__name__}); responses are kept in memory")

    def close(self):
        with self._db_lock:
            self._db.close()


def open_store(config, instance, logs):
    """The store on disk in the state dir, or (named in the banner, as
    `error`) in memory when it cannot be: --store-size 0, no sqlite3 in this
    Python, a state dir that cannot be written."""
    why = "--store-size 0" if not config.store_size else \
        "this Python has no sqlite3 module" if sqlite3 is None else None
    if why is None:
        state_dir = config.state_dir or default_state_dir()
        try:
            os.makedirs(state_dir, exist_ok=True)
            return DiskStore(os.path.join(state_dir, "responses.sqlite3"), config.store_size,
                             instance, logs)
        except (OSError, sqlite3.Error) as exc:
            why = f"{os.path.join(state_dir, 'responses.sqlite3')} could not be opened " \
                  f"({getattr(exc, 'strerror', None) or exc})"
    store = ResponseStore()
    store.error = why
    return store


# ---------------------------------------------------------------------------
# Responders: one per API, each writes a turn in its API's shape
# ---------------------------------------------------------------------------

class Responder:
    """Writes one turn to the client in one API's shape: as a stream of
    events when the request streams, else as one object at the end.

    The contract, the same for every API.  Turns and the pump call, in order:

        open()                      once, first: headers (and the opening
                                    events) go out before Codex says anything
        text(key, delta)            answer text; a new key starts a new message
        reasoning(item, part, delta)
                                    reasoning summary text; a new item or
                                    part starts a new paragraph
        keepalive()                 while Codex is silent (streams only)
        search(event)               a hosted web search begun or done (search_of)
        annotate(key, citations)    the url_citations of message `key`'s text
        search_refused(event, code) a search past max_uses: the turn ends
        tool_calls(calls)           at most once: [ToolCall] for the client
        end_output()                no more output comes: what is open is
                                    closed, so history_messages() and stored()
                                    are whole (what is kept or stored is
                                    decided now, before the last bytes)
        finish(reason, usage)       the last bytes: "stop" or "tool_calls"
        fail(error)                 instead of finish: a ProxyError

    A subclass fills in what differs: `open`, `text`, `reasoning`,
    `tool_calls`, `end_output`, `finish` and `fail_stream` (an error once
    the stream has started).  Writes raise ClientGone when the client has
    left."""

    def __init__(self, handler, request, reasoning_mode):
        self.handler = handler
        self.request = request
        self.model = request.model          # echoed exactly as the client sent it
        self.stream = request.stream
        self.reasoning_mode = reasoning_mode
        self.created = int(time.time())
        self.calls = []                     # [ToolCall] sent
        self.content = []                   # the answer text as sent
        self.reasoning_items = []           # encrypted reasoning, when Codex gives it
        self.stop_sequence = None           # the stop sequence that ended the answer

    def keepalive(self):
        if self.stream:
            self.handler.write_chunk(b": keepalive\n\n")

    def search(self, event):
        """A web search of the model's (shown where the API has a shape for it)."""

    def annotate(self, key, citations):
        """The url_citations of a message's text (where the API shows them)."""

    def search_refused(self, event, code):
        """A search past the request's max_uses (where the API says so)."""

    def end_output(self):
        """Close what is still open (nothing, unless a subclass keeps items open)."""

    def fail(self, error):
        if self.stream:
            self.fail_stream(error)
        else:
            self.handler.send_error_body(error)

    def fail_stream(self, error):
        raise NotImplementedError

    def answer_text(self):
        """The answer as the conversation's history should hold it."""
        return "".join(self.content)

    def history_messages(self):
        """What this response adds to the conversation, as the client will
        send it back."""
        return [Message("assistant", self.answer_text(), tool_calls=list(self.calls))]

    def stored(self):
        """(id, output items) when this response is kept for later requests
        to refer to (the Responses API's previous_response_id), else None."""
        return None


class StopFilter:
    """Cuts streamed text before the first stop sequence.  It holds back the
    few characters that could be the start of a stop sequence split across
    deltas, and lets them go once they cannot be."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.hit = False
        self.matched = None         # the stop sequence that ended the answer
        self._held = ""

    def feed(self, text):
        """-> the text that may go out now; sets `hit` at a stop sequence."""
        if self.hit:
            return ""
        buffer = self._held + text
        found = [(i, s) for i, s in ((buffer.find(s), s) for s in self.stops) if i >= 0]
        if found:
            at, self.matched = min(found)
            self.hit, self._held = True, ""
            return buffer[:at]
        keep = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), keep, -1):
                if buffer.endswith(stop[:size]):
                    keep = size
                    break
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self):
        held, self._held = self._held, ""
        return held


def token_counts(usage):
    usage = usage or {}

    def number(key):
        value = usage.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else 0
    return (number("input_tokens"), number("cached_input_tokens"),
            number("output_tokens"), number("reasoning_output_tokens"))


def openai_usage(usage):
    """Codex turn usage -> Chat Completions usage."""
    prompt, cached, completion, reasoning = token_counts(usage)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def new_completion_id():
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def make_chunk(cid, created, model, delta=None, finish_reason=None, usage=None):
    chunk = {"id": cid, "object": "chat.completion.chunk", "created": created,
             "model": model, "choices": []}
    if delta is not None:
        chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}]
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def tool_call_chunks(cid, created, model, calls, start_index=0):
    """Streaming fragments for calls: id, type and name first, then arguments."""
    chunks = []
    for offset, call in enumerate(calls):
        index = start_index + offset
        chunks.append(make_chunk(cid, created, model, {"tool_calls": [{
            "index": index, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": ""}}]}))
        if call.arguments:
            chunks.append(make_chunk(cid, created, model, {"tool_calls": [{
                "index": index, "function": {"arguments": call.arguments}}]}))
    return chunks


def make_completion(cid, created, model, content, reasoning, calls,
                    finish_reason, usage):
    """A whole chat.completion object."""
    message = {"role": "assistant", "content": content or None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.name, "arguments": c.arguments}} for c in calls]
    else:
        message["content"] = content or ""
    return {"id": cid, "object": "chat.completion", "created": created,
            "model": model, "choices": [{"index": 0, "message": message,
                                         "logprobs": None,
                                         "finish_reason": finish_reason}],
            "usage": usage}


def sse(data, event=None):
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class ChatResponder(Responder):
    """Chat Completions: `chat.completion.chunk`s on a chunked SSE response
    ending in `data: [DONE]`, or one `chat.completion`.  Reasoning goes out
    as `reasoning_content`, as <think> blocks in the content, or not at all
    (--reasoning)."""

    def __init__(self, handler, request, reasoning_mode):
        super().__init__(handler, request, reasoning_mode)
        self.id = new_completion_id()
        self.reasoning_text = []
        self.annotations = []               # url_citations, at their place in the content
        self._starts = {}                   # message key -> where its text begins
        self._length = 0                    # characters of content sent
        self._text_key = self._reasoning_key = None
        self._think_open = False

    def _chunk(self, delta=None, finish_reason=None, usage=None):
        return make_chunk(self.id, self.created, self.model, delta, finish_reason, usage)

    def _send(self, delta):
        if self.stream:
            self.handler.write_chunk(sse(self._chunk(delta)))

    def open(self):
        """Headers and the role chunk, at once, before Codex says anything."""
        if self.stream:
            self.handler.start_event_stream()
            self._send({"role": "assistant", "content": ""})

    def _content(self, text):
        self.content.append(text)
        self._length += len(text)
        self._send({"content": text})

    def text(self, key, delta):
        if not delta:
            return
        prefix = ""
        if self._think_open:
            prefix, self._think_open = "\n</think>\n\n", False
        elif key != self._text_key and self.content:
            prefix = "\n\n"
        if key != self._text_key:
            self._starts[key] = self._length + len(prefix)
        self._text_key = key
        self._content(prefix + delta)

    def annotate(self, key, citations):
        """Chat Completions' `annotations`: url_citation objects whose indices
        count in the whole content; streamed, in a delta of their own."""
        offset = self._starts.get(key, self._starts.get(self._text_key, 0))
        shaped = [{"type": "url_citation", "url_citation": {
            "url": c.get("url"), "title": c.get("title"),
            "start_index": offset + (c.get("start_index") or 0),
            "end_index": offset + (c.get("end_index") or 0)}} for c in citations]
        self.annotations += shaped
        self._send({"annotations": shaped})

    def reasoning(self, item, part, delta):
        """Reasoning summary text: as reasoning_content, inside <think> in the
        content, or nowhere (--reasoning)."""
        if not delta:
            return
        new_part = (item, part) != self._reasoning_key
        self._reasoning_key = (item, part)
        sep = "\n\n" if new_part and self.reasoning_text else ""
        self.reasoning_text.append(sep + delta)
        if self.reasoning_mode == "content":
            self._send({"reasoning_content": sep + delta})
        elif self.reasoning_mode == "think":
            if not self._think_open:
                self._think_open = True
                self._content(("\n\n" if self.content else "") + "<think>\n" + delta)
            else:
                self._content(sep + delta)

    def tool_calls(self, calls):
        start = len(self.calls)
        self.calls += calls
        if self.stream:
            self.handler.write_chunk(b"".join(sse(c) for c in tool_call_chunks(
                self.id, self.created, self.model, calls, start)))

    def end_output(self):
        if self._think_open:
            self._content("\n</think>")
            self._think_open = False

    def finish(self, reason, usage):
        """The finish chunk, the usage chunk when asked, [DONE] (or one
        chat.completion)."""
        self.end_output()
        usage = openai_usage(usage)
        if not self.stream:
            reasoning = "".join(self.reasoning_text) if self.reasoning_mode == "content" else ""
            completion = make_completion(self.id, self.created, self.model,
                                         "".join(self.content), reasoning, self.calls,
                                         reason, usage)
            if self.annotations:
                completion["choices"][0]["message"]["annotations"] = self.annotations
            self.handler.send_json(200, completion)
            return
        data = sse(self._chunk({}, reason))
        if self.request.include_usage:
            data += sse(self._chunk(usage=usage))
        self.handler.write_chunk(data + b"data: [DONE]\n\n")
        self.handler.end_chunks()

    def fail_stream(self, error):
        self.handler.write_chunk(sse(error.body()) + b"data: [DONE]\n\n")
        self.handler.end_chunks()

    def answer_text(self):
        return THINK_BLOCK.sub("", "".join(self.content))


def responses_usage(usage):
    """Codex turn usage -> Responses API usage."""
    prompt, cached, completion, reasoning = token_counts(usage)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion}


def output_message_item(item_id, text, status="completed", annotations=()):
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": list(annotations),
                         "logprobs": []}] if status == "completed" else []}


def output_search_item(event):
    """A web search as the Responses API's web_search_call item."""
    action = event["action"] if event["status"] == "completed" else {"type": "search"}
    return {"type": "web_search_call", "id": event["id"], "status": event["status"],
            "action": action}


def output_reasoning_item(item_id, parts):
    return {"type": "reasoning", "id": item_id,
            "summary": [{"type": "summary_text", "text": p} for p in parts]}


def output_call_item(item_id, call, status="completed"):
    if call.custom:
        item = {"type": "custom_tool_call", "id": item_id, "call_id": call.id,
                "name": call.name, "input": call.arguments if status == "completed" else "",
                "status": status}
    else:
        item = {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
                "arguments": call.arguments if status == "completed" else "",
                "status": status}
    if call.namespace:
        item["namespace"] = call.namespace
    return item


def make_response(rid, created, model, request, status, output, usage=None, error=None):
    """A Responses API Response object."""
    echo = request.echo
    return {"id": rid, "object": "response", "created_at": created, "status": status,
            "model": model, "output": output,
            "usage": responses_usage(usage) if usage is not None else None,
            "error": error, "incomplete_details": None,
            "instructions": echo.get("instructions"),
            "tools": echo.get("tools") or [],
            "tool_choice": echo.get("tool_choice") or "auto",
            "parallel_tool_calls": request.parallel_tool_calls,
            "previous_response_id": echo.get("previous_response_id"),
            "reasoning": echo.get("reasoning") or {"effort": None, "summary": None},
            "text": echo.get("text") or {"format": {"type": "text"}},
            "metadata": echo.get("metadata") or {},
            "temperature": echo.get("temperature"), "top_p": echo.get("top_p"),
            "max_output_tokens": echo.get("max_output_tokens"),
            "store": request.store, "truncation": echo.get("truncation") or "disabled",
            "user": echo.get("user")}


class ResponsesResponder(Responder):
    """The Responses API: the event sequence the openai SDKs parse
    (response.created ... response.completed) when the request streams,
    else one Response object.  Each Codex message, reasoning item and tool
    call becomes one output item."""

    def __init__(self, handler, request, reasoning_mode):
        super().__init__(handler, request, reasoning_mode)
        self.show_reasoning = reasoning_mode != "none"
        self.id = "resp_" + uuid.uuid4().hex
        self.output = []            # finished output items
        self._seq = 0
        self._item = None           # the item being written: {kind, key, id, parts}
        self._searches = {}         # web search id -> its place in the output
        self._messages = {}         # message key -> its place in the output, once done

    def _event(self, kind, **fields):
        if self.stream:
            self._seq += 1
            self.handler.write_chunk(sse({"type": kind, "sequence_number": self._seq,
                                          **fields}, kind))

    def _response(self, status, usage=None, error=None, output=None):
        return make_response(self.id, self.created, self.model, self.request, status,
                             self.output if output is None else output, usage, error)

    def open(self):
        if self.stream:
            self.handler.start_event_stream()
            self._event("response.created", response=self._response("in_progress"))
            self._event("response.in_progress", response=self._response("in_progress"))

    def _begin(self, kind, key, item):
        self._close()
        self._item = {"kind": kind, "key": key, "id": item["id"], "parts": []}
        self._event("response.output_item.added", output_index=len(self.output), item=item)

    def text(self, key, delta):
        """Answer text: a new message item (and its output_text part) when the
        key changes, then a delta."""
        if not delta:
            return
        item = self._item
        if item is None or item["kind"] != "message" or item["key"] != key:
            item_id = "msg_" + uuid.uuid4().hex
            self._begin("message", key, output_message_item(item_id, "", "in_progress"))
            self._event("response.content_part.added", item_id=item_id,
                        output_index=len(self.output), content_index=0,
                        part={"type": "output_text", "text": "", "annotations": [],
                              "logprobs": []})
            item = self._item
            item["parts"].append("")
        item["parts"][0] += delta
        self.content.append(delta)
        self._event("response.output_text.delta", item_id=item["id"],
                    output_index=len(self.output), content_index=0, delta=delta,
                    logprobs=[])

    def reasoning(self, item_key, part, delta):
        """Reasoning summary text: a reasoning item, a summary part for each
        part index, then a delta."""
        if not delta or not self.show_reasoning:
            return
        item = self._item
        if item is None or item["kind"] != "reasoning" or item["key"] != item_key:
            self._begin("reasoning", item_key, output_reasoning_item(
                "rs_" + uuid.uuid4().hex, []))
            item = self._item
            item["part_keys"] = []
        if part not in item["part_keys"]:
            item["part_keys"].append(part)
            item["parts"].append("")
            self._event("response.reasoning_summary_part.added", item_id=item["id"],
                        output_index=len(self.output), summary_index=len(item["parts"]) - 1,
                        part={"type": "summary_text", "text": ""})
        index = item["part_keys"].index(part)
        item["parts"][index] += delta
        self._event("response.reasoning_summary_text.delta", item_id=item["id"],
                    output_index=len(self.output), summary_index=index, delta=delta)

    def _close(self):
        """Close the item being written: its .done events, then it joins the output."""
        item, self._item = self._item, None
        if item is None:
            return
        index = len(self.output)
        if item["kind"] == "message":
            text, cited = item["parts"][0], item.get("annotations", [])
            part = {"type": "output_text", "text": text, "annotations": cited, "logprobs": []}
            self._event("response.output_text.done", item_id=item["id"], output_index=index,
                        content_index=0, text=text, logprobs=[])
            self._event("response.content_part.done", item_id=item["id"],
                        output_index=index, content_index=0, part=part)
            done = output_message_item(item["id"], text, annotations=cited)
            self._messages[item["key"]] = index
        else:
            for n, text in enumerate(item["parts"]):
                self._event("response.reasoning_summary_text.done", item_id=item["id"],
                            output_index=index, summary_index=n, text=text)
                self._event("response.reasoning_summary_part.done", item_id=item["id"],
                            output_index=index, summary_index=n,
                            part={"type": "summary_text", "text": text})
            done = output_reasoning_item(item["id"], item["parts"])
        self.output.append(done)
        self._event("response.output_item.done", output_index=index, item=done)

    def search(self, event):
        """A web search as a web_search_call item: added (in progress,
        searching), then completed and done with its action."""
        index = self._searches.get(event["id"])
        if index is None:
            self._close()
            index = self._searches[event["id"]] = len(self.output)
            self.output.append(output_search_item(dict(event, status="in_progress")))
            self._event("response.output_item.added", output_index=index,
                        item=self.output[index])
            for step in ("in_progress", "searching"):
                self._event(f"response.web_search_call.{step}", item_id=event["id"],
                            output_index=index)
        if event["status"] == "completed":
            self.output[index] = output_search_item(event)
            self._event("response.web_search_call.completed", item_id=event["id"],
                        output_index=index)
            self._event("response.output_item.done", output_index=index,
                        item=self.output[index])

    def annotate(self, key, citations):
        """url_citation annotations on the message's output_text, each with
        its response.output_text.annotation.added event."""
        shaped = [{"type": "url_citation", "url": c.get("url"), "title": c.get("title"),
                   "start_index": c.get("start_index"), "end_index": c.get("end_index")}
                  for c in citations]
        item = self._item if self._item is not None and self._item["kind"] == "message" \
            else None
        index = len(self.output) if item is not None else \
            self._messages.get(key, max(self._messages.values(), default=None))
        if item is not None:
            cited = item.setdefault("annotations", [])
            item_id = item["id"]
        elif index is not None:
            cited = self.output[index]["content"][0]["annotations"]
            item_id = self.output[index]["id"]
        else:
            return
        for annotation in shaped:
            self._event("response.output_text.annotation.added", item_id=item_id,
                        output_index=index, content_index=0, annotation_index=len(cited),
                        annotation=annotation)
            cited.append(annotation)

    def tool_calls(self, calls):
        """Each call as a function_call (or custom_tool_call) item: added, its
        arguments as one delta, done."""
        self._close()
        self.calls += calls
        for call in calls:
            index = len(self.output)
            item_id = ("ctc_" if call.custom else "fc_") + uuid.uuid4().hex
            self._event("response.output_item.added", output_index=index,
                        item=output_call_item(item_id, call, "in_progress"))
            kind = "custom_tool_call_input" if call.custom else "function_call_arguments"
            self._event(f"response.{kind}.delta", item_id=item_id, output_index=index,
                        delta=call.arguments)
            done_fields = {"input": call.arguments} if call.custom else \
                {"arguments": call.arguments, "name": call.name}
            self._event(f"response.{kind}.done", item_id=item_id, output_index=index,
                        **done_fields)
            done = output_call_item(item_id, call)
            self.output.append(done)
            self._event("response.output_item.done", output_index=index, item=done)

    def end_output(self):
        self._close()

    def stored(self):
        return (self.id, self.output) if self.request.store else None

    def finish(self, reason, usage):
        """response.completed with the whole Response (or it alone)."""
        self._close()
        response = self._response("completed", usage)
        if not self.stream:
            self.handler.send_json(200, response)
            return
        self._event("response.completed", response=response)
        self.handler.end_chunks()

    def fail_stream(self, error):
        self._close()
        self._event("response.failed", response=self._response(
            "failed", error={"code": error.code or "server_error", "message": error.message}))
        self.handler.end_chunks()


ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                         403: "permission_error", 404: "not_found_error",
                         413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error(error):
    """A ProxyError in the Messages API's error shape."""
    kind = ANTHROPIC_ERROR_TYPES.get(error.status) or \
        ("invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def ollama_error(error):
    """A ProxyError in the Ollama API's error shape."""
    return {"error": error.message}


def anthropic_usage(usage):
    """Codex turn usage -> Messages API usage (input_tokens there leaves out
    what was read from the cache)."""
    prompt, cached, completion, _ = token_counts(usage)
    return {"input_tokens": max(0, prompt - cached), "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0, "output_tokens": completion}


def call_input(call):
    """A call's arguments as the object tool_use (and Ollama) want."""
    try:
        value = json.loads(call.arguments)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"input": call.arguments}


class MessagesResponder(Responder):
    """The Anthropic Messages API: the SSE events the SDKs and Claude Code
    read (each with its `event:` line: message_start, content_block_start /
    _delta / _stop, message_delta, message_stop, ping), or one Message.  The
    model's reasoning summary is a thinking block, shown when the request
    asked for thinking; its signature carries Codex's encrypted reasoning,
    so that a returned block gives the model its reasoning back."""

    STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use"}

    def __init__(self, handler, request, reasoning_mode):
        super().__init__(handler, request, reasoning_mode)
        self.id = "msg_" + uuid.uuid4().hex[:24]
        self.seal = handler.server.seal       # signs the reasoning a thinking block carries
        self.show_thinking = request.reasoning_summary is not None
        self.blocks = []            # finished content blocks
        self._block = None          # the block being written
        self._key = None
        self.searches = []          # web searches done, in order
        self._held = None           # text after a search, held until its citations come
        self._cited = []            # ... and those citations (url_citation)

    def _event(self, kind, **fields):
        if self.stream:
            self.handler.write_chunk(sse(dict(type=kind, **fields), kind))

    def _usage(self, usage):
        shaped = anthropic_usage(usage or {})
        if self.searches:
            shaped["server_tool_use"] = {"web_search_requests": len(self.searches)}
        return shaped

    def _message(self, stop_reason=None, usage=None):
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": self.blocks if stop_reason else [], "stop_reason": stop_reason,
                "stop_sequence": self.stop_sequence if stop_reason else None,
                "usage": self._usage(usage)}

    def open(self):
        if self.stream:
            self.handler.start_event_stream()
            self._event("message_start", message=self._message())

    def _begin(self, block, key=None):
        self._close()
        self._block, self._key = block, key
        self._event("content_block_start", index=len(self.blocks), content_block=dict(
            block, **({"text": ""} if block["type"] == "text" else
                      {"thinking": "", "signature": ""} if block["type"] == "thinking" else
                      {"input": {}})))

    def _close(self):
        block, self._block = self._block, None
        if block is None:
            return
        if block["type"] == "thinking":
            used = sum(1 for b in self.blocks if b["type"] == "thinking")
            item = self.reasoning_items[used] if used < len(self.reasoning_items) else None
            block["signature"] = self.seal.sign(item) if item and self.seal else ""
            self._event("content_block_delta", index=len(self.blocks),
                        delta={"type": "signature_delta", "signature": block["signature"]})
        self._event("content_block_stop", index=len(self.blocks))
        self.blocks.append(block)

    def text(self, key, delta):
        if not delta:
            return
        self.content.append(delta)
        if self._held is not None:      # after a search: it waits for its citations
            self._held += delta
            return
        if self._block is None or self._block["type"] != "text" or self._key != key:
            self._begin({"type": "text", "text": ""}, key)
        self._block["text"] += delta
        self._event("content_block_delta", index=len(self.blocks),
                    delta={"type": "text_delta", "text": delta})

    # -- web search: server_tool_use, web_search_tool_result, cited text -------
    def search(self, event):
        """A done search: its blocks come with the results its answer cites,
        so the text after it is held until the citations arrive."""
        if event["status"] == "completed":
            self._close()
            self.searches.append(event)
            self._held = "" if self._held is None else self._held

    def annotate(self, key, citations):
        self._cited += citations
        self._flush()

    def search_refused(self, event, code):
        self._close()
        self._flush()
        self._search_blocks(event, {"type": "web_search_tool_result_error", "error_code": code})

    def _flush(self):
        """The held searches and text: for each search its server_tool_use
        and web_search_tool_result (the last one holds the cited pages),
        then the text with its citations (web_search_result_location)."""
        if self._held is None:
            return
        text, cited, self._held, self._cited = self._held, self._cited, None, []
        results = list({c.get("url"): c for c in cited if c.get("url")}.values())
        pending = [s for s in self.searches if not s.get("shown")]
        for n, event in enumerate(pending):
            event["shown"] = True
            self._search_blocks(event, [{
                "type": "web_search_result", "url": c["url"], "title": c.get("title") or "",
                "encrypted_content": base64.urlsafe_b64encode(c["url"].encode()).decode()}
                for c in results] if n == len(pending) - 1 else [])
        if text:
            locations = [{"type": "web_search_result_location", "url": c.get("url"),
                          "title": c.get("title"),
                          "encrypted_index": base64.urlsafe_b64encode(b"%d" % n).decode(),
                          "cited_text": text[c.get("start_index") or 0:c.get("end_index") or 0]
                          or c.get("title") or ""} for n, c in enumerate(cited)]
            self._whole({"type": "text", "text": text, "citations": locations},
                        [{"type": "citations_delta", "citation": loc} for loc in locations] +
                        [{"type": "text_delta", "text": text}],
                        {"type": "text", "text": "", "citations": []})

    def _search_blocks(self, event, content):
        tool_id = "srvtoolu_" + re.sub(r"[^A-Za-z0-9_]", "", event["id"])[:40]
        query = {"query": event.get("query") or ""}
        self._whole({"type": "server_tool_use", "id": tool_id, "name": "web_search",
                     "input": query},
                    [{"type": "input_json_delta", "partial_json": json.dumps(query)}],
                    {"type": "server_tool_use", "id": tool_id, "name": "web_search",
                     "input": {}})
        self._whole({"type": "web_search_tool_result", "tool_use_id": tool_id,
                     "content": content})

    def _whole(self, block, deltas=(), start=None):
        """A block written at once: its start, its deltas, its stop."""
        index = len(self.blocks)
        self._event("content_block_start", index=index, content_block=start or block)
        for delta in deltas:
            self._event("content_block_delta", index=index, delta=delta)
        self._event("content_block_stop", index=index)
        self.blocks.append(block)

    def reasoning(self, item, part, delta):
        if not delta or not self.show_thinking:
            return
        if self._block is None or self._block["type"] != "thinking" or self._key != item:
            self._begin({"type": "thinking", "thinking": ""}, item)
        elif self._block["thinking"] and part != self._block.get("part"):
            delta = "\n\n" + delta
        self._block["part"] = part
        self._block["thinking"] += delta
        self._event("content_block_delta", index=len(self.blocks),
                    delta={"type": "thinking_delta", "thinking": delta})

    def tool_calls(self, calls):
        self.calls += calls
        for call in calls:
            self._begin({"type": "tool_use", "id": call.id, "name": call.name})
            self._block["input"] = call_input(call)
            self._event("content_block_delta", index=len(self.blocks), delta={
                "type": "input_json_delta",
                "partial_json": json.dumps(self._block["input"], ensure_ascii=False)})
        self._close()

    def end_output(self):
        self._close()
        self._flush()
        for block in self.blocks:
            block.pop("part", None)

    def finish(self, reason, usage):
        self.end_output()
        stop = "stop_sequence" if self.stop_sequence else self.STOP_REASONS.get(reason, reason)
        if not self.stream:
            self.handler.send_json(200, self._message(stop, usage))
            return
        self._event("message_delta", delta={"stop_reason": stop,
                                            "stop_sequence": self.stop_sequence},
                    usage=self._usage(usage))
        self._event("message_stop")
        self.handler.end_chunks()

    def fail_stream(self, error):
        self._event("error", error=anthropic_error(error)["error"])
        self.handler.end_chunks()

    def keepalive(self):
        self._event("ping")


def ollama_time():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


class OllamaResponder(Responder):
    """The Ollama API: NDJSON lines (no blank line, no comment: the library
    parses every line) with `done: false`, then one `done: true` line with
    the counts; or that last object alone.  /api/chat writes `message`
    (content, thinking, tool_calls with object arguments); /api/generate
    (OllamaGenerateResponder) writes `response` and `thinking`."""

    chat = True

    def __init__(self, handler, request, reasoning_mode):
        super().__init__(handler, request, reasoning_mode)
        self.show_thinking = request.reasoning_summary is not None
        self.thinking = []
        self.started = time.monotonic()

    def _line(self, done=False, content="", thinking="", calls=(), extra=None):
        """One NDJSON object: /api/chat's `message` or /api/generate's `response`."""
        line = {"model": self.model or "", "created_at": ollama_time()}
        if self.chat:
            message = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = [{"function": {"name": c.name,
                                                       "arguments": call_input(c)}}
                                         for c in calls]
            line["message"] = message
        else:
            line["response"] = content
            if thinking:
                line["thinking"] = thinking
        line["done"] = done
        line.update(extra or {})
        return line

    def _write(self, line):
        if self.stream:
            self.handler.write_chunk(json.dumps(line).encode() + b"\n")

    def open(self):
        if self.stream:
            self.handler.start_event_stream("application/x-ndjson")

    def text(self, key, delta):
        if delta:
            self.content.append(delta)
            self._write(self._line(content=delta))

    def reasoning(self, item, part, delta):
        if delta and self.show_thinking:
            self.thinking.append(delta)
            self._write(self._line(thinking=delta))

    def tool_calls(self, calls):
        self.calls += calls
        if calls:
            self._write(self._line(calls=calls))

    def finish(self, reason, usage):
        prompt, _, completion, _ = token_counts(usage)
        elapsed = int((time.monotonic() - self.started) * 1e9)
        counts = {"done_reason": "stop", "total_duration": elapsed, "load_duration": 0,
                  "prompt_eval_count": prompt, "prompt_eval_duration": 0,
                  "eval_count": completion, "eval_duration": elapsed}
        if not self.chat:
            counts["context"] = context_numbers(self.context_id)
        if not self.stream:
            self.handler.send_json(200, self._line(True, "".join(self.content),
                                                   "".join(self.thinking), self.calls, counts))
            return
        self._write(self._line(True, extra=counts))
        self.handler.end_chunks()

    def fail_stream(self, error):
        self._write({"error": error.message})
        self.handler.end_chunks()

    def keepalive(self):
        self._write(self._line())        # an empty piece: NDJSON has no comments


class OllamaGenerateResponder(OllamaResponder):
    """/api/generate: the answer as `response`, with a `context` that names
    the conversation so far (stored): sent back, it continues it."""

    chat = False

    def __init__(self, handler, request, reasoning_mode):
        super().__init__(handler, request, reasoning_mode)
        self.context_id = "ctx_" + secrets.token_hex(12)

    def stored(self):
        return self.context_id, []

# ---------------------------------------------------------------------------
# Turns: one request from start to end, and what becomes of its run
# ---------------------------------------------------------------------------

# Reasons a run is released whose Codex is idle: it is let exit by itself.
IDLE_ENDS = ("answered", "max_kept", "ttl")


def incoming_fields(request, client, log_bodies):
    """What the log says of a request as it comes in."""
    fields = {"api": request.api, "model": request.model, "stream": request.stream,
              "messages": len(request.messages), "tools": len(request.tools), "client": client}
    if request.output_note:
        fields["output_format"] = request.output_note
    if request.ignored_tools:
        fields["ignored_tools"] = request.ignored_tools     # hosted: the model never sees them
    if request.notes:
        fields["notes"] = request.notes
    if log_bodies:
        fields["prompt"] = render_prompt(request.messages)[-4000:]
    return fields


def forgotten_why(store, key):
    """Why no kept thread holds a conversation: a proxy before this one kept
    it (the store remembers), or nothing is known of it."""
    digests = (conversation_digest(key[:n]) for n in range(len(key) - 1, 0, -1)[:32])
    return "proxy restarted" if store.seen_before(digests) else \
        "no kept thread holds this history"


def end_event(end, fate, responder, started, log_bodies, stalled=False):
    """What the log says of a turn's end -> (event, fields)."""
    elapsed = int((time.monotonic() - started) * 1000)
    if end.kind == "failed":
        return LogEvent.STREAM_CODEX_ERROR, {"status": end.error.status, "code": end.error.code,
                                             "message": end.error.message[:500]}
    if fate == "gone":
        return (LogEvent.CLIENT_STALLED if stalled else LogEvent.CLIENT_DISCONNECTED), \
            {"duration_ms": elapsed}
    first = end.first_output
    fields = {"api": responder.request.api, "finish_reason": end.reason, "duration_ms": elapsed,
              "first_token_ms": int((first - started) * 1000) if first else None,
              "usage": openai_usage(end.usage) if fate != "parked" else None,
              "tool_calls": len(responder.calls)}
    if log_bodies:
        fields["answer"] = responder.answer_text()[-4000:]
    return LogEvent.CURSOR_RESPONSE, fields


class Turns:
    """Every turn being answered, and the runs between turns.

    `serve` takes a parsed request.  Its tool results resume the parked run
    that made those calls; else its conversation continues a kept thread,
    or a new run starts.  A new or continued turn first takes a
    --max-concurrent slot and is refused past the limit; a resumed one takes
    a slot too but is never refused (its run is already running).  The pump
    relays the run's events; then `settle` decides in one place whether the
    run is parked (the model called the client's tools), kept (its thread
    takes the conversation's next turn) or released, and what is stored,
    before the slot is given back and the last bytes go out."""

    def __init__(self, config, launcher, logs, runs, stopping, store, clock=time.monotonic):
        self.config = config
        self.launcher = launcher
        self.logs = logs
        self.runs = runs
        self.stopping = stopping
        self.parked = ParkedTurns(config.max_parked, config.tool_result_timeout, clock)
        self.kept = KeptThreads(config.keep_conversations, config.conversation_ttl, clock)
        self.responses = store          # ResponseStore or DiskStore
        # _lock guards _active, the requests being answered now; _answered is
        # told whenever it drops.
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)
        self._active = 0

    def start_reaper(self):
        threading.Thread(target=self._reap, name="turns-reaper", daemon=True).start()

    def close(self):
        """End every run: parked ones, kept ones, then those still answering."""
        self._release_all(self.parked.take_all(), "shutdown", "parked")
        self._release_all(self.kept.take_all(), "shutdown", "kept")
        self._release_all(self.runs.all(), "shutdown")

    # -- one request, start to end ------------------------------------------
    def serve(self, handler, request, api):
        """Answer one request: resume, continue or start its run, relay the
        run's events in the API's shape, then settle how the turn ended."""
        self.logs.add(LogEvent.INCOMING_REQUEST, handler.request_id, **incoming_fields(
            request, handler.client_address[0], self.config.log_bodies))
        codex_run = self.resume(request, handler.request_id) or \
            self.admit(request, handler.request_id)     # each holds a slot now
        responder = api.responder(handler, request, self.config.reasoning)
        started = time.monotonic()
        try:
            responder.open()
            end = TurnPump(codex_run, responder, handler, self.launcher).pump()
            if end.process_died and end.first_output is None and codex_run.can_continue \
                    and not self.stopping.is_set():
                codex_run = self._restart(codex_run, request, handler.request_id)
                end = TurnPump(codex_run, responder, handler, self.launcher).pump()
        except DISCONNECT_ERRORS:
            end = TurnEnd("gone")
        except BaseException:       # a bug: still the run ends and the slot is given back
            self._done_answering()
            self.release(codex_run, "failed")
            raise
        self.settle(handler, codex_run, responder, end, started)

    def _restart(self, codex_run, request, request_id):
        """A turn whose Codex died before anything reached the client starts
        again on a fresh thread from the request's history -> the new run.
        Should it fail to start, serve() ends the old run and gives the slot
        back, once."""
        spec = run_spec(request, self.config.aliases, self.launcher.engine.namespaces)
        fresh = self.launcher.start_run(spec)
        self.release(codex_run, "exited")
        self.logs.add(LogEvent.CONVERSATION_STARTED, request_id, run=fresh.id,
                      reason="process died (the turn starts again)",
                      history_messages=len(spec.messages) - 1)
        return fresh

    def settle(self, handler, codex_run, responder, end, started):
        """The end of a turn, in one place.  First what becomes of the run
        (parked, kept, or released) and what is stored, then the slot is
        given back, then the last bytes go out: a client that sends its
        next request at once finds the parked run, the kept thread, the
        stored response and a free slot."""
        fate = self._decide(codex_run, responder, end)
        self._log_end(handler, codex_run, responder, end, fate, started)
        self._done_answering()
        if self._write_end(handler, codex_run, responder, end, fate) and fate != "gone":
            self.logs.add(LogEvent.CLIENT_STALLED if handler.stalled else
                          LogEvent.CLIENT_DISCONNECTED, handler.request_id, run=codex_run.id,
                          duration_ms=int((time.monotonic() - started) * 1000))
            if fate == "parked" and self.parked.discard(codex_run):
                fate = "gone"           # nobody has its calls
            elif fate not in ("parked", "kept"):
                fate = "gone"           # a kept thread stays: its conversation may go on
        if fate not in ("parked", "kept"):
            self.release(codex_run, fate)

    def _decide(self, codex_run, responder, end):
        """Park, keep and store, before any last byte -> "parked", "kept",
        or why the run is released."""
        if end.kind in ("failed", "gone"):
            return end.kind
        request = responder.request
        fate = "cut" if end.cut else "answered"
        try:
            if end.kind == "calls":
                fate = "forced" if end.forced else self.park(codex_run, responder, end.calls)
                responder.tool_calls([p.call for p in end.calls])
            responder.end_output()
        except DISCONNECT_ERRORS:
            return "gone" if fate != "parked" or self.parked.discard(codex_run) else fate
        stored = responder.stored()
        if stored is not None:
            self.responses.put(stored[0], request.messages + responder.history_messages(),
                               stored[1])
        if fate == "answered" and codex_run.can_continue and self.kept.size:
            fate = self.keep(codex_run, request, responder)
        return fate

    def _write_end(self, handler, codex_run, responder, end, fate):
        """The response's last bytes -> True when the client left first."""
        try:
            if end.kind == "failed":
                responder.fail(end.error)
            elif end.kind != "gone" and fate != "gone":
                # a parked turn's usage comes with the response that ends it
                responder.finish(end.reason, {} if fate == "parked" else end.usage)
        except DISCONNECT_ERRORS:
            handler.close_connection = True
            return True
        if end.kind == "gone":
            handler.close_connection = True
        return False

    def _log_end(self, handler, codex_run, responder, end, fate, started):
        if end.kind == "failed":
            end.error.message = self.launcher.redact(end.error.message)
        kind, fields = end_event(end, fate, responder, started, self.config.log_bodies,
                                 handler.stalled)
        self.logs.add(kind, handler.request_id, run=codex_run.id, **fields)

    # -- admitting, continuing and resuming -----------------------------------
    def admit(self, request, request_id):
        """A new or continued turn: a slot first (the concurrency check before
        anything else), then readiness from the cached checks, then the kept
        thread this conversation continues, or a new run."""
        spec = run_spec(request, self.config.aliases, self.launcher.engine.namespaces)
        with self._lock:
            if self._active >= self.config.max_concurrent:
                raise ProxyError(429, f"{self._active} Codex runs are busy "
                                 "(--max-concurrent); retry shortly", "rate_limit_error",
                                 "too_many_concurrent_requests", headers={"Retry-After": "2"})
            self._active += 1
        try:
            self.launcher.check_ready()
            codex_run, why = self._continue(request, spec, request_id)
            if codex_run is not None:
                return codex_run
            results = trailing_tool_results(request.messages)
            if results:
                self.logs.add(LogEvent.FALLBACK_TRANSCRIPT, request_id, results=len(results))
            codex_run = self.launcher.start_run(spec)
            if codex_run.can_continue:
                self.logs.add(LogEvent.CONVERSATION_STARTED, request_id, run=codex_run.id,
                              reason=why, history_messages=len(spec.messages) - 1)
            return codex_run
        except BaseException:
            self._done_answering()
            raise

    def _continue(self, request, spec, request_id):
        """The kept thread this conversation continues, given what is new and
        started on its next turn -> (run, None); or (None, why not)."""
        if not self.kept.size:
            return None, "conversations are not kept (--keep-conversations 0)"
        key, ends = conversation_key(request.messages)
        newest = next((m for m in reversed(request.messages) if m.role == "user"), None)
        kept, why, hinted = self.kept.claim(spec.match, key, ends, newest)
        if kept is None:
            return None, why or forgotten_why(self.responses, key)
        codex_run = kept.run
        if codex_run.retired:           # its process retires: a fresh thread takes over
            self.release(codex_run, "recycled", "kept")
            return None, GONE_WORDS["recycled"]
        added = [m for m in request.messages[ends[len(kept.key) - 1]:] if m.role != "system"]
        codex_run.remember_ids(spec.known_ids)
        try:
            codex_run.continue_turn(dataclasses.replace(spec, messages=added))
        except ProxyError as error:
            died = codex_run.exited.is_set()
            self.release(codex_run, "exited" if died else "continue_failed")
            return None, "process died" if died else f"its thread failed ({error.code})"
        self.logs.add(LogEvent.CONVERSATION_CONTINUED, request_id, run=codex_run.id,
                      thread_id=codex_run.thread_id, new_messages=len(added),
                      **({"note": "the client dropped the hint it had appended to "
                                  "an earlier message"} if hinted else {}))
        return codex_run, None

    def keep(self, codex_run, request, responder):
        """A completed turn's thread, kept for the conversation's next turn
        -> "kept"; past --keep-conversations others are let go."""
        messages = request.messages + responder.history_messages()
        key, ends = conversation_key(messages)
        newest = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
        hints = hint_candidates(messages[newest]) if newest is not None else {}
        last_user = ends.index(newest + 1) if newest is not None else -1
        for evicted in self.kept.keep(codex_run, codex_run.match, key, hints, last_user):
            self.release(evicted, "max_kept", "kept")
        self.responses.remember(conversation_digest(key))   # a restart can say so
        return "kept"

    def resume(self, request, request_id):
        """The parked run these tool results answer, with the results
        delivered; None when no parked turn of this conversation matches."""
        codex_run, stale = self.parked.resumed_by(request)
        for run in stale:
            self.release(run, "history_changed", "parked")
        if codex_run is None:
            return None
        if codex_run.fingerprint != request.fingerprint():    # a handoff to another agent
            self.release(codex_run, "conversation_changed", "parked")
            return None
        if codex_run.exited.is_set() or (codex_run.proc is not None and
                                         process_gone(codex_run.proc)):
            self.release(codex_run, "codex_exited", "parked")    # a fresh run answers instead
            return None
        codex_run.remember_ids(request.history_ids())
        answered = codex_run.take_results(trailing_tool_results(request.messages),
                                          trailing_context(request.messages))
        for call_id, chars in answered:
            self.logs.add(LogEvent.TOOL_RESULT_RECEIVED, request_id, run=codex_run.id,
                          call_id=call_id, result_chars=chars)
        self.logs.add(LogEvent.TURN_RESUMED, request_id, run=codex_run.id,
                      results=len(answered))
        with self._lock:
            self._active += 1
        return codex_run

    # -- slots, parking and the one way a run ends -----------------------------
    def _done_answering(self):
        with self._lock:
            self._active -= 1
            self._answered.notify_all()

    def wait_answered(self, timeout):
        """Wait until no request is being answered, so that each has written
        its last word (at a shutdown, that it is one) -> False after `timeout`."""
        with self._lock:
            return self._answered.wait_for(lambda: self._active <= 0, timeout)

    def park(self, codex_run, responder, calls):
        """Park a run on the calls it made -> "parked".  It is parked before
        the calls are written, so a client that answers at once finds it."""
        for pending in calls:
            pending.sent = True
        codex_run.parked_key = conversation_key(responder.request.messages + [Message(
            "assistant", responder.answer_text(), tool_calls=[p.call for p in calls])])[0]
        for evicted in self.parked.park(codex_run):
            self.release(evicted, "max_parked", "parked")
        return "parked"

    def release(self, codex_run, reason, was=None):
        """The one way a run ends.  It leaves the run table; when it was
        parked or kept, the log says so and why; then it stops.  A run whose
        Codex is idle is left to exit by itself, off the request path; any
        other is stopped now, its open calls answered with an error."""
        if was == "parked":
            self.logs.add(LogEvent.PARKED_EXPIRED, None, run=codex_run.id, reason=reason,
                          pending=sorted(codex_run.open_call_ids(sent_only=False)))
        elif was == "kept":
            self.logs.add(LogEvent.CONVERSATION_EXPIRED, None, run=codex_run.id, reason=reason,
                          thread_id=codex_run.thread_id)
        self.runs.pop(codex_run)
        if reason in IDLE_ENDS:
            threading.Thread(target=codex_run.stop, kwargs={"grace": KILL_GRACE_SECONDS},
                             name=f"reap-{codex_run.id}", daemon=True).start()
        else:
            codex_run.stop(f"The tool call was abandoned ({reason}).")

    def _release_all(self, runs, reason, was=None):
        """Release runs side by side: each may wait a moment for its turn/interrupt."""
        threads = [threading.Thread(target=self.release, args=(r, reason, was),
                                    name=f"stop-{r.id}") for r in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _reap(self):
        """Expire parked turns nobody answers and kept threads nobody uses."""
        period = min(1.0, max(0.05, min(self.config.tool_result_timeout,
                                        self.config.conversation_ttl) / 10))
        while not self.stopping.wait(period):
            for codex_run in self.parked.take_due():
                self.release(codex_run, "tool_result_timeout", "parked")
            for codex_run, why in self.kept.take_due():
                self.release(codex_run, why, "kept")


# ---------------------------------------------------------------------------
# Access, connections and rate limits
# ---------------------------------------------------------------------------


ACCESS_CODES = ("invalid_api_key", "api_key_required", "origin_not_allowed",
                "host_not_allowed")


def is_local_name(host):
    host = (host or "").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(value):
    """A Host header -> its host (no port, no brackets), or None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1:]
        if end < 0 or (rest and not re.fullmatch(r":[0-9]{1,5}", rest)):
            return None
        return value[1:end]
    host, sep, port = value.partition(":")
    if sep and not re.fullmatch(r"[0-9]{1,5}", port):
        return None
    return host or None


def host_allowed(value, allowed=()):
    """DNS rebinding and port-forward guard: a Host must be a loopback name
    (localhost, *.localhost, a loopback IP) or listed by the user.  The
    machine's own name, a .local name (any neighbour can answer for it) or
    another IP literal (a forward such as ssh -R names the far machine)
    need a key."""
    host = split_host(value)
    return host is not None and (is_local_name(host) or host in allowed)


ORIGIN = re.compile(r"(https?)://([a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?|\[[0-9a-f:.]{2,45}\])"
                    r"(?::([0-9]{1,5}))?")


def origin_allowed(origin, allowed=()):
    """A browser Origin may use a keyless proxy only when it is a local page
    (http(s)://localhost, 127.0.0.1, [::1], any port) or listed by the user.
    It must be an origin (scheme, host, optional port: no user part, no
    path, no whitespace); anything else is foreign."""
    if not well_formed_origin(origin):
        return False
    origin = origin.lower()
    if origin in allowed:           # "*" is for keyed proxies only: main refuses it without
        return True
    return is_local_name(ORIGIN.fullmatch(origin).group(2).strip("[]"))


def well_formed_origin(origin):
    match = ORIGIN.fullmatch(origin.lower()) if origin else None
    return match is not None and (match.group(3) is None or int(match.group(3)) <= 65535)


def tunnel_headers(headers):
    """Names of tunnel or proxy headers present, empty values included."""
    return sorted({k.lower() for k in headers.keys() if k.lower() in TUNNEL_HEADERS or
                   k.lower().startswith(TUNNEL_HEADER_PREFIXES)})


KEY_HEADERS = ("authorization", "api-key", "x-api-key")


def offered_keys(headers):
    """Every key a request offers, trimmed, whichever header carries it:
    `Authorization: Bearer KEY` (any case), `api-key: KEY`, `x-api-key: KEY`."""
    keys = []
    for name in KEY_HEADERS:
        for value in headers.get_all(name) or []:
            value = value.strip()
            if name == "authorization":
                scheme, _, value = value.partition(" ")
                if scheme.lower() != "bearer":
                    continue
            if value.strip():
                keys.append(value.strip())
    return keys


class AccessPolicy:
    """Who may use the proxy.  With a key, the key guards everything, from
    any origin and through any tunnel.  Without one, only this machine:
    no tunnel or proxy headers, only local pages (Origin) and local Host
    names (DNS rebinding).  It also decides what CORS answers may grant."""

    def __init__(self, config):
        self.keys = config.api_keys
        self.allow_origins = config.allow_origins
        self.allow_hosts = config.allow_hosts

    def check(self, headers):
        """Without a key: refuse tunnels, foreign pages and foreign Hosts (403)."""
        if self.keys:
            return
        tunnel = tunnel_headers(headers)
        if tunnel:
            raise ProxyError(403, "this request came through a tunnel or proxy "
                             f"({tunnel[0]} header) but the proxy has no API key: "
                             "restart it with --api-key-file FILE (or CODEX_PROXY_API_KEY) "
                             "and set the same key in your client",
                             "permission_error", "api_key_required")
        for origin in headers.get_all("Origin") or []:
            if not origin_allowed(origin, self.allow_origins):
                shown = origin.strip()[:100] if well_formed_origin(origin.strip()) else \
                    "a malformed origin"
                raise ProxyError(403, f"web pages from {shown!r} may not use this proxy; "
                                 "allow the origin with --allow-origin, or set an API key",
                                 "permission_error", "origin_not_allowed")
        hosts = headers.get_all("Host") or []
        if len(hosts) > 1 or not all(host_allowed(h, self.allow_hosts) for h in hosts):
            raise ProxyError(403, "without an API key only loopback names may be used "
                             "(localhost, 127.0.0.1); the Host header names another "
                             "(DNS rebinding?): allow it with --allow-host, or set an API key",
                             "permission_error", "host_not_allowed")

    def key_ok(self, headers):
        """Any key header carrying a valid key admits the request."""
        if not self.keys:
            return True
        return any(hmac.compare_digest(offered.encode(), key.encode())
                   for offered in offered_keys(headers) for key in self.keys)

    def require_key(self, headers):
        if not self.key_ok(headers):
            raise ProxyError(401, "invalid or missing API key: send Authorization: "
                             "Bearer <key> with the key the proxy was started with",
                             "authentication_error", "invalid_api_key")

    def cors_origin(self, headers):
        """The Origin a response may echo in Access-Control-Allow-Origin, or None."""
        origin = (headers.get("Origin") or "").strip() if headers is not None else ""
        if well_formed_origin(origin) and (self.keys or origin_allowed(origin,
                                                                       self.allow_origins)):
            return origin
        return None

    @staticmethod
    def preflight_headers(requested):
        """The request headers a CORS preflight grants: a fixed list, never an echo."""
        allowed = [h for h in (x.strip().lower() for x in (requested or "").split(","))
                   if h in CORS_HEADERS or h.startswith(CORS_HEADER_PREFIXES)]
        return allowed or ["authorization", "content-type"]


def connection_budget(config, soft_limit=None):
    """--max-connections, lowered so that connections never take the
    descriptors Codex processes need (three pipes each: running, parked,
    spare) plus a margin for the listener, logs and bridge."""
    if soft_limit is None:
        if resource is None:
            return config.max_connections
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft_limit == resource.RLIM_INFINITY:
            return config.max_connections
    reserve = 32 + 4 * (config.max_concurrent + config.max_parked + config.codex_processes)
    return min(config.max_connections, max(8, soft_limit - reserve))


class ConnectionTable:
    """The open client connections: their number (--max-connections) and
    the deadlines of a request's arrival.  Each connection is in a phase:

        idle  kept alive, waiting for its next request (KEEPALIVE_IDLE_SECONDS)
        head  its request line and headers arriving (REQUEST_READ_SECONDS in all)
        body  its body arriving (BODY_READ_SECONDS, then BODY_FLOOR_RATE on average)
        busy  being answered: no deadline here

    `reap()` (every half second, on its own thread) cuts a connection that
    overruns its phase, with a 408 when a request was arriving.  Past the
    limit the oldest connection that is not busy makes room, idle ones
    first; with none, a newcomer gets a polite 503."""

    EVICT_ORDER = ("idle", "head", "body")

    def __init__(self, limit, logs, clock=time.monotonic):
        self.limit = limit
        self._logs = logs
        self._clock = clock
        # _lock guards _connections (socket -> [phase, since, received]) and
        # _accept_logged; sockets are written and shut outside it.
        self._lock = threading.Lock()
        self._connections = {}
        self._accept_logged = 0.0

    def admit(self, sock):
        """A new connection: -> False when it was refused (and told so)."""
        refuse = False
        with self._lock:
            victim = None
            if len(self._connections) >= self.limit:
                victim = self._victim()
                if victim is None:
                    refuse = True
                else:
                    del self._connections[victim]
            if not refuse:
                self._connections[sock] = ["head", self._clock(), 0]
        if victim is not None:
            self._close(victim)
        if refuse:
            self._answer(sock, 503, "Service Unavailable", ProxyError(
                503, "too many open connections; retry shortly", "server_error",
                "too_many_connections"), "Retry-After: 1\r\n")
            return False
        return True

    def _victim(self):
        """The connection to close for a newcomer (under _lock), or None."""
        waiting = [(self.EVICT_ORDER.index(state[0]), state[1], sock)
                   for sock, state in self._connections.items()
                   if state[0] in self.EVICT_ORDER]
        return min(waiting, key=lambda w: w[:2])[2] if waiting else None

    def remove(self, sock):
        with self._lock:
            self._connections.pop(sock, None)

    def phase(self, sock, phase):
        """Enter a phase -> False when the reaper has already cut the connection."""
        with self._lock:
            state = self._connections.get(sock)
            if state is None or state[0] == "cut":
                return False
            state[:] = [phase, self._clock(), 0]
            return True

    def progress(self, sock, count):
        with self._lock:
            state = self._connections.get(sock)
            if state is not None:
                state[2] += count

    def reap(self):
        """Cut the connections that overran their phase."""
        now, cut, idle = self._clock(), [], []
        with self._lock:
            for sock, (phase, since, received) in self._connections.items():
                age = now - since
                if phase == "idle" and age > KEEPALIVE_IDLE_SECONDS:
                    idle.append(sock)
                elif (phase == "head" and age > REQUEST_READ_SECONDS) or (
                        phase == "body" and age > BODY_READ_SECONDS and
                        received < age * BODY_FLOOR_RATE):
                    cut.append((sock, phase))
            for sock, _ in cut:
                self._connections[sock][0] = "cut"
        for sock in idle:
            self._close(sock)
        for sock, phase in cut:
            error = ProxyError(408, f"the request's {'body' if phase == 'body' else 'headers'} "
                               "arrived too slowly", code="request_timeout")
            self._logs.add(LogEvent.REQUEST_REJECTED, status=408, code=error.code,
                           message=error.message)
            self._answer(sock, 408, "Request Timeout", error)
            self._close(sock)

    def accept_failed(self, exc):
        """accept() ran out of descriptors: close a waiting connection rather
        than spin, and say so now and then."""
        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            return
        with self._lock:
            victim = self._victim()
            log = self._clock() - self._accept_logged > 10
            if log:
                self._accept_logged = self._clock()
        if victim is not None:
            self._close(victim)
        if log:
            self._logs.add(LogEvent.CODEX_WARNING, message=f"accept failed: {exc.strerror}; "
                           "closing idle connections")
        time.sleep(0.05)

    def close_all(self):
        """Wake every handler, idle ones on kept-alive sockets included."""
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            self._close(sock)

    @staticmethod
    def _answer(sock, status, reason, error, extra=""):
        """A whole error response, written at once without waiting on a client
        that does not read."""
        body = json.dumps(error.body())
        data = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n{body}")
        try:
            sock.send(data.encode(), getattr(socket, "MSG_DONTWAIT", 0))
        except OSError:
            pass

    @staticmethod
    def _close(sock):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class BodyBudget:
    """The memory all request bodies in flight may hold together
    (--max-body-memory): a large body that would pass it gets a 503."""

    def __init__(self, limit):
        self.limit = limit
        # _lock guards _used (bytes reserved by bodies being read or parsed).
        self._lock = threading.Lock()
        self._used = 0

    def reserve(self, size, already=0):
        """Room for `size` more bytes of a body that holds `already` -> False
        when a body past DRAIN_LIMIT would overrun the budget."""
        with self._lock:
            if already + size > DRAIN_LIMIT and self._used + size > self.limit:
                return False
            self._used += size
            return True

    def release(self, size):
        with self._lock:
            self._used = max(0, self._used - size)


WARN_PERCENT = 90          # a window this full is a warning in Anthropic's status header
# Anthropic's name for a window of about five hours or about a week: (in the
# header names, in representative-claim)
ANTHROPIC_WINDOWS = {"session": ("5h", "five_hour"), "week": ("7d", "seven_day")}


def window_span(minutes):
    """A plan window by its length: "session" (a day or less), "week" (three
    days to a month), else None."""
    if not isinstance(minutes, (int, float)) or minutes <= 0:
        return None
    return "session" if minutes <= 1440 else "week" if 4320 <= minutes <= 44640 else None


def _int_text(value):
    return str(int(value)) if isinstance(value, (int, float)) and value >= 0 else None


class RateLimits:
    """The plan's usage windows as Codex last reported them
    (account/rateLimits/read and .../updated), for /health, the log page's
    header and the reset time in a 429."""

    def __init__(self, clock=time.time):
        self._clock = clock
        # _lock guards _limits and _at.
        self._lock = threading.Lock()
        self._limits, self._at = None, None

    def seen(self, snapshot):
        """Merge the windows Codex knows (called from reader threads)."""
        if not isinstance(snapshot, dict):
            return
        with self._lock:
            merged = dict(self._limits or {})
            merged.update({k: v for k, v in snapshot.items() if v is not None})
            self._limits, self._at = merged, self._clock()

    def view(self):
        """The windows for /health and the log page, or None."""
        with self._lock:
            limits, at = self._limits, self._at
        if not limits or not (limits.get("primary") or limits.get("secondary")):
            return None
        now, windows = self._clock(), []
        for name in ("primary", "secondary"):
            window = limits.get(name)
            if not isinstance(window, dict) or not isinstance(window.get("usedPercent"),
                                                               (int, float)):
                continue
            resets = window.get("resetsAt")
            windows.append({"name": name, "used_percent": window.get("usedPercent"),
                            "window_minutes": window.get("windowDurationMins"),
                            "resets_at": resets,
                            "resets_in_seconds": max(0, int(resets - now))
                            if isinstance(resets, (int, float)) else None})
        return {"plan": limits.get("planType"), "windows": windows,
                "reached": limits.get("rateLimitReachedType"), "updated_at": int(at)}

    def headers(self, dialect, refused=False):
        """The windows as headers in a dialect ("openai": the x-codex-* that
        Codex itself reads from its upstream; "anthropic": the
        anthropic-ratelimit-unified-* that Claude Code reads); `refused`
        when this answer is the plan's 429.  [] while nothing is known."""
        view = self.view() or {}
        windows = view.get("windows") or []
        if dialect == "openai":
            return [item for w in windows for item in (
                (f"x-codex-{w['name']}-used-percent", f"{float(w['used_percent']):g}"),
                (f"x-codex-{w['name']}-window-minutes", _int_text(w["window_minutes"])),
                (f"x-codex-{w['name']}-reset-at", _int_text(w["resets_at"])))
                if item[1] is not None]
        if dialect != "anthropic" or not windows:
            return []
        prefix, headers = "anthropic-ratelimit-unified-", []
        for w in windows:
            claim = ANTHROPIC_WINDOWS.get(window_span(w["window_minutes"]))
            if claim:
                headers.append((f"{prefix}{claim[0]}-utilization",
                                f"{w['used_percent'] / 100:g}"))
                if _int_text(w["resets_at"]):
                    headers.append((f"{prefix}{claim[0]}-reset", _int_text(w["resets_at"])))
        fullest = max(windows, key=lambda w: w["used_percent"])
        used = fullest["used_percent"]
        status = ("rejected" if refused or used >= 100 or view.get("reached")
                  else "allowed_warning" if used >= WARN_PERCENT else "allowed")
        headers.append((prefix + "status", status))
        if _int_text(fullest["resets_at"]):
            headers.append((prefix + "reset", _int_text(fullest["resets_at"])))
        claim = ANTHROPIC_WINDOWS.get(window_span(fullest["window_minutes"]))
        if claim:
            headers.append((prefix + "representative-claim", claim[1]))
        return headers

    def reset_seconds(self):
        """Seconds until the fullest window resets, when Codex told us."""
        windows = [w for w in (self.view() or {}).get("windows", [])
                   if w["resets_in_seconds"] is not None]
        if not windows:
            return None
        return max(windows, key=lambda w: w["used_percent"] or 0)["resets_in_seconds"] or None

# ---------------------------------------------------------------------------
# HTTP: framing (pure), a request's body, the connection's plumbing
# ---------------------------------------------------------------------------


HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
REQUEST_LINE = re.compile(r"([A-Z]{1,20}) (\S{1,65536}) (HTTP/1\.[01])")


def parse_head(requestline, lines):
    """A request line and its header lines (without line ends) -> (method,
    target, version, headers), strictly, as RFC 9112 asks; ProxyError (400)
    for anything two parsers could read differently: a line without a
    colon, whitespace before the colon, an obs-fold, control characters."""
    match = REQUEST_LINE.fullmatch(requestline)
    if match is None or HEADER_VALUE_BAD.search(requestline):
        raise framing_error("a request line must be METHOD TARGET HTTP/1.1")
    headers = http.client.HTTPMessage()
    for line in lines:
        if line[:1] in (" ", "\t"):
            raise framing_error("a folded header line (obs-fold) is not allowed")
        name, colon, value = line.partition(":")
        if not colon or not HEADER_NAME.fullmatch(name):
            raise framing_error("each header line needs a name, a colon and a value, "
                                "with no space before the colon")
        value = value.strip(" \t")
        if HEADER_VALUE_BAD.search(value):
            raise framing_error(f"the {name} header holds control characters")
        headers[name] = value
    return match.group(1), match.group(2), match.group(3), headers


def busy_receiving():
    return ProxyError(503, "the proxy is receiving too many large bodies at once; retry "
                      "shortly", "server_error", "busy_receiving", headers={"Retry-After": "2"})


JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_values(data):
    """About how many values parsing a JSON body would make (its
    structural characters), counted without parsing: cheaply, then, when
    that says too many, with the strings taken out (their commas are text)."""
    count = data.count(b"[") + data.count(b"{") + data.count(b",") + 1
    if count <= MAX_JSON_VALUES:
        return count
    bare = JSON_STRING.sub(b'""', data)
    return bare.count(b"[") + bare.count(b"{") + bare.count(b",") + 1


def framing_error(message):
    return ProxyError(400, message, code="bad_framing")


def body_framing(headers):
    """-> ("none", 0) | ("length", n) | ("chunked", None); ProxyError (400)
    for anything a front proxy and this server could read differently."""
    te = headers.get_all("Transfer-Encoding") or []
    cl = headers.get_all("Content-Length") or []
    if te:
        if cl:
            raise framing_error("a request may not carry both Content-Length and "
                                "Transfer-Encoding")
        if len(te) != 1 or te[0].strip().lower() != "chunked":
            raise framing_error("Transfer-Encoding must be exactly chunked")
        return "chunked", None
    if not cl:
        return "none", 0
    values = {v.strip() for v in cl}
    value = values.pop()
    if values or not re.fullmatch(r"[0-9]{1,15}", value):
        raise framing_error("Content-Length must be one non-negative decimal number")
    return ("length", int(value)) if int(value) else ("none", 0)


class RequestBody:
    """One request's body: read within its framing, the body budget
    (--max-body-memory) and the connection's deadlines, or dropped unread.
    After an answer that comes before the body was read, the connection
    must close (`close`), and with `linger` only after draining what the
    client still sends, so that it reads the answer, not a reset."""

    def __init__(self, handler, framing=("read", 0), expect=False):
        server = handler.server
        self._rfile, self._wfile, self._sock = handler.rfile, handler.wfile, handler.connection
        self._connections, self._budget = server.connections, server.body_budget
        self.max_body = server.config.max_body
        self._framing = framing     # body_framing(), or ("read", 0) once read or dropped
        self._expect = expect       # the client waits for 100 Continue before sending it
        self._reserved = 0          # bytes of the body budget this body holds
        self.length = 0             # bytes read
        self.close = False
        self.linger = False

    def read_json(self):
        """The body, parsed; its bytes are let go (and their share of the
        body budget given back) once parsed.  What parsing builds is bounded
        first: the values the body holds are counted (MAX_JSON_VALUES), and
        what they cost parsed is reserved from the budget while it parses."""
        self._reserved = self._reserve()
        try:
            data = self.read()
            values = json_values(data)
            if values > MAX_JSON_VALUES:
                self.close = True
                raise ProxyError(413, f"the request body holds more than {MAX_JSON_VALUES} "
                                 "JSON values; send fewer", code="request_too_large")
            parsed = values * PARSED_VALUE_BYTES
            if not self._budget.reserve(parsed, DRAIN_LIMIT + 1):
                raise busy_receiving()
            self._reserved += parsed
            return parse_json_body(data)
        finally:
            self._budget.release(self._reserved)
            self._reserved = 0

    def _early_close(self):
        self.close = self.linger = True

    def _reserve(self):
        kind, length = self._framing
        if kind == "length" and length > self.max_body:
            self._early_close()
            raise self.too_large()
        if kind == "length" and not self._budget.reserve(length, 0):
            self._early_close()
            raise busy_receiving()
        return length if kind == "length" else 0

    def read(self):
        """The body's bytes (b"" when it has none), read once; a client that
        waits for 100 Continue gets it now."""
        kind, length = self._framing
        self._framing = ("read", 0)
        if kind not in ("length", "chunked"):
            return b""
        if self._expect:            # every check has passed: now the body may come
            self._expect = False
            self._wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._wfile.flush()
        self._connections.phase(self._sock, "body")
        body = self._read_exact(length) if kind == "length" else self._read_chunked()
        self.length = len(body)
        if not self._connections.phase(self._sock, "busy"):
            raise ClientGone()          # the reaper cut it (and answered 408) meanwhile
        return body

    def too_large(self):
        return ProxyError(413, f"request body over {self.max_body} bytes "
                          "(raise --max-body)", code="request_too_large")

    def _read_exact(self, size):
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:       # readinto1: what has come, so progress counts as it comes
            count = self._rfile.readinto1(view[got:got + 65536])
            if not count:
                raise ClientGone()
            got += count
            self._connections.progress(self._sock, count)
        return buffer

    def _read_chunked(self):
        """A chunked body; what it holds is reserved as it comes, and given
        back after parsing (read_json)."""
        parts, total = [], 0
        while True:
            line = self._rfile.readline(1026)
            size = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", size):
                self.close = True
                raise framing_error("bad chunk size in a chunked body")
            size = int(size, 16)
            if size == 0:
                for _ in range(32):     # trailers, then the empty line
                    if self._rfile.readline(1026) in (b"\r\n", b"\n", b""):
                        return b"".join(parts)
                self.close = True
                raise framing_error("too many trailer lines")
            if total + size > self.max_body:
                self._early_close()
                raise self.too_large()
            if not self._budget.reserve(size, total):
                self._early_close()
                raise busy_receiving()
            total += size
            self._reserved += size
            parts.append(self._read_exact(size))
            if self._rfile.readline(3) not in (b"\r\n", b"\n"):
                self.close = True
                raise framing_error("a chunk is longer than its size says")

    def settle(self):
        """A body nobody read: drop it if small, else close the connection
        (after draining what the client still sends), so it is never parsed
        as the next request."""
        kind, length = self._framing
        self._framing = ("read", 0)
        if self._expect:            # no 100 Continue went out: the body may never come
            self.close = True
            return
        if kind == "length" and length <= DRAIN_LIMIT:
            try:
                self._sock.settimeout(5.0)
                self._read_exact(length)
                return
            except (ClientGone, OSError):
                pass
        if kind in ("length", "chunked"):
            self._early_close()


class HttpHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 plumbing, knowing nothing of the APIs: strict parsing of a
    request's head, deadlines for its arrival (with the ConnectionTable's
    reaper), unambiguous framing, bodies read within a memory budget or
    dropped, JSON answers, event streams (chunked, or close-delimited for
    HTTP/1.0), and noticing a client that has left.  A subclass names the
    `methods` it serves and `dispatch`es."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"   # no HTTP/0.9: even junk gets a status line
    server_version = f"codex-openai-proxy/{__version__}"
    error_content_type = "application/json"
    timeout = REQUEST_READ_SECONDS
    methods = ()

    def setup(self):
        super().setup()
        self.request_id = None
        self.headers = None
        self.body = None            # this request's RequestBody
        self._selector = None
        self._served = 0
        self._chunked = True        # streams are chunked, but for HTTP/1.0
        self._expect = False        # the client waits for 100 Continue before its body
        self.api = None             # the Api its path belongs to: its errors' shape
        self.answered = False       # a status line went out for this request
        self.stalled = False        # the client took no byte for --send-timeout seconds

    def finish(self):
        if self._selector is not None:
            self._selector.close()
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args):
        pass        # the proxy's own log records what matters

    def handle_one_request(self):
        """One request: a kept-alive connection idles until the request's
        first byte; then the line and headers must come within
        REQUEST_READ_SECONDS in all (the connection table's reaper cuts a
        connection that trickles them)."""
        connections, sock = self.server.connections, self.connection
        self.connection.settimeout(KEEPALIVE_IDLE_SECONDS if self._served
                                   else REQUEST_READ_SECONDS)
        try:
            if self._served:
                connections.phase(sock, "idle")
                first = self.rfile.read(1)
                connections.phase(sock, "head")
                self.connection.settimeout(REQUEST_READ_SECONDS)
            else:
                first = b""
            self.raw_requestline = first + self.rfile.readline(65537)
            self._served += 1
            self.body = RequestBody(self)
            self.headers, self.answered, self.stalled = None, False, False
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            if not connections.phase(sock, "busy"):
                self.close_connection = True    # the reaper cut it: too slow
                return
            if self.command not in self.methods:
                self.send_error(501, f"unsupported method {self.command!r}")
                return
            self.dispatch(self.command)
            self.wfile.flush()
        except (socket.timeout, OSError, ValueError):
            self.close_connection = True
        finally:
            if self.body is not None and self.body.linger:
                self._lingering_close()

    def _lingering_close(self):
        """Close after an early answer so that a client still sending its
        body reads the answer, not a reset: stop writing, then read and drop
        what comes for a while."""
        self.body.linger = False
        deadline, dropped = time.monotonic() + LINGER_SECONDS, 0
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            while time.monotonic() < deadline and dropped < 4 * self.server.config.max_body:
                self.connection.settimeout(max(0.05, deadline - time.monotonic()))
                data = self.connection.recv(65536)
                if not data:
                    break
                dropped += len(data)
        except OSError:
            pass

    def parse_request(self):
        """The request line and headers, read and checked strictly (no
        http.server leniency: a header it would skip could hide an Origin)."""
        self.command, self.request_version = None, self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        lines = []
        while True:
            raw = self.rfile.readline(65537)
            line = str(raw, "iso-8859-1")
            if line in ("\r\n", "\n", ""):
                break
            if len(raw) > 65536 or len(lines) >= MAX_HEADER_LINES:
                self.send_error(431, "request header fields too large")
                return False
            lines.append(line[:-2] if line.endswith("\r\n") else line.rstrip("\n"))
        try:
            self.command, self.path, self.request_version, self.headers = \
                parse_head(self.requestline, lines)
        except ProxyError as error:
            self.send_error(400, error.message)
            return False
        tokens = {t.strip().lower() for v in self.headers.get_all("Connection") or []
                  for t in v.split(",")}
        self.close_connection = self.request_version == "HTTP/1.0" or "close" in tokens
        self._chunked = self.request_version != "HTTP/1.0"
        self._expect = self.request_version == "HTTP/1.1" and \
            (self.headers.get("Expect") or "").lower() == "100-continue"
        return True

    def dispatch(self, method):
        raise NotImplementedError

    def settle_body(self):
        """Drop what is left of the body; close the connection when it must."""
        self.body.settle()
        if self.body.close:
            self.close_connection = True

    @property
    def route(self):
        path = urllib.parse.urlsplit(self.path).path.rstrip("/") or "/"
        if path == "/v1" or path.startswith("/v1/"):
            path = path[3:] or "/"
        return path

    @property
    def query(self):
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)

    # -- answers -------------------------------------------------------------
    def end_headers(self):
        """Every answer says: sniff no other type, and no other site may
        embed it (CORS answers to the pages allowed still work)."""
        origin = self.server.access.cors_origin(self.headers)
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        if self.close_connection or self.server.stopping.is_set():
            self.send_header("Connection", "close")
        super().end_headers()

    def send_json(self, status, body, headers=None):
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (OSError, ValueError) as exc:
            raise self._gone(exc)

    def send_response(self, code, message=None):
        """The status line: from here on an error can only close the
        connection, and a client that takes no byte for --send-timeout
        seconds is cut."""
        self.answered = True
        self.connection.settimeout(self.server.config.send_timeout)
        super().send_response(code, message)

    def _gone(self, exc):
        """A failed write -> ClientGone; `stalled` when the client took no
        byte for --send-timeout seconds rather than leaving."""
        self.stalled = self.stalled or isinstance(exc, socket.timeout)
        return ClientGone("stalled" if self.stalled else "gone")

    def send_error_body(self, error):
        """The one place an error body is written, in the shape of the API
        the request's path belongs to."""
        body = self.api.errors(error) if self.api is not None else error.body()
        self.send_json(error.status, body, error.headers)

    def send_error(self, code, message=None, explain=None):
        """Errors found before routing (a bad request line or header, an
        unknown method) as JSON; the connection closes."""
        self.close_connection = True
        message = message or explain or "bad request"
        self.server.logs.add(LogEvent.REQUEST_REJECTED, status=code, code="bad_framing",
                             client=self.client_address[0], message=message[:300])
        try:
            self.send_error_body(ProxyError(code, message, code="bad_framing"))
        except DISCONNECT_ERRORS + (OSError,):
            pass

    def start_event_stream(self, content_type="text/event-stream"):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:                       # HTTP/1.0 has no chunks: the stream ends with the connection
            self.close_connection = True
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()

    def write_chunk(self, data):
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)
            self.wfile.flush()
        except (OSError, ValueError) as exc:
            raise self._gone(exc)

    def end_chunks(self):
        try:
            if self._chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (OSError, ValueError) as exc:
            raise self._gone(exc)

    def client_gone(self):
        """True once the client closed its side of the connection."""
        try:
            if self._selector is None:
                self._selector = selectors.DefaultSelector()
                self._selector.register(self.connection, selectors.EVENT_READ)
            if not self._selector.select(0):
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


# ---------------------------------------------------------------------------
# APIs: the endpoints, the table of APIs and routes, routing and errors
# ---------------------------------------------------------------------------

def endpoint_health(handler):
    """The proxy's state for monitors: Codex, the engine, its processes and
    threads, parked turns, conversations, stored responses; the plan's
    windows only with the key."""
    server = handler.server
    launcher = server.launcher
    _, version, logged_in = launcher.codex_state()
    body = {"status": "ok", "version": __version__, "codex_version": version,
            "logged_in": logged_in, "engine": launcher.engine.name,
            "engine_reason": launcher.engine_reason,
            "codex_processes": [{"pid": p.proc.pid if p.proc else None,
                                 "threads": p.thread_count(), "served": p.served,
                                 "retired": p.retired} for p in launcher.pool.processes()],
            "parked_turns": len(server.turns.parked),
            "conversations": len(server.turns.kept),
            "stored_responses": {"count": len(server.store), "bytes": server.store.size(),
                                 "on_disk": server.store.error is None}}
    if server.access.key_ok(handler.headers):
        body["rate_limits"] = server.rate_limits.view()
    handler.send_json(200, body)


def endpoint_models(handler):
    """The model names a client may send, with their context windows where
    the catalog knows them; in Anthropic's list shape for a caller that
    sends `anthropic-version` (the anthropic SDK and Claude Code do)."""
    launcher = handler.server.launcher
    names = launcher.model_names()
    facts = {name: launcher.facts(name) for name in names}
    if handler.headers.get("anthropic-version"):
        handler.send_json(200, {"data": [
            {"type": "model", "id": name, "display_name": facts[name]["display_name"] or name,
             "created_at": "1970-01-01T00:00:00Z"} for name in names],
            "has_more": False, "first_id": names[0] if names else None,
            "last_id": names[-1] if names else None})
        return
    handler.send_json(200, {"object": "list", "data": [dict(
        {"id": name, "object": "model", "created": 0, "owned_by": "codex-openai-proxy"},
        **({"context_length": facts[name]["context_length"]}
           if facts[name]["context_length"] else {})) for name in names]})


def endpoint_logs(handler):
    """The page for browsers (it asks for the key itself); the events as JSON
    for everyone else, with the key."""
    server = handler.server
    html = server.logs_page()
    wants_json = handler.query.get("format", [""])[0] == "json" or \
        "text/html" not in (handler.headers.get("Accept") or "")
    if html is not None and not wants_json:
        data = html.encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "text/html; charset=utf-8")
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Content-Security-Policy", "default-src 'self'; "
                            "script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                            "frame-ancestors 'none'")
        handler.send_header("X-Frame-Options", "DENY")
        handler.end_headers()
        handler.wfile.write(data)
        return
    server.access.require_key(handler.headers)
    handler.send_json(200, {"events": server.logs.since(since_of(handler)),
                            "instance": server.instance})


def since_of(handler):
    try:
        return int(handler.query.get("since", ["0"])[0])
    except ValueError:
        raise bad_request("since must be an integer", "since")


def endpoint_logs_stream(handler):
    """New log events as SSE, as they come, with keepalives, until the
    client leaves or the proxy stops."""
    server = handler.server
    seq = since_of(handler)
    handler.start_event_stream()
    handler.write_chunk(b": connected\n\n")
    quiet_since = time.monotonic()
    while not server.stopping.is_set():
        events = server.logs.wait_since(seq, 1.0)
        if events:
            seq = events[-1]["seq"]
            handler.write_chunk(b"".join(b"id: %d\n" % e["seq"] + sse(e) for e in events))
            quiet_since = time.monotonic()
        elif handler.client_gone():
            raise ClientGone()
        elif time.monotonic() - quiet_since >= server.config.keepalive:
            handler.write_chunk(b": keepalive\n\n")
            quiet_since = time.monotonic()
    handler.end_chunks()


def endpoint_turn(handler):
    """A model route: the body, parsed in the API's own way (what it grows
    to as it is parsed counts against --max-body and the body budget),
    answered as a turn of Codex in the API's own shape."""
    api, server = handler.api, handler.server
    body = handler.body.read_json()
    room = Room(max(0, server.config.max_body - handler.body.length), server.body_budget,
                server.config.max_body, server.seal)
    try:
        request = api.parse(body, server, room)
    finally:
        room.release()
    request.api = api.name
    if request.web_search and server.config.no_web_search:
        raise bad_request("this request asks for web search, which this proxy was started "
                          "without (--no-web-search)", "tools", "web_search_disabled")
    server.turns.serve(handler, request, api)


def endpoint_count_tokens(handler):
    handler.send_json(200, {"input_tokens": count_tokens_estimate(handler.body.read_json())})


def endpoint_root(handler):
    """What Ollama answers at / (clients probe it); Claude Code sends HEAD."""
    data = b"Ollama is running"
    handler.send_response(200)
    handler.send_header("Content-Type", "text/plain; charset=utf-8")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)


def endpoint_favicon(handler):
    """The log page carries its own icon; a browser that asks anyway gets
    nothing, and no error row in the log."""
    handler.send_response(204)
    handler.send_header("Cache-Control", "max-age=86400")
    handler.end_headers()


OLLAMA_DETAILS = {"parent_model": "", "format": "codex", "family": "gpt", "families": ["gpt"],
                  "parameter_size": "", "quantization_level": ""}


def endpoint_ollama_tags(handler):
    handler.send_json(200, {"models": [
        {"name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z", "size": 0,
         "digest": hashlib.sha256(name.encode()).hexdigest(), "details": OLLAMA_DETAILS}
        for name in handler.server.launcher.model_names()]})


def endpoint_ollama_show(handler):
    body = handler.body.read_json()
    name = field(body if isinstance(body, dict) else {}, "model", (str,), "model") or \
        field(body if isinstance(body, dict) else {}, "name", (str,), "name")
    if not name:
        raise bad_request("model is required", "model")
    facts = handler.server.launcher.facts(name)
    info = {"general.architecture": "codex", "general.basename": name}
    if facts["context_length"]:
        info["codex.context_length"] = facts["context_length"]
    handler.send_json(200, {"license": "", "modelfile": "", "parameters": "", "template": "",
                            "details": OLLAMA_DETAILS, "model_info": info,
                            "capabilities": facts["capabilities"],
                            "modified_at": "1970-01-01T00:00:00Z"})


def endpoint_ollama_version(handler):
    handler.send_json(200, {"version": OLLAMA_VERSION})


def endpoint_ollama_ps(handler):
    handler.send_json(200, {"models": []})      # nothing is loaded: Codex holds the models


@dataclasses.dataclass(frozen=True)
class Route:
    """How one path is served: its methods, its endpoint (None: a turn of
    its API, see endpoint_turn) and who may use it."""
    methods: tuple = ("POST",)
    endpoint: object = None     # endpoint_...(handler), or None for a turn
    key: str = "required"       # "required", "none" (open), or "endpoint" (it checks)


@dataclasses.dataclass(frozen=True)
class Api:
    """One API the proxy speaks, in one row of APIS: its routes, how a turn's
    body is parsed (into a ProxyRequest) and written (a Responder), and the
    shape of its errors.  A request's `api` is the row's name; a path's
    errors take the shape of the row it belongs to."""
    name: str
    routes: dict                # path (without /v1) -> Route
    errors: object              # ProxyError -> the error body in this API's shape
    parse: object = None        # (body, server, room) -> ProxyRequest, for its turns
    responder: object = None    # the Responder class that writes its turns
    plan: str = None            # whose headers carry the plan's windows (RateLimits.headers)


TURN = Route()

# Every API and every path, in one table: adding an API is a row here plus
# its parser and its responder.
APIS = (
    Api("chat", {"/chat/completions": TURN}, ProxyError.body,
        lambda body, server, room: parse_chat_request(body, server.config.reasoning,
                                                       server.turns.responses), ChatResponder,
        "openai"),
    Api("responses", {"/responses": TURN}, ProxyError.body,
        lambda body, server, room: parse_responses_request(body, server.turns.responses),
        ResponsesResponder, "openai"),
    Api("messages", {"/messages": TURN,
                     "/messages/count_tokens": Route(endpoint=endpoint_count_tokens)},
        anthropic_error, lambda body, server, room: parse_messages_request(body, room),
        MessagesResponder, "anthropic"),
    Api("ollama_chat", {"/api/chat": TURN,
                        "/api/tags": Route(("GET",), endpoint_ollama_tags),
                        "/api/show": Route(("POST",), endpoint_ollama_show),
                        "/api/version": Route(("GET",), endpoint_ollama_version),
                        "/api/ps": Route(("GET",), endpoint_ollama_ps)},
        ollama_error, lambda body, server, room: parse_ollama_chat(body), OllamaResponder),
    Api("ollama_generate", {"/api/generate": TURN}, ollama_error,
        lambda body, server, room: parse_ollama_generate(body, server.turns.responses),
        OllamaGenerateResponder),
    Api("proxy", {"/models": Route(("GET",), endpoint_models),
                  "/": Route(("GET", "HEAD"), endpoint_root, key="none"),
                  "/favicon.ico": Route(("GET",), endpoint_favicon, key="none"),
                  "/health": Route(("GET",), endpoint_health, key="none"),
                  "/logs": Route(("GET",), endpoint_logs, key="endpoint"),
                  "/logs/stream": Route(("GET",), endpoint_logs_stream)},
        ProxyError.body),
)


def route_table(apis):
    """path -> (Api, Route), for every path of every API."""
    table = {}
    for api in apis:
        for path, route in api.routes.items():
            if path in table:
                raise ValueError(f"two APIs serve {path}")
            table[path] = (api, route)
    return table


def api_near(table, path):
    """The API a path belongs to, or is nearest to (its first segment: an
    unknown /api/... path is answered in Ollama's shape); else the first."""
    if path in table:
        return table[path][0]
    head = "/" + path.strip("/").split("/")[0]
    near = [api for known, (api, _) in table.items()
            if known != "/" and "/" + known.strip("/").split("/")[0] == head]
    return near[0] if near else next(iter(table.values()))[0]


class ProxyHandler(HttpHandler):
    """Routing and errors: every request gets the framing and access checks,
    then its route's endpoint; every error is answered and logged here."""

    methods = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
    plan = None         # whose plan headers this request's answer carries (Api.plan)
    refused = False     # its answer is the plan's 429

    def dispatch(self, method):
        """One request: framing and access checks, its route, its endpoint;
        every error answered here in its API's shape (and logged), never a
        traceback."""
        self.request_id = "req_" + secrets.token_hex(5)
        server = self.server
        self.api = api_near(server.routes, self.route)    # whose error shape
        self.plan, self.refused = None, False
        try:
            try:
                self.body = RequestBody(self, body_framing(self.headers), self._expect)
            except ProxyError:
                self.close_connection = True
                raise
            if server.stopping.is_set():   # a kept-alive connection outlived the server
                raise ProxyError(503, "the proxy is shutting down", "server_error",
                                 code="shutting_down")
            server.access.check(self.headers)
            route = self._route(method)
            if route is None:
                return self.preflight()
            if route.key == "required":
                server.access.require_key(self.headers)
                self.plan = self.api.plan       # a caller with the key may see the windows
            (route.endpoint or endpoint_turn)(self)
        except ProxyError as error:
            self.reject(error)
        except DISCONNECT_ERRORS:
            self.close_connection = True
        except Exception as exc:   # never a traceback to the client
            server.logs.add(LogEvent.INTERNAL_ERROR, self.request_id, error=server.launcher.redact(
                f"{type(exc).__name__}: {exc}")[:500])
            if self.answered:       # a response is under way: all that is left is to close
                self.close_connection = True
            else:
                self.reject(ProxyError(500, "internal proxy error; see the proxy's log",
                                       "server_error"), log=False)
        finally:
            self.settle_body()
            if server.stopping.is_set():
                self.close_connection = True

    def _route(self, method):
        """The Route for this path and method; None for a CORS preflight."""
        path = self.route
        api, route = self.server.routes.get(path, (None, None))
        if route is None:
            served = [("" if p.startswith("/api/") else "/v1") + p
                      for p, (_, r) in self.server.routes.items() if r.endpoint is None]
            raise ProxyError(404, f"no route {method} {path}; this proxy serves "
                             f"{', '.join(served)} and /v1/models", code="not_found")
        if method == "OPTIONS":
            return None
        if method not in route.methods:
            raise ProxyError(405, f"{path} takes {', '.join(route.methods)}, "
                             f"not {method}", code="method_not_allowed",
                             headers={"Allow": ", ".join(route.methods + ("OPTIONS",))})
        return route

    def send_response(self, code, message=None):
        """The status line, then the plan's windows in the API's own headers
        for a success or a 429 (the last known for a stream, those after
        its turn for a whole answer)."""
        super().send_response(code, message)
        if self.plan is not None and (code < 400 or code == 429):
            for name, value in self.server.rate_limits.headers(self.plan, self.refused):
                self.send_header(name, value)

    def send_error_body(self, error):
        self.refused = error.code == "usage_limit_reached"
        super().send_error_body(error)

    def reject(self, error, log=True):
        """Answer with an error before any response started, and log it."""
        self.settle_body()
        error.message = self.server.launcher.redact(error.message)
        if log:
            self.server.logs.add(
                LogEvent.AUTH_REJECTED if error.code in ACCESS_CODES
                else LogEvent.REQUEST_REJECTED,
                self.request_id, status=error.status, code=error.code,
                method=self.command, route=self.route if self.headers is not None else None,
                client=self.client_address[0], message=error.message[:300])
        try:
            self.send_error_body(error)
        except DISCONNECT_ERRORS + (OSError,):
            self.close_connection = True

    def preflight(self):
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods",
                         ", ".join(self.server.routes[self.route][1].methods + ("OPTIONS",)))
        self.send_header("Access-Control-Allow-Headers", ", ".join(
            AccessPolicy.preflight_headers(self.headers.get("Access-Control-Request-Headers"))))
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

# ---------------------------------------------------------------------------
# The server: wiring and lifecycle
# ---------------------------------------------------------------------------


class ProxyServer(http.server.ThreadingHTTPServer):
    """Wires the parts together and runs them: the log, access rules,
    connections, rate limits, the Codex launcher and the turns.  Each part
    owns its state and its lock; handlers reach them through `self.server`."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024      # a burst of connections waits in the kernel, not in SYN retries

    def __init__(self, config, log_stream=sys.stderr, clock=time.monotonic, apis=APIS):
        """Wire the parts (nothing runs until start_background) and bind."""
        self.config = config
        self.routes = route_table(apis)         # path -> (Api, Route)
        self.logs = LogBuffer(config.log_size, None if config.quiet else log_stream)
        self.stopping = threading.Event()
        self.instance = secrets.token_hex(6)    # lets the log page notice a restart
        self.access = AccessPolicy(config)
        self.connections = ConnectionTable(connection_budget(config), self.logs)
        self.body_budget = BodyBudget(config.max_body_memory)
        self.rate_limits = RateLimits()
        self.env = child_environment(os.environ, config.api_keys, config.codex_home)
        self.runs = RunTable()
        self.launcher = CodexLauncher(config, self.env, self.logs, self.rate_limits,
                                      self.runs, self.stopping)
        self.store = open_store(config, self.instance, self.logs)
        self.seal, self.seal_error = Seal.in_folder(config.state_dir or default_state_dir())
        self.turns = Turns(config, self.launcher, self.logs, self.runs, self.stopping,
                           self.store, clock)
        self._logs_html = None
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        super().__init__((config.host, config.port), ProxyHandler)

    def start_background(self):
        """Check Codex, pick the engine, build the model catalog, start the
        helper threads and the app-server processes."""
        self.launcher.open()
        self.turns.start_reaper()
        threading.Thread(target=self._reap_connections, name="connection-reaper",
                         daemon=True).start()

    def _reap_connections(self):
        while not self.stopping.wait(0.5):
            self.connections.reap()

    def close(self):
        """Stop serving and end every Codex process and run (a turn being
        answered hears that its Codex is gone: the proxy is shutting down)."""
        self.stopping.set()
        self.launcher.pool.close()
        self.turns.close()
        self.turns.wait_answered(SHUTDOWN_ANSWER_SECONDS)    # before their sockets close
        self.connections.close_all()
        self.launcher.close()
        self.store.close()
        self.server_close()

    # -- socketserver hooks: connections ----------------------------------------
    def verify_request(self, request, client_address):
        return self.connections.admit(request)

    def shutdown_request(self, request):
        self.connections.remove(request)
        super().shutdown_request(request)

    def get_request(self):
        """accept(), which must never spin when descriptors run out."""
        try:
            return super().get_request()
        except OSError as exc:
            self.connections.accept_failed(exc)
            raise

    def logs_page(self):
        if self._logs_html is None and self.config.logs_html:
            try:
                with open(self.config.logs_html, encoding="utf-8") as f:
                    self._logs_html = f.read()
            except OSError:
                return None
        return self._logs_html


# ---------------------------------------------------------------------------
# Command line: every setting once (FLAGS), Config, the parser, the banner
# ---------------------------------------------------------------------------

def parse_addr(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_alias(text):
    name, sep, model = text.partition("=")
    if not sep or not name.strip() or not model.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=MODEL, got {text!r}")
    return name.strip(), model.strip()


def read_key_file(path):
    """Keys from a file: one per line; blank lines and # comments skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            keys = [line.strip() for line in f if line.strip() and
                    not line.lstrip().startswith("#")]
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read the key file: {exc.strerror}")
    if not keys:
        raise argparse.ArgumentTypeError("the key file holds no key")
    return keys


def mib(n):
    return f"{n // (1024 * 1024)} MiB"


@dataclasses.dataclass(frozen=True)
class Flag:
    """One setting, defined once: its flag and environment variable, the
    Config field it sets and its default there, how its text is read, its
    floor, and what it does.  The parser, Config, the clamps and README's
    flag table all follow from FLAGS."""
    flag: str                   # "--max-body"; the README adds `metavar`
    env: str                    # its environment variable; the flag wins
    field: str                  # Config's field
    default: object             # Config's default (None: unset)
    help: str                   # what it does: --help and README say the same
    kind: str = "text"          # text | int | float | switch | choice | list
    metavar: str = None
    low: float = None           # numbers: a smaller value is raised to this
    choices: tuple = ()
    sep: str = ","              # list: how the variable separates its values
    read: object = None         # text -> value (text and list flags)
    scale: float = 1            # numbers: Config holds the flag's value times this
    shown: str = None           # README's default, where the value says it badly

    @property
    def flag_default(self):
        """The default as the flag says it (--tool-quiet-ms: milliseconds)."""
        if self.kind in ("int", "float") and self.scale != 1:
            return type(self.default)(round(self.default / self.scale))
        return self.default


FLAGS = (
    Flag("--addr", "CODEX_OPENAI_PROXY_ADDR", "addr", ("127.0.0.1", 11435),
         "where to listen", metavar="HOST:PORT", read=parse_addr, shown="`127.0.0.1:11435`"),
    Flag("--codex-bin", "CODEX_BIN", "codex_bin", "codex",
         "the Codex executable; an npm install is run through its native binary (on "
         "Windows the `codex.cmd` shim's node script is the fallback)", metavar="PATH",
         shown="`codex` on `PATH`"),
    Flag("--codex-home", "CODEX_HOME", "codex_home", None,
         "Codex's folder: login and `config.toml`", metavar="DIR", shown="`~/.codex`"),
    Flag("--engine", "CODEX_PROXY_ENGINE", "engine", "auto",
         "how Codex is run: `app-server` (streams tokens), `exec`, or `auto`: app-server "
         "when its start-up probe passes (see Engines)", kind="choice",
         choices=("auto",) + tuple(ENGINES), shown="`auto`"),
    Flag("--codex-processes", "CODEX_PROXY_CODEX_PROCESSES", "codex_processes", 2,
         "long-lived `codex app-server` processes that host every conversation's thread "
         "(see Engines)", kind="int", metavar="N", low=1),
    Flag("--api-key", "CODEX_PROXY_API_KEY", "api_keys", (),
         "require this key, as `Authorization: Bearer KEY` (visible in `ps`: prefer the file "
         "or the variable); repeatable, or comma-separated in the variable", kind="list",
         metavar="KEY", shown="none"),
    Flag("--api-key-file", "CODEX_PROXY_API_KEY_FILE", "api_key_file", None,
         "require the keys in this file, one per line (`#` comments allowed)",
         metavar="FILE", shown="none"),
    Flag("--insecure-no-key", "CODEX_PROXY_INSECURE_NO_KEY", "insecure_no_key", False,
         "allow a non-loopback `--addr` without a key", kind="switch"),
    Flag("--allow-origin", "CODEX_PROXY_ALLOW_ORIGINS", "allow_origins", (),
         "without a key, also let web pages from this origin (`https://chat.example`) use "
         "the proxy; repeatable, or comma-separated in the variable", kind="list",
         metavar="ORIGIN", read=lambda o: o.strip().lower().rstrip("/"), shown="none"),
    Flag("--allow-host", "CODEX_PROXY_ALLOW_HOSTS", "allow_hosts", (),
         "without a key, also accept this `Host` name; repeatable, or comma-separated in "
         "the variable", kind="list", metavar="HOST", read=lambda h: h.strip().lower(),
         shown="none"),
    Flag("--alias", "CODEX_PROXY_ALIASES", "aliases", (),
         "map a client's model name to a Codex model; repeatable, or comma-separated in "
         "the variable", kind="list", metavar="NAME=MODEL", read=parse_alias, shown="none"),
    Flag("--codex-config", "CODEX_PROXY_CODEX_CONFIG", "codex_config", (),
         "an extra `codex -c KEY=VALUE` setting; repeatable, or `;`-separated in the "
         "variable", kind="list", metavar="KEY=VALUE", sep=";", shown="none"),
    Flag("--reasoning", "CODEX_PROXY_REASONING", "reasoning", "content",
         "the reasoning summary as `delta.reasoning_content`, as `<think>...</think>` in "
         "the content (stripped again from history), or not at all", kind="choice",
         choices=("content", "think", "none"), shown="`content`"),
    Flag("--max-body", "CODEX_PROXY_MAX_BODY", "max_body", 16 * 1024 * 1024,
         "larger request bodies get 413", kind="int", metavar="BYTES",
         shown=mib(16 * 1024 * 1024)),
    Flag("--max-body-memory", "CODEX_PROXY_MAX_BODY_MEMORY", "max_body_memory",
         256 * 1024 * 1024, "memory all request bodies being received may hold together; "
         "past it a large body gets 503 with `Retry-After`", kind="int", metavar="BYTES",
         low=DRAIN_LIMIT, shown=mib(256 * 1024 * 1024)),
    Flag("--max-concurrent", "CODEX_PROXY_MAX_CONCURRENT", "max_concurrent", 4,
         "Codex runs at once; more get 429 with `Retry-After`", kind="int", metavar="N",
         low=1),
    Flag("--max-connections", "CODEX_PROXY_MAX_CONNECTIONS", "max_connections", 1000,
         "open client connections; past it the oldest idle one is closed, and with none "
         "idle a newcomer gets 503", kind="int", metavar="N", low=8),
    Flag("--idle-timeout", "CODEX_PROXY_IDLE_TIMEOUT", "idle_timeout", 300.0,
         "give up when Codex makes no progress for this many seconds", kind="float",
         metavar="S"),
    Flag("--request-timeout", "CODEX_PROXY_REQUEST_TIMEOUT", "request_timeout", 1800.0,
         "give up on a response that takes longer than this many seconds", kind="float",
         metavar="S"),
    Flag("--keepalive", "CODEX_PROXY_KEEPALIVE", "keepalive", 15.0,
         "seconds between keepalives while Codex is silent (tunnels drop silent streams "
         "after about 100 s)", kind="float", metavar="S", low=0.05),
    Flag("--send-timeout", "CODEX_PROXY_SEND_TIMEOUT", "send_timeout", 60.0,
         "seconds a client may take no byte of its answer before it is cut, its Codex "
         "turn ended and its slot freed (as nginx's send_timeout)", kind="float", metavar="S",
         low=1.0),
    Flag("--tool-result-timeout", "CODEX_PROXY_TOOL_RESULT_TIMEOUT", "tool_result_timeout",
         600.0, "how long a parked turn waits for the client's tool results, in seconds",
         kind="float", metavar="S"),
    Flag("--max-parked", "CODEX_PROXY_MAX_PARKED", "max_parked", 16,
         "turns waiting on tool results at once; past it the oldest ends", kind="int",
         metavar="N", low=1),
    Flag("--max-unknown-calls", "CODEX_PROXY_MAX_UNKNOWN_CALLS", "max_unknown_calls", 3,
         "end a turn whose model calls tools nobody declared more than this many times in "
         "a row (see Tools)", kind="int", metavar="N", low=0),
    Flag("--max-silent-calls", "CODEX_PROXY_MAX_SILENT_CALLS", "max_silent_calls", 30,
         "end a turn after this many model calls with nothing for the client", kind="int",
         metavar="N", low=1),
    Flag("--keep-conversations", "CODEX_PROXY_KEEP_CONVERSATIONS", "keep_conversations", 64,
         "conversations whose Codex thread is kept between their turns (see Conversations); "
         "past it one-shot requests are let go first, then the least recently used; 0 turns "
         "it off",
         kind="int", metavar="N", low=0),
    Flag("--conversation-ttl", "CODEX_PROXY_CONVERSATION_TTL", "conversation_ttl", 1800.0,
         "seconds an unused kept conversation lives", kind="float", metavar="S", low=1.0),
    Flag("--tool-quiet-ms", "CODEX_PROXY_TOOL_QUIET_MS", "tool_quiet", 0.15,
         "milliseconds to wait for sibling tool calls when Codex does not say the model "
         "has finished its response", kind="int", metavar="MS", low=0, scale=0.001),
    Flag("--store-size", "CODEX_PROXY_STORE_SIZE", "store_size", 256 * 1024 * 1024,
         "bytes of stored responses (for `previous_response_id`, `item_reference` and "
         "Ollama's `context`) kept on disk, 30 days at most, the oldest let go first; 0 "
         "keeps them in memory only, for an hour", kind="int", metavar="BYTES", low=0,
         shown=mib(256 * 1024 * 1024)),
    Flag("--state-dir", "CODEX_PROXY_STATE_DIR", "state_dir", None,
         "where the proxy keeps its own files: the model catalog copy and the stored "
         "responses", metavar="DIR",
         shown="`~/.local/state/codex-openai-proxy` (`%LOCALAPPDATA%\\codex-openai-proxy` "
               "on Windows)"),
    Flag("--no-web-search", "CODEX_PROXY_NO_WEB_SEARCH", "no_web_search", False,
         "refuse requests that ask for Codex's hosted web search (400), instead of "
         "searching (see Web search)", kind="switch"),
    Flag("--log-size", "CODEX_PROXY_LOG_SIZE", "log_size", 2000,
         "events kept for `/logs`", kind="int", metavar="N", low=1),
    Flag("--log-bodies", "CODEX_PROXY_LOG_BODIES", "log_bodies", False,
         "also log prompt and answer text", kind="switch"),
    Flag("--quiet", "CODEX_PROXY_QUIET", "quiet", False,
         "no log lines on stderr", kind="switch"),
)


def make_config_class():
    """Config: a field for each flag (its default from FLAGS), and what
    `main` derives (host and port from --addr; every key; the log page)."""
    fields = [("host", str, "127.0.0.1"), ("port", int, 11435),
              ("logs_html", object, None),
              # at most this many threads on one app-server process (0: no limit);
              # 1 is the old design of a process per conversation (--bench)
              ("process_threads", int, 0)]
    fields += [(f.field, object, f.default) for f in FLAGS if f.field != "addr"]
    namespace = {
        "__doc__": "Everything `main` learned from flags and environment variables: "
                   "one field per entry of FLAGS (--addr gives host and port; keys from "
                   "--api-key-file join api_keys).",
        "codex_home_dir": property(lambda self: self.codex_home or os.environ.get(
            "CODEX_HOME") or os.path.join(os.path.expanduser("~"), ".codex")),
        "__module__": __name__}
    return dataclasses.make_dataclass("Config", [
        (name, kind, dataclasses.field(default_factory=dict) if name == "aliases" else
         dataclasses.field(default=value, repr=name != "api_keys"))
        for name, kind, value in fields],
        namespace=namespace)


Config = make_config_class()


def default_text(flag):
    """A flag's default as README and --help say it."""
    if flag.shown:
        return flag.shown
    if flag.kind == "switch":
        return "off"
    value = flag.flag_default
    return f"{value:g}" if isinstance(value, float) else str(value)


def flag_table():
    """README's flag table, as FLAGS says it (a test holds README to it)."""
    rows = ["| flag | environment variable | default | what it does |",
            "| --- | --- | --- | --- |"]
    for f in FLAGS:
        usage = f.flag + (f" {f.metavar}" if f.metavar else "") + \
            (" " + "|".join(f.choices) if f.kind == "choice" else "")
        usage = "`" + usage.replace("|", "\\|") + "`" + \
            (" (repeatable)" if f.kind == "list" else "")
        env = f"`{f.env}=1`" if f.kind == "switch" else f"`{f.env}`"
        rows.append(f"| {usage} | {env} | {default_text(f)} | {f.help} |")
    return "\n".join(rows) + "\n"


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def build_parser():
    """The command line, from FLAGS: a flag not given reads its variable."""
    p = argparse.ArgumentParser(
        prog="codex_proxy.py",
        description="OpenAI, Anthropic and Ollama APIs backed by Codex (your ChatGPT "
                    "subscription). Every flag has an environment variable; the flag wins.")
    for f in FLAGS:
        text = f"{f.help} (env {f.env}" + ("=1" if f.kind == "switch" else "")
        text += "" if f.kind in ("switch", "list") else \
            f"; default {default_text(f).replace('`', '')}"
        text = (text + ")").replace("%", "%%")
        if f.kind == "switch":
            p.add_argument(f.flag, action="store_true", default=env_flag(f.env), help=text)
        elif f.kind == "list":
            p.add_argument(f.flag, action="append", default=None, metavar=f.metavar,
                           type=f.read, help=text)
        else:
            given = os.environ.get(f.env)       # text: argparse reads it with `type`
            p.add_argument(f.flag, type={"int": int, "float": float}.get(f.kind, f.read),
                           choices=f.choices or None, metavar=f.metavar, help=text,
                           default=given if given is not None else f.flag_default)
    p.add_argument("--mcp-bridge", metavar="FILE", help=argparse.SUPPRESS)
    return p


def config_value(flag, value):
    """A parsed flag value -> Config's: list flags from their variable when
    not given, numbers clamped and scaled."""
    if flag.kind == "list":
        if value is None:
            value = [flag.read(v) if flag.read else v for v in (
                p.strip() for p in os.environ.get(flag.env, "").split(flag.sep)) if v]
        return dict(value) if flag.field == "aliases" else tuple(
            v for v in value if v != "")
    if flag.kind in ("int", "float"):
        if flag.low is not None:
            value = max(flag.low, value)
        return value * flag.scale if flag.scale != 1 else value
    return value


def config_from_args(args):
    values = {f.field: config_value(f, getattr(args, f.flag[2:].replace("-", "_")))
              for f in FLAGS}
    host, port = values.pop("addr")
    keys = list(values["api_keys"])
    if values["api_key_file"]:
        keys += read_key_file(values["api_key_file"])
    values["api_keys"] = tuple(k.strip() for key in keys for k in key.split(",") if k.strip())
    html = os.path.join(os.path.dirname(os.path.abspath(__file__)), "logs.html")
    return Config(host=host, port=port, logs_html=html if os.path.isfile(html) else None,
                  **values)


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def raise_descriptor_limit():
    """Let the proxy hold as many connections as the OS allows this user."""
    if resource is None:
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, 1 << 20), hard))
    except (ValueError, OSError):
        pass        # macOS caps it lower; what we have is still fine


def banner(server):
    """What a user sees at start-up: where it listens, the Codex it found and
    its login, the key, the engine, and notes on what needs fixing."""
    cfg, launcher = server.config, server.launcher
    codex = launcher.codex
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    base = f"http://{host}:{server.server_address[1]}"
    if codex.argv is None:
        codex_line = f"NOT FOUND ({cfg.codex_bin!r}); install it: {INSTALL_HINT}"
    else:
        login = {True: "logged in", False: "NOT logged in: run `codex login`",
                 None: "login state unknown"}[codex.logged_in]
        codex_line = f"{' '.join(codex.argv)} ({codex.version or 'version unknown'}), {login}"
    key = "required" if cfg.api_keys else \
        "none (only local pages and local Host names; tunnels are refused)"
    warm = f", {launcher.pool.size} Codex process(es)" if launcher.engine.pooled else ""
    lines = [f"codex-openai-proxy {__version__} listening on {base}",
             f"  base URL for Cursor / OpenAI clients: {base}/v1",
             f"  codex: {codex_line}",
             f"  API key: {key}",
             f"  engine: {launcher.engine.name} ({launcher.engine_reason}){warm}",
             f"  logs: {base}/logs"]
    model = launcher.default_model()
    if model:
        window = launcher.facts(model)["context_length"]
        whose = "config.toml" if launcher.configured_model() else "Codex"
        lines.insert(-1, f"  model: {model} ({whose}'s default"
                      + (f", a {window:,}-token context" if window else "")
                      + "; a request's model picks another)")
    user_config = launcher.user_config
    user_config.read()
    if user_config.error:
        lines.append(f"  note: {user_config.path} could not be read "
                     f"({user_config.error}); its model settings are ignored")
    if server.seal_error:
        lines.append(f"  note: the secret that seals thinking signatures is only in memory "
                     f"({server.seal_error}): after a restart, old thinking blocks come back "
                     "without their reasoning")
    if server.store.error:
        lines.append(f"  note: stored responses are kept in memory only, for an hour: "
                     f"{server.store.error}")
    if launcher.catalog_error:
        lines.append(f"  note: the model catalog copy could not be written to "
                     f"{cfg.state_dir or default_state_dir()} ({launcher.catalog_error}): "
                     "catalog models may be offered Codex's apply_patch, and with the exec "
                     "engine see client tools only behind tool_search; fix --state-dir")
    agents = global_agents_file(cfg.codex_home_dir)
    if agents:
        lines.append(f"  note: Codex sends {agents} to the model with every request; "
                     "move it away if that is not wanted")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Run the proxy (or, with --mcp-bridge, the bridge Codex starts);
    -> the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mcp_bridge:
        return run_mcp_bridge(args.mcp_bridge)
    try:
        config = config_from_args(args)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if "*" in config.allow_origins and not config.api_keys:
        print("refusing --allow-origin '*' without an API key: every web page you visit "
              "could use your ChatGPT subscription. Set --api-key-file FILE (or "
              "CODEX_PROXY_API_KEY); with a key, every origin is allowed already.",
              file=sys.stderr)
        return 2
    if not config.api_keys and not is_loopback(config.host) and not config.insecure_no_key:
        print(f"refusing to listen on {config.host} without an API key: anyone who can "
              "reach it would use your ChatGPT subscription. Set --api-key-file FILE "
              "(or CODEX_PROXY_API_KEY), or pass --insecure-no-key.", file=sys.stderr)
        return 2
    raise_descriptor_limit()
    try:
        server = ProxyServer(config)
    except OSError as exc:
        print(f"cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    server.start_background()
    if hasattr(sys.stdout, "reconfigure"):     # a path the console cannot encode
        sys.stdout.reconfigure(errors="backslashreplace")
    sys.stdout.write(banner(server))
    sys.stdout.flush()
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(
            target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
