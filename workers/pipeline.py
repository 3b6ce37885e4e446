"""Pipelines: an ordered chain of agent stages, messages processed in order per key.

A pipeline type is a subclass of :class:`Pipeline` that lists its stages::

    class Orders(Pipeline):
        stages = (
            Stage("Validator", "check", on_error="retry", retries=3),
            Stage("Pricer", "price", on_error="dead_letter"),
            Stage("Ledger", "record", on_error="stop"),
        )

and is registered like any agent type. A message enters with
``client.tell("Orders/<key>", "push", data=...)`` (or ``ask`` to learn its
sequence number). The pipeline agent ``Orders/<key>`` keeps the key's items in
its state (LMDB) and runs them one at a time, in arrival order: item *n* goes
to stage 0's agent ``Validator/<key>`` (action ``check(data=...)``), whose
result is the data of stage 1 (``Pricer/<key>.price``), and so on; item *n+1*
starts once item *n* left the last stage (or was dead-lettered). Different
keys run independently, in parallel, on whatever workers own their agents.

Each stage call is an agent :meth:`~workers.agent.Agent.request` with
``exactly_once`` delivery: request and result travel through the workers'
transactional outboxes, so a worker crash neither loses an item nor runs a
stage twice for it.

Per-stage error strategy, when the stage's action fails (raises, unknown
action, bad arguments):

- ``retry``: run the stage again, up to ``retries`` more times, then
  dead-letter the item and go on with the next one;
- ``dead_letter``: record the item (with the stage and the error) in the
  pipeline's dead letters and go on with the next one;
- ``stop``: keep the item at that stage and stop the pipeline for this key;
  nothing more runs until ``resume`` (which retries the failed stage).

Actions of a pipeline agent: ``push(data) -> seq``, ``status()``,
``dead_letters()``, ``replay(seq)`` (push a dead letter again, at the end),
``resume()``, and ``stage_result`` (the replies of the stages; not for users).
The queue of one key is bounded (``max_queue``, default 10,000): ``push``
beyond it raises, which the caller sees as ACTION_FAILED.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from phoenix_node.state import LWWRegister

from ._errors import PluginError
from .agent import Agent, action

__all__ = ["ON_ERROR", "Pipeline", "PipelineFullError", "Stage"]

ON_ERROR = ("retry", "dead_letter", "stop")


class PipelineFullError(Exception):
    """``push`` on a key whose queue already holds ``max_queue`` items."""


@dataclass(frozen=True)
class Stage:
    """One stage: the agent type and action that run it, and its error strategy."""

    agent_type: str
    action: str
    on_error: str = "retry"
    retries: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.agent_type, str) or not self.agent_type or "/" in self.agent_type:
            raise PluginError(f"stage agent_type {self.agent_type!r} must be a type name")
        if not isinstance(self.action, str) or not self.action.isidentifier():
            raise PluginError(f"stage action {self.action!r} must be an identifier")
        if self.on_error not in ON_ERROR:
            raise PluginError(f"stage on_error {self.on_error!r} must be one of {ON_ERROR}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise PluginError(f"stage retries {self.retries!r} must be an int >= 0")


def _empty() -> dict[str, Any]:
    return {"next": 0, "head": 0, "stage": 0, "attempts": 0, "stopped": "", "items": {},
            "dead": {}, "done": 0}  # fmt: skip


class Pipeline(Agent):
    """Base class of pipeline types (see the module docstring)."""

    stages: ClassVar[tuple[Stage, ...]] = ()
    max_queue: ClassVar[int] = 10_000
    pipe = LWWRegister()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "stages" in cls.__dict__:
            stages = tuple(cls.stages)
            if not stages or not all(isinstance(s, Stage) for s in stages):
                raise PluginError(f"pipeline {cls.__name__}: stages must be a non-empty list "
                                  "of Stage")  # fmt: skip
            cls.stages = stages

    # --- state ---------------------------------------------------------------------

    def _state_dict(self) -> dict[str, Any]:
        value = self.pipe.value
        return dict(value) if isinstance(value, dict) else _empty()

    def _save(self, state: dict[str, Any]) -> None:
        self.pipe.set(self.replica, state)

    # --- actions -------------------------------------------------------------------

    @action
    def push(self, data: Any = None) -> int:
        """Queue ``data`` for this key; returns its sequence number."""
        state = self._state_dict()
        items = dict(state["items"])
        if len(items) >= self.max_queue:
            raise PipelineFullError(f"{self.id}: {len(items)} items already queued")
        seq = state["next"]
        items[str(seq)] = data
        state["items"] = items
        state["next"] = seq + 1
        idle = len(items) == 1 and not state["stopped"]
        self._save(state)
        if idle:
            self._dispatch(state)
        return int(seq)

    @action
    def stage_result(self, status: int, result: Any = None, context: Any = None) -> None:
        """The reply of a stage (sent by the worker that ran it)."""
        state = self._state_dict()
        if not isinstance(context, list) or len(context) != 3:
            return
        seq, stage_index, attempt = context
        if (seq, stage_index, attempt) != (state["head"], state["stage"], state["attempts"]):
            return  # a stale or duplicate reply
        if str(seq) not in state["items"]:
            return
        stage = self.stages[stage_index]
        if status == 0:
            if stage_index + 1 < len(self.stages):
                items = dict(state["items"])
                items[str(seq)] = result
                state.update(items=items, stage=stage_index + 1, attempts=0)
            else:
                self._advance(state)
                state["done"] += 1
        else:
            error = result.get("message") if isinstance(result, dict) else str(result)
            if stage.on_error == "retry" and state["attempts"] < stage.retries:
                state["attempts"] += 1
            elif stage.on_error == "stop":
                state["stopped"] = (
                    f"stage {stage_index} ({stage.agent_type}.{stage.action}): {error}"
                )
                self._save(state)
                return
            else:
                dead = dict(state["dead"])
                dead[str(seq)] = {"data": state["items"][str(seq)], "stage": stage_index,
                                  "error": error}  # fmt: skip
                state["dead"] = dead
                self._advance(state)
        self._save(state)
        self._dispatch(state)

    @action
    def resume(self) -> bool:
        """Restart a stopped pipeline at the stage that failed; False if it was running."""
        state = self._state_dict()
        if not state["stopped"]:
            return False
        state["stopped"] = ""
        state["attempts"] += 1
        self._save(state)
        self._dispatch(state)
        return True

    @action
    def status(self) -> dict[str, Any]:
        """Queued items, the head item's stage, done and dead-lettered counts."""
        state = self._state_dict()
        return {"queued": len(state["items"]), "head": state["head"], "stage": state["stage"],
                "attempts": state["attempts"], "stopped": state["stopped"],
                "done": state["done"], "dead": len(state["dead"])}  # fmt: skip

    @action
    def dead_letters(self) -> dict[str, Any]:
        """Items given up on: sequence number -> data, stage and error."""
        return dict(self._state_dict()["dead"])

    @action
    def replay(self, seq: int) -> int:
        """Push a dead-lettered item again (at the end of the queue); returns its new seq."""
        state = self._state_dict()
        dead = dict(state["dead"])
        letter = dead.pop(str(seq), None)
        if letter is None:
            raise KeyError(f"{self.id} has no dead letter {seq}")
        state["dead"] = dead
        self._save(state)
        return self.push(letter["data"])

    # --- internals -----------------------------------------------------------------

    def _advance(self, state: dict[str, Any]) -> None:
        items = dict(state["items"])
        items.pop(str(state["head"]), None)
        state["items"] = items
        state["stage"] = 0
        state["attempts"] = 0
        state["head"] = min((int(k) for k in items), default=state["next"])

    def _dispatch(self, state: dict[str, Any]) -> None:
        if state["stopped"] or str(state["head"]) not in state["items"]:
            return
        stage = self.stages[state["stage"]]
        self.request(
            f"{stage.agent_type}/{self.key}",
            stage.action,
            reply_to="stage_result",
            context=[state["head"], state["stage"], state["attempts"]],
            data=state["items"][str(state["head"])],
        )
