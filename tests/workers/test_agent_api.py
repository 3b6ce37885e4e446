"""The plugin API (workers/agent.py) and plugin loading (workers/plugins.py): every
rule of validate_agent_class refuses with a message naming the plugin; state fields
belong to each agent instance."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipc.protocol import pack
from phoenix_node.demo import KV, Counter
from phoenix_node.state import GCounter, PNCounter
from phoenix_node.state.store import Store
from workers._errors import AgentError, PluginError
from workers.agent import RESERVED_ARGUMENTS, Agent, action, validate_agent_class
from workers.host import AgentHost
from workers.plugins import ENTRY_POINT_GROUP, load_agent_types, load_spec

ORIGIN = "mypkg.agents:Thing"
HERE = __name__  # "tests.workers.test_agent_api": specs below point at this module


# --- agent types used as plugins by the loading tests (module level, importable) -------


class Good(Agent):
    hits = GCounter()

    @action
    def hit(self, n: int = 1, *, label: str = "", **extra: Any) -> int:
        self.hits.increment(self.replica, n)
        return self.hits.value


class DupA(Agent):
    type_name = "Dup"

    @action
    def a(self) -> None:
        pass


class DupB(Agent):
    type_name = "Dup"

    @action
    def b(self) -> None:
        pass


class NotTheDemoCounter(Agent):
    type_name = "Counter"

    @action
    def inc(self) -> None:
        pass


class Outer:
    class Inner(Agent):
        @action
        def ping(self) -> str:
            return "pong"


# --- validate_agent_class: one test per rule -----------------------------------------------


def refused(cls: object, *fragments: str) -> str:
    with pytest.raises(PluginError) as info:
        validate_agent_class(cls, ORIGIN)
    message = str(info.value)
    assert f"plugin {ORIGIN}" in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_valid_agent_type_is_returned() -> None:
    assert validate_agent_class(Good, ORIGIN) is Good
    assert Good.type_name == "Good"
    assert set(Good.__phoenix_actions__) == {"hit"}
    assert issubclass(PluginError, AgentError)


def test_async_action_is_refused() -> None:
    class Async(Agent):
        @action
        async def go(self) -> None:
            pass

    refused(Async, "Async.go", "async")


def test_async_generator_action_is_refused() -> None:
    class AsyncGen(Agent):
        @action
        async def go(self) -> Any:
            yield 1

    refused(AsyncGen, "AsyncGen.go", "async")


def test_var_positional_parameter_is_refused() -> None:
    class Star(Agent):
        @action
        def go(self, *items: int) -> None:
            pass

    refused(Star, "Star.go", "'items'", "keyword")


def test_positional_only_parameter_is_refused() -> None:
    class PosOnly(Agent):
        @action
        def go(self, n: int, /) -> None:
            pass

    refused(PosOnly, "PosOnly.go", "'n'", "keyword")


@pytest.mark.parametrize("name", sorted(RESERVED_ARGUMENTS))
def test_reserved_parameter_names_are_refused(name: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"def go(self, {name}=None):\n    pass\n", namespace)
    cls = type("Reserved", (Agent,), {"go": action(namespace["go"])})
    refused(cls, "Reserved.go", repr(name), "reserved")


def test_reserved_names_are_exactly_timeout_and_delivery() -> None:
    assert frozenset({"timeout", "delivery"}) == RESERVED_ARGUMENTS


def test_underscore_parameter_is_refused() -> None:
    class Under(Agent):
        @action
        def go(self, _secret: int = 0) -> None:
            pass

    refused(Under, "Under.go", "'_secret'")


def test_underscore_action_name_is_refused() -> None:
    class Hidden(Agent):
        @action
        def _go(self) -> None:
            pass

    refused(Hidden, "Hidden._go", "must not start with '_'")


def test_action_without_self_is_refused() -> None:
    class NoSelf(Agent):
        @action
        def go() -> None:  # type: ignore[misc]
            pass

    refused(NoSelf, "NoSelf.go", "self")


def test_staticmethod_action_is_refused() -> None:
    class Static(Agent):
        go = action(staticmethod(lambda: None))

    refused(Static, "Static.go", "plain method")


def test_no_actions_is_refused() -> None:
    class Silent(Agent):
        hits = GCounter()

        def not_an_action(self) -> None:
            pass

    refused(Silent, "Silent", "no @action")


@pytest.mark.parametrize("type_name", ["a/b", "", "x" * 129, 5, None])
def test_bad_type_name_is_refused(type_name: Any) -> None:
    cls = type("Named", (Agent,), {"type_name": type_name, "go": action(lambda self: None)})
    refused(cls, "type_name")


@pytest.mark.parametrize("timeout", [0, -1, "5"])
def test_bad_idle_timeout_is_refused(timeout: Any) -> None:
    cls = type("Idle", (Agent,), {"idle_timeout": timeout, "go": action(lambda self: None)})
    refused(cls, "idle_timeout")


def test_init_that_needs_arguments_is_refused() -> None:
    class NeedsArgs(Agent):
        def __init__(self, db: str) -> None:
            self.db = db

        @action
        def go(self) -> None:
            pass

    refused(NeedsArgs, "NeedsArgs()", "no arguments")


def test_init_with_defaults_is_accepted() -> None:
    class Defaults(Agent):
        def __init__(self, db: str = "x", *args: Any, **kwargs: Any) -> None:
            self.db = db

        @action
        def go(self) -> None:
            pass

    assert validate_agent_class(Defaults, ORIGIN) is Defaults


@pytest.mark.parametrize("obj", [Agent, Good(), lambda: None, int, "Counter", None], ids=repr)
def test_non_agent_classes_are_refused(obj: object) -> None:
    refused(obj, "not a subclass")


def test_action_decorator_refuses_a_non_callable() -> None:
    with pytest.raises(PluginError, match="applies to a method"):
        action(property(lambda self: 1))  # type: ignore[arg-type]


def test_a_non_empty_state_declaration_is_refused_at_class_creation() -> None:
    counter = GCounter()
    counter.increment("r", 3)
    with pytest.raises(PluginError) as info:
        type("Prefilled", (Agent,), {"hits": counter, "go": action(lambda self: None)})
    assert "Prefilled.hits" in str(info.value) and "empty" in str(info.value)


# --- state belongs to each instance --------------------------------------------------------


@pytest.fixture
def host(tmp_path: Path) -> Iterator[AgentHost]:
    store = Store(tmp_path / "db", durability="buffered")
    try:
        yield AgentHost({"Counter": Counter, "KV": KV, "Good": Good}, store, "node:0")
    finally:
        store.close()


def test_two_agents_of_one_class_do_not_share_state(host: AgentHost) -> None:
    for _ in range(5):
        host.handle("Counter/a", "inc", pack({}))
    assert host.handle("Counter/b", "inc", pack({})) == (0, 1)
    assert host.handle("Counter/a", "get", b"") == (0, 5)
    a, b = host.active["Counter/a"], host.active["Counter/b"]
    assert a.state is not b.state and a.count is not b.count  # type: ignore[attr-defined]
    # the class attribute is a descriptor, not a shared CRDT, and stays a template
    assert not isinstance(Counter.__dict__["count"], PNCounter)
    assert Counter.__phoenix_schema__.new_state()["count"].value == 0


def test_agent_identity_properties(host: AgentHost) -> None:
    host.handle("Good/key/with/slashes", "hit", pack({}))
    agent = host.active["Good/key/with/slashes"]
    assert agent.id == "Good/key/with/slashes"
    assert agent.key == "key/with/slashes"
    assert agent.replica == "node:0"
    assert repr(agent) == "<Good Good/key/with/slashes>"
    assert "unbound" in repr(Good())


def test_state_fields_cannot_be_assigned(host: AgentHost) -> None:
    host.handle("Counter/a", "inc", pack({"n": 2}))
    agent = host.active["Counter/a"]
    with pytest.raises(AttributeError, match="count"):
        agent.count = PNCounter()  # type: ignore[attr-defined]
    assert host.handle("Counter/a", "get", b"") == (0, 2)


def test_kwargs_and_keyword_only_arguments_reach_the_action(host: AgentHost) -> None:
    assert host.handle("Good/x", "hit", pack({"n": 2, "label": "l", "other": [1]})) == (0, 2)


def test_a_subclass_inherits_the_state_fields_of_its_base(host: AgentHost) -> None:
    class BigCounter(Counter):
        @action
        def double(self) -> int:
            self.count.increment(self.replica, self.count.value)
            return self.count.value

    assert "count" in BigCounter.__phoenix_schema__
    host.types["BigCounter"] = BigCounter
    host._timeouts["BigCounter"] = host.idle_timeout
    assert host.handle("BigCounter/a", "inc", pack({"n": 3})) == (0, 3)
    assert host.handle("BigCounter/a", "double", b"") == (0, 6)


# --- loading -------------------------------------------------------------------------------


def test_entry_points_provide_the_demo_agents() -> None:
    types = load_agent_types()
    assert types["Counter"] is Counter and types["KV"] is KV
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert {"Counter", "KV"} <= names


def test_specs_add_types_and_the_same_class_twice_is_fine() -> None:
    types = load_agent_types([f"{HERE}:Good", f"{HERE}:Good", "phoenix_node.demo:Counter"])
    assert types["Good"] is Good and types["Counter"] is Counter
    assert load_agent_types([f"{HERE}:Outer.Inner"], use_entry_points=False) == {
        "Inner": Outer.Inner
    }


def test_duplicate_type_names_name_both_plugins() -> None:
    with pytest.raises(PluginError) as info:
        load_agent_types([f"{HERE}:DupA", f"{HERE}:DupB"], use_entry_points=False)
    message = str(info.value)
    assert f"{HERE}:DupA" in message and f"{HERE}:DupB" in message and "'Dup'" in message


def test_a_spec_clashing_with_an_entry_point_names_both() -> None:
    with pytest.raises(PluginError) as info:
        load_agent_types([f"{HERE}:NotTheDemoCounter"])
    message = str(info.value)
    assert f"{HERE}:NotTheDemoCounter" in message
    assert "entry point Counter" in message and "phoenix_node.demo:Counter" in message


def test_no_types_at_all_is_an_error() -> None:
    with pytest.raises(PluginError, match="no agent types"):
        load_agent_types([], use_entry_points=False)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("no_colon", "module:Class"),
        (":Good", "module:Class"),
        (f"{HERE}:", "module:Class"),
        ("tests.workers.no_such_module_xyz:Good", "import failed"),
        (f"{HERE}:Missing", "has no Missing"),
        (f"{HERE}:Outer.Missing", "has no Outer.Missing"),
        (f"{HERE}:ORIGIN", "not a subclass"),
        (f"{HERE}:refused", "not a subclass"),
    ],
)
def test_bad_specs_name_the_plugin(spec: str, fragment: str) -> None:
    with pytest.raises(PluginError) as info:
        load_spec(spec)
    assert spec in str(info.value) and fragment in str(info.value)


def test_a_plugin_module_that_fails_at_import_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"phoenix_plugin_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        "from phoenix_node.state import GCounter\n"
        "from workers.agent import Agent, action\n"
        "_c = GCounter()\n"
        "_c.increment('r', 2)\n"
        "class Prefilled(Agent):\n"
        "    hits = _c\n"
        "    @action\n"
        "    def go(self):\n"
        "        pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(PluginError) as info:
            load_agent_types([f"{name}:Prefilled"], use_entry_points=False)
    finally:
        sys.modules.pop(name, None)
    message = str(info.value)
    assert f"plugin {name}:Prefilled" in message and "import failed" in message
    assert "declare state fields empty" in message
