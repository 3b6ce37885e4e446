"""The plugin API: ``Agent``, ``@action`` and the lifecycle hooks.

An agent type is a subclass of :class:`Agent` that declares its state as CRDT
fields and its behaviour as ``@action`` methods::

    class Counter(Agent):
        count = PNCounter()

        @action
        def inc(self, n: int = 1) -> int:
            self.count.increment(self.replica, n)
            return self.count.value

Each agent instance (one per id ``"<Type>/<key>"``) gets its own state values;
the class attributes are only templates. Agents are *virtual*: the worker that
owns an id activates it on the first message (state loaded from LMDB), and
passivates it after ``idle_timeout`` seconds without messages (state stays in
LMDB). Every state change made by the actions of one batch of messages is
committed in one LMDB transaction before any reply of that batch is sent: a
reply means the change is durable.

Rules for actions: plain ``def`` methods (not ``async``), arguments passed by
keyword (no ``*args``, no positional-only parameters, no names starting with
``_`` or reserved by the client API: ``timeout``, ``delivery``), arguments and
results are plain msgpack data (None, bool, int, float, str, bytes, lists,
str-keyed dicts). An action must not block the worker for long: the worker's
loop serves thousands of agents, and the supervisor replaces a worker whose
loop stops sending heartbeats.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ipc.protocol import (
    ASK,
    PUBLISH,
    SUBSCRIBE,
    TELL,
    UNSUBSCRIBE,
    ProtocolError,
    check_agent_id,
    pack,
)
from phoenix_node.state import CRDT, AgentState, StateError, StateSchema
from phoenix_node.state.delivery import parse_delivery

from ._errors import PluginError
from .mailbox import MailboxPolicy
from .ratelimit import RateLimit
from .topics import check_pattern, check_topic

if TYPE_CHECKING:
    from .host import AgentContext

__all__ = ["RESERVED_ARGUMENTS", "Agent", "action", "validate_agent_class"]

RESERVED_ARGUMENTS = frozenset({"timeout", "delivery"})
F = TypeVar("F", bound=Callable[..., Any])


def action(fn: F) -> F:
    """Mark a method of an :class:`Agent` subclass as callable by messages."""
    if not callable(fn):
        raise PluginError(f"@action applies to a method, not {fn!r}")
    fn.__phoenix_action__ = True  # type: ignore[attr-defined]
    return fn


class _StateField:
    """Class attribute standing for a declared CRDT field; reads the instance's value."""

    __slots__ = ("name", "template_type")

    def __init__(self, name: str, template_type: type[CRDT]) -> None:
        self.name = name
        self.template_type = template_type

    def __get__(self, instance: Agent | None, owner: type) -> Any:
        if instance is None:
            return self
        return instance._state._fields[self.name]  # hot path: one lookup, no call

    def __set__(self, instance: Agent, value: object) -> None:
        raise AttributeError(
            f"state field {self.name!r} is changed through its methods "
            f"(e.g. self.{self.name}.increment(self.replica)), not assigned"
        )


class Agent:
    """Base class of agent types. See the module docstring for the rules."""

    #: the type name in agent ids (``"<type_name>/<key>"``); defaults to the class name
    type_name: ClassVar[str]
    #: seconds without messages before passivation; None means the node's default
    idle_timeout: ClassVar[float | None] = None
    #: the mailbox of each agent of this type: a dict like ``{"capacity": 1000,
    #: "strategy": "drop_oldest"}`` (see :class:`workers.mailbox.MailboxPolicy`);
    #: None means the node's default (bounded, rejecting with BACKPRESSURE when full)
    mailbox: ClassVar[Any] = None
    #: a token-bucket rate limit per agent of this type, e.g. ``"100/s"`` or
    #: ``{"rate": 100, "burst": 20}``; messages over it wait in the mailbox
    rate_limit: ClassVar[Any] = None
    __phoenix_schema__: ClassVar[StateSchema]
    __phoenix_actions__: ClassVar[dict[str, Callable[..., Any]]]
    __phoenix_mailbox__: ClassVar[MailboxPolicy | None] = None
    __phoenix_rate__: ClassVar[RateLimit | None] = None

    _state: AgentState
    _ctx: AgentContext
    _id: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "type_name" not in cls.__dict__:
            cls.type_name = cls.__name__
        try:
            own = StateSchema.from_class(cls)
            # Fields of agent base classes are _StateField descriptors by now, which
            # from_class does not see: inherit them from the bases' schemas.
            inherited: dict[str, type[CRDT]] = {}
            for base in reversed(cls.__mro__[1:]):
                base_schema = base.__dict__.get("__phoenix_schema__")
                if isinstance(base_schema, StateSchema):
                    inherited.update(base_schema.fields)
            schema = StateSchema({**inherited, **own.fields}, owner=cls.__qualname__)
        except StateError as exc:
            raise PluginError(f"agent type {cls.__qualname__}: {exc}") from None
        for name, field_type in schema.fields.items():
            if isinstance(cls.__dict__.get(name), CRDT):
                setattr(cls, name, _StateField(name, field_type))
        cls.__phoenix_schema__ = schema
        actions: dict[str, Callable[..., Any]] = {}
        for klass in reversed(cls.__mro__):
            for name, attr in vars(klass).items():
                if getattr(attr, "__phoenix_action__", False):
                    actions[name] = attr
        cls.__phoenix_actions__ = actions

    # --- identity and context (set by the worker before on_start) ------------------

    @property
    def id(self) -> str:
        """The agent id, ``"<Type>/<key>"``."""
        return self._id

    @property
    def key(self) -> str:
        """The key part of the id."""
        return self._id.partition("/")[2]

    @property
    def replica(self) -> str:
        """This node's CRDT replica id (node id plus incarnation): pass it to mutators."""
        return self._ctx.replica

    @property
    def state(self) -> AgentState:
        """The composite state holding every declared field."""
        return self._state

    def tell(
        self, agent_id: str, action_name: str, *, delivery: str = "at_most_once", **kwargs: Any
    ) -> None:
        """Send a message to another agent; it leaves after this batch commits.

        ``delivery``: ``"at_most_once"`` (fire and forget), ``"at_least_once"`` (kept in
        the worker's LMDB outbox, written in the same transaction as this action's
        state change, until the receiver acknowledges it), ``"exactly_once"`` (the same,
        and the receiver drops duplicates) or ``"causal"`` (at least once, delivered
        after the messages this agent had seen before sending it). Agents of the same
        worker are reached without a socket; others through the owning worker's ipc
        socket.
        """
        check_agent_id_arg(agent_id)
        self._ctx.send(TELL, agent_id, action_name, kwargs, delivery_code(delivery))

    def request(
        self,
        agent_id: str,
        action_name: str,
        *,
        reply_to: str,
        context: Any = None,
        delivery: str = "exactly_once",
        **kwargs: Any,
    ) -> None:
        """Ask another agent without blocking: its result comes back later as a message
        to this agent's action ``reply_to(status=, result=, context=)`` (``status`` 0 and
        the result, or an error code and the error map). The request and the reply
        travel through the workers' outboxes (``delivery`` at least once), so neither
        is lost when a worker dies; ``context`` (plain data) comes back unchanged."""
        check_agent_id_arg(agent_id)
        if reply_to not in type(self).__phoenix_actions__:
            raise PluginError(f"{type(self).__name__} has no action {reply_to!r} to reply to")
        code = delivery_code(delivery)
        if code == 0:
            raise ValueError("a request needs a delivery guarantee (its reply is a message)")
        extra = {"phoenixreplyto": self._id, "phoenixreplyaction": reply_to,
                 "phoenixcontext": pack(context)}  # fmt: skip
        self._ctx.send(ASK, agent_id, action_name, kwargs, code, extra)

    def publish(self, topic: str, data: Any = None, *, delivery: str = "at_most_once") -> None:
        """Publish ``data`` on ``topic`` (dot-separated segments); every subscription
        whose pattern matches gets it, on every worker of the node."""
        check_topic(topic)
        self._ctx.send(PUBLISH, topic, "", data, delivery_code(delivery))

    def subscribe(
        self, pattern: str, action_name: str = "on_event", *, delivery: str = "at_least_once"
    ) -> None:
        """Subscribe this agent to topics matching ``pattern`` (``*`` one segment, ``#``
        any tail): each event calls ``action_name(topic=..., data=...)``. Stored with the
        node (it survives restarts and passivation) once this batch commits."""
        check_pattern(pattern)
        if action_name not in type(self).__phoenix_actions__:
            raise PluginError(f"{type(self).__name__} has no action {action_name!r} to subscribe")
        self._ctx.send(SUBSCRIBE, pattern, action_name, None, delivery_code(delivery))

    def unsubscribe(self, pattern: str) -> None:
        """Remove this agent's subscription to ``pattern`` (no error if there is none)."""
        check_pattern(pattern)
        self._ctx.send(UNSUBSCRIBE, pattern, "", None, 0)

    # --- lifecycle hooks ------------------------------------------------------------

    def on_start(self) -> None:
        """Called in the worker process when the agent is activated, state loaded.

        If it raises, the activation fails: the message that caused it gets an
        ACTION_FAILED error reply naming the agent and ``on_start``, the agent is
        not kept, and the next message tries again.
        """

    def on_stop(self) -> None:
        """Called in the worker process before passivation or a graceful shutdown.

        State changes it makes are committed. If it raises, the error is logged
        and the agent is passivated anyway (its state as of the last commit stays).
        """

    def on_failure(self, error: BaseException, action_name: str) -> None:
        """Called in the worker process after an action raised ``error``.

        The caller gets an ACTION_FAILED error reply naming the agent, action and
        exception; state changes made by the failed action are still committed
        with the batch (CRDT changes are not rolled back). If this hook itself
        raises, the error is logged and ignored.
        """

    def __repr__(self) -> str:
        ident = getattr(self, "_id", "<unbound>")
        return f"<{type(self).__name__} {ident}>"


def validate_agent_class(cls: object, origin: str) -> type[Agent]:
    """Check that ``cls`` is a usable agent type; raise PluginError naming ``origin``."""
    where = f"plugin {origin}"
    if not (isinstance(cls, type) and issubclass(cls, Agent)) or cls is Agent:
        raise PluginError(f"{where}: {cls!r} is not a subclass of phoenix Agent")
    name = cls.type_name
    if not isinstance(name, str) or not name or "/" in name or len(name) > 128:
        raise PluginError(f"{where}: type_name {name!r} must be a non-empty str without '/'")
    if cls.idle_timeout is not None and not (
        isinstance(cls.idle_timeout, (int, float)) and cls.idle_timeout > 0
    ):
        raise PluginError(f"{where}: idle_timeout must be a positive number or None")
    try:
        cls.__phoenix_mailbox__ = MailboxPolicy.parse(cls.mailbox) if cls.mailbox else None
        cls.__phoenix_rate__ = RateLimit.parse(cls.rate_limit) if cls.rate_limit else None
    except (TypeError, ValueError) as exc:
        raise PluginError(f"{where}: {exc}") from None
    if not cls.__phoenix_actions__:
        raise PluginError(f"{where}: {cls.__qualname__} declares no @action methods")
    for action_name, fn in cls.__phoenix_actions__.items():
        _validate_action(where, cls, action_name, fn)
    try:
        init_sig = inspect.signature(cls)
    except (TypeError, ValueError):
        init_sig = None
    if init_sig is not None and any(
        p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in init_sig.parameters.values()
    ):
        raise PluginError(f"{where}: {cls.__qualname__}() must be constructible with no arguments")
    return cls


def _validate_action(where: str, cls: type, name: str, fn: Callable[..., Any]) -> None:
    label = f"{where}: action {cls.__qualname__}.{name}"
    if name.startswith("_"):
        raise PluginError(f"{label}: action names must not start with '_'")
    if not inspect.isfunction(fn):
        raise PluginError(f"{label}: must be a plain method (def)")
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise PluginError(f"{label}: async actions are not supported; use a plain def")
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].kind not in (
        params[0].POSITIONAL_OR_KEYWORD,
        params[0].POSITIONAL_ONLY,
    ):
        raise PluginError(f"{label}: first parameter must be self")
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            raise PluginError(f"{label}: parameter {p.name!r} must be passable by keyword")
        if p.name.startswith("_") or p.name in RESERVED_ARGUMENTS:
            raise PluginError(
                f"{label}: parameter name {p.name!r} is reserved (no leading '_', "
                f"not one of {sorted(RESERVED_ARGUMENTS)})"
            )


def delivery_code(delivery: str) -> int:
    """The wire code of a delivery guarantee name; ValueError naming the valid ones."""
    return int(parse_delivery(delivery))


def check_agent_id_arg(agent_id: object) -> None:
    if not isinstance(agent_id, str):
        raise TypeError(f"agent id must be a str, got {type(agent_id).__name__}")
    try:
        check_agent_id(agent_id)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None


def check_action_name(action_name: object) -> str:
    """An action name as messages carry it: a Python identifier of <= 128 chars."""
    if not isinstance(action_name, str) or not action_name.isidentifier() or len(action_name) > 128:
        raise ValueError(f"action {action_name!r} is not an identifier of <= 128 chars")
    return action_name
