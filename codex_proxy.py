#!/usr/bin/env python3
"""codex-openai-proxy: the OpenAI Chat Completions and Responses APIs on top of Codex.

Use a ChatGPT Plus/Pro subscription from any OpenAI-compatible client (Cursor,
the openai SDK, the Agents SDK, LangChain, Continue, Cline, Open WebUI...).
Sign in once with `codex login`, then run:

    python3 codex_proxy.py            # serves http://127.0.0.1:11435/v1

Every request is answered by one Codex CLI process.  The default engine is
`codex app-server` (JSON-RPC on stdio): one process per request, started and
initialized ahead of time, which streams the answer token by token and takes
the client's tools as plain functions.  The fallback engine is `codex exec
--json`, whose client tools reach the model through an MCP server that is this
same file (`--mcp-bridge`).  Either way Codex runs with every setting that
leaves the model no tool of Codex's own (no shell, no file reads, no web
search, none of the user's MCP servers), and when the model calls a client
tool the call goes back to the client as `tool_calls`; the Codex process waits
("parks") on the unanswered call, and the client's next request, carrying the
results, resumes the same turn.  Codex itself never runs a tool.

Standard library only, Python 3.9+.  `python3 codex_proxy.py --help` lists
every flag and its environment variable.

SECURITY: whoever can reach the proxy spends your subscription.  It listens on
loopback by default and, without a key, answers only local pages and local
Host names (browsers and DNS rebinding are real attackers) and refuses
requests that carry tunnel headers.  Before exposing it (a Cloudflare Tunnel
or ngrok for Cursor), set a key with `--api-key-file` / CODEX_PROXY_API_KEY.
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
import dataclasses
import datetime
import errno
import hashlib
import hmac
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

try:                        # Python 3.11+; older ones use read_toml() below
    import tomllib
except ImportError:         # pragma: no cover - exercised on 3.9/3.10
    tomllib = None
try:
    import resource         # POSIX only: raising the descriptor limit
except ImportError:         # pragma: no cover - Windows
    resource = None

__version__ = "0.3.0"

# ---------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------

DEFAULT_ADDR = "127.0.0.1:11435"
DEFAULT_ENGINE = "auto"            # auto | app-server | exec
DEFAULT_WARM = 1                   # app-server processes initialized ahead of requests
DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_MAX_CONCURRENT = 4
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_REQUEST_TIMEOUT = 1800.0
DEFAULT_KEEPALIVE = 15.0
DEFAULT_LOG_SIZE = 2000
DEFAULT_TOOL_RESULT_TIMEOUT = 600.0
DEFAULT_MAX_PARKED = 16
DEFAULT_TOOL_QUIET = 0.15          # seconds to wait for sibling tool calls
LOGIN_CACHE_SECONDS = 30.0
KILL_GRACE_SECONDS = 2.0
POLL_SECONDS = 0.25                # how often a waiting handler looks around
REQUEST_READ_SECONDS = 30.0        # a request's line, headers and body must arrive within this
KEEPALIVE_IDLE_SECONDS = 60.0      # a kept-alive connection may wait this long for its next request
WRITE_STALL_SECONDS = 120.0        # a client that reads nothing for this long is gone
WARM_MAX_IDLE_SECONDS = 300.0      # a spare app-server unused this long is replaced
APP_SERVER_START_SECONDS = 30.0    # initialize must answer within this
RPC_SECONDS = 30.0                 # thread/start, turn/start... must answer within this
MAX_INPUT_CHARS = 1048576          # Codex refuses a turn input longer than this
MAX_JSON_DEPTH = 64
MAX_STOP_SEQUENCES = 4
RESPONSES_KEPT = 256               # stored responses for previous_response_id
RESPONSES_TTL_SECONDS = 3600.0
RESPONSES_KEPT_CHARS = 64 * 1024 * 1024
MCP_PROTOCOL_VERSION = "2025-06-18"
INSTALL_HINT = "npm install -g @openai/codex"
EFFORTS = ("minimal", "low", "medium", "high", "xhigh")
SUMMARIES = ("auto", "concise", "detailed", "none")
# Any copy of one of these, even empty, means the request came through a tunnel
# or a proxy: without a key such requests are refused.
TUNNEL_HEADERS = ("forwarded", "x-real-ip", "cf-connecting-ip", "cf-ray", "cdn-loop",
                  "true-client-ip", "via", "x-client-ip", "fastly-client-ip")
TUNNEL_HEADER_PREFIXES = ("x-forwarded-",)
# Request headers a browser page may send (CORS preflight); never echoed blindly.
CORS_HEADERS = ("authorization", "content-type", "api-key", "x-api-key", "openai-organization",
                "openai-project", "openai-beta", "accept", "cache-control")
CORS_HEADER_PREFIXES = ("x-stainless-",)
# Keys of $CODEX_HOME/config.toml that still apply although `codex exec` runs
# with --ignore-user-config (which keeps the user's own MCP servers off the host).
FORWARDED_CONFIG_KEYS = ("model", "model_provider", "model_providers",
                         "model_reasoning_effort", "model_reasoning_summary",
                         "model_verbosity", "service_tier")
# PROTOCOL.md section 2: together these leave the model no tool of Codex's
# that runs or reads anything on the host (the exec engine).
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
# The same settings for an app-server thread (APP_SERVER.md 3), plus the
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
    """Every failure a client sees: an HTTP status and an OpenAI error body."""

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


def bad_request(message, param=None, code=None):
    return ProxyError(400, message, "invalid_request_error", code, param)


class ClientGone(Exception):
    """The HTTP client closed its connection."""


DISCONNECT_ERRORS = (BrokenPipeError, ConnectionResetError,
                     ConnectionAbortedError, ClientGone)


# ---------------------------------------------------------------------------
# The request model (pure): both APIs parse into these
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class ToolSpec:
    """A tool the client declared.  `custom` tools take one raw string."""
    name: str
    description: str = ""
    parameters: dict = dataclasses.field(default_factory=dict)
    custom: bool = False


@dataclasses.dataclass
class ToolCall:
    id: str
    name: str
    arguments: str          # as the client sees it: JSON, or raw text for custom
    custom: bool = False


@dataclasses.dataclass
class Message:
    role: str               # system | user | assistant | tool
    text: str = ""
    tool_calls: list = dataclasses.field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    images: list = dataclasses.field(default_factory=list)   # data: URLs


@dataclasses.dataclass
class ProxyRequest:
    """One request, whichever API it came through."""
    api: str                        # "chat" | "responses"
    model: str | None               # exactly as the client sent it
    messages: list
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
                          sort_keys=True, default=str)
        return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()[:16]


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


TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def tool_spec(tool, seen):
    """One declared tool (Chat, flat Responses or custom form) -> ToolSpec,
    or None for hosted tools (web_search...), which have no client side."""
    if not isinstance(tool, dict):
        raise bad_request("each tool must be an object", "tools")
    kind = field(tool, "type", (str,), "tools[].type", "function")
    if kind not in ("function", "custom"):
        return None
    fn = tool.get("function") if tool.get("function") is not None else tool
    if not isinstance(fn, dict):
        raise bad_request("tools[].function must be an object", "tools")
    name = fn.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise bad_request("each tool needs a name of 1-64 letters, digits, _ . -", "tools")
    if name in seen:
        return None
    seen.add(name)
    description = field(fn, "description", (str,), "tools[].description", "")
    if kind == "custom":
        fmt = tool.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "grammar":
            description += ("\n\nThe `input` must follow this "
                            f"{field(fmt, 'syntax', (str,), 'format.syntax', '')} grammar:\n"
                            f"{field(fmt, 'definition', (str,), 'format.definition', '')}")
        return ToolSpec(name, description.strip(), {
            "type": "object",
            "properties": {"input": {"type": "string", "description":
                                     "The raw input text for this tool."}},
            "required": ["input"], "additionalProperties": False}, custom=True)
    params = field(fn, "parameters", (dict,), "tools[].parameters")
    if not params or params.get("type") != "object":
        params = {"type": "object", "properties": {}}
    return ToolSpec(name, description, params)


def normalize_tools(tools):
    """Chat style, flat Responses style and `custom` tools -> [ToolSpec]."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request("tools must be a list", "tools")
    seen = set()
    return [s for s in (tool_spec(t, seen) for t in tools) if s is not None]


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
    text = content_to_text(raw.get("content"), images if role == "user" else None, where)
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


def parse_input_items(items):
    """Responses API input items -> [Message] (Chat-shaped conversation)."""
    if isinstance(items, str):
        return [Message("user", items)]
    if not isinstance(items, list):
        raise bad_request("input must be a string or a list of items", "input")
    messages = []
    for n, item in enumerate(items):
        where = f"input[{n}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", "input")
        kind = field(item, "type", (str,), f"{where}.type", "message")
        if kind == "message":
            role = item.get("role", "user")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(f"{where}.role must be user, assistant, system or "
                                  "developer", "input")
            images = []
            text = content_to_text(item.get("content"), images if role == "user" else None,
                                   where)
            messages.append(Message("system" if role == "developer" else role, text,
                                    images=images))
        elif kind in ("function_call", "custom_tool_call"):
            call_id = field(item, "call_id", (str,), f"{where}.call_id") or \
                field(item, "id", (str,), f"{where}.id", "")
            name = field(item, "name", (str,), f"{where}.name")
            if not name:
                raise bad_request(f"{where}.name is required", "input")
            args = item.get("arguments") if kind == "function_call" else \
                field(item, "input", (str,), f"{where}.input", "")
            call = ToolCall(call_id, name, call_arguments(args), custom=kind != "function_call")
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                last.tool_calls.append(call)
            else:
                messages.append(Message("assistant", tool_calls=[call]))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = field(item, "call_id", (str,), f"{where}.call_id")
            if not call_id:
                raise bad_request(f"{where}.call_id is required", "input")
            output = item.get("output")
            text = output if isinstance(output, str) else content_to_text(output, None, where)
            messages.append(Message("tool", text, tool_call_id=call_id))
        elif kind == "item_reference":
            raise bad_request("item_reference input items are not supported; send the "
                              "items themselves or use previous_response_id", "input")
        # reasoning and hosted-tool items carry nothing the model needs again
    return messages


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


def parse_chat_request(body, reasoning_mode="content", history=None):
    """Validate a Chat Completions (or Responses-shaped) body -> ProxyRequest."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    if "messages" not in body and "input" in body:     # Cursor's agent may send these
        request = parse_responses_request(body, history, strict_previous=False)
        request.api = "chat"
        return request
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    request = ProxyRequest(api="chat", model=parse_model(body),
                           messages=[parse_message(m, i, reasoning_mode)
                                     for i, m in enumerate(messages)])
    common_fields(body, request)
    options = field(body, "stream_options", (dict,), default={})
    request.include_usage = bool(options.get("include_usage"))
    request.tools = normalize_tools(body.get("tools"))
    request.reasoning_effort = parse_effort(body.get("reasoning_effort"), "reasoning_effort")
    request.output_schema, request.output_instruction, request.output_note = \
        parse_text_format(body.get("response_format"), "response_format")
    request.stop = parse_stop(body.get("stop"))
    return check_request(request)


def parse_responses_request(body, history=None, strict_previous=True):
    """Validate a Responses API body -> ProxyRequest.

    `history(previous_response_id)` returns the stored conversation a
    `previous_response_id` continues, or None when it is unknown: a 400 on
    /responses; on /chat/completions (Cursor's agent sends ids of its own
    there, along with the whole history) it is ignored."""
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
        earlier = history(previous) if history is not None else None
        if earlier is None and strict_previous:
            raise bad_request(f"Previous response with id '{previous}' not found (this "
                              "proxy keeps recent responses in memory for a while).",
                              "previous_response_id", "previous_response_not_found")
        # an earlier request's `instructions` do not carry over (as upstream)
        messages += [m for m in earlier or [] if m.name != INSTRUCTIONS_MESSAGE]
    instructions = field(body, "instructions", (str,))
    if instructions:
        messages.insert(0, Message("system", instructions, name=INSTRUCTIONS_MESSAGE))
    messages += parse_input_items(body.get("input"))
    request = ProxyRequest(api="responses", model=parse_model(body), messages=messages)
    common_fields(body, request)
    request.tools = normalize_tools(body.get("tools"))
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
    return check_request(request)


def check_request(request):
    """What Codex would refuse or answer badly, refused here with a clear 400."""
    convo = [m for m in request.messages if m.role != "system"]
    if not any(m.text.strip() or m.tool_calls or m.images or m.role == "tool"
               for m in convo):
        raise bad_request("the conversation is empty: send at least one message with text",
                          "messages" if request.api == "chat" else "input", "empty_prompt")
    return request


def resolve_model(name, aliases):
    """Client model name -> (Codex model or None for the default, effort or None).

    An alias wins; a name whose reverse starts with `gpt-` is reversed
    (`xedoc-2.5-tpg` -> `gpt-5.2-codex`); anything else passes through.  A
    trailing `-low`, `-high`... on the result sets the reasoning effort."""
    if not name:
        return None, None
    model = aliases.get(name)
    if model is None:
        model = name[::-1] if name[::-1].startswith("gpt-") else name
    effort = None
    head, sep, tail = model.rpartition("-")
    if sep and head and tail in EFFORTS:
        model, effort = head, tail
    return model, effort


def trailing_tool_results(messages):
    """The tool messages after the last assistant message, or []."""
    results = []
    for msg in reversed(messages):
        if msg.role != "tool":
            break
        results.append(msg)
    return results[::-1]


# ---------------------------------------------------------------------------
# Prompt rendering (pure)
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


def request_instructions(request, tools):
    extras = [request.output_instruction]
    if tools and not request.parallel_tool_calls:
        extras.append("Call at most one tool per reply, then wait for its result.")
    return render_instructions(request.messages, tools, request.tool_choice, extras)


def render_prompt(messages):
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
    names = {c.id: c.name for m in convo for c in m.tool_calls}
    lines = ["<transcript>"]
    for m in convo:
        if m.role == "tool":
            name = names.get(m.tool_call_id) or m.name or ""
            lines += [f'<tool_result id="{m.tool_call_id}" name="{name}">',
                      m.text, "</tool_result>"]
            continue
        lines.append(f'<message role="{m.role}">')
        if m.text:
            lines.append(m.text)
        for c in m.tool_calls:
            lines.append(f'<tool_call id="{c.id}" name="{c.name}">'
                         f'{c.arguments}</tool_call>')
        lines.append("</message>")
    lines.append("</transcript>")
    lines.append("Continue this conversation: write the assistant's next "
                 "message (call a tool if you need one).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# TOML: values for `codex -c key=value`, and a small reader for Python < 3.11
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


# ---------------------------------------------------------------------------
# Codex failures -> OpenAI errors (pure)
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
    "misalignmentPolicyViolation": (400, "invalid_request_error", "content_policy_violation"),
    "internalServerError": (502, "api_error", "codex_error"),
}


def classify_codex_error(error, reset_seconds=None):
    """An app-server TurnError {message, codexErrorInfo, additionalDetails}
    -> ProxyError; unknown kinds fall back to reading the message."""
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message") or "Codex turn failed")
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
# Usage, Chat Completions and Responses shapes (pure)
# ---------------------------------------------------------------------------

def usage_from_app_server(total):
    """thread/tokenUsage/updated `total` -> Codex's usage dict (exec's names)."""
    total = total if isinstance(total, dict) else {}
    return {"input_tokens": total.get("inputTokens") or 0,
            "cached_input_tokens": total.get("cachedInputTokens") or 0,
            "output_tokens": total.get("outputTokens") or 0,
            "reasoning_output_tokens": total.get("reasoningOutputTokens") or 0}


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


def responses_usage(usage):
    """Codex turn usage -> Responses API usage."""
    prompt, cached, completion, reasoning = token_counts(usage)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion}


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


def output_message_item(item_id, text, status="completed"):
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [],
                         "logprobs": []}] if status == "completed" else []}


def output_reasoning_item(item_id, parts):
    return {"type": "reasoning", "id": item_id,
            "summary": [{"type": "summary_text", "text": p} for p in parts]}


def output_call_item(item_id, call, status="completed"):
    if call.custom:
        return {"type": "custom_tool_call", "id": item_id, "call_id": call.id,
                "name": call.name, "input": call.arguments if status == "completed" else "",
                "status": status}
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments if status == "completed" else "", "status": status}


def make_response(rid, created, model, request, status, output, usage=None, error=None):
    """A Responses API Response object."""
    echo = request.echo
    incomplete = {"reason": "stop_sequence"} if status == "incomplete" else None
    return {"id": rid, "object": "response", "created_at": created, "status": status,
            "model": model, "output": output,
            "usage": responses_usage(usage) if usage is not None else None,
            "error": error, "incomplete_details": incomplete,
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


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    """Everything `main` learned from flags and environment variables."""
    host: str = "127.0.0.1"
    port: int = 11435
    codex_bin: str = "codex"
    codex_home: str | None = None
    engine: str = DEFAULT_ENGINE
    warm: int = DEFAULT_WARM
    api_keys: tuple = ()
    insecure_no_key: bool = False
    allow_origins: tuple = ()
    allow_hosts: tuple = ()
    max_body: int = DEFAULT_MAX_BODY
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    keepalive: float = DEFAULT_KEEPALIVE
    reasoning: str = "content"          # content | think | none
    aliases: dict = dataclasses.field(default_factory=dict)
    codex_config: list = dataclasses.field(default_factory=list)
    log_size: int = DEFAULT_LOG_SIZE
    log_bodies: bool = False
    quiet: bool = False
    tool_result_timeout: float = DEFAULT_TOOL_RESULT_TIMEOUT
    max_parked: int = DEFAULT_MAX_PARKED
    tool_quiet: float = DEFAULT_TOOL_QUIET
    state_dir: str | None = None
    logs_html: str | None = None

    @property
    def codex_home_dir(self):
        return self.codex_home or os.environ.get("CODEX_HOME") or \
            os.path.join(os.path.expanduser("~"), ".codex")


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
# Log buffer
# ---------------------------------------------------------------------------

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
# Processes
# ---------------------------------------------------------------------------

def popen_group_kwargs():
    """Start children in their own group so the whole tree can be stopped."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


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
    """Where Codex is, its version and login state, checked in the background.

    The request path only reads the cached answer.  A stale answer starts one
    background check; the only wait is for a cached "not logged in" that is
    stale, so that a user who just ran `codex login` is not refused."""

    def __init__(self, config, env, clock=time.monotonic, on_refresh=None):
        self._config = config
        self._env = env
        self._clock = clock
        self._on_refresh = on_refresh       # called after each check, outside the locks
        # _lock guards the cached fields below; checks run outside it.
        self._lock = threading.Lock()
        # _check_lock makes checks one at a time; a waiter gets the fresh result.
        self._check_lock = threading.Lock()
        self.argv = None
        self.version = None
        self.logged_in = None
        self._checked_at = None
        self._checking = False

    def refresh(self):
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
        if self._on_refresh is not None:
            self._on_refresh(argv, version)
        return self

    def snapshot(self, max_age=LOGIN_CACHE_SECONDS):
        """(argv, version, logged_in) from the cache; see the class docstring."""
        with self._lock:
            age = None if self._checked_at is None else self._clock() - self._checked_at
            logged_in, checking = self.logged_in, self._checking
            start = age is not None and age > max_age and logged_in and not checking
            if start:
                self._checking = True
        if age is None or (age > max_age and not logged_in):
            self.refresh()
        elif start:
            threading.Thread(target=self.refresh, name="codex-info", daemon=True).start()
        with self._lock:
            return self.argv, self.version, self.logged_in

    def current(self):
        """(argv, version) as last checked, without checking."""
        with self._lock:
            return self.argv, self.version

    def expire(self):
        """Make the next snapshot check again (tests, and after a 401 from Codex)."""
        with self._lock:
            if self._checked_at is not None:
                self._checked_at -= LOGIN_CACHE_SECONDS + 1


def build_model_catalog(codex_argv, env, state_dir, version):
    """Write Codex's model catalog with tool search and apply_patch turned off.

    Catalog models otherwise see MCP tools only behind `tool_search` (exec),
    and would be offered Codex's own apply_patch (both engines).
    Returns (path, [model slugs listed for users]) or (None, [])."""
    safe = re.sub(r"[^A-Za-z0-9.]+", "-", version or "unknown")
    path = os.path.join(state_dir, f"model-catalog-{safe}.json")
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
        if os.path.isfile(path):    # an earlier copy for this version
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return path, [m.get("slug") for m in data.get("models", [])
                          if m.get("visibility") == "list"]
        return None, []
    for model in data["models"]:
        model["supports_search_tool"] = False
        model["apply_patch_tool_type"] = None
    os.makedirs(state_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    return path, [m.get("slug") for m in data["models"]
                  if isinstance(m, dict) and m.get("visibility") == "list"]


# ---------------------------------------------------------------------------
# Runs: one Codex process answering one request's turn
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class PendingCall:
    """A client tool call Codex is waiting on."""
    call: ToolCall
    sent: bool = False                  # reached the client in a response
    result: tuple | None = None         # (text, is_error)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    rpc_id: object = None               # app-server: the request id to answer


@dataclasses.dataclass
class RunSpec:
    """What a run needs from a request, whichever engine runs it."""
    model: str | None               # the Codex model, None for Codex's default
    effort: str | None
    summary: str | None
    instructions: str
    prompt: str
    images: list                    # data: URLs
    tools: list                     # [ToolSpec]
    output_schema: dict | None


class CodexRun:
    """One Codex process: its events, its tool calls and its files.

    An engine subclass turns the process's output into (kind, payload) items
    on `events`; the HTTP handler that owns the run at the moment consumes
    them.  Kinds: thread, text (key, delta), reasoning (key, delta), usage,
    completed, interrupted, failed (message or app-server error), warning,
    unexpected, tool_call (PendingCall), exit (code, plain output).  A run
    outlives an HTTP response when it parks on tool calls."""

    engine = None

    def __init__(self, run_id, env, tempdir):
        self.id = run_id
        self.env = env
        self.tempdir = tempdir
        self.workdir = os.path.join(tempdir, "work")    # Codex's empty working root
        os.makedirs(self.workdir, exist_ok=True)
        self.events = queue.Queue()
        self.stderr_tail = collections.deque(maxlen=40)
        self.proc = None
        self.thread_id = None
        self.model = None           # as given to Codex, for the log
        self.effort = None
        self.warm = False           # started ahead of its request
        self.fingerprint = None     # ProxyRequest.fingerprint() of its conversation
        self.tools = {}
        self.exited = threading.Event()
        # _lock guards _calls and _used_ids; reader threads and handlers share them.
        self._lock = threading.Lock()
        self._calls = {}
        self._used_ids = set()

    def set_tools(self, tools, known_ids):
        self.tools = {t.name: t for t in tools}
        with self._lock:
            self._used_ids.update(known_ids)

    def _start_readers(self):
        threading.Thread(target=self._read_stdout, name=f"codex-out-{self.id}",
                         daemon=True).start()
        threading.Thread(target=self._read_stderr, name=f"codex-err-{self.id}",
                         daemon=True).start()

    def _read_stderr(self):
        for raw in iter(self.proc.stderr.readline, b""):
            self.stderr_tail.append(raw.decode("utf-8", "replace").rstrip())
        self.proc.stderr.close()

    def _read_stdout(self):
        raise NotImplementedError

    # -- tool calls --------------------------------------------------------
    def add_call(self, call_id, name, arguments, rpc_id=None):
        """Register a call from Codex and queue it for the client."""
        spec = self.tools.get(name)
        custom = spec is not None and spec.custom
        if custom and isinstance(arguments, dict):
            text = arguments.get("input")
            arguments = text if isinstance(text, str) else json.dumps(arguments)
        else:
            arguments = call_arguments(arguments)
        with self._lock:
            if not isinstance(call_id, str) or not call_id or call_id in self._used_ids:
                call_id = "call_" + secrets.token_hex(12)
            self._used_ids.add(call_id)
            pending = PendingCall(ToolCall(call_id, name, arguments, custom), rpc_id=rpc_id)
            self._calls[call_id] = pending
        self.events.put(("tool_call", pending))
        return pending

    def remember_ids(self, ids):
        with self._lock:
            self._used_ids.update(ids)

    def open_call_ids(self, sent_only=True):
        with self._lock:
            return {cid for cid, p in self._calls.items()
                    if not p.done.is_set() and (p.sent or not sent_only)}

    def answer(self, call_id, text, is_error=False):
        with self._lock:
            pending = self._calls.get(call_id)
            if pending is None or pending.done.is_set():
                return False
            pending.result = (text, is_error)
            pending.done.set()
        self._deliver(pending)
        return True

    def _deliver(self, pending):
        """Hand an answered call back to Codex (the exec bridge waits on `done`)."""

    # -- ending ------------------------------------------------------------
    def interrupt(self):
        """Ask Codex to stop the turn now (the abandoned answer is not retried)."""

    def close_input(self):
        """Let a Codex that has finished its turn exit on its own."""

    def stop(self, reason="The request ended before the tool result arrived.", grace=0.0):
        """Answer open calls with an error, stop the process tree, remove files.

        `grace` lets a Codex that has finished its turn exit on its own first."""
        if grace:
            self.close_input()
            self.exited.wait(grace)
        else:
            self.interrupt()
        for call_id in self.open_call_ids(sent_only=False):
            self.answer(call_id, reason, True)
        self.close_input()
        if self.proc is not None:
            stop_process_tree(self.proc)
        shutil.rmtree(self.tempdir, ignore_errors=True)


def translate_codex_event(event):
    """One parsed `codex exec --json` line -> [(kind, payload)].

    Text is taken from completed items only, so it goes out exactly once."""
    etype = event.get("type")
    if etype == "thread.started":
        return [("thread", event.get("thread_id"))]
    if etype == "turn.completed":
        return [("usage", event.get("usage") or {}), ("completed", None)]
    if etype == "turn.failed":
        error = event.get("error") or {}
        return [("failed", error.get("message") or "Codex turn failed")]
    if etype == "error":
        return [("warning", event.get("message") or "")]
    if etype not in ("item.completed", "item.started"):
        return []
    item = event.get("item") or {}
    itype = item.get("type")
    if itype == "error":
        return [("warning", item.get("message") or "")] if etype == "item.completed" else []
    if etype != "item.completed":
        return []
    if itype == "agent_message":
        return [("text", (item.get("id"), item.get("text") or ""))]
    if itype == "reasoning":
        return [("reasoning", (item.get("id"), item.get("text") or ""))]
    if itype in ("command_execution", "file_change", "web_search"):
        return [("unexpected", itype)]
    return []


class ExecRun(CodexRun):
    """`codex exec --json`: the prompt on stdin, JSONL events on stdout, client
    tools through the MCP bridge (this file, started by Codex)."""

    engine = "exec"

    def __init__(self, run_id, env, tempdir):
        super().__init__(run_id, env, tempdir)
        self.secret = secrets.token_hex(24)
        self.argv = []

    def start(self, argv, prompt):
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

    def _read_stdout(self):
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
            for item in translate_codex_event(event):
                self.events.put(item)
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
               bridge_timeout=DEFAULT_TOOL_RESULT_TIMEOUT, output_schema=None, summary=None):
    """The full `codex exec` command line for one run."""
    argv = [*prefix, "exec"]
    for path in images:
        argv += ["-i", path]
    argv += FORWARDER_FLAGS
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


class RpcError(Exception):
    """An app-server JSON-RPC error answer."""

    def __init__(self, error):
        error = error if isinstance(error, dict) else {}
        super().__init__(str(error.get("message") or "app-server error"))
        self.data = error.get("data") if isinstance(error.get("data"), dict) else {}


class AppServerRun(CodexRun):
    """`codex app-server`: newline-delimited JSON-RPC on stdio.

    `launch` and `initialize` may run ahead of the request (a warm spare);
    `start` then opens one thread with the request's settings and tools and
    starts its one turn.  Notifications become events; an `item/tool/call`
    request from Codex becomes a PendingCall whose answer is the reply."""

    engine = "app-server"
    DECLINE = {"item/commandExecution/requestApproval": {"decision": "decline"},
               "item/fileChange/requestApproval": {"decision": "decline"},
               "item/permissions/requestApproval": {"decision": "decline"},
               "applyPatchApproval": {"decision": "denied"},
               "execCommandApproval": {"decision": "denied"},
               "mcpServer/elicitation/request": {"action": "decline"}}

    def __init__(self, run_id, env, tempdir, argv, on_rate_limits=None):
        super().__init__(run_id, env, tempdir)
        self.argv = argv
        self.on_rate_limits = on_rate_limits    # called from the reader thread
        self.user_overrides = {}    # switches for what the user's config.toml adds
        self.turn_id = None
        self.turn_done = threading.Event()
        self.born = time.monotonic()
        self._deltas = set()        # items whose text arrived as deltas
        self._response_calls = set()   # client tool calls of the response being written
        self.signals_responses = False  # Codex tells us when the model ends a response
        # _write_lock keeps one JSON line at a time on stdin.
        self._write_lock = threading.Lock()
        # _rpc_lock guards _next_id and _waiting (request id -> [Event, reply]).
        self._rpc_lock = threading.Lock()
        self._next_id = 0
        self._waiting = {}

    # -- process and JSON-RPC ----------------------------------------------
    def launch(self):
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=self.workdir, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_group_kwargs())
        self._start_readers()
        return self

    def send(self, message):
        data = json.dumps(message, ensure_ascii=False).encode("utf-8") + b"\n"
        with self._write_lock:
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (OSError, ValueError):
                return False        # Codex has gone; the reader reports why
        return True

    def call(self, method, params, timeout=RPC_SECONDS):
        """Send a request and wait for its answer -> result; raises RpcError,
        or ProxyError when Codex exits or does not answer."""
        with self._rpc_lock:
            self._next_id += 1
            rid = self._next_id
            slot = self._waiting[rid] = [threading.Event(), None]
        # The reader sets `exited` before it wakes the waiting slots, so a
        # process that is already gone is noticed here, not after `timeout`.
        if not self.send({"id": rid, "method": method, "params": params}) or \
                self.exited.is_set():
            slot[0].set()
        answered = slot[0].wait(timeout)
        with self._rpc_lock:
            self._waiting.pop(rid, None)
        if not answered or slot[1] is None:
            tail = " ".join(list(self.stderr_tail)[-3:])
            raise ProxyError(502, f"Codex app-server did not answer {method}"
                             + (" (it exited)" if self.exited.is_set() else "")
                             + (f": {tail[:300]}" if tail else ""), "api_error", "codex_error")
        if "error" in slot[1]:
            raise RpcError(slot[1]["error"])
        return slot[1].get("result") or {}

    def initialize(self, client_name="codex_openai_proxy", timeout=APP_SERVER_START_SECONDS):
        self.call("initialize", {"clientInfo": {"name": client_name,
                                                "title": "codex-openai-proxy",
                                                "version": __version__},
                                 "capabilities": {"experimentalApi": True}}, timeout)
        self.send({"method": "initialized"})
        try:
            effective = self.call("config/read", {"includeLayers": False}, timeout)
            self.user_overrides = user_config_overrides(effective.get("config") or {})
        except RpcError:
            self.user_overrides = {}
        return self

    def thread_params(self, instructions, tools, thread_config, model=None):
        """thread/start for a pure forwarder: the client's instructions and
        tools, the forwarder settings, and the user's additions switched off."""
        # experimentalRawEvents adds rawResponse/completed: the one sign that the
        # model has finished a response, so its calls can go out without a wait.
        params = {"cwd": self.workdir, "sandbox": "read-only", "approvalPolicy": "never",
                  "ephemeral": True, "experimentalRawEvents": True,
                  "baseInstructions": instructions, "environments": [],
                  "dynamicTools": [{"type": "function", "name": t.name,
                                    "description": t.description, "inputSchema": t.parameters}
                                   for t in tools],
                  "config": dict(thread_config, **self.user_overrides)}
        if model:
            params["model"] = model
        return params

    def start(self, spec, thread_config):
        """Open the thread and start the turn -> the turn id."""
        params = self.thread_params(spec.instructions, spec.tools, thread_config, spec.model)
        try:
            thread = self.call("thread/start", params).get("thread") or {}
            self.thread_id = thread.get("id")
            self.events.put(("thread", self.thread_id))
            turn = {"threadId": self.thread_id, "input": [
                {"type": "text", "text": spec.prompt, "text_elements": []}] +
                [{"type": "image", "url": url} for url in spec.images]}
            for key, value in (("effort", spec.effort), ("summary", spec.summary),
                               ("outputSchema", spec.output_schema)):
                if value is not None:
                    turn[key] = value
            result = self.call("turn/start", turn)
        except RpcError as exc:
            if exc.data.get("input_error_code") == "input_too_large":
                raise ProxyError(400, f"{exc} Shorten the conversation.",
                                 "invalid_request_error", "context_length_exceeded")
            raise ProxyError(502, f"Codex refused the request: {exc}", "api_error",
                             "codex_error")
        self.turn_id = self.turn_id or (result.get("turn") or {}).get("id")
        return self.turn_id

    def _read_stdout(self):
        for raw in iter(self.proc.stdout.readline, b""):
            try:
                message = json.loads(raw)
            except ValueError:
                self.stderr_tail.append(raw.decode("utf-8", "replace").rstrip()[:500])
                continue
            if isinstance(message, dict):
                self._dispatch(message)
        self.proc.stdout.close()
        self.proc.wait()
        self.exited.set()
        with self._rpc_lock:
            waiting = list(self._waiting.values())
        for slot in waiting:
            slot[0].set()
        self.events.put(("exit", (self.proc.returncode, "")))

    def _dispatch(self, message):
        method = message.get("method")
        if method is None:
            with self._rpc_lock:
                slot = self._waiting.get(message.get("id"))
            if slot is not None:
                slot[1] = message
                slot[0].set()
        elif "id" in message:
            self._server_request(message["id"], method, message.get("params") or {})
        else:
            for event in self._translate(method, message.get("params") or {}):
                self.events.put(event)

    def _server_request(self, rid, method, params):
        if method == "item/tool/call":
            name = params.get("tool")
            if name in self.tools:
                self.add_call(params.get("callId"), name, params.get("arguments"), rid)
                return
            self.send({"id": rid, "result": {"success": False, "contentItems": [
                {"type": "inputText", "text": f"unknown tool: {name}"}]}})
            return
        if method == "currentTime/read":
            self.send({"id": rid, "result": {"currentTimeAt": int(time.time())}})
            return
        if method in self.DECLINE:
            self.events.put(("unexpected", method))
            self.send({"id": rid, "result": self.DECLINE[method]})
            return
        self.send({"id": rid, "error": {"code": -32601,
                                        "message": f"{method} is not supported here"}})

    def _translate(self, method, params):
        """One notification -> [(kind, payload)]."""
        if method == "item/agentMessage/delta":
            self._deltas.add(params.get("itemId"))
            return [("text", (params.get("itemId"), params.get("delta") or ""))]
        if method == "item/reasoning/summaryTextDelta":
            self._deltas.add(params.get("itemId"))
            key = f"{params.get('itemId')}#{params.get('summaryIndex', 0)}"
            return [("reasoning", (key, params.get("delta") or ""))]
        if method == "item/completed":
            return self._completed_item(params.get("item") or {})
        if method == "item/started":
            kind = (params.get("item") or {}).get("type")
            if kind in ("commandExecution", "fileChange", "webSearch", "mcpToolCall",
                        "imageGeneration", "collabAgentToolCall"):
                return [("unexpected", kind)]
            return []
        if method == "rawResponseItem/completed":
            self.signals_responses = True
            item = params.get("item") or {}
            if item.get("type") in ("function_call", "custom_tool_call") and \
                    item.get("name") in self.tools:
                self._response_calls.add(item.get("call_id"))
            return []
        if method == "rawResponse/completed":
            calls, self._response_calls = frozenset(self._response_calls), set()
            return [("response_done", calls)] if calls else []
        if method == "thread/tokenUsage/updated":
            return [("usage", usage_from_app_server(
                (params.get("tokenUsage") or {}).get("total")))]
        if method == "turn/started":
            self.turn_id = (params.get("turn") or {}).get("id") or self.turn_id
            return []
        if method == "turn/completed":
            turn = params.get("turn") or {}
            self.turn_done.set()
            status = turn.get("status")
            if status == "completed":
                return [("completed", None)]
            if status == "interrupted":
                return [("interrupted", None)]
            return [("failed", turn.get("error") or {"message": f"turn {status}"})]
        if method == "error":
            error = params.get("error") or {}
            if params.get("willRetry"):
                return [("warning", f"retrying: {error.get('message') or ''}")]
            return []       # turn/completed carries the failure
        if method == "account/rateLimits/updated" and self.on_rate_limits is not None:
            self.on_rate_limits(params.get("rateLimits"))
            return []
        if method in ("warning", "model/rerouted", "deprecationNotice"):
            return [("warning", json.dumps(params)[:500])]
        if method == "mcpServer/startupStatus/updated":
            return [("unexpected", f"MCP server {params.get('name')}")]
        return []

    def _completed_item(self, item):
        kind, item_id = item.get("type"), item.get("id")
        if kind == "agentMessage" and item_id not in self._deltas:
            return [("text", (item_id, item.get("text") or ""))]
        if kind == "reasoning" and item_id not in self._deltas:
            return [("reasoning", (f"{item_id}#{n}", text))
                    for n, text in enumerate(item.get("summary") or []) if text]
        return []

    def _deliver(self, pending):
        if pending.rpc_id is None:
            return
        text, is_error = pending.result
        self.send({"id": pending.rpc_id, "result": {
            "contentItems": [{"type": "inputText", "text": text}], "success": not is_error}})

    def interrupt(self):
        if self.thread_id and self.turn_id and not self.turn_done.is_set() \
                and not self.exited.is_set():
            self.send({"id": "interrupt", "method": "turn/interrupt",
                       "params": {"threadId": self.thread_id, "turnId": self.turn_id}})
            self.turn_done.wait(1.0)

    def close_input(self):
        with self._write_lock:
            try:
                self.proc.stdin.close()
            except (OSError, ValueError, AttributeError):
                pass


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


class WarmPool:
    """App-server processes started and initialized ahead of requests.

    A request takes one whose key (Codex binary and version, login and
    config files) still matches; a background thread keeps `size` spares,
    replacing those whose key changed or that sat unused too long.  A spare
    serves one request and is never reused."""

    def __init__(self, size, spawn, key, max_idle=WARM_MAX_IDLE_SECONDS,
                 clock=time.monotonic, on_error=None):
        self.size = size
        self._spawn = spawn          # () -> initialized AppServerRun
        self._key = key              # () -> hashable, or None when spares make no sense
        self._max_idle = max_idle
        self._clock = clock
        self._on_error = on_error
        # _lock guards _spares [(run, key)]; processes start and stop outside it.
        self._lock = threading.Lock()
        self._spares = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = None

    def start(self):
        if self.size > 0:
            self._thread = threading.Thread(target=self._loop, name="warm-pool", daemon=True)
            self._thread.start()
        return self

    def __len__(self):
        with self._lock:
            return len(self._spares)

    def take(self):
        """A ready spare for the current key, or None; a replacement follows."""
        if self.size <= 0:
            return None
        key = self._key()
        run = None
        with self._lock:
            for n, (spare, spare_key) in enumerate(self._spares):
                if spare_key == key and not spare.exited.is_set():
                    run = self._spares.pop(n)[0]
                    break
        self._wake.set()
        return run

    def refresh(self):
        """Look at the spares again now (Codex or its config changed)."""
        self._wake.set()

    def _loop(self):
        failures = 0
        while not self._stopping.is_set():
            self._wake.wait(min(5.0, 0.5 * 2 ** failures) if failures else 1.0)
            self._wake.clear()
            if self._stopping.is_set():
                break
            key = self._key()
            now = self._clock()
            with self._lock:
                stale = [r for r, k in self._spares if k != key or r.exited.is_set()
                         or now - r.born > self._max_idle]
                self._spares = [(r, k) for r, k in self._spares if r not in stale]
                missing = self.size - len(self._spares) if key is not None else 0
            for run in stale:
                run.stop("recycled", grace=0.5)
            for _ in range(missing):
                if self._stopping.is_set():
                    break
                try:
                    run = self._spawn()
                except Exception as exc:      # a broken Codex must not end the loop
                    failures = min(failures + 1, 4)
                    if self._on_error is not None:
                        self._on_error(exc)
                    break
                failures = 0
                with self._lock:
                    if self._stopping.is_set():
                        stale = [run]
                    else:
                        self._spares.append((run, key))
                        stale = []
                for extra in stale:
                    extra.stop("shutdown")

    def close(self):
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(APP_SERVER_START_SECONDS + 5)
        with self._lock:
            spares, self._spares = [r for r, _ in self._spares], []
        for run in spares:
            run.stop("shutdown")


# ---------------------------------------------------------------------------
# Parked turns and stored responses
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

    def claim(self, call_ids):
        """Take out the run whose open calls these results answer, if any."""
        call_ids = set(call_ids)
        with self._lock:
            for run_id, (run, _) in self._runs.items():
                if run.open_call_ids() & call_ids:
                    del self._runs[run_id]
                    return run
        return None

    def take_mentioning(self, call_ids):
        """Take out runs whose open calls appear in an edited history."""
        call_ids = set(call_ids)
        with self._lock:
            stale = [rid for rid, (run, _) in self._runs.items()
                     if run.open_call_ids() & call_ids]
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


def message_chars(messages):
    return sum(len(m.text) + sum(len(c.arguments) for c in m.tool_calls) for m in messages)


class ResponseStore:
    """Recent Responses API conversations, for `previous_response_id`:
    bounded in count and characters, and forgotten after a while."""

    def __init__(self, keep=RESPONSES_KEPT, ttl=RESPONSES_TTL_SECONDS,
                 max_chars=RESPONSES_KEPT_CHARS, clock=time.monotonic):
        self._keep, self._ttl, self._max_chars, self._clock = keep, ttl, max_chars, clock
        # _lock guards _items (id -> (messages, chars, stored_at)) and _chars.
        self._lock = threading.Lock()
        self._items = collections.OrderedDict()
        self._chars = 0

    def __len__(self):
        with self._lock:
            return len(self._items)

    def put(self, response_id, messages):
        chars = message_chars(messages)
        if chars > self._max_chars:
            return
        with self._lock:
            self._items[response_id] = (tuple(messages), chars, self._clock())
            self._chars += chars
            self._trim()

    def get(self, response_id):
        """A copy of the conversation a response ended, or None."""
        with self._lock:
            self._trim()
            entry = self._items.get(response_id)
            if entry is None:
                return None
            return [dataclasses.replace(m, tool_calls=list(m.tool_calls),
                                        images=list(m.images)) for m in entry[0]]

    def _trim(self):
        now = self._clock()
        while self._items:
            oldest = next(iter(self._items.values()))
            if len(self._items) <= self._keep and self._chars <= self._max_chars and \
                    now - oldest[2] < self._ttl:
                break
            self._chars -= self._items.popitem(last=False)[1][1]


# ---------------------------------------------------------------------------
# The MCP bridge (exec engine; runs inside Codex as `codex_proxy.py --mcp-bridge FILE`)
# ---------------------------------------------------------------------------

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
        proxy = self.server.proxy
        hello = self._line(BRIDGE_HELLO_LIMIT)
        if not isinstance(hello, dict):
            return
        run = proxy.find_run(str(hello.get("run", "")))
        if not isinstance(run, ExecRun) or not hmac.compare_digest(
                run.secret.encode(), str(hello.get("secret", "")).encode()):
            self._reply("unknown run or bad secret", True)
            return
        request = self._line(proxy.config.max_body)
        if not isinstance(request, dict):
            return
        self.connection.settimeout(None)
        pending = run.add_call(request.get("call_id"), str(request.get("name", "")),
                               request.get("arguments"))
        while not pending.done.wait(1.0):
            if run.exited.is_set() or proxy.stopping.is_set():
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

    def _reply(self, text, is_error):
        try:
            self.wfile.write(json.dumps({"text": text, "is_error": is_error}).encode() + b"\n")
        except OSError:
            pass


class BridgeListener(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, proxy):
        self.proxy = proxy
        # _lock guards _open, the number of relay connections being served.
        self._lock = threading.Lock()
        self._open = 0
        super().__init__(("127.0.0.1", 0), BridgeRelayHandler)

    def verify_request(self, request, client_address):
        with self._lock:
            if self._open >= BRIDGE_MAX_CONNECTIONS:
                return False
            self._open += 1
        return True

    def shutdown_request(self, request):
        with self._lock:
            self._open = max(0, self._open - 1)
        super().shutdown_request(request)


def mcp_tool_list(tools):
    return [{"name": t.name, "description": t.description,
             "inputSchema": t.parameters} for t in tools]


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
    send({"jsonrpc": "2.0", "id": msg_id, "result": {
        "content": [{"type": "text", "text": str(answer.get("text", ""))}],
        "isError": bool(answer.get("is_error"))}})


# ---------------------------------------------------------------------------
# API translation layers: one responder per API, streamed or not
# ---------------------------------------------------------------------------

class ChatResponder:
    """Writes one turn as Chat Completions: chunks on a chunked SSE response
    when the request streams, else one chat.completion object at the end.

    The pump calls text / reasoning (with a key that changes between Codex
    items), tool_calls, then finish or fail."""

    def __init__(self, handler, request, reasoning_mode):
        self.handler = handler
        self.request = request
        self.model = request.model
        self.stream = request.stream
        self.reasoning_mode = reasoning_mode
        self.id = new_completion_id()
        self.created = int(time.time())
        self.content = []           # the content as sent (think blocks included)
        self.reasoning_text = []
        self.calls = []
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
        self._send({"content": text})

    def text(self, key, delta):
        if not delta:
            return
        prefix = ""
        if self._think_open:
            prefix, self._think_open = "\n</think>\n\n", False
        elif key != self._text_key and self.content:
            prefix = "\n\n"
        self._text_key = key
        self._content(prefix + delta)

    def reasoning(self, key, delta):
        if not delta:
            return
        new_part = key != self._reasoning_key
        self._reasoning_key = key
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

    def finish(self, reason, usage):
        if self._think_open:
            self._content("\n</think>")
            self._think_open = False
        usage = openai_usage(usage)
        if not self.stream:
            reasoning = "".join(self.reasoning_text) if self.reasoning_mode == "content" else ""
            self.handler.send_json(200, make_completion(
                self.id, self.created, self.model, "".join(self.content), reasoning,
                self.calls, reason, usage))
            return
        data = sse(self._chunk({}, reason))
        if self.request.include_usage:
            data += sse(self._chunk(usage=usage))
        self.handler.write_chunk(data + b"data: [DONE]\n\n")
        self.handler.end_chunks()

    def fail(self, error):
        if not self.stream:
            self.handler.send_error_body(error)
            return
        self.handler.write_chunk(sse(error.body()) + b"data: [DONE]\n\n")
        self.handler.end_chunks()

    def keepalive(self):
        if self.stream:
            self.handler.write_chunk(b": keepalive\n\n")

    def answer_text(self):
        return THINK_BLOCK.sub("", "".join(self.content))


class ResponsesResponder:
    """Writes one turn as a Responses API Response: the event sequence the
    openai SDKs parse when the request streams, else one Response object.

    Each Codex message, reasoning item and tool call becomes one output item."""

    def __init__(self, handler, request, reasoning_mode):
        self.handler = handler
        self.request = request
        self.model = request.model
        self.stream = request.stream
        self.show_reasoning = reasoning_mode != "none"
        self.id = "resp_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.output = []            # finished output items
        self.calls = []
        self.content = []           # answer text, for the log and the history
        self.on_finish = None       # called before the last bytes go out
        self._seq = 0
        self._item = None           # the item being written: {kind, key, id, parts}

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

    def reasoning(self, key, delta):
        if not delta or not self.show_reasoning:
            return
        item_key = str(key).split("#")[0]
        item = self._item
        if item is None or item["kind"] != "reasoning" or item["key"] != item_key:
            self._begin("reasoning", item_key, output_reasoning_item(
                "rs_" + uuid.uuid4().hex, []))
            item = self._item
            item["part_keys"] = []
        if key not in item["part_keys"]:
            item["part_keys"].append(key)
            item["parts"].append("")
            self._event("response.reasoning_summary_part.added", item_id=item["id"],
                        output_index=len(self.output), summary_index=len(item["parts"]) - 1,
                        part={"type": "summary_text", "text": ""})
        index = item["part_keys"].index(key)
        item["parts"][index] += delta
        self._event("response.reasoning_summary_text.delta", item_id=item["id"],
                    output_index=len(self.output), summary_index=index, delta=delta)

    def _close(self):
        item, self._item = self._item, None
        if item is None:
            return
        index = len(self.output)
        if item["kind"] == "message":
            text = item["parts"][0]
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            self._event("response.output_text.done", item_id=item["id"], output_index=index,
                        content_index=0, text=text, logprobs=[])
            self._event("response.content_part.done", item_id=item["id"],
                        output_index=index, content_index=0, part=part)
            done = output_message_item(item["id"], text)
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

    def tool_calls(self, calls):
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

    def finish(self, reason, usage):
        self._close()
        if self.on_finish is not None:     # before the client can ask for what follows
            self.on_finish(self)
        response = self._response("completed", usage)
        if not self.stream:
            self.handler.send_json(200, response)
            return
        self._event("response.completed", response=response)
        self.handler.end_chunks()

    def fail(self, error):
        if not self.stream:
            self.handler.send_error_body(error)
            return
        self._close()
        self._event("response.failed", response=self._response(
            "failed", error={"code": error.code or "server_error", "message": error.message}))
        self.handler.end_chunks()

    def keepalive(self):
        if self.stream:
            self.handler.write_chunk(b": keepalive\n\n")

    def answer_text(self):
        return "".join(self.content)


class StopFilter:
    """Cuts streamed text before the first stop sequence.  It holds back the
    few characters that could be the start of a stop sequence split across
    deltas, and lets them go once they cannot be."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.hit = False
        self._held = ""

    def feed(self, text):
        """-> the text that may go out now; sets `hit` at a stop sequence."""
        if self.hit:
            return ""
        buffer = self._held + text
        found = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self._held = True, ""
            return buffer[:min(found)]
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


# ---------------------------------------------------------------------------
# The pump: one run's events -> one response
# ---------------------------------------------------------------------------

class TurnPump:
    """Moves one run's events to one response until the turn ends or parks."""

    NOT_RUN = ("Not run: the client accepts one tool call at a time "
               "(parallel_tool_calls is false). Call it again after this result if "
               "you still need it.")

    def __init__(self, server, run, out, handler, request):
        self.server, self.run_, self.out, self.handler = server, run, out, handler
        self.request = request
        self.config = server.config
        self.calls = []
        self.usage = None
        self.last_warning = None
        self.reasoning_chars = 0
        self.expected = None        # the calls of a response the model has finished
        self.stop = StopFilter(request.stop) if request.stop else None
        self._text_key = None

    def run(self):
        """-> (outcome, usage, finish_reason); raises ProxyError or ClientGone."""
        cfg, clock = self.config, time.monotonic
        started = last_event = next_keepalive = clock()
        next_keepalive += cfg.keepalive
        quiet_until = None
        while True:
            now = clock()
            if quiet_until is not None and now >= quiet_until:
                return self.park()
            if now - last_event >= cfg.idle_timeout:
                raise ProxyError(504, f"Codex sent nothing for {cfg.idle_timeout:g} s "
                                 "(--idle-timeout)", "api_error", "codex_idle_timeout")
            if now - started >= cfg.request_timeout:
                raise ProxyError(504, f"the request took over {cfg.request_timeout:g} s "
                                 "(--request-timeout)", "api_error", "codex_request_timeout")
            wait = min(POLL_SECONDS, next_keepalive - now,
                       (quiet_until - now) if quiet_until is not None else POLL_SECONDS)
            try:
                kind, payload = self.run_.events.get(timeout=max(0.0, wait))
            except queue.Empty:
                if self.handler.client_gone():
                    raise ClientGone()
                if clock() >= next_keepalive:
                    self.out.keepalive()
                    next_keepalive = clock() + cfg.keepalive
                continue
            last_event = clock()
            if kind in ("tool_call", "response_done"):
                quiet_until = self.siblings(kind, payload, last_event)
                continue
            result = self.handle_event(kind, payload)
            if result is not None:
                return result

    def siblings(self, kind, payload, now):
        """A call arrived, or the model ended a response: -> when to end this
        HTTP response with the calls collected so far (None: not yet).

        Calls the model makes together go out together.  app-server says
        when the model has finished a response (and which calls it made);
        without that sign, a quiet spell of --tool-quiet-ms ends the batch."""
        if kind == "tool_call":
            self.calls.append(payload)
            self.server.logs.add("tool_call_forwarded", self.handler.request_id,
                                 turn=self.run_.id, name=payload.call.name,
                                 call_id=payload.call.id,
                                 argument_bytes=len(payload.call.arguments))
        else:
            self.expected = payload
        if not self.calls:
            return None
        if self.expected is not None:
            done = self.expected <= {p.call.id for p in self.calls}
            return now if done else now + self.config.tool_quiet
        if getattr(self.run_, "signals_responses", False):
            return None         # the model may still be writing more calls
        return now + self.config.tool_quiet

    def handle_event(self, kind, payload):
        logs, rid, run = self.server.logs, self.handler.request_id, self.run_
        if kind == "thread":
            run.thread_id = payload
            logs.add("codex_forward", rid, turn=run.id, engine=run.engine, warm=run.warm,
                     thread_id=payload, mapped_model=run.model, effort=run.effort,
                     pid=run.proc.pid if run.proc else None)
        elif kind == "text":
            return self.text(*payload)
        elif kind == "reasoning":
            self.reasoning_chars += len(payload[1])
            self.out.reasoning(*payload)
        elif kind == "usage":
            self.usage = payload
        elif kind == "warning":
            self.last_warning = payload or self.last_warning
            logs.add("codex_warning", rid, turn=run.id, message=payload[:500])
        elif kind == "unexpected":
            logs.add("codex_warning", rid, turn=run.id,
                     message=f"Codex produced {payload}; it should have no such tool")
        elif kind == "completed":
            self.flush_text()
            return self.finish("done", "stop")
        elif kind in ("failed", "interrupted"):
            raise self.server.codex_failure(payload if kind == "failed" else
                                            "Codex interrupted the turn")
        elif kind == "exit":
            code, plain = payload
            detail = plain or self.last_warning or "\n".join(list(run.stderr_tail)[-5:])
            raise self.server.codex_failure(f"Codex exited (code {code}) without finishing "
                                            f"the turn: {detail or 'no output'}")
        return None

    def text(self, key, delta):
        if self.stop is None:
            self.out.text(key, delta)
            return None
        if key != self._text_key:
            self.flush_text()
            self._text_key = key
        emit = self.stop.feed(delta)
        if emit:
            self.out.text(key, emit)
        if self.stop.hit:
            return self.finish("stopped", "stop")
        return None

    def flush_text(self):
        if self.stop is not None:
            held = self.stop.flush()
            if held:
                self.out.text(self._text_key, held)

    def finish(self, outcome, reason):
        if self.reasoning_chars:
            self.server.logs.add("reasoning_detected", self.handler.request_id,
                                 turn=self.run_.id, summary_chars=self.reasoning_chars)
        self.out.finish(reason, self.usage or {})
        return outcome, self.usage or {}, reason

    def park(self):
        """End the response with the calls; the run waits for their results.

        The run is parked before the calls are written, so a client that
        answers at once always finds it."""
        calls = self.calls
        if not self.request.parallel_tool_calls and len(calls) > 1:
            for extra in calls[1:]:
                self.run_.answer(extra.call.id, self.NOT_RUN, True)
            calls = calls[:1]
        for pending in calls:
            pending.sent = True
        self.flush_text()
        self.server.park(self.run_)
        try:
            self.out.tool_calls([p.call for p in calls])
            self.out.finish("tool_calls", {})  # the turn's usage comes with its last response
        except DISCONNECT_ERRORS:
            if self.server.parked.discard(self.run_):
                raise           # nobody has the calls: end the run as a disconnect
        return "parked", {}, "tool_calls"


# ---------------------------------------------------------------------------
# HTTP: framing and access rules (pure)
# ---------------------------------------------------------------------------

ROUTES = {"/chat/completions": ("POST",), "/responses": ("POST",), "/models": ("GET",),
          "/health": ("GET",), "/logs": ("GET",), "/logs/stream": ("GET",)}
OPEN_ROUTES = ("/health",)
ACCESS_CODES = ("invalid_api_key", "api_key_required", "origin_not_allowed",
                "host_not_allowed")
DRAIN_LIMIT = 64 * 1024           # an unread body this small is read and dropped


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


def host_allowed(value, allowed=(), own_names=()):
    """DNS rebinding guard: a Host must be local, this machine's own name, an
    IP literal (which no rebinding can produce) or listed by the user."""
    host = split_host(value)
    if host is None:
        return False
    if is_local_name(host) or host in own_names or host in allowed:
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def origin_allowed(origin, allowed=()):
    """A browser Origin may use a keyless proxy only when it is a local page
    (http(s)://localhost, 127.0.0.1, [::1], any port) or listed by the user."""
    origin = origin.strip().lower().rstrip("/")
    if origin in allowed or "*" in allowed:
        return True
    try:
        parts = urllib.parse.urlsplit(origin)
        parts.port      # raises on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and is_local_name(parts.hostname)


def tunnel_headers(headers):
    """Names of tunnel or proxy headers present, empty values included."""
    return sorted({k.lower() for k in headers.keys() if k.lower() in TUNNEL_HEADERS or
                   k.lower().startswith(TUNNEL_HEADER_PREFIXES)})


def offered_key(headers):
    auth = headers.get("Authorization") or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("api-key") or headers.get("x-api-key")


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
    reserve = 32 + 4 * (config.max_concurrent + config.max_parked + config.warm)
    return min(config.max_connections, max(8, soft_limit - reserve))


def own_host_names():
    name = socket.gethostname().lower()
    short = name.split(".")[0]
    return {n for n in (name, short, short + ".local") if n}


# ---------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------

class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Routes /v1/... and /... to the chat, responses, models, health and log
    endpoints, after the framing and access checks every request gets."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"   # no HTTP/0.9: even junk gets a status line
    server_version = f"codex-openai-proxy/{__version__}"
    error_content_type = "application/json"
    timeout = REQUEST_READ_SECONDS

    # -- plumbing ----------------------------------------------------------
    def setup(self):
        super().setup()
        self.request_id = None
        self.headers = None
        self._framing = ("none", 0)
        self._selector = None
        self._served = 0

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
        """One request, with a short deadline for its line and headers and a
        longer idle wait between kept-alive requests; idle connections are
        the first to go when connections run short."""
        self.connection.settimeout(KEEPALIVE_IDLE_SECONDS if self._served
                                   else REQUEST_READ_SECONDS)
        self.server.set_idle(self.connection, True)
        try:
            try:
                self.raw_requestline = self.rfile.readline(65537)
            finally:
                self.server.set_idle(self.connection, False)
            self.connection.settimeout(REQUEST_READ_SECONDS)
            self._served += 1
            self.headers = None
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(501, f"unsupported method {self.command!r}")
                return
            method()
            self.wfile.flush()
        except (socket.timeout, OSError, ValueError):
            self.close_connection = True

    def end_headers(self):
        origin = self.headers.get("Origin") if self.headers is not None else None
        if origin and (self.server.config.api_keys or origin_allowed(
                origin, self.server.config.allow_origins)):
            self.send_header("Access-Control-Allow-Origin", origin.strip())
            self.send_header("Vary", "Origin")
        if self.close_connection or self.server.stopping.is_set():
            self.send_header("Connection", "close")
        super().end_headers()

    def send_json(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error_body(self, error):
        """The one place an OpenAI error body is written."""
        self.send_json(error.status, error.body(), error.headers)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, unknown method) as JSON."""
        self.close_connection = True
        try:
            self.send_error_body(ProxyError(code, message or explain or "bad request",
                                            code="http_error"))
        except OSError:
            pass

    def start_event_stream(self):
        self.connection.settimeout(WRITE_STALL_SECONDS)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()

    def write_chunk(self, data):
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except (OSError, ValueError) as exc:
            raise ClientGone() from exc

    def end_chunks(self):
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (OSError, ValueError) as exc:
            raise ClientGone() from exc

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

    @property
    def route(self):
        path = urllib.parse.urlsplit(self.path).path.rstrip("/") or "/"
        if path == "/v1" or path.startswith("/v1/"):
            path = path[3:] or "/"
        return path

    @property
    def query(self):
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)

    # -- request bodies ----------------------------------------------------
    def read_body(self):
        kind, length = self._framing
        self._framing = ("read", 0)
        if kind not in ("length", "chunked"):
            return b""
        deadline = time.monotonic() + REQUEST_READ_SECONDS
        if kind == "length":
            if length > self.server.config.max_body:
                self.close_connection = True
                raise self.too_large()
            return self._read_exact(length, deadline)
        return self._read_chunked(deadline)

    def too_large(self):
        return ProxyError(413, f"request body over {self.server.config.max_body} bytes "
                          "(raise --max-body)", code="request_too_large")

    def _read_exact(self, size, deadline):
        parts = []
        while size > 0:
            if time.monotonic() > deadline:
                self.close_connection = True
                raise ProxyError(408, "the request body arrived too slowly",
                                 code="request_timeout")
            data = self.rfile.read(min(size, 65536))
            if not data:
                raise ClientGone()
            parts.append(data)
            size -= len(data)
        return b"".join(parts)

    def _read_chunked(self, deadline):
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1026)
            size = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", size):
                self.close_connection = True
                raise framing_error("bad chunk size in a chunked body")
            size = int(size, 16)
            if size == 0:
                for _ in range(32):     # trailers, then the empty line
                    if self.rfile.readline(1026) in (b"\r\n", b"\n", b""):
                        return b"".join(parts)
                self.close_connection = True
                raise framing_error("too many trailer lines")
            total += size
            if total > self.server.config.max_body:
                self.close_connection = True
                raise self.too_large()
            parts.append(self._read_exact(size, deadline))
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                self.close_connection = True
                raise framing_error("a chunk is longer than its size says")

    def settle_body(self):
        """A body nobody read: drop it if small, else close the connection, so
        it is never parsed as the next request."""
        kind, length = self._framing
        self._framing = ("read", 0)
        if kind == "length" and length <= DRAIN_LIMIT:
            try:
                self._read_exact(length, time.monotonic() + 5.0)
                return
            except (ProxyError, ClientGone, OSError):
                pass
        if kind in ("length", "chunked"):
            self.close_connection = True

    def read_json_body(self):
        return parse_json_body(self.read_body())

    # -- entry points ------------------------------------------------------
    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_OPTIONS(self):
        self.dispatch("OPTIONS")

    def dispatch(self, method):
        self.request_id = "req_" + secrets.token_hex(5)
        try:
            try:
                self._framing = body_framing(self.headers)
            except ProxyError:
                self.close_connection = True
                self._framing = ("read", 0)
                raise
            if self.server.stopping.is_set():   # a kept-alive connection outlived the server
                raise ProxyError(503, "the proxy is shutting down", "server_error",
                                 code="shutting_down")
            self.server.check_access(self)
            route = self.route
            if route not in ROUTES:
                raise ProxyError(404, f"no route {method} {route}; this proxy serves "
                                 "/v1/chat/completions, /v1/responses and /v1/models",
                                 code="not_found")
            if method == "OPTIONS":
                return self.preflight(route)
            if method not in ROUTES[route]:
                raise ProxyError(405, f"{route} takes {', '.join(ROUTES[route])}, "
                                 f"not {method}", code="method_not_allowed",
                                 headers={"Allow": ", ".join(ROUTES[route] + ("OPTIONS",))})
            self.server.check_key(self, route)
            getattr(self, "handle_" + route.strip("/").replace("/", "_"))()
        except ProxyError as error:
            self.reject(error)
        except DISCONNECT_ERRORS:
            self.close_connection = True
        except Exception as exc:   # never a traceback to the client
            self.server.logs.add("internal_error", self.request_id,
                                 error=f"{type(exc).__name__}: {exc}"[:500])
            self.reject(ProxyError(500, "internal proxy error; see the proxy's log",
                                   "server_error"), log=False)
        finally:
            self.settle_body()
            if self.server.stopping.is_set():
                self.close_connection = True

    def reject(self, error, log=True):
        """Answer with an error before any response started, and log it."""
        self.settle_body()
        if log:
            self.server.logs.add(
                "auth_rejected" if error.code in ACCESS_CODES else "request_rejected",
                self.request_id, status=error.status, code=error.code,
                method=self.command, route=self.route if self.headers is not None else None,
                client=self.client_address[0], message=error.message[:300])
        try:
            self.send_error_body(error)
        except DISCONNECT_ERRORS + (OSError,):
            self.close_connection = True

    def preflight(self, route):
        requested = (self.headers.get("Access-Control-Request-Headers") or "").split(",")
        allowed = [h for h in (x.strip().lower() for x in requested)
                   if h in CORS_HEADERS or h.startswith(CORS_HEADER_PREFIXES)]
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", ", ".join(ROUTES[route] + ("OPTIONS",)))
        self.send_header("Access-Control-Allow-Headers",
                         ", ".join(allowed or ("authorization", "content-type")))
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    # -- small endpoints ---------------------------------------------------
    def handle_health(self):
        server = self.server
        _, version, logged_in = server.codex.snapshot()
        body = {"status": "ok", "version": __version__, "codex_version": version,
                "logged_in": logged_in, "engine": server.engine,
                "engine_reason": server.engine_reason, "warm_spares": len(server.warm),
                "parked_turns": len(server.parked)}
        if server.key_ok(self.headers):
            body["rate_limits"] = server.rate_limit_view()
        self.send_json(200, body)

    def handle_models(self):
        self.send_json(200, {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "codex-openai-proxy"}
            for name in self.server.model_names()]})

    def handle_logs(self):
        html = self.server.logs_page()
        wants_json = self.query.get("format", [""])[0] == "json" or \
            "text/html" not in (self.headers.get("Accept") or "")
        if html is not None and not wants_json:
            data = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Content-Security-Policy", "default-src 'self'; "
                             "script-src 'unsafe-inline'; style-src 'unsafe-inline'")
            self.end_headers()
            self.wfile.write(data)
            return
        self.server.require_key(self)
        self.send_json(200, {"events": self.server.logs.since(self._since()),
                             "instance": self.server.instance})

    def _since(self):
        try:
            return int(self.query.get("since", ["0"])[0])
        except ValueError:
            raise bad_request("since must be an integer", "since")

    def handle_logs_stream(self):
        seq = self._since()
        self.start_event_stream()
        self.write_chunk(b": connected\n\n")
        quiet_since = time.monotonic()
        while not self.server.stopping.is_set():
            events = self.server.logs.wait_since(seq, 1.0)
            if events:
                seq = events[-1]["seq"]
                self.write_chunk(b"".join(b"id: %d\n" % e["seq"] + sse(e) for e in events))
                quiet_since = time.monotonic()
            elif self.client_gone():
                raise ClientGone()
            elif time.monotonic() - quiet_since >= self.server.config.keepalive:
                self.write_chunk(b": keepalive\n\n")
                quiet_since = time.monotonic()
        self.end_chunks()

    # -- the two APIs ------------------------------------------------------
    def handle_chat_completions(self):
        body = self.read_json_body()
        self.serve(parse_chat_request(body, self.server.config.reasoning,
                                      self.server.responses.get))

    def handle_responses(self):
        body = self.read_json_body()
        self.serve(parse_responses_request(body, self.server.responses.get))

    def serve(self, request):
        server = self.server
        self.log_incoming(request)
        run = server.resume_run(request, self.request_id)
        if run is None:     # only a fresh run needs the prompt rendered
            run = server.start_run(request, server.run_spec(request),
                                   self.request_id)             # counts as active
        self.serve_turn(run, request)

    def log_incoming(self, request):
        fields = {"api": request.api, "model": request.model, "stream": request.stream,
                  "messages": len(request.messages), "tools": len(request.tools),
                  "client": self.client_address[0]}
        if request.output_note:
            fields["output_format"] = request.output_note
        if self.server.config.log_bodies:
            fields["prompt"] = render_prompt(request.messages)[-4000:]
        self.server.logs.add("incoming_request", self.request_id, **fields)

    def serve_turn(self, run, request):
        """Relay one run to this response; keep it parked if it called tools."""
        server, logs = self.server, self.server.logs
        responder = ChatResponder if request.api == "chat" else ResponsesResponder
        out = responder(self, request, server.config.reasoning)
        started = time.monotonic()
        outcome = "failed"
        if request.api == "responses" and request.store:
            out.on_finish = lambda done: server.responses.put(done.id, request.messages + [
                Message("assistant", done.answer_text(), tool_calls=list(done.calls))])
        try:
            out.open()
            outcome, usage, reason = TurnPump(server, run, out, self, request).run()
            logs.add("cursor_response", self.request_id, turn=run.id, api=request.api,
                     finish_reason=reason, duration_ms=int((time.monotonic() - started) * 1000),
                     usage=openai_usage(usage) if outcome != "parked" else None,
                     tool_calls=len(out.calls),
                     **({"answer": out.answer_text()[-4000:]} if server.config.log_bodies
                        else {}))
        except ProxyError as error:
            logs.add("stream_codex_error", self.request_id, turn=run.id,
                     status=error.status, code=error.code, message=error.message[:500])
            try:
                out.fail(error)
            except DISCONNECT_ERRORS:
                self.close_connection = True
        except DISCONNECT_ERRORS:
            outcome = "disconnected"
            logs.add("client_disconnected", self.request_id, turn=run.id,
                     duration_ms=int((time.monotonic() - started) * 1000))
            self.close_connection = True
        finally:
            server.leave_active(run, outcome)


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

class ProxyServer(http.server.ThreadingHTTPServer):
    """Owns the shared state: config, log buffer, engine, runs, parked turns,
    warm spares, stored responses, connections."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024      # a burst of connections waits in the kernel, not in SYN retries

    def __init__(self, config, log_stream=sys.stderr, clock=time.monotonic):
        self.config = config
        self.clock = clock
        self.logs = LogBuffer(config.log_size, None if config.quiet else log_stream)
        self.env = child_environment(os.environ, config.api_keys, config.codex_home)
        self.codex = CodexInfo(config, self.env, on_refresh=self._codex_checked)
        self.user_config = CodexConfigFile(config.codex_home_dir)
        self.parked = ParkedTurns(config.max_parked, config.tool_result_timeout, clock)
        self.responses = ResponseStore(clock=clock)
        self.stopping = threading.Event()
        self.instance = secrets.token_hex(6)    # lets the log page notice a restart
        self.own_names = own_host_names()
        self.max_connections = connection_budget(config)
        self.catalog_path, self.catalog_models = None, []
        self.engine = "exec" if config.engine == "exec" else "app-server"
        self.engine_reason = "not checked yet"
        self.warm = WarmPool(config.warm if config.engine != "exec" else 0,
                             self.spawn_app_server, self.warm_key, clock=clock,
                             on_error=self._warm_failed)
        # _catalog_lock guards _catalog_version and the engine choice; the
        # catalog build and the probe run under it, off the request path.
        self._catalog_lock = threading.Lock()
        self._catalog_version = None
        # _lock guards _runs, _active, _connections, _rate_limits and _accept_logged.
        self._lock = threading.Lock()
        self._runs = {}
        self._active = 0
        self._connections = {}          # socket -> idle (waiting for a request line)
        self._rate_limits, self._rate_limits_at = None, None
        self._accept_logged = 0.0
        self._logs_html = None
        self._bridge_thread = None
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        super().__init__((config.host, config.port), ProxyHandler)
        self.bridge = BridgeListener(self)

    # -- lifecycle ---------------------------------------------------------
    def start_background(self):
        """Check Codex, pick the engine, build the model catalog, start the
        helper threads and the warm spares."""
        self.codex.refresh()        # builds the catalog and probes the engine too
        self._bridge_thread = threading.Thread(
            target=self.bridge.serve_forever, kwargs={"poll_interval": 0.2},
            name="bridge-listener", daemon=True)
        self._bridge_thread.start()
        threading.Thread(target=self._reap_parked, name="parked-reaper",
                         daemon=True).start()
        self.warm.start()

    def _codex_checked(self, argv, version):
        """At start-up and whenever Codex's version changes: build the model
        catalog and choose the engine again."""
        with self._catalog_lock:        # one build per version, even when checks race
            if argv is None or version == self._catalog_version:
                if argv is None:
                    self.engine_reason = "Codex not found"
                return
            self._catalog_version = version
            state_dir = self.config.state_dir or default_state_dir()
            try:
                self.catalog_path, self.catalog_models = build_model_catalog(
                    argv, self.env, state_dir, version)
            except OSError as exc:
                self.logs.add("codex_warning", message=f"model catalog not written: {exc}")
            self._choose_engine(argv)
        self.warm.refresh()

    def _choose_engine(self, argv):
        if self.config.engine == "exec":
            self.engine, self.engine_reason = "exec", "chosen with --engine exec"
            return
        ok, why = self.probe_app_server(argv)
        if ok:
            self.engine, self.engine_reason = "app-server", why
        elif self.config.engine == "app-server":
            self.engine, self.engine_reason = "app-server", f"forced; its probe failed: {why}"
        else:
            self.engine, self.engine_reason = "exec", f"app-server probe failed: {why}"
        self.logs.add("engine_selected", engine=self.engine, reason=self.engine_reason[:300])

    def probe_app_server(self, argv):
        """Handshake plus a thread with one dynamic tool -> (ok, reason)."""
        try:
            run = AppServerRun("probe_" + secrets.token_hex(4), self.env,
                               tempfile.mkdtemp(prefix="codex-proxy-"),
                               self.app_server_argv(argv), self._rate_limits_seen)
        except OSError as exc:
            return False, str(exc)
        try:
            run.launch().initialize(timeout=20)
            probe_tool = ToolSpec("probe_tool", "probe", {"type": "object", "properties": {}})
            result = run.call("thread/start", run.thread_params(
                "probe", [probe_tool], self.thread_config()), 20)
            if not (result.get("thread") or {}).get("id"):
                return False, "thread/start gave no thread"
            try:
                limits = run.call("account/rateLimits/read", None, 10)
                self._rate_limits_seen(limits.get("rateLimits"))
            except (RpcError, ProxyError):
                pass        # API-key and custom-provider logins have none
            return True, "app-server answered the probe"
        except (ProxyError, RpcError, OSError) as exc:
            return False, self.redact(str(exc))[:300]
        finally:
            run.stop("probe")

    def close(self):
        """Stop serving and end every Codex process: spares, parked, running."""
        self.stopping.set()
        self.warm.close()
        self._end_all(self.parked.take_all(), "parked_shutdown")
        with self._lock:
            runs = list(self._runs.values())
        self._end_all(runs, "shutdown")
        with self._lock:
            connections = list(self._connections)
        for connection in connections:     # wakes handlers idling on kept-alive sockets
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._bridge_thread is not None:   # shutdown() waits for serve_forever
            self.bridge.shutdown()
        self.bridge.server_close()
        self.server_close()

    def _end_all(self, runs, reason):
        """End runs side by side: each may wait a moment for its turn/interrupt."""
        threads = [threading.Thread(target=self.end_run, args=(run, reason),
                                    name=f"stop-{run.id}") for run in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _reap_parked(self):
        while not self.stopping.wait(min(1.0, max(0.05, self.config.tool_result_timeout / 10))):
            for run in self.parked.take_due():
                self.expire(run, "tool_result_timeout")

    def _warm_failed(self, exc):
        self.logs.add("codex_warning", message=f"warm app-server failed to start: "
                      f"{self.redact(str(exc))[:300]}")

    # -- connections ---------------------------------------------------------
    def verify_request(self, request, client_address):
        """Admit a connection; past --max-connections the oldest idle one
        makes room, and with none idle the newcomer is refused politely."""
        victim = refuse = None
        with self._lock:
            if len(self._connections) >= self.max_connections:
                victim = next((c for c, idle in self._connections.items() if idle), None)
                if victim is None:
                    refuse = True
                else:
                    del self._connections[victim]
            if not refuse:
                self._connections[request] = False
        if victim is not None:
            try:
                victim.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if refuse:
            body = json.dumps(ProxyError(503, "too many open connections; retry shortly",
                                         "server_error", "too_many_connections").body())
            try:
                request.settimeout(1.0)
                request.sendall(("HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                 f"application/json\r\nContent-Length: {len(body)}\r\n"
                                 "Retry-After: 1\r\nConnection: close\r\n\r\n"
                                 + body).encode())
            except OSError:
                pass
            return False
        return True

    def shutdown_request(self, request):
        with self._lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def set_idle(self, connection, idle):
        with self._lock:
            if connection in self._connections:
                self._connections[connection] = idle

    def get_request(self):
        """accept(), which must never spin when descriptors run out."""
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                with self._lock:
                    victim = next((c for c, idle in self._connections.items() if idle), None)
                    log = time.monotonic() - self._accept_logged > 10
                    if log:
                        self._accept_logged = time.monotonic()
                if victim is not None:
                    try:
                        victim.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                if log:
                    self.logs.add("codex_warning", message=f"accept failed: {exc.strerror}; "
                                  "closing idle connections")
                time.sleep(0.05)
            raise

    # -- access ------------------------------------------------------------
    def check_access(self, handler):
        """Without a key: no tunnels, only local pages and local Host names.
        With a key, the key guards everything (check_key)."""
        if self.config.api_keys:
            return
        headers = handler.headers
        tunnel = tunnel_headers(headers)
        if tunnel:
            raise ProxyError(403, "this request came through a tunnel or proxy "
                             f"({tunnel[0]} header) but the proxy has no API key: "
                             "restart it with --api-key-file FILE (or CODEX_PROXY_API_KEY) "
                             "and set the same key in your client",
                             "permission_error", "api_key_required")
        for origin in headers.get_all("Origin") or []:
            if not origin_allowed(origin, self.config.allow_origins):
                raise ProxyError(403, f"web pages from {origin.strip()[:100]!r} may not use "
                                 "this proxy; allow the origin with --allow-origin, or set "
                                 "an API key", "permission_error", "origin_not_allowed")
        hosts = headers.get_all("Host") or []
        if len(hosts) > 1 or not all(host_allowed(h, self.config.allow_hosts,
                                                  self.own_names) for h in hosts):
            raise ProxyError(403, "the Host header names neither this machine nor a local "
                             "address (DNS rebinding?); allow it with --allow-host, or set "
                             "an API key", "permission_error", "host_not_allowed")

    def check_key(self, handler, route):
        if route in OPEN_ROUTES or (route == "/logs" and self.logs_page() is not None):
            return      # /logs checks the key itself before answering JSON
        self.require_key(handler)

    def key_ok(self, headers):
        if not self.config.api_keys:
            return True
        offered = offered_key(headers)
        return offered is not None and any(
            hmac.compare_digest(offered.encode(), k.encode()) for k in self.config.api_keys)

    def require_key(self, handler):
        if not self.key_ok(handler.headers):
            raise ProxyError(401, "invalid or missing API key: send Authorization: "
                             "Bearer <key> with the key the proxy was started with",
                             "authentication_error", "invalid_api_key")

    def redact(self, text):
        return redact_paths(text, (self.config.codex_home_dir, self.config.state_dir,
                                   tempfile.gettempdir(), os.path.expanduser("~")))

    # -- rate limits ---------------------------------------------------------
    def _rate_limits_seen(self, snapshot):
        """account/rateLimits (read or updated): merge the windows Codex knows."""
        if not isinstance(snapshot, dict):
            return
        with self._lock:
            merged = dict(self._rate_limits or {})
            merged.update({k: v for k, v in snapshot.items() if v is not None})
            self._rate_limits, self._rate_limits_at = merged, time.time()

    def rate_limit_view(self):
        """The plan's windows for /health and the log page, or None."""
        with self._lock:
            limits, at = self._rate_limits, self._rate_limits_at
        if not limits or not (limits.get("primary") or limits.get("secondary")):
            return None
        now, windows = time.time(), []
        for name in ("primary", "secondary"):
            window = limits.get(name)
            if not isinstance(window, dict) or window.get("usedPercent") is None:
                continue
            resets = window.get("resetsAt")
            windows.append({"name": name, "used_percent": window.get("usedPercent"),
                            "window_minutes": window.get("windowDurationMins"),
                            "resets_at": resets,
                            "resets_in_seconds": max(0, int(resets - now))
                            if isinstance(resets, (int, float)) else None})
        return {"plan": limits.get("planType"), "windows": windows,
                "reached": limits.get("rateLimitReachedType"), "updated_at": int(at)}

    def reset_seconds(self):
        """Seconds until the fullest window resets, when Codex told us."""
        view = self.rate_limit_view()
        windows = [w for w in (view or {}).get("windows", [])
                   if w["resets_in_seconds"] is not None]
        if not windows:
            return None
        return max(windows, key=lambda w: w["used_percent"] or 0)["resets_in_seconds"] or None

    def codex_failure(self, payload):
        """A failed turn (exec message or app-server TurnError) -> ProxyError."""
        reset = self.reset_seconds()
        error = classify_codex_error(payload, reset) if isinstance(payload, dict) else \
            classify_failure(str(payload), reset)
        error.message = self.redact(clean_codex_output(error.message) or error.message)
        if error.status == 401:
            self.codex.expire()
        return error

    # -- runs --------------------------------------------------------------
    def run_spec(self, request):
        """What Codex gets for a request; a prompt Codex would refuse is refused here."""
        model, effort = resolve_model(request.model, self.config.aliases)
        tools = request.tools if request.tool_choice != "none" else []
        spec = RunSpec(model=model, effort=request.reasoning_effort or effort,
                       summary=request.reasoning_summary,
                       instructions=request_instructions(request, tools),
                       prompt=render_prompt(request.messages), images=request.images(),
                       tools=tools, output_schema=request.output_schema)
        if len(spec.prompt) > MAX_INPUT_CHARS:
            raise ProxyError(400, f"the conversation is {len(spec.prompt)} characters; Codex "
                             f"takes at most {MAX_INPUT_CHARS}. Shorten it.",
                             "invalid_request_error", "context_length_exceeded", "messages")
        return spec

    def thread_config(self):
        config = dict(FORWARDER_THREAD_CONFIG)
        if self.catalog_path:
            config["model_catalog_json"] = self.catalog_path
        return config

    def app_server_argv(self, prefix):
        argv = [*prefix, "app-server"]
        for item in self.config.codex_config:
            argv += ["-c", item]
        return argv

    def warm_key(self):
        """What a spare depends on; None when no spare should be kept."""
        argv, version = self.codex.current()
        if argv is None or self.engine != "app-server":
            return None
        auth = os.path.join(self.config.codex_home_dir, "auth.json")
        try:
            auth_stamp = os.stat(auth).st_mtime_ns
        except OSError:
            auth_stamp = None
        return (tuple(argv), version, self.catalog_path, self.user_config.stamp(),
                auth_stamp, tuple(self.config.codex_config))

    def spawn_app_server(self):
        """A new app-server process, initialized (a spare, or for a request)."""
        argv, _ = self.codex.current()
        if argv is None:
            raise ProxyError(503, "the Codex CLI was not found", "server_error",
                             "codex_not_found")
        run = AppServerRun("turn_" + secrets.token_hex(5), self.env,
                           tempfile.mkdtemp(prefix="codex-proxy-"),
                           self.app_server_argv(argv), self._rate_limits_seen)
        try:
            run.launch().initialize()
        except OSError as exc:
            run.stop("failed to start")
            raise ProxyError(503, f"could not start Codex: {exc.strerror or exc}",
                             "server_error", "codex_not_found")
        except BaseException:
            run.stop("failed to start")
            raise
        return run

    def check_ready(self):
        argv, _, logged_in = self.codex.snapshot()
        if argv is None:
            raise ProxyError(503, f"the Codex CLI was not found; install it with "
                             f"`{INSTALL_HINT}` (or point --codex-bin at it), then run "
                             "`codex login`", "server_error", "codex_not_found")
        user_config = self.user_config.read()
        if not logged_in and not uses_custom_provider(user_config, self.config.codex_config):
            raise ProxyError(401, "Codex is not logged in: run `codex login` on the "
                             "proxy's machine (with your ChatGPT account), then retry",
                             "authentication_error", "codex_not_logged_in")
        return argv, user_config

    def start_run(self, request, spec, request_id):
        """Admit the request (the concurrency check first, then readiness from
        the cached checks) and start a Codex for it."""
        with self._lock:
            if self._active >= self.config.max_concurrent:
                raise ProxyError(429, f"{self._active} Codex runs are busy "
                                 "(--max-concurrent); retry shortly", "rate_limit_error",
                                 "too_many_concurrent_requests", headers={"Retry-After": "2"})
            self._active += 1
        try:
            argv, user_config = self.check_ready()
            results = trailing_tool_results(request.messages)
            if results:
                self.logs.add("fallback_transcript", request_id, results=len(results))
            if self.engine == "app-server":
                return self._start_app_server(request, spec)
            return self._start_exec(request, spec, argv, user_config)
        except BaseException:
            with self._lock:
                self._active -= 1
            raise

    def _register(self, run, request, spec):
        run.set_tools(spec.tools, request.history_ids())
        run.fingerprint = request.fingerprint()
        run.model = spec.model or self.user_config.read().get("model")
        run.effort = spec.effort
        with self._lock:
            self._runs[run.id] = run

    def _start_app_server(self, request, spec):
        run = self.warm.take()
        if run is not None:
            run.warm = True
        while True:
            if run is None:
                run = self.spawn_app_server()
            self._register(run, request, spec)
            try:
                run.start(spec, self.thread_config())
                return run
            except ProxyError:
                self.end_run(run, "spawn_failed")
                if not run.warm or run.thread_id is not None:
                    raise
                run = None      # a spare that died before its thread started: go fresh
            except BaseException:
                self.end_run(run, "spawn_failed")
                raise

    def _start_exec(self, request, spec, argv_prefix, user_config):
        run = ExecRun("turn_" + secrets.token_hex(5), self.env,
                      tempfile.mkdtemp(prefix="codex-proxy-"))
        self._register(run, request, spec)
        try:
            instructions, images, schema = write_run_files(
                run, spec.instructions, spec.images, spec.output_schema)
            bridge_path = self._write_bridge_config(run, spec.tools) if spec.tools else None
            argv = codex_argv(
                argv_prefix, model=spec.model, effort=spec.effort, user_config=user_config,
                extra_config=self.config.codex_config, workdir=run.workdir,
                instructions_path=instructions, images=images, bridge_config=bridge_path,
                catalog=self.catalog_path, bridge_timeout=self.config.tool_result_timeout,
                output_schema=schema, summary=spec.summary)
            run.start(argv, spec.prompt)
        except OSError as exc:
            self.end_run(run, "spawn_failed")
            raise ProxyError(503, f"could not start Codex: {exc.strerror or exc}",
                             "server_error", "codex_not_found")
        except BaseException:
            self.end_run(run, "spawn_failed")
            raise
        return run

    def _write_bridge_config(self, run, tools):
        path = os.path.join(run.tempdir, "bridge.json")
        host, port = self.bridge.server_address[:2]
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"relay": f"{host}:{port}", "run": run.id, "secret": run.secret,
                       "tools": mcp_tool_list(tools)}, f)
        return path

    def resume_run(self, request, request_id):
        """The parked run these tool results answer, with the results
        delivered; None when no parked turn of this conversation matches."""
        results = trailing_tool_results(request.messages)
        history_ids = request.history_ids()
        run = self.parked.claim(r.tool_call_id for r in results) if results else None
        for stale in self.parked.take_mentioning(history_ids):
            self.expire(stale, "history_changed")
        if run is None:
            return None
        if run.fingerprint != request.fingerprint():     # e.g. a handoff to another agent
            self.expire(run, "conversation_changed")
            return None
        run.remember_ids(history_ids)
        answered = 0
        for result in results:
            if run.answer(result.tool_call_id, result.text):
                answered += 1
                self.logs.add("tool_result_received", request_id, turn=run.id,
                              call_id=result.tool_call_id, result_chars=len(result.text))
        for missing in run.open_call_ids():
            run.answer(missing, "The client sent no result for this call.", True)
        self.logs.add("turn_resumed", request_id, turn=run.id, results=answered)
        with self._lock:
            self._active += 1
        return run

    def leave_active(self, run, outcome):
        with self._lock:
            self._active -= 1
        if outcome != "parked":
            self.end_run(run, outcome)

    def park(self, run):
        for evicted in self.parked.park(run):
            self.expire(evicted, "max_parked")

    def expire(self, run, reason):
        self.logs.add("parked_expired", None, turn=run.id, reason=reason,
                      pending=sorted(run.open_call_ids(sent_only=False)))
        self.end_run(run, reason)

    def end_run(self, run, reason):
        with self._lock:
            self._runs.pop(run.id, None)
        if reason == "done":    # Codex ends by itself; reap it off the request path
            threading.Thread(target=run.stop, kwargs={"grace": KILL_GRACE_SECONDS},
                             name=f"reap-{run.id}", daemon=True).start()
        else:
            run.stop(f"The tool call was abandoned ({reason}).")

    def find_run(self, run_id):
        with self._lock:
            return self._runs.get(run_id)

    # -- content -----------------------------------------------------------
    def model_names(self):
        user_config = self.user_config.read()
        names = []
        base = [user_config.get("model")] + list(self.config.aliases) + \
            list(self.config.aliases.values()) + list(self.catalog_models)
        for name in base:
            if not isinstance(name, str) or not name:
                continue
            for candidate in (name, name[::-1]):
                if candidate not in names:
                    names.append(candidate)
        return names

    def logs_page(self):
        if self._logs_html is None and self.config.logs_html:
            try:
                with open(self.config.logs_html, encoding="utf-8") as f:
                    self._logs_html = f.read()
            except OSError:
                return None
        return self._logs_html


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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


def split_env_list(name, sep=","):
    return [p.strip() for p in os.environ.get(name, "").split(sep) if p.strip()]


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


def build_parser():
    e = os.environ.get
    p = argparse.ArgumentParser(
        prog="codex_proxy.py",
        description="OpenAI Chat Completions and Responses APIs backed by Codex "
                    "(your ChatGPT subscription). Every flag has an environment variable.")
    p.add_argument("--addr", type=parse_addr, default=e("CODEX_OPENAI_PROXY_ADDR", DEFAULT_ADDR),
                   help=f"HOST:PORT to listen on (env CODEX_OPENAI_PROXY_ADDR; default {DEFAULT_ADDR})")
    p.add_argument("--codex-bin", default=e("CODEX_BIN", "codex"),
                   help="Codex executable (env CODEX_BIN; default: codex on PATH)")
    p.add_argument("--codex-home", default=e("CODEX_HOME"),
                   help="Codex's home folder with auth and config.toml (env CODEX_HOME; default ~/.codex)")
    p.add_argument("--engine", choices=("auto", "app-server", "exec"),
                   default=e("CODEX_PROXY_ENGINE", DEFAULT_ENGINE),
                   help="how Codex is run: app-server (streams tokens), exec, or auto: app-server "
                        "when its start-up probe passes (env CODEX_PROXY_ENGINE; default auto)")
    p.add_argument("--warm", type=int, default=e("CODEX_PROXY_WARM", str(DEFAULT_WARM)),
                   help=f"app-server processes started ahead of requests; 0 turns it off "
                        f"(env CODEX_PROXY_WARM; default {DEFAULT_WARM})")
    p.add_argument("--api-key", action="append", default=None,
                   help="require this key as Authorization: Bearer KEY; repeatable; visible in "
                        "`ps`, prefer --api-key-file (env CODEX_PROXY_API_KEY, comma-separated)")
    p.add_argument("--api-key-file", default=e("CODEX_PROXY_API_KEY_FILE"),
                   help="read the keys from this file, one per line "
                        "(env CODEX_PROXY_API_KEY_FILE)")
    p.add_argument("--insecure-no-key", action="store_true", default=env_flag("CODEX_PROXY_INSECURE_NO_KEY"),
                   help="allow a non-loopback --addr without a key (env CODEX_PROXY_INSECURE_NO_KEY=1)")
    p.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="without a key, also let web pages from this origin use the proxy, e.g. "
                        "https://chat.example; repeatable (env CODEX_PROXY_ALLOW_ORIGINS, comma-separated)")
    p.add_argument("--allow-host", action="append", default=None, metavar="HOST",
                   help="without a key, also accept this Host name; repeatable "
                        "(env CODEX_PROXY_ALLOW_HOSTS, comma-separated)")
    p.add_argument("--alias", action="append", type=parse_alias, default=None, metavar="NAME=MODEL",
                   help="map a client model name to a Codex model; repeatable (env CODEX_PROXY_ALIASES, comma-separated)")
    p.add_argument("--codex-config", action="append", default=None, metavar="KEY=VALUE",
                   help="extra `codex -c KEY=VALUE`; repeatable (env CODEX_PROXY_CODEX_CONFIG, ';'-separated)")
    p.add_argument("--reasoning", choices=("content", "think", "none"), default=e("CODEX_PROXY_REASONING", "content"),
                   help="reasoning summary as delta.reasoning_content, as <think> in content, or not at all (env CODEX_PROXY_REASONING; default content)")
    p.add_argument("--max-body", type=int, default=e("CODEX_PROXY_MAX_BODY", str(DEFAULT_MAX_BODY)),
                   help=f"largest request body in bytes (env CODEX_PROXY_MAX_BODY; default {DEFAULT_MAX_BODY})")
    p.add_argument("--max-concurrent", type=int, default=e("CODEX_PROXY_MAX_CONCURRENT", str(DEFAULT_MAX_CONCURRENT)),
                   help=f"Codex runs at once; more get 429 (env CODEX_PROXY_MAX_CONCURRENT; default {DEFAULT_MAX_CONCURRENT})")
    p.add_argument("--max-connections", type=int,
                   default=e("CODEX_PROXY_MAX_CONNECTIONS", str(DEFAULT_MAX_CONNECTIONS)),
                   help=f"open client connections; past it idle ones are closed first "
                        f"(env CODEX_PROXY_MAX_CONNECTIONS; default {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--idle-timeout", type=float, default=e("CODEX_PROXY_IDLE_TIMEOUT", str(DEFAULT_IDLE_TIMEOUT)),
                   help=f"seconds without a Codex event before giving up (env CODEX_PROXY_IDLE_TIMEOUT; default {DEFAULT_IDLE_TIMEOUT:g})")
    p.add_argument("--request-timeout", type=float, default=e("CODEX_PROXY_REQUEST_TIMEOUT", str(DEFAULT_REQUEST_TIMEOUT)),
                   help=f"seconds one response may take (env CODEX_PROXY_REQUEST_TIMEOUT; default {DEFAULT_REQUEST_TIMEOUT:g})")
    p.add_argument("--keepalive", type=float, default=e("CODEX_PROXY_KEEPALIVE", str(DEFAULT_KEEPALIVE)),
                   help=f"seconds between SSE keepalive comments (env CODEX_PROXY_KEEPALIVE; default {DEFAULT_KEEPALIVE:g})")
    p.add_argument("--tool-result-timeout", type=float,
                   default=e("CODEX_PROXY_TOOL_RESULT_TIMEOUT", str(DEFAULT_TOOL_RESULT_TIMEOUT)),
                   help=f"seconds a turn waits for the client's tool results (env CODEX_PROXY_TOOL_RESULT_TIMEOUT; default {DEFAULT_TOOL_RESULT_TIMEOUT:g})")
    p.add_argument("--max-parked", type=int, default=e("CODEX_PROXY_MAX_PARKED", str(DEFAULT_MAX_PARKED)),
                   help=f"turns waiting on tool results at once; past it the oldest ends (env CODEX_PROXY_MAX_PARKED; default {DEFAULT_MAX_PARKED})")
    p.add_argument("--tool-quiet-ms", type=int, default=e("CODEX_PROXY_TOOL_QUIET_MS", str(int(DEFAULT_TOOL_QUIET * 1000))),
                   help=f"milliseconds to wait for sibling tool calls (env CODEX_PROXY_TOOL_QUIET_MS; default {int(DEFAULT_TOOL_QUIET * 1000)})")
    p.add_argument("--state-dir", default=e("CODEX_PROXY_STATE_DIR"),
                   help="folder for the proxy's model catalog (env CODEX_PROXY_STATE_DIR; default ~/.local/state/codex-openai-proxy)")
    p.add_argument("--log-size", type=int, default=e("CODEX_PROXY_LOG_SIZE", str(DEFAULT_LOG_SIZE)),
                   help=f"events kept for /logs (env CODEX_PROXY_LOG_SIZE; default {DEFAULT_LOG_SIZE})")
    p.add_argument("--log-bodies", action="store_true", default=env_flag("CODEX_PROXY_LOG_BODIES"),
                   help="also log prompt and answer text (env CODEX_PROXY_LOG_BODIES=1)")
    p.add_argument("--quiet", action="store_true", default=env_flag("CODEX_PROXY_QUIET"),
                   help="no log lines on stderr (env CODEX_PROXY_QUIET=1)")
    p.add_argument("--mcp-bridge", metavar="FILE", help=argparse.SUPPRESS)
    return p


def config_from_args(args):
    keys = args.api_key if args.api_key is not None else split_env_list("CODEX_PROXY_API_KEY")
    if args.api_key_file:
        keys = list(keys) + read_key_file(args.api_key_file)
    aliases = args.alias if args.alias is not None else [
        parse_alias(a) for a in split_env_list("CODEX_PROXY_ALIASES")]
    extra = args.codex_config if args.codex_config is not None else \
        split_env_list("CODEX_PROXY_CODEX_CONFIG", ";")
    origins = args.allow_origin if args.allow_origin is not None else \
        split_env_list("CODEX_PROXY_ALLOW_ORIGINS")
    hosts = args.allow_host if args.allow_host is not None else \
        split_env_list("CODEX_PROXY_ALLOW_HOSTS")
    host, port = args.addr if isinstance(args.addr, tuple) else parse_addr(args.addr)
    html = os.path.join(os.path.dirname(os.path.abspath(__file__)), "logs.html")
    return Config(
        host=host, port=port, codex_bin=args.codex_bin, codex_home=args.codex_home,
        engine=args.engine, warm=max(0, args.warm),
        api_keys=tuple(k.strip() for key in keys for k in key.split(",") if k.strip()),
        insecure_no_key=args.insecure_no_key,
        allow_origins=tuple(o.strip().lower().rstrip("/") for o in origins if o.strip()),
        allow_hosts=tuple(h.strip().lower() for h in hosts if h.strip()),
        max_body=args.max_body, max_concurrent=max(1, args.max_concurrent),
        max_connections=max(8, args.max_connections), idle_timeout=args.idle_timeout,
        request_timeout=args.request_timeout, keepalive=max(0.05, args.keepalive),
        reasoning=args.reasoning, aliases=dict(aliases), codex_config=list(extra),
        log_size=args.log_size, log_bodies=args.log_bodies, quiet=args.quiet,
        tool_result_timeout=args.tool_result_timeout, max_parked=max(1, args.max_parked),
        tool_quiet=max(0, args.tool_quiet_ms) / 1000.0, state_dir=args.state_dir,
        logs_html=html if os.path.isfile(html) else None)


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
    cfg, codex = server.config, server.codex
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
    warm = f", {server.warm.size} warm spare(s)" if server.engine == "app-server" and \
        server.warm.size else ""
    lines = [f"codex-openai-proxy {__version__} listening on {base}",
             f"  base URL for Cursor / OpenAI clients: {base}/v1",
             f"  codex: {codex_line}",
             f"  API key: {key}",
             f"  engine: {server.engine} ({server.engine_reason}){warm}",
             f"  logs: {base}/logs"]
    server.user_config.read()
    if server.user_config.error:
        lines.append(f"  note: {server.user_config.path} could not be read "
                     f"({server.user_config.error}); its model settings are ignored")
    agents = global_agents_file(cfg.codex_home_dir)
    if agents:
        lines.append(f"  note: Codex sends {agents} to the model with every request; "
                     "move it away if that is not wanted")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mcp_bridge:
        return run_mcp_bridge(args.mcp_bridge)
    try:
        config = config_from_args(args)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
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
