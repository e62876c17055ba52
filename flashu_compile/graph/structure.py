"""Structure discovery on a dynamo FX graph: decoder layers, projections, residual boundaries.

Read-only. Everything comes from the graph itself: ``nn_module_stack`` gives each call's module
path, parameter placeholders give the weights (their real values are the backend's example
inputs), and a networkx view answers dataflow questions. Model-specific names are confined to
the pattern table below; a graph that does not fit it yields a "not applicable" report, never
a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import networkx as nx
import torch
import torch.fx

# The only names this module knows. Qwen2, Llama and Show-o2's flow head all follow them.
PATTERNS = {
    "decoder_layer": re.compile(r"^(?P<stack>.*?layers)\.(?P<index>\d+)$"),
    "flow_head_block": re.compile(r"^(?P<stack>.*?diffusion_head_a)\.(?P<index>\d+)$"),
    "attention": ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
    "swiglu": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
# The dim along which each FFN projection's weight holds its neurons (which pruning may reorder).
FFN_NEURON_DIM = {"gate_proj": 0, "up_proj": 0, "down_proj": 1}
# Dynamo names the root module after how the traced frame received it: L['self'] for a method, an
# argument such as L['args'][0] when forward runs through a wrapper that takes the module as an argument
# (transformers 5.24's Llama forward does), or G['name'] for a model the frame reads as a global.
_ROOT = re.compile(r"^(?P<root>[LG]\['[^']+'\](?:\[\d+\])*)\.?")


@dataclass
class LinearRef:
    """One ``F.linear`` call: its node, weight placeholder and the real weight tensor."""

    path: str
    node: torch.fx.Node
    weight: torch.fx.Node
    bias: torch.fx.Node | None
    weight_value: torch.Tensor | None

    @property
    def out_features(self) -> int:
        # The index's own record, not the node: a pass may have rewired the weight argument.
        return int(self.weight.meta["example_value"].shape[0])


@dataclass
class LayerRef:
    """A transformer block with attention and a SwiGLU MLP, and where the residual stream enters and leaves."""

    kind: str  # "decoder_layer" or "flow_head_block"
    index: int
    path: str
    attention: dict[str, LinearRef]
    mlp: dict[str, LinearRef]
    input: torch.fx.Node
    output: torch.fx.Node
    nodes: list[torch.fx.Node] = field(default_factory=list)  # every call inside the block, in graph order

    @property
    def intermediate_size(self) -> int:
        return self.mlp["gate_proj"].out_features


@dataclass
class StructureIndex:
    layers: list[LayerRef] = field(default_factory=list)  # LLM decoder layers, in order
    head_blocks: list[LayerRef] = field(default_factory=list)  # flow-head blocks, in order
    problems: list[str] = field(default_factory=list)

    def replace_input(self, old: torch.fx.Node, new: torch.fx.Node) -> None:
        """Blocks whose residual stream was ``old`` now read ``new`` (a pass rewired it; later passes see that)."""
        for layer in (*self.layers, *self.head_blocks):
            if layer.input is old:
                layer.input = new

    def remap(self, nodes: dict[torch.fx.Node, torch.fx.Node]) -> StructureIndex:
        """The same index over a copy of its graph (``nodes``: original -> copy, as ``Graph.graph_copy`` fills it).

        A node the copy lacks (one a pass already erased) is kept as it is: it was stale before too.
        """

        def node(n: torch.fx.Node | None) -> torch.fx.Node | None:
            return nodes.get(n, n) if n is not None else None

        def linear(ref: LinearRef) -> LinearRef:
            return replace(ref, node=node(ref.node), weight=node(ref.weight), bias=node(ref.bias))

        def layer(ref: LayerRef) -> LayerRef:
            return replace(ref, attention={k: linear(v) for k, v in ref.attention.items()},
                           mlp={k: linear(v) for k, v in ref.mlp.items()}, input=node(ref.input),
                           output=node(ref.output), nodes=[node(n) for n in ref.nodes])

        return StructureIndex([layer(x) for x in self.layers], [layer(x) for x in self.head_blocks],
                              list(self.problems))

    @property
    def applicable(self) -> bool:
        return bool(self.layers or self.head_blocks) and not self.problems

    def report(self) -> str:
        if not self.applicable:
            why = "; ".join(self.problems) or "no decoder layer with attention and a SwiGLU MLP was found"
            return f"not applicable: {why}"
        return (f"{len(self.layers)} decoder layers (FFN {self.layers[0].intermediate_size if self.layers else '-'}), "
                f"{len(self.head_blocks)} flow-head blocks")


def module_path(node: torch.fx.Node) -> str | None:
    """The innermost module of the model's own tree that a call ran in, without dynamo's root (``L['self']``).

    Entries of ``nn_module_stack`` rooted at a global other than the model's own root are skipped:
    such a module is a wrapper the model's code calls, not a part of the model. transformers with
    ``kernels`` installed runs ``apply_rotary_pos_emb`` as a module-level hub-kernel module
    (``G['__import_...'].apply_rotary_pos_emb``); its nodes still belong to the attention that called it.
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    paths = [entry[0] for entry in stack.values()]
    model_root = _root(paths[0])
    own = [p for p in paths if p.startswith("L[") or _root(p) == model_root]  # never empty: paths[0] is kept
    return _ROOT.sub("", own[-1])


def _root(raw: str) -> str | None:
    match = _ROOT.match(raw)
    return match.group("root") if match else None


def _placeholder_values(gm: torch.fx.GraphModule, example_inputs: list | None) -> dict[torch.fx.Node, torch.Tensor]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if example_inputs is None or len(example_inputs) != len(placeholders):
        return {}
    return {n: v for n, v in zip(placeholders, example_inputs, strict=True) if isinstance(v, torch.Tensor)}


def _shape(node: torch.fx.Node) -> tuple | None:
    value = node.meta.get("example_value")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def build_index(gm: torch.fx.GraphModule, example_inputs: list | None = None) -> StructureIndex:
    """Index the decoder layers and flow-head blocks of a dynamo graph."""
    values = _placeholder_values(gm, example_inputs)
    linears: dict[str, LinearRef] = {}
    members: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" and node.op != "call_method":
            continue
        path = module_path(node)
        if path is None:
            continue
        if node.target is torch._C._nn.linear:
            weight = node.args[1]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            linears[path] = LinearRef(path, node, weight, bias, values.get(weight))
        # Every call belongs to each enclosing block path, so blocks can find their nodes.
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            members.setdefault(".".join(parts[:i]), []).append(node)

    dataflow = nx.DiGraph()
    for node in gm.graph.nodes:
        for user in node.users:
            dataflow.add_edge(node, user)

    index = StructureIndex()
    for block_path in sorted(members, key=lambda p: (p.count("."), p)):
        kind = "flow_head_block" if PATTERNS["flow_head_block"].match(block_path) else (
            "decoder_layer" if PATTERNS["decoder_layer"].match(block_path) else None)
        if kind is None:
            continue
        layer = _layer(kind, block_path, linears, members[block_path], dataflow, index.problems)
        if layer is not None:
            (index.head_blocks if kind == "flow_head_block" else index.layers).append(layer)
    index.layers.sort(key=lambda layer: layer.index)
    index.head_blocks.sort(key=lambda layer: layer.index)
    for layers in (index.layers, index.head_blocks):
        if [layer.index for layer in layers] != list(range(len(layers))):
            index.problems.append(f"layer indices are not contiguous: {[layer.index for layer in layers]}")
    return index


def _layer(kind, path, linears, nodes, dataflow, problems) -> LayerRef | None:
    attn_name, attn_projs = PATTERNS["attention"]
    mlp_name, mlp_projs = PATTERNS["swiglu"]
    attention = {p: linears.get(f"{path}.{attn_name}.{p}") for p in attn_projs}
    mlp = {p: linears.get(f"{path}.{mlp_name}.{p}") for p in mlp_projs}
    if not all(mlp.values()) or not all(attention.values()):
        return None  # e.g. a SigLIP layer (fc1/fc2, out_proj): not a block these passes rewrite
    gate, up, down = mlp["gate_proj"].node, mlp["up_proj"].node, mlp["down_proj"].node
    if gate.args[0] is not up.args[0] or not (nx.has_path(dataflow, gate, down) and nx.has_path(dataflow, up, down)):
        problems.append(f"{path}.mlp is not a SwiGLU (gate and up must share an input and both feed down)")
        return None
    inside = set(nodes)
    external = [a for n in nodes for a in n.all_input_nodes if a not in inside]
    leaving = [n for n in nodes if any(u not in inside for u in n.users)]
    if not leaving:
        problems.append(f"{path}: no value leaves the block")
        return None
    output = leaving[-1]
    stream = [a for a in dict.fromkeys(external) if _shape(a) == _shape(output) and a.op != "get_attr"]
    if len(stream) != 1:
        problems.append(f"{path}: cannot identify the residual stream entering the block ({len(stream)} candidates)")
        return None
    match = PATTERNS[kind].match(path)
    return LayerRef(kind, int(match.group("index")), path, attention, mlp, stream[0], output, list(nodes))
