"""The ``kvtier`` command.

    kvtier version              print the package version
    kvtier config               print the effective configuration and the
                                source of each value (default/file/env/override)
    kvtier config --check FILE  validate a YAML configuration file
    kvtier bench ...            the benchmarks (kvtier.bench.cli), imported lazily
    kvtier stats | top | lookup | clear | pin | unpin | move | verify | health | profile
                                talk to running engines' controllers (kvtier.controller.cli)
    kvtier proxy --prefill URL --decode URL --port N
                                the disaggregated-prefill router (kvtier.proxy)

Exit status: 0 on success, 2 on a configuration or usage error, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from kvtier._version import __version__
from kvtier.config import (
    ENV_CONFIG_FILE,
    ConfigError,
    load_config_with_sources,
    redact_url,
)

EXIT_USAGE = 2


def _cmd_version(_args: argparse.Namespace) -> int:
    print(f"kvtier {__version__}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.check is not None:
        # Only the file is judged: defaults < FILE, no environment overrides,
        # so the answer is the same on every machine.
        try:
            load_config_with_sources(environ={ENV_CONFIG_FILE: args.check})
        except ConfigError as exc:
            print(f"kvtier: {args.check}: invalid: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"{args.check}: OK")
        return 0
    try:
        config, sources = load_config_with_sources()
    except ConfigError as exc:
        print(f"kvtier: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        # The engine's form where it has one (sizes in bytes); Python-only
        # keys (cpu_capacity_clamp) as configured.
        native = config.to_native()
        values = {k: native[k] if k in native else getattr(config, k) for k in sources}
        for k in ("remote_password", "controller_token"):  # secrets are never printed
            if values.get(k):
                values[k] = "***"
        if values.get("remote_url"):
            values["remote_url"] = redact_url(str(values["remote_url"]))
        print(json.dumps({k: {"value": v, "source": sources[k]} for k, v in values.items()}, indent=2))
    else:
        print(config.describe(sources))
    return 0


def _run_bench(bench_args: list[str]) -> int:
    try:
        module = importlib.import_module("kvtier.bench.cli")
    except ModuleNotFoundError as exc:
        if exc.name not in ("kvtier.bench", "kvtier.bench.cli"):
            raise  # the bench module exists but one of its imports is missing
        print("kvtier: 'kvtier bench' is not available in this installation "
              "(module kvtier.bench.cli not found)", file=sys.stderr)
        return EXIT_USAGE
    result = module.main(bench_args)
    return int(result or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="kvtier KV-cache layer")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p_version = sub.add_parser("version", help="print the kvtier version")
    p_version.set_defaults(func=_cmd_version)

    p_config = sub.add_parser(
        "config", help="print the effective configuration, or validate a file")
    p_config.add_argument("--check", metavar="FILE",
                          help="validate a YAML configuration file and exit")
    p_config.add_argument("--json", action="store_true",
                          help="print values and sources as JSON")
    p_config.set_defaults(func=_cmd_config)

    # Listed for --help only, like bench: kvtier.proxy (FastAPI, httpx,
    # uvicorn) is imported only when the proxy runs.
    sub.add_parser("proxy", add_help=False,
                   help="OpenAI-compatible router for disaggregated prefill (see 'kvtier proxy --help')")

    # Listed for --help only: main() hands everything after 'bench' to
    # kvtier.bench.cli untouched, options included.
    sub.add_parser("bench", help="run benchmarks (see 'kvtier bench --help')", add_help=False)

    # The controller's commands: stats, top, lookup, clear, pin, unpin,
    # move, verify, health, profile, controller-openapi (docs/controller.md).
    from kvtier.controller.cli import add_commands

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _run_bench(argv[1:])
    if argv[:1] == ["proxy"]:
        try:
            from kvtier import proxy
        except ImportError as exc:
            print(f"kvtier proxy needs fastapi, httpx and uvicorn (installed with vLLM): {exc}", file=sys.stderr)
            return EXIT_USAGE
        return proxy.main(argv[1:])
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
