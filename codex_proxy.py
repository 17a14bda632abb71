#!/usr/bin/env python3
"""codex-openai-proxy: the OpenAI Chat Completions API on top of `codex exec`.

Use a ChatGPT Plus/Pro subscription from any OpenAI-compatible client (Cursor,
the openai SDK, Continue, Cline, Open WebUI...).  Sign in once with
`codex login`, then run:

    python3 codex_proxy.py            # serves http://127.0.0.1:11435/v1

Every chat request runs one `codex exec --json -s read-only` subprocess with
every flag that leaves the model no tool of Codex's own (no shell, no file
reads, no web search, no user MCP servers).  Its JSONL events become an OpenAI
response or SSE chunks.  Tools the client declares reach the model through an
MCP server that is this same file (`--mcp-bridge` mode); when the model calls
one, the call goes back to the client as `tool_calls`, the Codex process waits
("parks") on the unanswered call, and the client's next request, carrying the
tool results, resumes the same Codex turn.  Codex itself never runs a tool.

Standard library only, Python 3.11+.  `python3 codex_proxy.py --help` lists
every flag and its environment variable.

SECURITY: whoever can reach the proxy spends your subscription.  It listens on
loopback by default.  Before exposing it (a Cloudflare Tunnel or ngrok for
Cursor), set a key with `--api-key` / CODEX_PROXY_API_KEY: without one, the
proxy refuses requests that carry tunnel headers and refuses to bind a
non-loopback address unless told `--insecure-no-key`.
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 11):     # tomllib; macOS's own python3 is older
    sys.exit(f"codex_proxy.py needs Python 3.11 or newer; this is {sys.version.split()[0]}. "
             "Install a newer Python (python.org, Homebrew, winget) and run it with that.")

import argparse
import base64
import binascii
import collections
import dataclasses
import datetime
import hmac
import http.server
import ipaddress
import json
import os
import queue
import re
import secrets
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
import tomllib
import urllib.parse
import uuid

__version__ = "0.2.0"

# ---------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------

DEFAULT_ADDR = "127.0.0.1:11435"
DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_MAX_CONCURRENT = 4
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
CONNECTION_IDLE_SECONDS = 600.0    # a socket read or write stalled this long ends the connection
MCP_PROTOCOL_VERSION = "2025-06-18"
INSTALL_HINT = "npm install -g @openai/codex"
EFFORTS = ("minimal", "low", "medium", "high", "xhigh")
TUNNEL_HEADERS = ("cf-connecting-ip", "x-forwarded-for", "forwarded", "x-real-ip")
# Keys of $CODEX_HOME/config.toml that still apply although Codex runs with
# --ignore-user-config (which keeps the user's own MCP servers off the host).
FORWARDED_CONFIG_KEYS = ("model", "model_provider", "model_providers",
                         "model_reasoning_effort", "model_reasoning_summary",
                         "model_verbosity", "service_tier")
# PROTOCOL.md section 2: together these leave the model no tool of Codex's
# that runs or reads anything on the host.
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
# Request parsing (pure)
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


@dataclasses.dataclass
class Message:
    role: str               # system | user | assistant | tool
    text: str = ""
    tool_calls: list = dataclasses.field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    images: list = dataclasses.field(default_factory=list)   # data: URLs


@dataclasses.dataclass
class ChatRequest:
    model: str | None           # exactly as the client sent it
    messages: list
    stream: bool = False
    include_usage: bool = False
    tools: list = dataclasses.field(default_factory=list)
    tool_choice: object = "auto"
    reasoning_effort: str | None = None


def content_to_text(content, images=None, where="content"):
    """Flatten a message content (string, null or list of parts) to text.

    `image_url` parts with data: URLs are appended to `images`; remote image
    URLs cannot be handed to Codex and are refused."""
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
            url = part.get("image_url")
            if isinstance(url, dict):
                url = url.get("url")
            if not isinstance(url, str) or not url.startswith("data:"):
                raise bad_request(
                    "only data: image URLs are supported (Codex cannot fetch "
                    "remote images); send the image inline as base64", where)
            if images is not None:
                images.append(url)
            texts.append(f"[image #{len(images or ())}]")
        elif isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part.get("content"), (str, list)):
            texts.append(content_to_text(part["content"], images, where))
        elif isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
    return "\n".join(t for t in texts if t)


def normalize_tools(tools):
    """Chat style, flat Responses style and `custom` tools -> [ToolSpec]."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request("tools must be a list", "tools")
    specs, seen = [], set()
    for tool in tools:
        if not isinstance(tool, dict):
            raise bad_request("each tool must be an object", "tools")
        kind = tool.get("type", "function")
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        name = fn.get("name")
        if kind not in ("function", "custom"):
            continue    # hosted tools (web_search, file_search...) have no client side
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise bad_request(f"invalid tool name {name!r}", "tools")
        if name in seen:
            continue
        seen.add(name)
        description = fn.get("description") or ""
        if kind == "custom":
            fmt = tool.get("format")
            if isinstance(fmt, dict) and fmt.get("type") == "grammar":
                description += ("\n\nThe `input` must follow this "
                                f"{fmt.get('syntax', '')} grammar:\n"
                                f"{fmt.get('definition', '')}")
            specs.append(ToolSpec(name, description.strip(), {
                "type": "object",
                "properties": {"input": {"type": "string", "description":
                               "The raw input text for this tool."}},
                "required": ["input"]}, custom=True))
        else:
            params = fn.get("parameters")
            if not isinstance(params, dict) or params.get("type") != "object":
                params = {"type": "object", "properties": {}}
            specs.append(ToolSpec(name, description, params))
    return specs


def responses_body_to_chat(body):
    """Turn the Responses-shaped body Cursor's agent may send into Chat form."""
    messages = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise bad_request("input must be a string or a list of items", "input")
    for item in items:
        if not isinstance(item, dict):
            raise bad_request("input items must be objects", "input")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role", "user"),
                             "content": item.get("content")})
        elif kind in ("function_call", "custom_tool_call"):
            args = item.get("arguments") if kind == "function_call" else item.get("input")
            call = {"id": item.get("call_id") or item.get("id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": args or ""}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None,
                                 "tool_calls": [call]})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": item.get("output")})
        # reasoning and other item types carry nothing the model needs again
    chat = {k: v for k, v in body.items() if k not in ("input", "instructions")}
    chat["messages"] = messages
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(
        body.get("reasoning"), dict) else None
    if effort and "reasoning_effort" not in chat:
        chat["reasoning_effort"] = effort
    return chat


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.S)


def parse_message(raw, index, reasoning_mode):
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise bad_request(f"{where} must be an object", "messages")
    role = raw.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool", "function"):
        raise bad_request(f"{where}.role must be one of system, developer, "
                          f"user, assistant, tool", "messages")
    images = []
    text = content_to_text(raw.get("content"), images if role == "user" else None,
                           where)
    if role == "developer":
        role = "system"
    msg = Message(role=role, text=text, images=images)
    if role == "function":      # legacy function results
        msg.role, msg.tool_call_id, msg.name = "tool", raw.get("name"), raw.get("name")
    elif role == "tool":
        msg.tool_call_id = raw.get("tool_call_id")
        if not isinstance(msg.tool_call_id, str) or not msg.tool_call_id:
            raise bad_request(f"{where}.tool_call_id is required", "messages")
    elif role == "assistant":
        if reasoning_mode == "think":
            msg.text = THINK_BLOCK.sub("", msg.text)
        calls = raw.get("tool_calls") or []
        if isinstance(raw.get("function_call"), dict):
            calls = [{"id": raw["function_call"].get("name"), "type": "function",
                      "function": raw["function_call"]}]
        for call in calls if isinstance(calls, list) else []:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_request(f"{where}.tool_calls entries need a function "
                                  f"name", "messages")
            args = fn.get("arguments")
            if not isinstance(args, str):
                args = json.dumps(args if args is not None else {})
            msg.tool_calls.append(ToolCall(str(call.get("id") or ""), fn["name"], args))
    return msg


def parse_chat_request(body, reasoning_mode="content"):
    """Validate a Chat Completions (or Responses-shaped) body -> ChatRequest."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    if "messages" not in body and "input" in body:
        body = responses_body_to_chat(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    n = body.get("n")
    if n not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    model = body.get("model") or None       # "" too means Codex's default
    if model is not None and not (isinstance(model, str) and MODEL_NAME.fullmatch(model)):
        raise bad_request("model must be a name of letters, digits and . _ - : / @ +",
                          "model", "invalid_model")
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS + ("none",):
        raise bad_request(f"reasoning_effort must be one of {', '.join(EFFORTS)}",
                          "reasoning_effort")
    stream_options = body.get("stream_options")
    tool_choice = body.get("tool_choice", "auto")
    if tool_choice is None:
        tool_choice = "auto"
    return ChatRequest(
        model=model or None,
        messages=[parse_message(m, i, reasoning_mode) for i, m in enumerate(messages)],
        stream=bool(body.get("stream")),
        include_usage=bool(isinstance(stream_options, dict)
                           and stream_options.get("include_usage")),
        tools=normalize_tools(body.get("tools")),
        tool_choice=tool_choice,
        reasoning_effort=None if effort == "none" else effort)


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
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if name:
            return f"You must call the tool `{name}` in your reply."
    return ""


def render_instructions(messages, tools, tool_choice):
    """The model's instructions: a neutral preamble, then the client's system
    and developer text verbatim, then what `tool_choice` asks for."""
    parts = [INSTRUCTIONS_PREAMBLE]
    parts += [m.text for m in messages if m.role == "system" and m.text]
    extra = tool_choice_instruction(tool_choice, tools)
    if extra:
        parts.append(extra)
    return "\n\n".join(parts) + "\n"


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


# ---------------------------------------------------------------------------
# Codex events -> OpenAI shapes (pure)
# ---------------------------------------------------------------------------

def translate_codex_event(event):
    """One parsed `codex exec --json` line -> [(kind, payload)].

    Kinds: thread, text, reasoning, warning, completed, failed, unexpected.
    Text is taken from completed items only, so it goes out exactly once."""
    etype = event.get("type")
    if etype == "thread.started":
        return [("thread", event.get("thread_id"))]
    if etype == "turn.completed":
        return [("completed", event.get("usage") or {})]
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


def openai_usage(usage):
    """Codex turn usage -> Chat Completions usage."""
    usage = usage or {}
    prompt = int(usage.get("input_tokens") or 0)
    completion = int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {
                "cached_tokens": int(usage.get("cached_input_tokens") or 0)},
            "completion_tokens_details": {
                "reasoning_tokens": int(usage.get("reasoning_output_tokens") or 0)}}


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


def classify_failure(message):
    """A failed Codex turn's message -> the ProxyError a client should see."""
    lower = message.lower()
    if "usage limit" in lower or "usage_limit" in lower or "rate limit" in lower:
        seconds = retry_after_seconds(message)
        headers = {"Retry-After": str(seconds)} if seconds else {}
        return ProxyError(429, message, "rate_limit_error", "usage_limit_reached",
                          headers=headers)
    if ("401" in lower and "unauthorized" in lower) or "not logged in" in lower \
            or "authentication" in lower or "token_expired" in lower:
        return ProxyError(401, message + " (run `codex login` on the proxy's "
                          "machine)", "authentication_error", "codex_unauthorized")
    if "context window" in lower or "context_length" in lower \
            or "maximum context" in lower:
        return ProxyError(400, message, "invalid_request_error",
                          "context_length_exceeded")
    return ProxyError(502, message, "api_error", "codex_error")


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


def sse(data):
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


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
    api_keys: tuple = ()
    insecure_no_key: bool = False
    max_body: int = DEFAULT_MAX_BODY
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
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


def read_codex_config(codex_home):
    """The keys of $CODEX_HOME/config.toml that the proxy forwards to Codex."""
    path = os.path.join(codex_home, "config.toml")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProxyError(500, f"cannot read {path}: {exc}", "server_error",
                         "codex_config_invalid")
    return {k: data[k] for k in FORWARDED_CONFIG_KEYS if k in data}


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


def resolve_codex(codex_bin, windows=os.name == "nt"):
    """The argv prefix that runs Codex, or None when it cannot be found.

    On Windows npm installs a `codex.cmd` shim; running it would route our
    arguments through cmd.exe's quoting, so run its node script directly.
    The shim sits beside node_modules (npm -g) or in node_modules/.bin."""
    path = shutil.which(codex_bin) or (codex_bin if os.path.isfile(codex_bin) else None)
    if path is None:
        return None
    path = os.path.abspath(path)
    if windows and path.lower().endswith((".cmd", ".bat")):
        folder = os.path.dirname(path)
        node = shutil.which("node") or os.path.join(folder, "node.exe")
        for modules in (os.path.join(folder, "node_modules"), os.path.dirname(folder)):
            script = os.path.join(modules, "@openai", "codex", "bin", "codex.js")
            if os.path.isfile(script) and os.path.isfile(node):
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
    """Where Codex is, its version and login state, cached and refreshed."""

    def __init__(self, config, env, clock=time.monotonic, on_refresh=None):
        self._config = config
        self._env = env
        self._clock = clock
        self._on_refresh = on_refresh       # called after each check, outside the lock
        # _lock guards the cached fields below; checks run outside it.
        self._lock = threading.Lock()
        self.argv = None
        self.version = None
        self.logged_in = None
        self._checked_at = None

    def refresh(self):
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
        if self._on_refresh is not None:
            self._on_refresh(argv, version)
        return self

    def snapshot(self, max_age=LOGIN_CACHE_SECONDS):
        """(argv, version, logged_in), refreshed when older than max_age.

        A stale "logged in" answer is used while a refresh runs behind it; a
        stale "not logged in" is checked again at once, so a user who just
        ran `codex login` is not refused."""
        with self._lock:
            age = None if self._checked_at is None else self._clock() - self._checked_at
            state = (self.argv, self.version, self.logged_in)
        if age is None or (age > max_age and not state[2]):
            self.refresh()
        elif age > max_age:
            with self._lock:
                self._checked_at = self._clock()   # one refresh at a time
            threading.Thread(target=self.refresh, name="codex-info", daemon=True).start()
        with self._lock:
            return self.argv, self.version, self.logged_in


def build_model_catalog(codex_argv, env, state_dir, version):
    """Write Codex's model catalog with tool search and apply_patch turned off.

    Catalog models otherwise see MCP tools only behind `tool_search`, and a
    direct call to a client tool loops on `unsupported call` (PROTOCOL.md 3).
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
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    return path, [m.get("slug") for m in data["models"]
                  if isinstance(m, dict) and m.get("visibility") == "list"]


# ---------------------------------------------------------------------------
# The Codex runner
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class PendingCall:
    """A client tool call the bridge is holding open, waiting for its result."""
    call: ToolCall
    sent: bool = False                  # reached the client in a response
    result: tuple | None = None         # (text, is_error)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class CodexRun:
    """One `codex exec` process: its events, its tool calls and its files.

    The reader thread turns stdout's JSONL into (kind, payload) items on
    `events`; the bridge listener adds ("tool_call", PendingCall) items.  The
    HTTP handler that owns the run at the moment consumes them.  A run outlives
    an HTTP response when it parks on tool calls."""

    def __init__(self, run_id, argv, env, tempdir, tools, known_ids):
        self.id = run_id
        self.argv = argv
        self.env = env
        self.tempdir = tempdir
        self.secret = secrets.token_hex(24)
        self.tools = {t.name: t for t in tools}
        self.events = queue.Queue()
        self.stderr_tail = collections.deque(maxlen=40)
        self.proc = None
        self.thread_id = None
        self.model = None           # as passed to Codex, for the log
        self.effort = None
        self.exited = threading.Event()
        # _lock guards _calls and _used_ids; bridge threads and handlers share them.
        self._lock = threading.Lock()
        self._calls = {}
        self._used_ids = set(known_ids)

    # -- process -----------------------------------------------------------
    def start(self, prompt):
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=os.path.join(self.tempdir, "work"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_group_kwargs())
        threading.Thread(target=self._read_stdout, name=f"codex-out-{self.id}",
                         daemon=True).start()
        threading.Thread(target=self._read_stderr, name=f"codex-err-{self.id}",
                         daemon=True).start()
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

    def _read_stderr(self):
        for raw in iter(self.proc.stderr.readline, b""):
            self.stderr_tail.append(raw.decode("utf-8", "replace").rstrip())
        self.proc.stderr.close()

    def stop(self, reason="The request ended before the tool result arrived.", grace=0.0):
        """Answer open calls with an error, stop the process tree, remove files.

        `grace` lets a Codex that has finished its turn exit on its own first."""
        if grace:
            self.exited.wait(grace)
        with self._lock:
            open_calls = [p for p in self._calls.values() if not p.done.is_set()]
        for pending in open_calls:
            self._finish_call(pending, reason, True)
        if self.proc is not None:
            stop_process_tree(self.proc)
        shutil.rmtree(self.tempdir, ignore_errors=True)

    # -- tool calls --------------------------------------------------------
    def add_call(self, call_id, name, arguments):
        """Register a call from the bridge and queue it for the client."""
        spec = self.tools.get(name)
        if spec is not None and spec.custom and isinstance(arguments, dict):
            text = arguments.get("input")
            arguments = text if isinstance(text, str) else json.dumps(arguments)
        elif not isinstance(arguments, str):
            arguments = json.dumps(arguments if arguments is not None else {},
                                   ensure_ascii=False)
        with self._lock:
            if not call_id or call_id in self._used_ids:
                call_id = "call_" + secrets.token_hex(12)
            self._used_ids.add(call_id)
            pending = PendingCall(ToolCall(call_id, name, arguments))
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
        self._finish_call(pending, text, is_error)
        return True

    def _finish_call(self, pending, text, is_error):
        pending.result = (text, is_error)
        pending.done.set()


def make_run_files(tempdir, instructions, images):
    """Write the instructions and images a run needs; return their paths."""
    workdir = os.path.join(tempdir, "work")       # Codex's empty working root
    os.mkdir(workdir)
    instructions_path = os.path.join(tempdir, "instructions.md")
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
        path = os.path.join(tempdir, f"image-{n + 1}{ext}")
        with open(path, "wb") as f:
            f.write(data)
        image_paths.append(path)
    return workdir, instructions_path, image_paths


def codex_argv(prefix, *, model, effort, user_config, extra_config, workdir,
               instructions_path, images=(), bridge_config=None, catalog=None,
               bridge_timeout=DEFAULT_TOOL_RESULT_TIMEOUT):
    """The full `codex exec` command line for one run."""
    argv = [*prefix, "exec"]
    for path in images:
        argv += ["-i", path]
    argv += FORWARDER_FLAGS
    argv += ["-C", workdir]
    for key in FORWARDED_CONFIG_KEYS:
        if key == "model" or key not in user_config:
            continue
        if key == "model_reasoning_effort" and effort:
            continue
        argv += ["-c", f"{key}={toml_value(user_config[key])}"]
    if effort:
        argv += ["-c", f"model_reasoning_effort={toml_value(effort)}"]
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


# ---------------------------------------------------------------------------
# Parked turns
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


# ---------------------------------------------------------------------------
# The MCP bridge (runs inside Codex as `codex_proxy.py --mcp-bridge FILE`)
# ---------------------------------------------------------------------------

class BridgeRelayHandler(socketserver.StreamRequestHandler):
    """Proxy side of the bridge: one connection per tool call.

    The bridge sends {"run", "secret", "call_id", "name", "arguments"} as one
    line; the answer line {"text", "is_error"} is written when the client's
    result arrives (or the run ends)."""

    def handle(self):
        proxy = self.server.proxy
        try:
            request = json.loads(self.rfile.readline(proxy.config.max_body) or b"null")
        except ValueError:
            return
        if not isinstance(request, dict):
            return
        run = proxy.find_run(str(request.get("run", "")))
        if run is None or not hmac.compare_digest(
                run.secret.encode(), str(request.get("secret", "")).encode()):
            self._reply("unknown run or bad secret", True)
            return
        pending = run.add_call(request.get("call_id"), str(request.get("name", "")),
                               request.get("arguments"))
        while not pending.done.wait(1.0):
            if run.exited.is_set() or proxy.stopping.is_set():
                return
        self._reply(*pending.result)

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
        super().__init__(("127.0.0.1", 0), BridgeRelayHandler)


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
    request = {"run": conf["run"], "secret": conf["secret"],
               "call_id": meta.get("callId") or meta.get("call_id"),
               "name": params.get("name"), "arguments": params.get("arguments") or {}}
    host, _, port = conf["relay"].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.settimeout(None)
            sock.sendall(json.dumps(request).encode() + b"\n")
            line = sock.makefile("rb").readline()
        answer = json.loads(line)
    except (OSError, ValueError):
        answer = {"text": "The proxy did not return a result for this call.",
                  "is_error": True}
    send({"jsonrpc": "2.0", "id": msg_id, "result": {
        "content": [{"type": "text", "text": str(answer.get("text", ""))}],
        "isError": bool(answer.get("is_error"))}})


# ---------------------------------------------------------------------------
# Responses: streamed (SSE) and buffered (one JSON object)
# ---------------------------------------------------------------------------

class StreamResponder:
    """Writes one chat.completion.chunk stream on a chunked HTTP response."""

    def __init__(self, handler, model, include_usage, reasoning_mode):
        self.handler = handler
        self.model = model
        self.include_usage = include_usage
        self.reasoning_mode = reasoning_mode
        self.id = new_completion_id()
        self.created = int(time.time())
        self.content = []
        self.reasoning_text = []
        self.calls = []
        self.started = False

    def _chunk(self, delta=None, finish_reason=None, usage=None):
        return make_chunk(self.id, self.created, self.model, delta, finish_reason, usage)

    def open(self):
        """Headers and the role chunk, at once, before Codex says anything."""
        h = self.handler
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("X-Accel-Buffering", "no")
        h.end_headers()
        self.started = True
        h.write_chunk(sse(self._chunk({"role": "assistant", "content": ""})))

    def text(self, text):
        if self.content and text:
            text = "\n\n" + text
        self.content.append(text)
        self.handler.write_chunk(sse(self._chunk({"content": text})))

    def reasoning(self, text):
        self.reasoning_text.append(text)
        if self.reasoning_mode == "content":
            self.handler.write_chunk(sse(self._chunk({"reasoning_content": text})))
        elif self.reasoning_mode == "think":
            self.text(f"<think>\n{text}\n</think>")

    def tool_calls(self, calls):
        self.calls += calls
        data = b"".join(sse(c) for c in tool_call_chunks(
            self.id, self.created, self.model, calls, len(self.calls) - len(calls)))
        self.handler.write_chunk(data)

    def finish(self, reason, usage):
        data = sse(self._chunk({}, reason))
        if self.include_usage:
            data += sse(self._chunk(usage=usage))
        self.handler.write_chunk(data + b"data: [DONE]\n\n")
        self.handler.end_chunks()

    def fail(self, error):
        self.handler.write_chunk(sse(error.body()) + b"data: [DONE]\n\n")
        self.handler.end_chunks()

    def keepalive(self):
        self.handler.write_chunk(b": keepalive\n\n")


class BufferResponder(StreamResponder):
    """Collects the turn and answers with one chat.completion object."""

    def open(self):
        pass

    def text(self, text):
        self.content.append(text)

    def reasoning(self, text):
        self.reasoning_text.append(text)
        if self.reasoning_mode == "think":
            self.content.append(f"<think>\n{text}\n</think>")

    def tool_calls(self, calls):
        self.calls += calls

    def finish(self, reason, usage):
        reasoning = "\n\n".join(self.reasoning_text) if self.reasoning_mode == "content" else ""
        body = make_completion(self.id, self.created, self.model,
                               "\n\n".join(t for t in self.content if t), reasoning,
                               self.calls, reason, usage)
        self.handler.send_json(200, body)

    def fail(self, error):
        self.handler.send_error_body(error)

    def keepalive(self):
        pass


# ---------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------

ROUTES = {"/chat/completions": ("POST",), "/models": ("GET",), "/health": ("GET",),
          "/logs": ("GET",), "/logs/stream": ("GET",)}
OPEN_ROUTES = ("/health",)


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Routes /v1/... and /... to the chat, models, health and log endpoints."""

    protocol_version = "HTTP/1.1"
    server_version = f"codex-openai-proxy/{__version__}"
    error_content_type = "application/json"
    timeout = CONNECTION_IDLE_SECONDS   # an idle kept-alive client does not hold a thread forever

    # -- plumbing ----------------------------------------------------------
    def setup(self):
        super().setup()
        self.server.track_connection(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.track_connection(self.connection, False)

    def log_message(self, format, *args):
        pass        # the proxy's own log records what matters

    def end_headers(self):
        self.send_header("Access-Control-Allow-Origin", "*")
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
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
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

    # -- entry points ------------------------------------------------------
    def do_OPTIONS(self):
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods",
                         self.headers.get("Access-Control-Request-Method")
                         or "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers",
                         self.headers.get("Access-Control-Request-Headers")
                         or "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "86400")
        self.send_header("Content-Length", "0")
        self.end_headers()

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

    def dispatch(self, method):
        self.request_id = "req_" + secrets.token_hex(5)
        try:
            if self.server.stopping.is_set():   # a kept-alive connection outlived the server
                raise ProxyError(503, "the proxy is shutting down", "server_error",
                                 code="shutting_down")
            route = self.route
            if route not in ROUTES:
                raise ProxyError(404, f"no route {method} {route}; this proxy serves "
                                 "/v1/chat/completions and /v1/models", code="not_found")
            if method not in ROUTES[route]:
                raise ProxyError(405, f"{route} takes {', '.join(ROUTES[route])}, "
                                 f"not {method}", code="method_not_allowed",
                                 headers={"Allow": ", ".join(ROUTES[route])})
            self.server.check_access(self, route)
            getattr(self, "handle_" + route.strip("/").replace("/", "_"))()
        except ProxyError as error:
            try:
                self.send_error_body(error)
            except DISCONNECT_ERRORS + (OSError,):
                self.close_connection = True
        except DISCONNECT_ERRORS:
            self.close_connection = True
        except Exception as exc:   # never a traceback to the client
            self.server.logs.add("internal_error", self.request_id,
                                 error=f"{type(exc).__name__}: {exc}")
            try:
                self.send_error_body(ProxyError(500, "internal proxy error; see the "
                                                "proxy's log", "server_error"))
            except DISCONNECT_ERRORS + (OSError,):
                self.close_connection = True
        finally:
            if self.server.stopping.is_set():
                self.close_connection = True

    def read_json_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = self._read_chunked_body()
        else:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise bad_request("bad Content-Length")
            if length > self.server.config.max_body:
                self.close_connection = True
                raise ProxyError(413, f"request body over {self.server.config.max_body} "
                                 "bytes (raise --max-body)", code="request_too_large")
            data = self.rfile.read(length)
        try:
            return json.loads(data or b"null")
        except ValueError as exc:
            raise bad_request(f"request body is not valid JSON: {exc}")

    def _read_chunked_body(self):
        parts, total = [], 0
        while True:
            size = int(self.rfile.readline(64).split(b";")[0] or b"0", 16)
            if size == 0:
                self.rfile.readline(64)
                return b"".join(parts)
            total += size
            if total > self.server.config.max_body:
                self.close_connection = True
                raise ProxyError(413, "request body too large", code="request_too_large")
            parts.append(self.rfile.read(size))
            self.rfile.readline(64)

    # -- small endpoints ---------------------------------------------------
    def handle_health(self):
        _, version, logged_in = self.server.codex.snapshot()
        self.send_json(200, {"status": "ok", "codex_version": version,
                             "logged_in": logged_in, "version": __version__,
                             "parked_turns": len(self.server.parked)})

    def handle_models(self):
        self.send_json(200, {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "codex-openai-proxy"}
            for name in self.server.model_names()]})

    def handle_logs(self):
        html = self.server.logs_page()
        wants_json = self.query.get("format", [""])[0] == "json" or \
            "text/html" not in self.headers.get("Accept", "")
        if html is not None and not wants_json:
            data = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-cache")
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
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
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

    # -- chat --------------------------------------------------------------
    def handle_chat_completions(self):
        server = self.server
        body = self.read_json_body()
        request = parse_chat_request(body, server.config.reasoning)
        self.log_incoming(request)
        run = server.resume_run(request, self.request_id)
        if run is None:
            run = server.start_run(request, self.request_id)   # counts as active
        else:
            server.enter_active()
        self.serve_turn(run, request)

    def log_incoming(self, request):
        fields = {"model": request.model, "stream": request.stream,
                  "messages": len(request.messages), "tools": len(request.tools),
                  "client": self.client_address[0]}
        if self.server.config.log_bodies:
            fields["prompt"] = render_prompt(request.messages)[-4000:]
        self.server.logs.add("incoming_request", self.request_id, **fields)

    def serve_turn(self, run, request):
        """Relay one run to this response; keep it parked if it called tools."""
        server, logs = self.server, self.server.logs
        responder_cls = StreamResponder if request.stream else BufferResponder
        out = responder_cls(self, request.model, request.include_usage,
                            server.config.reasoning)
        started = time.monotonic()
        outcome = "failed"
        try:
            out.open()
            outcome, usage, reason = TurnPump(server, run, out, self).run()
            logs.add("cursor_response", self.request_id, turn=run.id,
                     finish_reason=reason, duration_ms=int((time.monotonic() - started) * 1000),
                     usage=usage, tool_calls=len(out.calls),
                     **({"answer": "\n\n".join(out.content)[-4000:]}
                        if server.config.log_bodies else {}))
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


class TurnPump:
    """Moves one run's events to one response until the turn ends or parks."""

    def __init__(self, server, run, out, handler):
        self.server, self.run_, self.out, self.handler = server, run, out, handler
        self.config = server.config
        self.calls = []
        self.last_warning = None

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
            if kind == "tool_call":
                self.calls.append(payload)
                self.server.logs.add("tool_call_forwarded", self.handler.request_id,
                                     turn=self.run_.id, name=payload.call.name,
                                     call_id=payload.call.id,
                                     argument_bytes=len(payload.call.arguments))
                quiet_until = last_event + cfg.tool_quiet
                continue
            result = self.handle_event(kind, payload)
            if result is not None:
                return result

    def handle_event(self, kind, payload):
        logs, rid, run = self.server.logs, self.handler.request_id, self.run_
        if kind == "thread":
            run.thread_id = payload
            logs.add("codex_forward", rid, turn=run.id, thread_id=payload,
                     mapped_model=run.model, effort=run.effort, pid=run.proc.pid)
        elif kind == "text":
            self.out.text(payload[1])
        elif kind == "reasoning":
            logs.add("reasoning_detected", rid, turn=run.id, summary_chars=len(payload[1]))
            self.out.reasoning(payload[1])
        elif kind == "warning":
            self.last_warning = payload or self.last_warning
            logs.add("codex_warning", rid, turn=run.id, message=payload[:500])
        elif kind == "unexpected":
            logs.add("codex_warning", rid, turn=run.id,
                     message=f"Codex produced a {payload} item; it should have no such tool")
        elif kind == "completed":
            usage = openai_usage(payload)
            self.out.finish("stop", usage)
            return "done", usage, "stop"
        elif kind == "failed":
            raise classify_failure(payload)
        elif kind == "exit":
            code, plain = payload
            detail = plain or self.last_warning or "\n".join(list(run.stderr_tail)[-5:])
            raise classify_failure(f"Codex exited (code {code}) without finishing the "
                                   f"turn: {detail or 'no output'}")
        return None

    def park(self):
        """End the response with the calls; the run waits for their results.

        The run is parked before the calls are written, so a client that
        answers at once always finds it."""
        for pending in self.calls:
            pending.sent = True
        self.server.park(self.run_)
        usage = openai_usage({})      # the turn's usage comes with its last response
        try:
            self.out.tool_calls([p.call for p in self.calls])
            self.out.finish("tool_calls", usage)
        except DISCONNECT_ERRORS:
            if self.server.parked.discard(self.run_):
                raise           # nobody has the calls: end the run as a disconnect
        return "parked", usage, "tool_calls"


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

class ProxyServer(http.server.ThreadingHTTPServer):
    """Owns the shared state: config, log buffer, runs, parked turns."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, config, log_stream=sys.stderr, clock=time.monotonic):
        self.config = config
        self.clock = clock
        self.logs = LogBuffer(config.log_size, None if config.quiet else log_stream)
        self.env = dict(os.environ)
        if config.codex_home:
            self.env["CODEX_HOME"] = config.codex_home
        self.codex = CodexInfo(config, self.env, on_refresh=self._codex_checked)
        self.parked = ParkedTurns(config.max_parked, config.tool_result_timeout, clock)
        self.stopping = threading.Event()
        self.instance = secrets.token_hex(6)    # lets the log page notice a restart
        self.catalog_path, self.catalog_models = None, []
        # _catalog_lock guards _catalog_version; the build itself runs outside it.
        self._catalog_lock = threading.Lock()
        self._catalog_version = None
        # _lock guards _runs, _active and _connections.
        self._lock = threading.Lock()
        self._runs = {}
        self._active = 0
        self._connections = set()
        self._logs_html = None
        self._bridge_thread = None
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        super().__init__((config.host, config.port), ProxyHandler)
        self.bridge = BridgeListener(self)

    # -- lifecycle ---------------------------------------------------------
    def start_background(self):
        """Check Codex, build the model catalog, start the helper threads."""
        self.codex.refresh()        # builds the model catalog too
        self._bridge_thread = threading.Thread(
            target=self.bridge.serve_forever, kwargs={"poll_interval": 0.2},
            name="bridge-listener", daemon=True)
        self._bridge_thread.start()
        threading.Thread(target=self._reap_parked, name="parked-reaper",
                         daemon=True).start()

    def _codex_checked(self, argv, version):
        """Build the model catalog at start-up and whenever Codex's version changes."""
        with self._catalog_lock:        # one build per version, even when checks race
            if argv is None or version == self._catalog_version:
                return
            self._catalog_version = version
        state_dir = self.config.state_dir or default_state_dir()
        try:
            self.catalog_path, self.catalog_models = build_model_catalog(
                argv, self.env, state_dir, version)
        except OSError as exc:
            self.logs.add("codex_warning", message=f"model catalog not written: {exc}")

    def close(self):
        """Stop serving and end every Codex process, parked or running."""
        self.stopping.set()
        for run in self.parked.take_all():
            self.end_run(run, "parked_shutdown")
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            self.end_run(run, "shutdown")
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

    def track_connection(self, connection, is_open):
        with self._lock:
            (self._connections.add if is_open else self._connections.discard)(connection)

    def _reap_parked(self):
        while not self.stopping.wait(min(1.0, max(0.05, self.config.tool_result_timeout / 10))):
            for run in self.parked.take_due():
                self.expire(run, "tool_result_timeout")

    def expire(self, run, reason):
        self.logs.add("parked_expired", None, turn=run.id, reason=reason,
                      pending=sorted(run.open_call_ids(sent_only=False)))
        self.end_run(run, reason)

    def end_run(self, run, reason):
        with self._lock:
            self._runs.pop(run.id, None)
        if reason == "done":    # Codex exits by itself; reap it off the request path
            threading.Thread(target=run.stop, kwargs={"grace": KILL_GRACE_SECONDS},
                             name=f"reap-{run.id}", daemon=True).start()
        else:
            run.stop(f"The tool call was abandoned ({reason}).")

    def find_run(self, run_id):
        with self._lock:
            return self._runs.get(run_id)

    # -- access ------------------------------------------------------------
    def check_access(self, handler, route):
        if route in OPEN_ROUTES or (route == "/logs" and self.logs_page() is not None):
            return      # /logs checks the key itself before answering JSON
        self.require_key(handler)

    def require_key(self, handler):
        if not self.config.api_keys:
            tunnel = [h for h in TUNNEL_HEADERS if handler.headers.get(h)]
            if tunnel:
                self.logs.add("auth_rejected", handler.request_id, reason="tunnel_without_key",
                              client=handler.client_address[0])
                raise ProxyError(403, "this request came through a tunnel or proxy "
                                 f"({tunnel[0]} header) but the proxy has no API key: "
                                 "restart it with --api-key KEY (or CODEX_PROXY_API_KEY) "
                                 "and set the same key in your client",
                                 "permission_error", "api_key_required")
            return
        offered = self._offered_key(handler.headers)
        if offered is None or not any(hmac.compare_digest(offered.encode(), k.encode())
                                      for k in self.config.api_keys):
            self.logs.add("auth_rejected", handler.request_id,
                          reason="missing_key" if offered is None else "wrong_key",
                          client=handler.client_address[0])
            raise ProxyError(401, "invalid or missing API key: send Authorization: "
                             "Bearer <key> with the key the proxy was started with",
                             "authentication_error", "invalid_api_key")

    @staticmethod
    def _offered_key(headers):
        auth = headers.get("Authorization") or ""
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        return headers.get("api-key") or headers.get("x-api-key")

    # -- runs --------------------------------------------------------------
    def enter_active(self):
        with self._lock:
            self._active += 1

    def leave_active(self, run, outcome):
        with self._lock:
            self._active -= 1
        if outcome != "parked":
            self.end_run(run, outcome)

    def park(self, run):
        for evicted in self.parked.park(run):
            self.expire(evicted, "max_parked")

    def check_ready(self):
        argv, _, logged_in = self.codex.snapshot()
        if argv is None:
            raise ProxyError(503, f"the Codex CLI was not found (--codex-bin "
                             f"{self.config.codex_bin!r}); install it with "
                             f"`{INSTALL_HINT}`, then run `codex login`", "server_error",
                             "codex_not_found")
        user_config = read_codex_config(self.config.codex_home_dir)
        if not logged_in and not uses_custom_provider(user_config, self.config.codex_config):
            raise ProxyError(401, "Codex is not logged in: run `codex login` on the "
                             "proxy's machine (with your ChatGPT account), then retry",
                             "authentication_error", "codex_not_logged_in")
        return argv, user_config

    def start_run(self, request, request_id):
        """Admit the request and start a fresh Codex for it."""
        argv_prefix, user_config = self.check_ready()
        results = trailing_tool_results(request.messages)
        if results:
            self.logs.add("fallback_transcript", request_id, results=len(results))
        with self._lock:
            if self._active >= self.config.max_concurrent:
                raise ProxyError(429, f"{self._active} Codex runs are busy "
                                 "(--max-concurrent); retry shortly", "rate_limit_error",
                                 "too_many_concurrent_requests", headers={"Retry-After": "2"})
            self._active += 1
        try:
            return self._spawn(request, argv_prefix, user_config)
        except BaseException:
            with self._lock:
                self._active -= 1
            raise

    def _spawn(self, request, argv_prefix, user_config):
        model, effort = resolve_model(request.model, self.config.aliases)
        effort = request.reasoning_effort or effort
        tools = request.tools if request.tool_choice != "none" else []
        known = {c.id for m in request.messages for c in m.tool_calls}
        tempdir = tempfile.mkdtemp(prefix="codex-proxy-")
        run = CodexRun("turn_" + secrets.token_hex(5), [], self.env, tempdir, tools, known)
        run.model, run.effort = model or user_config.get("model"), effort
        try:
            workdir, instructions, images = make_run_files(
                tempdir, render_instructions(request.messages, tools, request.tool_choice),
                [url for m in request.messages for url in m.images])
            bridge_path = self._write_bridge_config(run, tools) if tools else None
            run.argv = codex_argv(
                argv_prefix, model=model, effort=effort, user_config=user_config,
                extra_config=self.config.codex_config, workdir=workdir,
                instructions_path=instructions, images=images,
                bridge_config=bridge_path, catalog=self.catalog_path,
                bridge_timeout=self.config.tool_result_timeout)
            with self._lock:
                self._runs[run.id] = run
            run.start(render_prompt(request.messages))
        except OSError as exc:
            self.end_run(run, "spawn_failed")
            raise ProxyError(503, f"could not start Codex: {exc}", "server_error",
                             "codex_not_found")
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
        """The parked run these tool results answer, with the results delivered."""
        results = trailing_tool_results(request.messages)
        history_ids = {c.id for m in request.messages for c in m.tool_calls}
        run = self.parked.claim(r.tool_call_id for r in results) if results else None
        for stale in self.parked.take_mentioning(history_ids):
            self.expire(stale, "history_changed")
        if run is None:
            return None
        run.remember_ids(history_ids)
        answered = {}
        for result in results:
            if run.answer(result.tool_call_id, result.text):
                answered[result.tool_call_id] = len(result.text)
                self.logs.add("tool_result_received", request_id, turn=run.id,
                              call_id=result.tool_call_id, result_chars=len(result.text))
        for missing in run.open_call_ids():
            run.answer(missing, "The client sent no result for this call.", True)
        self.logs.add("turn_resumed", request_id, turn=run.id, results=len(answered))
        return run

    # -- content -----------------------------------------------------------
    def model_names(self):
        user_config = read_codex_config(self.config.codex_home_dir)
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


def build_parser():
    e = os.environ.get
    p = argparse.ArgumentParser(
        prog="codex_proxy.py",
        description="OpenAI Chat Completions API backed by `codex exec` "
                    "(your ChatGPT subscription). Every flag has an environment variable.")
    p.add_argument("--addr", type=parse_addr, default=e("CODEX_OPENAI_PROXY_ADDR", DEFAULT_ADDR),
                   help=f"HOST:PORT to listen on (env CODEX_OPENAI_PROXY_ADDR; default {DEFAULT_ADDR})")
    p.add_argument("--codex-bin", default=e("CODEX_BIN", "codex"),
                   help="Codex executable (env CODEX_BIN; default: codex on PATH)")
    p.add_argument("--codex-home", default=e("CODEX_HOME"),
                   help="Codex's home folder with auth and config.toml (env CODEX_HOME; default ~/.codex)")
    p.add_argument("--api-key", action="append", default=None,
                   help="require this key as Authorization: Bearer KEY; repeatable "
                        "(env CODEX_PROXY_API_KEY, comma-separated)")
    p.add_argument("--insecure-no-key", action="store_true", default=env_flag("CODEX_PROXY_INSECURE_NO_KEY"),
                   help="allow a non-loopback --addr without a key (env CODEX_PROXY_INSECURE_NO_KEY=1)")
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
    aliases = args.alias if args.alias is not None else [
        parse_alias(a) for a in split_env_list("CODEX_PROXY_ALIASES")]
    extra = args.codex_config if args.codex_config is not None else \
        split_env_list("CODEX_PROXY_CODEX_CONFIG", ";")
    host, port = args.addr if isinstance(args.addr, tuple) else parse_addr(args.addr)
    html = os.path.join(os.path.dirname(os.path.abspath(__file__)), "logs.html")
    return Config(
        host=host, port=port, codex_bin=args.codex_bin, codex_home=args.codex_home,
        api_keys=tuple(k for key in keys for k in key.split(",") if k.strip()),
        insecure_no_key=args.insecure_no_key, max_body=args.max_body,
        max_concurrent=max(1, args.max_concurrent), idle_timeout=args.idle_timeout,
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
    key = "required" if cfg.api_keys else "none (requests through a tunnel are refused)"
    agents = global_agents_file(cfg.codex_home_dir)
    return (f"codex-openai-proxy {__version__} listening on {base}\n"
            f"  base URL for Cursor / OpenAI clients: {base}/v1\n"
            f"  codex: {codex_line}\n"
            f"  API key: {key}\n"
            f"  logs: {base}/logs\n"
            + (f"  note: Codex sends {agents} to the model with every request; "
               "move it away if that is not wanted\n" if agents else ""))


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.mcp_bridge:
        return run_mcp_bridge(args.mcp_bridge)
    config = config_from_args(args)
    if not config.api_keys and not is_loopback(config.host) and not config.insecure_no_key:
        print(f"refusing to listen on {config.host} without an API key: anyone who can "
              "reach it would use your ChatGPT subscription. Set --api-key KEY "
              "(or CODEX_PROXY_API_KEY), or pass --insecure-no-key.", file=sys.stderr)
        return 2
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
