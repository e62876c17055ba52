"""Running part of a traced graph on a subset of its sequence positions: helpers shared by passes.

``token_drop`` (survivors after layer K) and ``prefix_cache`` (the image span, and the text prefix)
both take the per-token computation downstream of some residual stream and run it on fewer
positions. What that needs is the same: find the per-token region, classify what it reads from
outside (rotary tables and embeddings by row, attention masks by row and column, weights), and
rewrite the sequence length dynamo wrote into view/reshape/expand: a literal in a static graph,
the node of its symbol where dynamo made the length dynamic (a second prompt length). Literal
sizes are rewritten by value, so every helper refuses when the value is ambiguous, and the
rewritten graph is re-checked on fake tensors before it is lowered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .manager import PROVENANCE_KEY, PassNotApplicable, tag

# Ops whose integer arguments are sizes: dynamo writes the traced sequence length into them.
SHAPE_METHODS = {"view", "reshape", "expand"}


def example_value(node: torch.fx.Node) -> torch.Tensor | None:
    value = node.meta.get("example_value")
    return value if isinstance(value, torch.Tensor) else None


def static_dims(value: torch.Tensor) -> list[int | None]:
    """A value's sizes, None where dynamo traced a symbolic size (e.g. a batch that changed): comparing
    those by value would add guards to the traced graph."""
    return [d if type(d) is int else None for d in value.shape]


@contextlib.contextmanager
def tagged(graph: torch.fx.Graph, pass_name: str) -> Iterator[None]:
    """Tag every node created inside the block with ``pass_name``'s provenance."""
    before = set(graph.nodes)
    yield
    for node in graph.nodes:
        if node not in before and PROVENANCE_KEY not in node.meta:
            tag(node, pass_name)


def flat_args(node: torch.fx.Node) -> list:
    flat: list = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), flat.append)
    return flat


def is_shape_op(node: torch.fx.Node) -> bool:
    return node.op == "call_method" and node.target in SHAPE_METHODS


def users_closure(starts: Iterable[torch.fx.Node], stop: Callable[[torch.fx.Node], bool] = lambda n: False
                  ) -> set[torch.fx.Node]:
    """Every node computed (transitively) from ``starts``, without the output; ``stop`` nodes are not followed."""
    region: set[torch.fx.Node] = set()
    frontier = list(starts)
    while frontier:
        node = frontier.pop()
        if stop(node):
            continue
        for user in node.users:
            if user not in region and user.op != "output":
                region.add(user)
                frontier.append(user)
    return region


def size_key(size: int | torch.SymInt) -> object:
    """What a size is compared by: an int as itself, a symbolic size by its expression. Comparing SymInts
    by value would add guards to the traced graph; their expressions compare structurally, without any."""
    return size if type(size) is int else size.node.expr


def holds_size(arg: object, seq: int | torch.SymInt) -> bool:
    """Whether ``arg``, one argument of an op, is the size ``seq``: the literal dynamo writes for a static
    size, the node carrying the symbol (a placeholder dynamo lifted) for a symbolic one."""
    if type(seq) is int:
        return type(arg) is int and arg == seq
    value = arg.meta.get("example_value") if isinstance(arg, torch.fx.Node) else None
    return isinstance(value, torch.SymInt) and size_key(value) == size_key(seq)


def classify(node: torch.fx.Node, seq: int | torch.SymInt, reader: str) -> str | None:
    """How a value read by per-token code from outside is narrowed along a sequence of length ``seq``.

    "rows": (B, S, d), e.g. rotary tables or a span mask; "square": (B, heads, S, S), an attention
    mask; "weight": a parameter one of whose sizes happens to equal S; None: no sequence axis.
    """
    value = example_value(node)
    dims = [size_key(d) for d in value.shape] if value is not None else []
    key = size_key(seq)
    if key not in dims:
        return None
    if len(dims) == 3 and dims[1] == key:
        return "rows"
    if len(dims) == 4 and dims[2:] == [key, key]:
        return "square"
    if node.op == "placeholder" and value.dim() <= 2:
        return "weight"
    raise PassNotApplicable(f"{node.name} {tuple(value.shape)} is read by {reader} and its sequence axis is not "
                            "one this pass can narrow")


def sequence_sized(nodes: Iterable[torch.fx.Node], seq: int | torch.SymInt, model_dims: set[int]
                   ) -> list[torch.fx.Node]:
    """The shape ops among ``nodes`` that hold the sequence length ``seq``, refusing where it is ambiguous."""
    static = type(seq) is int
    # Literal sizes are told apart by value, which is only unambiguous when no model dimension has the same
    # size; a symbolic length is its own node, never a model dimension.
    if static and seq in model_dims:
        raise PassNotApplicable(f"the sequence length {seq} equals a model dimension, so the traced sizes "
                                "cannot be told apart; pad the prompt to another length")
    sized = []
    for node in nodes:
        if not is_shape_op(node):
            continue
        hits = sum(holds_size(a, seq) for a in flat_args(node))
        if static and hits > 1:
            raise PassNotApplicable(f"{node.name} has the sequence length {seq} twice among its sizes")
        if hits:
            sized.append(node)
    return sized


def resize(nodes: Iterable[torch.fx.Node], seq: int | torch.SymInt, new: int | torch.fx.Node, pass_name: str
           ) -> None:
    """Replace the sequence length ``seq`` by ``new`` (a literal, or a node computing a symbolic size) in the
    sizes of ``nodes`` (see ``sequence_sized``)."""
    for node in nodes:
        node.args = torch.fx.node.map_aggregate(node.args, lambda a: new if holds_size(a, seq) else a)
        tag(node, pass_name, replaces=node.name)


def propagate_shapes(gm: torch.fx.GraphModule, pass_name: str) -> None:
    """Re-derive every value's shape on fake tensors: a size the rewrite missed fails here, not at run time."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [n.meta.get("example_value") for n in placeholders]
    # The mode the values were traced in (the compile context may hold another one).
    modes = {v.fake_mode for v in inputs if isinstance(v, FakeTensor)}
    if len(modes) != 1:
        return  # a graph not from dynamo (no fake values): the lowering's own tracing checks shapes
    (mode,) = modes
    gm.graph.lint()
    gm.recompile()
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    except Exception as err:
        raise RuntimeError(f"{pass_name} left the graph with inconsistent shapes: {err}") from err
    for node in gm.graph.nodes:
        if "val" in node.meta and node.op != "placeholder":
            node.meta["example_value"] = node.meta["val"]
