"""The controller's commands of the ``kvtier`` CLI (kvtier/cli.py registers them).

    kvtier stats | top | lookup | clear | pin | unpin | move | verify | health
    kvtier profile --duration 60s [-o FILE]
    kvtier controller-openapi [-o FILE]

Each command talks to one or several controllers (``--url``, repeatable: one
per rank). Without ``--url``: ``controller_listen`` of the effective
configuration (KVTIER_CONFIG, KVTIER_CONTROLLER_LISTEN), else
http://127.0.0.1:8199. The token: ``--token``, else KVTIER_CONTROLLER_TOKEN,
else ``controller_token_file`` of the configuration. Output is a table;
``--json`` prints the controllers' answers as a JSON list instead.

Exit status: 0 on success; 1 when a controller is unreachable or refuses,
``health`` finds one down, or ``verify`` finds one inconsistent; 2 on a
usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8199"
ENV_TOKEN = "KVTIER_CONTROLLER_TOKEN"
EXIT_FAIL = 1
EXIT_USAGE = 2

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """'60s', '2m', '500ms', '1h', '90' (seconds) -> seconds."""
    m = _DURATION.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 60s, 2m, 500ms)")
    value = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive: {text!r}")
    return value


def parse_tokens(text: str) -> list[int]:
    """'1,2,3', '1 2 3', or '@FILE' holding either or a JSON list."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc.strerror}") from None
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                data = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise argparse.ArgumentTypeError(f"not a JSON list of token ids: {exc}") from None
            if not isinstance(data, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in data):
                raise argparse.ArgumentTypeError("not a JSON list of token ids")
            return data
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError("token ids are integers separated by commas or spaces") from None


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if url.isdigit():
        return f"http://127.0.0.1:{url}"
    if "://" not in url:
        return f"http://{url}"
    return url


def _defaults() -> tuple[str, str]:
    """(URL, token) from the effective configuration; the environment's
    token alone when the configuration cannot be loaded here."""
    from kvtier.config import ConfigError, load_config

    try:
        config = load_config()
    except ConfigError:
        return DEFAULT_URL, os.environ.get(ENV_TOKEN, "")
    url = DEFAULT_URL
    if config.controller_listen:
        from kvtier.controller.server import split_listen, url_host

        host, port = split_listen(config.controller_listen)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        url = f"http://{url_host(host)}:{port}"
    try:
        from kvtier.controller.auth import resolve_token

        token = resolve_token(config)
    except ConfigError:
        token = os.environ.get(ENV_TOKEN, "")
    return url, token


class CommandError(Exception):
    pass


class Controllers:
    """The controllers a command talks to, with one httpx client."""

    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        default_url, default_token = _defaults() if not (args.url and args.token) else ("", "")
        self.urls = [normalize_url(u) for u in (args.url or [default_url])]
        token = args.token or os.environ.get(ENV_TOKEN) or default_token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(headers=headers, timeout=args.timeout)
        self.errors: list[str] = []

    def request(self, url: str, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        """The decoded JSON answer, or None after recording the error."""
        import httpx

        try:
            kwargs: dict[str, Any] = {"json": body} if body is not None else {}
            if timeout is not None:
                kwargs["timeout"] = timeout
            r = self.client.request(method, url + path, **kwargs)
        except httpx.HTTPError as exc:
            self.errors.append(f"{url}: cannot reach the controller: {exc}")
            return None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 400 and not (path == "/health" and r.status_code == 503 and isinstance(data, dict)):
            detail = data.get("detail") if isinstance(data, dict) else r.text[:500]
            self.errors.append(f"{url}: {r.status_code}: {_detail(detail)}")
            return None
        return data

    def each(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> list[tuple[str, Any]]:
        """(url, answer) for every controller that answered, asked concurrently."""
        with ThreadPoolExecutor(max_workers=min(16, len(self.urls))) as pool:
            answers = list(pool.map(lambda u: self.request(u, method, path, body, timeout=timeout), self.urls))
        return [(u, a) for u, a in zip(self.urls, answers) if a is not None]

    def finish(self, code: int = 0) -> int:
        for error in self.errors:
            print(f"kvtier: {error}", file=sys.stderr)
        self.client.close()
        return EXIT_FAIL if self.errors else code


def _detail(detail: Any) -> str:
    if isinstance(detail, list):  # FastAPI's validation errors
        return "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" for d in detail if isinstance(d, dict))
    return str(detail)


# --------------------------------------------------------------------------
# Formatting


def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{int(n)}B"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _column_header(url: str, answer: dict[str, Any]) -> str:
    return f"rank {answer.get('rank', '?')} {url}"


def _ratio(num: float, den: float) -> str:
    return f"{100.0 * num / den:.1f}%" if den else "-"


def _stats_rows(stats: dict[str, Any], rates: dict[str, float] | None = None) -> list[tuple[str, str]]:
    rows = [
        ("hit rate (tokens)", _ratio(stats.get("lookup_hit_tokens", 0), stats.get("lookup_query_tokens", 0))),
        ("lookups", str(stats.get("lookups", 0))),
        ("hit tokens", str(stats.get("lookup_hit_tokens", 0))),
        ("chunks stored", str(stats.get("chunks_stored", 0))),
        ("chunks loaded", str(stats.get("chunks_loaded", 0))),
        ("write-behind queue", str(stats.get("write_behind_queue_depth", 0))),
        ("write-behind dropped", str(stats.get("write_behind_dropped", 0))),
        ("catalogue entries", str(stats.get("catalogue_entries", 0))),
    ]
    if rates is not None:
        rows[1:1] = [(f"{name}/s", f"{value:.1f}") for name, value in rates.items()]
    for tier, t in sorted(stats.get("tiers", {}).items()):
        cap = t.get("capacity_bytes", 0)
        used = t.get("used_bytes", 0)
        rows.append((f"{tier} used / capacity", f"{_bytes(used)} / {_bytes(cap)} ({_ratio(used, cap)})"))
        rows.append((f"{tier} entries", str(t.get("entries", 0))))
        rows.append((f"{tier} evictions", str(t.get("evictions", 0))))
        rows.append((f"{tier} errors", str(t.get("errors", 0))))
    remote = stats.get("remote")
    if isinstance(remote, dict):
        rows.append(("remote connected", str(remote.get("connected", "-")).lower()))
        rows.append(("remote upload queue", str(remote.get("upload_queue_depth", 0))))
        rows.append(("remote errors", str(remote.get("errors", 0))))
    return rows


def _side_by_side(columns: list[tuple[str, list[tuple[str, str]]]]) -> str:
    labels: list[str] = []
    for _, rows in columns:
        for label, _ in rows:
            if label not in labels:
                labels.append(label)
    values = [dict(rows) for _, rows in columns]
    table = [[""] + [header for header, _ in columns]]
    table += [[label] + [v.get(label, "-") for v in values] for label in labels]
    return _table(table)


def _print_json(answers: list[tuple[str, Any]]) -> None:
    print(json.dumps([{"url": u, **a} if isinstance(a, dict) else {"url": u, "answer": a} for u, a in answers], indent=2))


# --------------------------------------------------------------------------
# Commands


def _prefix_body(args: argparse.Namespace, *, required: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.tokens is not None:
        body["tokens"] = args.tokens
    if args.text is not None:
        body["text"] = args.text
        if args.no_special_tokens:
            body["add_special_tokens"] = False
    if args.cache_salt is not None:
        body["cache_salt"] = args.cache_salt
    if required and "tokens" not in body and "text" not in body:
        raise CommandError("give the prefix: --tokens or --text")
    return body


def cmd_stats(args: argparse.Namespace) -> int:
    c = Controllers(args)
    answers = c.each("GET", "/v1/stats")
    if args.json:
        _print_json(answers)
    elif answers:
        print(_side_by_side([(_column_header(u, a), _stats_rows(a["stats"])) for u, a in answers]))
    return c.finish()


_RATE_KEYS = (("lookups", "lookups"), ("hit tokens", "lookup_hit_tokens"), ("tokens loaded", "tokens_loaded"),
              ("chunks stored", "chunks_stored"))


def cmd_top(args: argparse.Namespace) -> int:
    c = Controllers(args)
    previous: dict[str, tuple[float, dict[str, Any]]] = {}
    iteration = 0
    failed = False
    clear = sys.stdout.isatty() and not args.json
    while True:
        answers = c.each("GET", "/v1/stats")
        now = time.monotonic()
        columns = []
        for url, a in answers:
            stats = a["stats"]
            rates: dict[str, float] = {}
            if url in previous:
                t0, s0 = previous[url]
                dt = max(now - t0, 1e-9)
                rates = {name: (stats.get(key, 0) - s0.get(key, 0)) / dt for name, key in _RATE_KEYS}
            else:
                rates = {name: 0.0 for name, _ in _RATE_KEYS}
            previous[url] = (now, stats)
            columns.append((_column_header(url, a), _stats_rows(stats, rates)))
        if clear:
            print("\x1b[H\x1b[2J", end="")
        if args.json:
            print(json.dumps({"time": time.time(), "controllers": [{"url": u, **a} for u, a in answers]}), flush=True)
        else:
            print(f"kvtier top  {time.strftime('%H:%M:%S')}  every {args.interval:g}s  (Ctrl-C to stop)")
            if columns:
                print(_side_by_side(columns))
            print(flush=True)
        for error in c.errors:  # shown per refresh, on stderr
            print(f"kvtier: {error}", file=sys.stderr, flush=True)
        failed = bool(c.errors)
        c.errors.clear()
        iteration += 1
        if args.iterations and iteration >= args.iterations:
            break
        try:
            time.sleep(args.interval)  # the refresh period
        except KeyboardInterrupt:
            break
    return c.finish(EXIT_FAIL if failed else 0)


def cmd_lookup(args: argparse.Namespace) -> int:
    c = Controllers(args)
    answers = c.each("POST", "/v1/lookup", _prefix_body(args))
    if args.json:
        _print_json(answers)
    elif answers:
        columns = []
        for u, a in answers:
            rows = [("cached tokens", f"{a['cached_tokens']} of {a['query_tokens']}"),
                    ("chunk tokens", str(a["chunk_tokens"]))]
            rows += [(f"chunks in {tier}", str(n)) for tier, n in sorted(a["by_tier"].items())]
            rows.append(("pinned chunks", str(sum(1 for ch in a["chunks"] if ch.get("pinned")))))
            columns.append((_column_header(u, a), rows))
        print(_side_by_side(columns))
    return c.finish()


def _simple(path: str, field: str, label: str, body_of: Callable[[argparse.Namespace], dict[str, Any]]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        c = Controllers(args)
        answers = c.each("POST", path, body_of(args))
        if args.json:
            _print_json(answers)
        elif answers:
            print(_table([["controller", label]] + [[_column_header(u, a), str(a[field])] for u, a in answers]))
        return c.finish()

    return run


def _clear_body(args: argparse.Namespace) -> dict[str, Any]:
    body = _prefix_body(args, required=False)
    if args.tier:
        body["tiers"] = args.tier
    if args.older_than is not None:
        body["older_than_s"] = args.older_than
    if args.all:
        body["all"] = True
    if not body or body.keys() <= {"cache_salt"}:
        raise CommandError("nothing selected: give --tier, --tokens/--text, --older-than, or --all")
    return body


def _pin_body(args: argparse.Namespace) -> dict[str, Any]:
    body = _prefix_body(args)
    if args.ttl is not None:
        body["ttl_s"] = args.ttl
    return body


def cmd_move(args: argparse.Namespace) -> int:
    c = Controllers(args)
    body = {**_prefix_body(args), "tier": args.tier}
    answers = c.each("POST", "/v1/move", body)
    results: list[tuple[str, Any]] = []
    if args.wait:
        deadline = time.monotonic() + args.wait_timeout
        for u, a in answers:
            while True:
                task = c.request(u, "GET", f"/v1/tasks/{a['task_id']}")
                if task is None or task["done"]:
                    break
                if time.monotonic() > deadline:
                    c.errors.append(f"{u}: task {a['task_id']} not done after {args.wait_timeout:g}s")
                    break
                time.sleep(0.2)  # polling the task's state
            if task is not None:
                results.append((u, {**a, **task}))
                if task.get("error"):
                    c.errors.append(f"{u}: task {a['task_id']} failed: {task['error']}")
    else:
        results = answers
    if args.json:
        _print_json(results)
    elif results:
        header = ["controller", "task", "done", "result"] if args.wait else ["controller", "task"]
        rows = [header]
        for u, a in results:
            row = [_column_header(u, a), a["task_id"]]
            if args.wait:
                row += [str(a.get("done")).lower(), json.dumps(a.get("result"))]
            rows.append(row)
        print(_table(rows))
    return c.finish()


def cmd_verify(args: argparse.Namespace) -> int:
    c = Controllers(args)
    answers = c.each("POST", "/v1/verify", {"deep": bool(args.deep)}, timeout=args.timeout)
    if args.json:
        _print_json(answers)
    elif answers:
        rows = [["controller", "consistent", "entries", "checked", "ok", "missing", "orphans", "corrupt"]]
        for u, a in answers:
            rows.append([_column_header(u, a), str(a["consistent"]).lower(), str(a["entries"]), str(a["checked"]),
                         str(a["ok"]), json.dumps(a["missing"]), json.dumps(a["orphans"]), str(a["corrupt"])])
        print(_table(rows))
    return c.finish(EXIT_FAIL if any(not a["consistent"] for _, a in answers) else 0)


def cmd_health(args: argparse.Namespace) -> int:
    c = Controllers(args)
    answers = c.each("GET", "/health")
    if args.json:
        _print_json(answers)
    elif answers:
        rows = [["controller", "status", "reasons"]]
        rows += [[_column_header(u, a), a["status"], "; ".join(a["reasons"]) or "-"] for u, a in answers]
        print(_table(rows))
    return c.finish(EXIT_FAIL if any(a["status"] == "down" for _, a in answers) else 0)


def cmd_profile(args: argparse.Namespace) -> int:
    from kvtier.controller.profiler import merge

    c = Controllers(args)
    path = f"/v1/profile?duration_s={args.duration:g}&interval_ms={args.interval * 1000:g}"
    print(f"kvtier: sampling {len(c.urls)} controller(s) for {args.duration:g}s ...", file=sys.stderr)
    answers = c.each("GET", path, timeout=args.duration + args.timeout)
    if answers:
        doc = merge([(f"rank {a.get('name', '?').rsplit(' ', 1)[-1]} {u}", a) for u, a in answers],
                    name=f"kvtier profile {time.strftime('%Y-%m-%d %H:%M:%S')}")
        out = Path(args.output or f"kvtier-profile-{time.strftime('%Y%m%d-%H%M%S')}.speedscope.json")
        out.write_text(json.dumps(doc), encoding="utf-8")
        samples = sum(len(p["samples"]) for p in doc["profiles"])
        print(f"{out}: {len(doc['profiles'])} threads, {samples} samples (speedscope format: "
              "open at https://www.speedscope.app)")
    return c.finish()


def cmd_openapi(args: argparse.Namespace) -> int:
    from kvtier.controller import openapi_schema

    text = json.dumps(openapi_schema(), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


# --------------------------------------------------------------------------
# Parser


def _client_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--url", action="append", metavar="URL",
                   help=f"a controller (repeat for several ranks); default: controller_listen, else {DEFAULT_URL}")
    p.add_argument("--token", help=f"bearer token (default: ${ENV_TOKEN}, else controller_token_file)")
    p.add_argument("--json", action="store_true", help="print the controllers' answers as JSON")
    p.add_argument("--timeout", type=parse_duration, default=30.0, metavar="DURATION",
                   help="per-request timeout (default 30s)")
    return p


def _prefix_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tokens", type=parse_tokens, metavar="IDS", help="token ids: '1,2,3' or @FILE")
    g.add_argument("--text", help="text, tokenized by the served model's tokenizer")
    p.add_argument("--no-special-tokens", action="store_true", help="with --text: do not add BOS")
    p.add_argument("--cache-salt", help="the cache_salt the requests carried")


def add_commands(sub: Any) -> None:
    """Adds the controller commands to kvtier's subparsers."""
    common = _client_options()
    tiers = ("cpu", "disk")  # the local tiers (the shared remote is neither cleared nor a target)

    p = sub.add_parser("stats", parents=[common], help="engine statistics of each controller")
    p.set_defaults(func=_guarded(cmd_stats))

    p = sub.add_parser("top", parents=[common], help="live statistics, refreshed every --interval")
    p.add_argument("--interval", type=parse_duration, default=2.0, metavar="DURATION", help="refresh period (default 2s)")
    p.add_argument("--iterations", type=int, default=0, metavar="N", help="stop after N refreshes (default: never)")
    p.set_defaults(func=_guarded(cmd_top))

    p = sub.add_parser("lookup", parents=[common], help="how much of a prefix is cached, in which tier")
    _prefix_options(p)
    p.set_defaults(func=_guarded(cmd_lookup))

    p = sub.add_parser("clear", parents=[common], help="remove entries (by tier, prefix, age; or --all)")
    _prefix_options(p)
    p.add_argument("--tier", action="append", choices=tiers, help="only this tier (repeatable)")
    p.add_argument("--older-than", type=parse_duration, metavar="DURATION", help="only entries unused for this long")
    p.add_argument("--all", action="store_true", help="everything in the selected tiers")
    p.set_defaults(func=_guarded(_simple("/v1/clear", "cleared", "cleared", _clear_body)))

    p = sub.add_parser("pin", parents=[common], help="pin a prefix's cached chunks")
    _prefix_options(p)
    p.add_argument("--ttl", type=parse_duration, metavar="DURATION", help="unpin by itself after this long")
    p.set_defaults(func=_guarded(_simple("/v1/pin", "pinned", "pinned chunks", _pin_body)))

    p = sub.add_parser("unpin", parents=[common], help="unpin a prefix's chunks")
    _prefix_options(p)
    p.set_defaults(func=_guarded(_simple("/v1/unpin", "unpinned", "unpinned chunks", _prefix_body)))

    p = sub.add_parser("move", parents=[common], help="move a cached prefix to a tier (a background task)")
    _prefix_options(p)
    p.add_argument("--tier", required=True, choices=tiers)
    p.add_argument("--wait", action="store_true", help="wait for the task and print its result")
    p.add_argument("--wait-timeout", type=parse_duration, default=600.0, metavar="DURATION")
    p.set_defaults(func=_guarded(cmd_move))

    p = sub.add_parser("verify", parents=[common], help="check the index against the tiers (exit 1 if inconsistent)")
    p.add_argument("--deep", action="store_true", help="also read every entry back and check its checksums")
    p.set_defaults(func=_guarded(cmd_verify))

    p = sub.add_parser("health", parents=[common], help="ok / degraded / down per controller (exit 1 if one is down)")
    p.set_defaults(func=_guarded(cmd_health))

    p = sub.add_parser("profile", parents=[common],
                       help="sample the engine process's threads; writes a speedscope profile")
    p.add_argument("--duration", type=parse_duration, default=10.0, metavar="DURATION", help="default 10s")
    p.add_argument("--interval", type=parse_duration, default=0.01, metavar="DURATION",
                   help="between samples (default 10ms)")
    p.add_argument("-o", "--output", metavar="FILE", help="default kvtier-profile-<time>.speedscope.json")
    p.set_defaults(func=_guarded(cmd_profile))

    p = sub.add_parser("controller-openapi", help="print the controller's OpenAPI schema (docs/openapi.json)")
    p.add_argument("-o", "--output", metavar="FILE")
    p.set_defaults(func=_guarded(cmd_openapi))


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CommandError as exc:
            print(f"kvtier: {exc}", file=sys.stderr)
            return EXIT_USAGE

    return run
