"""The ``phoenix-node`` command line: run, status, leave, migrate, unpin, placement,
tell, ask, demo."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from ._version import __version__
from .config import ConfigError, add_arguments, load_config

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phoenix-node",
        description="Phoenix: a node runtime for distributed, stateful Python agents.",
    )
    parser.add_argument("--version", action="version", version=f"phoenix-node {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a node in the foreground",
        description="Run a node: a supervisor, one worker per CPU, and the "
        "control process on the public endpoint.",
    )
    add_arguments(run)

    default_endpoint = os.environ.get("PHOENIX_LISTEN", "tcp://127.0.0.1:7400")
    status = sub.add_parser("status", help="show a running node's workers and its cluster")
    status.add_argument("--endpoint", default=default_endpoint, help="node endpoint")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--timeout", type=float, default=5.0)

    leave = sub.add_parser("leave", help="make a node leave its cluster gracefully, then stop")
    leave.add_argument("--endpoint", default=default_endpoint, help="node endpoint")
    leave.add_argument("--timeout", type=float, default=5.0)

    migrate = sub.add_parser(
        "migrate",
        help="move a live agent to another node of the cluster (it stays placed there)",
    )
    migrate.add_argument("agent", help='agent id, "<Type>/<key>"')
    migrate.add_argument("node", help="the target node's address, as `status` lists it")
    for name, text in (
        ("unpin", "remove an agent's placement: it moves to the node the ring gives it"),
        ("placement", "show where the cluster places an agent (owner, replicas)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("agent", help='agent id, "<Type>/<key>"')
    for p in (migrate, sub.choices["unpin"], sub.choices["placement"]):
        p.add_argument("--endpoint", default=default_endpoint, help="node endpoint")
        p.add_argument("--timeout", type=float, default=10.0)

    for name, text in (
        ("tell", "send a fire-and-forget message to an agent"),
        ("ask", "call an agent's action and print its result"),
    ):
        p = sub.add_parser(
            name,
            help=text,
            description=text + ". Arguments are key=value; "
            "values are read as JSON when they parse, else as strings.",
        )
        p.add_argument("agent", help='agent id, "<Type>/<key>"')
        p.add_argument("action", help="action name")
        p.add_argument("args", nargs="*", metavar="key=value")
        p.add_argument("--endpoint", default=default_endpoint, help="node endpoint")
        p.add_argument("--timeout", type=float, default=10.0)

    demo = sub.add_parser("demo", help="start a node with the demo agents and drive it")
    demo.add_argument("--data", default="phoenix-data", help="data directory")
    demo.add_argument("--workers", type=int, default=0, help="0 = one per CPU")
    demo.add_argument("--listen", default="tcp://127.0.0.1:0", help="node endpoint")
    demo.add_argument("--seconds", type=float, default=None, help="stop after this long")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "status":
            return _status(args)
        if args.command in ("tell", "ask"):
            return _call(args)
        if args.command == "leave":
            return _leave(args)
        if args.command in ("migrate", "unpin", "placement"):
            return _placement_command(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.data, args.workers, args.listen, args.seconds)
    except ConfigError as exc:
        print(f"phoenix-node: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.print_help()
    return 0


def _run(args: argparse.Namespace) -> int:
    from workers.plugins import PluginError, load_agent_types

    from .supervisor import Supervisor, SupervisorExit, configure_logging

    config = load_config(args)
    configure_logging(config.log_level)
    try:
        types = load_agent_types(config.agents, use_entry_points=config.entry_points)
    except PluginError as exc:
        print(f"phoenix-node: cannot start: {exc}", file=sys.stderr)
        return SupervisorExit.CONFIG_ERROR
    return Supervisor(config, types).run()


def _status(args: argparse.Namespace) -> int:
    from .client import Client
    from .errors import PhoenixError

    try:
        with Client(args.endpoint, timeout=args.timeout) as client:
            status = client.status()
    except PhoenixError as exc:
        print(f"phoenix-node: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(
        f"node {status.get('node_id')}  {status.get('state')}  endpoint "
        f"{status.get('endpoint')}  supervisor pid {status.get('pid')}"
    )
    print(
        f"{'worker':>6} {'pid':>8} {'cpu':>4} {'state':<10} {'agents':>8} {'handled':>10} "
        f"{'failed':>7} {'restarts':>8}"
    )
    for w in status.get("workers", []):
        print(
            f"{w['index']:>6} {w['pid'] or '-':>8} {w['cpu']:>4} {w['state']:<10} "
            f"{w['agents']:>8} {w['handled']:>10} {w['failed']:>7} {w['restarts']:>8}"
        )
    cluster = status.get("cluster")
    if isinstance(cluster, dict):
        _print_cluster(cluster)
    return 0


def _print_cluster(cluster: dict[str, Any]) -> None:
    members = cluster.get("members", [])
    stats = cluster.get("membership", {})
    print(
        f"\ncluster: this node {cluster.get('state')}, {len(members)} members known, "
        f"{cluster.get('forwarded', 0)} requests forwarded, "
        f"{stats.get('suspicions', 0)} suspicions ({stats.get('refuted_suspicions', 0)} refuted)"
    )
    print(f"{'member':<28} {'incarnation':>18} {'state':<9} {'ring share':>10} {'since':>9}")
    for m in members:
        mark = "*" if m.get("self") else " "
        print(
            f"{mark}{m['address']:<27} {m['incarnation']:>18} {m['state']:<9} "
            f"{m['share'] * 100:>9.1f}% {m['since_s']:>8.1f}s"
        )
    repl = cluster.get("replication")
    if isinstance(repl, dict):
        print(
            f"replication: {repl.get('shipped', 0)} shipped ({repl.get('deltas_shipped', 0)} "
            f"deltas, {repl.get('states_shipped', 0)} whole states, "
            f"{repl.get('bytes_shipped', 0)} bytes), {repl.get('acked', 0)} acked, "
            f"{repl.get('pending', 0)} pending, {repl.get('expired', 0)} expired, "
            f"ack={repl.get('ack')}"
        )


def _leave(args: argparse.Namespace) -> int:
    from .client import Client
    from .errors import PhoenixError

    try:
        with Client(args.endpoint, timeout=args.timeout) as client:
            result = client.leave()
    except PhoenixError as exc:
        print(f"phoenix-node: {exc}", file=sys.stderr)
        return 1
    print(f"node {result.get('leaving')} is leaving its cluster and stopping")
    return 0


def _placement_command(args: argparse.Namespace) -> int:
    from .client import Client
    from .errors import PhoenixError

    try:
        with Client(args.endpoint, timeout=args.timeout) as client:
            if args.command == "migrate":
                result = client.migrate(args.agent, args.node)
            elif args.command == "unpin":
                result = client.unpin(args.agent)
            else:
                result = client.placement(args.agent)
    except PhoenixError as exc:
        print(f"phoenix-node: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.command == "placement":
        placed = result.get("placed")
        print(
            f"{result['agent']}: owner {result['owner']}"
            + (" (placed there)" if placed else " (by the ring)")
            + f", replicas {', '.join(result['preference'][1:]) or 'none'}"
        )
    elif result.get("moved"):
        print(
            f"{result['agent']} moved from {result['from']} to {result['to']} in "
            f"{result['seconds'] * 1000:.1f} ms ({result['buffered']} requests waited)"
        )
    else:
        print(f"{result['agent']} is already on {result['to']}")
    return 0


def _parse_value(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _call(args: argparse.Namespace) -> int:
    from .client import Client
    from .errors import PhoenixError

    kwargs: dict[str, Any] = {}
    for item in args.args:
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            print(f"phoenix-node: argument {item!r} is not key=value", file=sys.stderr)
            return 2
        kwargs[key] = _parse_value(value)
    try:
        with Client(args.endpoint, timeout=args.timeout) as client:
            if args.command == "tell":
                client.tell(args.agent, args.action, **kwargs)
                return 0
            result = client.ask(args.agent, args.action, timeout=args.timeout, **kwargs)
    except PhoenixError as exc:
        print(f"phoenix-node: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(result, default=_bytes_repr).decode())
    return 0


def _bytes_repr(obj: object) -> Any:
    if isinstance(obj, bytes):
        return obj.hex()
    raise TypeError


if __name__ == "__main__":
    sys.exit(main())
