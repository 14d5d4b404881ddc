"""Step 5 for several hosts: one locked deployment on every node of a multi-node (multiprocessing) run.

Every node runs the same lock and the same argv but for the flags `plan.Topology` owns: its
rank, the address and port of rank 0, and --headless on every rank but 0. They are runtime facts,
given to `up --node-rank K --master-addr ADDR`, never written to the lock, so every node has the
same deployment id. `plan --node-rank K` shows how node K's plan differs from node 0's, as Changes
computed from the two whole plans (argv, environment, address), so anything else that differed
would show too. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vdeploy.changes import Change, Effect, mapping_changes
from vdeploy.errors import UsageError
from vdeploy.plan import TOPOLOGY_FLAGS, Plan, Topology

HEAD_WAIT = "/health answers 200"
# What `up` waits for on a headless node (launch.Supervision, enginelog.has_joined): its log says a
# worker is loading the model, which it does only once the process group with node 0 is formed.
JOINED_WAIT = "its engine joined node 0"


def node_topology(serve: Mapping[str, Any], node_rank: int | None, master_addr: str | None) -> Topology | None:
    """This node's place in the locked deployment; None when neither is given (run as locked).

    The address defaults to the lock's [serve] master-addr, so `up --node-rank 1` is enough where
    the manifest names the head."""
    if node_rank is None and master_addr is None:
        return None
    if master_addr is not None:
        from vdeploy.flags import host_problem

        problem = host_problem(master_addr)
        if problem:
            raise UsageError(f"--master-addr {master_addr!r} {problem}; give node 0's address, like 10.0.0.1 or head.example")
    address = master_addr if master_addr is not None else serve.get("master-addr")
    return Topology.for_node(serve, 0 if node_rank is None else node_rank, None if address is None else str(address))


def option_values(argv: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The options of an engine argv by name: "--x v" and "--x=v" → {"x": "v"}, a bare "--x" → True,
    a repeated option → its values in order. Words before the first option (the launcher, the model
    folder) are under "" ."""
    values: dict[str, Any] = {}

    def add(name: str, value: Any) -> None:
        held = values.get(name)
        values[name] = value if name not in values else [*held, value] if isinstance(held, list) else [held, value]

    name, waiting = "", False  # waiting: the option just seen has no value yet
    for arg in argv:
        if arg.startswith("--"):
            name, sep, value = arg[2:].partition("=")
            add(name, value if sep else True)
            waiting = not sep
        elif waiting:
            held = values[name]
            if isinstance(held, list):
                held[-1] = arg
            else:
                values[name] = arg
            waiting = False
        else:
            add(name, arg)
    return values


def node_facts(argv: tuple[str, ...] | list[str]) -> dict[str, Any] | None:
    """Which node an engine argv runs as (for the run record); None for a one-node deployment."""
    values = option_values(argv)

    def number(value: Any) -> Any:  # text an orchestrator fills in stays text
        return int(value) if isinstance(value, str) and value.isdigit() else value

    nodes = number(values.get("nnodes", "1"))
    if nodes == 1:
        return None
    return {
        "rank": number(values.get("node-rank", "0")),
        "nodes": nodes,
        "master_addr": values.get("master-addr"),
        "master_port": number(values.get("master-port")),
        "headless": values.get("headless") is True,
    }


def waits_for(plan: Plan) -> str:
    return JOINED_WAIT if "--headless" in plan.argv else HEAD_WAIT


def rank_changes(head: Plan, node: Plan) -> list[Change]:
    """Everything node's plan does differently from head's (node 0's): argv options, environment,
    secrets, address, and what `up` waits for. Topology flags are operational (they never change
    answers); anything else is shown as it is."""

    def effect(name: str) -> Effect:
        return Effect.OPERATIONAL if name in (*TOPOLOGY_FLAGS, "url", "waits for") else Effect.UNKNOWN

    changes = mapping_changes(option_values(head.argv), option_values(node.argv), "argv", effect_of=effect)
    changes += mapping_changes(head.env, node.env, "env")
    changes += mapping_changes(head.secrets, node.secrets, "secrets")
    changes += mapping_changes(
        {"url": head.url, "deployment": head.deployment, "waits for": waits_for(head)},
        {"url": node.url, "deployment": node.deployment, "waits for": waits_for(node)},
        "node", effect_of=effect,
    )
    return changes
