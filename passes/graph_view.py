"""Graph views for inspection and export: networkx, GraphML, DOT, and a normalized text form."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import fx
from torch.fx.node import _get_qualified_name


def target_name(node: fx.Node) -> str:
    """A stable name for a node's target: qualified names for functions (never an address)."""
    if node.op == "call_function":
        return _get_qualified_name(node.target)
    return str(node.target)


def _format_arg(arg: Any) -> str:
    if isinstance(arg, fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_format_arg(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k}: {_format_arg(v)}" for k, v in arg.items()) + "}"
    if isinstance(arg, (torch.dtype, torch.device)):
        return str(arg)
    if isinstance(arg, slice):
        return f"slice({_format_arg(arg.start)}, {_format_arg(arg.stop)}, {_format_arg(arg.step)})"
    return repr(arg)


def normalized_text(gm: fx.GraphModule) -> str:
    """One line per node: ``%name = op target(args, kwargs)``, with stable target names: the
    form golden-graph tests compare."""
    lines = []
    for node in gm.graph.nodes:
        args = ", ".join([_format_arg(a) for a in node.args]
                         + [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()])
        lines.append(f"%{node.name} = {node.op} {target_name(node)}({args})")
    return "\n".join(lines) + "\n"


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The data-flow graph: a node per fx node (op, target, shape, fxsdc site) and an edge per
    use."""
    graph = nx.DiGraph(name=type(gm).__name__)
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        shape = list(meta.shape) if hasattr(meta, "shape") else None
        site = node.meta.get("fxsdc_site") or node.meta.get("fxsdc_check")
        graph.add_node(node.name, op=node.op, target=target_name(node),
                       shape=json.dumps(shape), fxsdc=json.dumps(site))
        for inp in node.all_input_nodes:
            graph.add_edge(inp.name, node.name)
    return graph


def write_dot(graph: nx.DiGraph, path: Path, highlight: Iterable[str] = ()) -> None:
    """Write ``graph`` in Graphviz DOT, the inserted fxsdc nodes filled."""
    marked = set(highlight)

    def quote(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = [f"digraph {quote(graph.graph.get('name', 'fx'))} {{", "  node [shape=box];"]
    for name, data in graph.nodes(data=True):
        style = ", style=filled, fillcolor=orange" if name in marked else ""
        label = f"{name}\n{data['target']}"
        lines.append(f"  {quote(name)} [label={quote(label)}{style}];")
    lines.extend(f"  {quote(a)} -> {quote(b)};" for a, b in graph.edges)
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")
