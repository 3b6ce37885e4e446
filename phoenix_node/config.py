"""Node configuration, declared once.

Each :class:`Option` names its type, default, help text, environment variable
(``PHOENIX_<NAME>``) and command-line flag (``--<name-with-dashes>``). The CLI
parser, validation, ``--help`` and ``docs/configuration.md`` all come from
:data:`OPTIONS`. Precedence, lowest first: defaults, the TOML file
(``--config``, keys as in the table, at top level or under ``[node]``), the
environment, the command line.
"""

from __future__ import annotations

import argparse
import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ipc import EndpointError, check_endpoint
from phoenix_node.cluster._swim_wire import check_address
from workers.ratelimit import RateLimit

__all__ = ["OPTIONS", "ConfigError", "NodeConfig", "Option", "add_arguments", "load_config"]


class ConfigError(Exception):
    """A configuration value is invalid; the message names where it came from."""


@dataclass(frozen=True)
class Option:
    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    multiple: bool = False
    minimum: float | None = None
    check: Callable[[Any], Any] | None = None

    @property
    def env(self) -> str:
        return "PHOENIX_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _endpoint(value: str) -> str:
    try:
        return check_endpoint(value)
    except EndpointError as exc:
        raise ValueError(str(exc)) from None


def _ring_weight(value: float) -> float:
    if not 0.0 < value <= 1000.0 or value != value:
        raise ValueError(f"weight must be in (0, 1000], not {value!r}")
    return value


def _peer_endpoint(value: str) -> str:
    """A cluster address: tcp://host:port with a real port ('' allowed: not set)."""
    if value:
        check_address(value)  # ValueError names the problem
    return value


def _rate(value: str) -> str:
    if value:
        RateLimit.parse(value)  # ValueError names the problem
    return value


OPTIONS: tuple[Option, ...] = (
    Option("workers", int, 0, "worker processes; 0 = one per usable CPU", minimum=0),
    Option(
        "listen",
        str,
        "tcp://127.0.0.1:7400",
        "the node's public endpoint (port 0 = any free port)",
        check=_endpoint,
    ),
    Option("data", str, "phoenix-data", "data directory (LMDB environment, status files)"),
    Option("agents", str, [], "extra agent types as module:Class (repeatable)", multiple=True),
    Option(
        "entry_points",
        bool,
        True,
        "load agent types from the phoenix_node.agents entry points (demo agents included)",
    ),
    Option(
        "durability",
        str,
        "durable",
        "durable: fsync at each commit; buffered: no fsync",
        choices=("durable", "buffered"),
    ),
    Option("batch_size", int, 1000, "most messages a worker runs per commit", minimum=1),
    Option(
        "idle_timeout", float, 300.0, "seconds before an idle agent is passivated", minimum=0.01
    ),
    Option(
        "max_active", int, 100_000, "most active agents per worker (LRU passivation)", minimum=1
    ),
    Option("heartbeat_interval", float, 0.5, "seconds between worker heartbeats", minimum=0.01),
    Option(
        "heartbeat_timeout",
        float,
        10.0,
        "seconds without a heartbeat before a worker counts as hung and is replaced",
        minimum=0.05,
    ),
    Option(
        "drain_timeout",
        float,
        10.0,
        "seconds a graceful stop may take before the rest is killed",
        minimum=0.0,
    ),
    Option(
        "max_restarts",
        int,
        10,
        "crashes tolerated within restart_period before the node stops",
        minimum=0,
    ),
    Option(
        "restart_period",
        float,
        60.0,
        "window (seconds) of the restart-intensity limit",
        minimum=0.1,
    ),
    Option(
        "restart_backoff_max", float, 10.0, "longest delay before restarting a worker", minimum=0.0
    ),
    Option(
        "mailbox_capacity",
        int,
        10_000,
        "default mailbox size of an agent (high watermark; agent types may set their own)",
        minimum=1,
    ),
    Option(
        "mailbox_strategy",
        str,
        "reject",
        "default overflow strategy of a full mailbox",
        choices=("reject", "drop_oldest", "drop_newest", "spill_to_disk"),
    ),
    Option(
        "sender_rate",
        str,
        "",
        "token-bucket limit per sender connection on each worker, e.g. 50000/s ('' = none)",
        check=_rate,
    ),
    Option(
        "dedup_window",
        float,
        86400.0,
        "seconds an exactly_once reply is kept to answer duplicates",
        minimum=1.0,
    ),
    Option(
        "seeds",
        str,
        [],
        "cluster: tcp endpoints of nodes to join through (repeatable; none = a new cluster)",
        multiple=True,
        check=_peer_endpoint,
    ),
    Option(
        "advertise",
        str,
        "",
        "cluster: the endpoint other nodes reach this one at ('' = listen, as bound)",
        check=_peer_endpoint,
    ),
    Option("vnodes", int, 128, "cluster: virtual nodes per node on the hash ring", minimum=1),
    Option(
        "weight",
        float,
        1.0,
        "cluster: this node's share of the ring relative to the others (2.0 = twice the "
        "agents of a 1.0 node), announced to every node through the registry",
        check=_ring_weight,
    ),
    Option(
        "probe_interval",
        float,
        0.5,
        "cluster: seconds between failure-detector probes (SWIM protocol period)",
        minimum=0.01,
    ),
    Option(
        "suspicion_mult",
        float,
        4.0,
        "cluster: a suspect is declared down after suspicion_mult x max(1, log10 n) "
        "x probe_interval seconds without refuting",
        minimum=1.0,
    ),
    Option(
        "replicas",
        int,
        2,
        "cluster: nodes besides the owner that hold a copy of each agent's state",
        minimum=0,
    ),
    Option(
        "anti_entropy_interval",
        float,
        30.0,
        "cluster: seconds between state digest exchanges with the peers (also run "
        "soon after every membership change)",
        minimum=0.1,
    ),
    Option(
        "replication_ack",
        str,
        "replicas",
        "cluster: when a write is acknowledged: once every alive replica holds it "
        "(replicas) or once its owner committed it, shipped right after (owner)",
        choices=("replicas", "owner"),
    ),
    Option(
        "replication_timeout",
        float,
        5.0,
        "cluster: seconds a reply waits for the replicas (replication_ack=replicas) "
        "before the client gets UNAVAILABLE (the write stays on its owner and is "
        "shipped later)",
        minimum=0.1,
    ),
    Option(
        "replication_deltas",
        bool,
        True,
        "cluster: ship a replica only what changed (the CRDT delta) once it is known to "
        "hold the rest; off: every shipment carries the whole state",
    ),
    Option(
        "fault_injection",
        bool,
        False,
        "cluster: accept fault-injection commands (drop, delay, duplicate, partition); tests only",
    ),
    Option("ready_file", str, "", "write a JSON line here once the node serves (for tools)"),
    Option("log_level", str, "info", "log level", choices=("debug", "info", "warning", "error")),
)
_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class NodeConfig:
    """Validated node settings (field names are the option names)."""

    workers: int = 0
    listen: str = "tcp://127.0.0.1:7400"
    data: str = "phoenix-data"
    agents: tuple[str, ...] = ()
    entry_points: bool = True
    durability: str = "durable"
    batch_size: int = 1000
    idle_timeout: float = 300.0
    max_active: int = 100_000
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 10.0
    drain_timeout: float = 10.0
    max_restarts: int = 10
    restart_period: float = 60.0
    restart_backoff_max: float = 10.0
    mailbox_capacity: int = 10_000
    mailbox_strategy: str = "reject"
    sender_rate: str = ""
    dedup_window: float = 86400.0
    seeds: tuple[str, ...] = ()
    advertise: str = ""
    vnodes: int = 128
    weight: float = 1.0
    probe_interval: float = 0.5
    suspicion_mult: float = 4.0
    replicas: int = 2
    anti_entropy_interval: float = 30.0
    replication_ack: str = "replicas"
    replication_timeout: float = 5.0
    replication_deltas: bool = True
    fault_injection: bool = False
    ready_file: str = ""
    log_level: str = "info"
    extra: Mapping[str, Any] = field(default_factory=dict)


def _convert(option: Option, raw: Any, source: str) -> Any:
    where = f"{option.name} from {source}"
    if option.multiple:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{where}: expected a list of strings, got {raw!r}")
        values = tuple(i.strip() for i in items if i.strip())
        if option.check is not None:
            try:
                values = tuple(option.check(v) for v in values)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return values
    try:
        if option.type is bool:
            value = _to_bool(raw)
        elif option.type is int and not (isinstance(raw, str) or type(raw) is int):
            raise ValueError(f"expected an int, got {raw!r}")
        elif option.type is float and isinstance(raw, bool):
            raise ValueError(f"expected a number, got {raw!r}")
        else:
            value = option.type(raw)
        if option.check is not None:
            value = option.check(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if option.choices and value not in option.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(option.choices)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if option.minimum is not None and value < option.minimum:
        raise ConfigError(f"{where}: {value!r} is below the minimum {option.minimum}")
    return value


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(raw, str) and raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {raw!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every option as a flag (defaults left unset so precedence can apply)."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with node settings")
    for o in OPTIONS:
        help_text = f"{o.help} (env {o.env}; default: {o.default!r})"
        if o.type is bool:
            parser.add_argument(
                o.flag,
                dest=o.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif o.multiple:
            parser.add_argument(
                o.flag,
                dest=o.name,
                action="extend",
                nargs="+",
                default=None,
                metavar="SPEC",
                help=help_text,
            )
        else:
            parser.add_argument(
                o.flag, dest=o.name, default=None, choices=o.choices or None, help=help_text
            )


def load_config(
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Merge defaults, the TOML file, the environment, flags and ``overrides``."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {o.name: o.default for o in OPTIONS}
    config_path = getattr(args, "config", None) or env.get("PHOENIX_CONFIG")
    if config_path:
        for name, raw in _read_toml(config_path).items():
            option = _BY_NAME.get(name)
            if option is None:
                raise ConfigError(
                    f"{config_path}: unknown setting {name!r} "
                    f"(known: {', '.join(sorted(_BY_NAME))})"
                )
            values[name] = _convert(option, raw, config_path)
    for o in OPTIONS:
        if o.env in env:
            values[o.name] = _convert(o, env[o.env], f"environment {o.env}")
    if args is not None:
        for o in OPTIONS:
            raw = getattr(args, o.name, None)
            if raw is not None:
                values[o.name] = _convert(o, raw, f"flag {o.flag}")
    for name, raw in (overrides or {}).items():
        option = _BY_NAME.get(name)
        if option is None:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = _convert(option, raw, "arguments")
    for o in OPTIONS:
        if o.multiple:
            values[o.name] = tuple(values[o.name])
    return NodeConfig(**values)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    if "node" not in doc:
        return doc
    table = doc["node"]
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [node] must be a table")
    stray = sorted(k for k in doc if k != "node")
    if stray:
        raise ConfigError(
            f"config file {path}: settings {', '.join(stray)} are outside the [node] "
            "table; put every setting in [node] or none"
        )
    return table


def options_markdown(options: Sequence[Option] = OPTIONS) -> str:
    """The configuration reference table (docs/configuration.md is generated from it)."""
    rows = ["| setting | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for o in options:
        rows.append(f"| `{o.name}` | `{o.flag}` | `{o.env}` | `{o.default!r}` | {o.help} |")
    return "\n".join(rows) + "\n"


def configuration_page() -> str:
    """The whole of docs/configuration.md (``python -m phoenix_node.config`` prints it)."""
    return (
        "# Node configuration\n\n"
        "Generated from `phoenix_node/config.py` (`OPTIONS`) by `python -m phoenix_node.config`;"
        "\na test keeps this page in step. Precedence, lowest first: defaults, the TOML file\n"
        "(`--config`; keys at top level or under `[node]`), the `PHOENIX_*` environment,\n"
        "command-line flags.\n\n" + options_markdown()
    )


if __name__ == "__main__":
    print(configuration_page(), end="")
