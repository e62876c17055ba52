"""graph-diff's report: the data a diff holds, as ``graph_diff.schema.json`` (beside this package) describes it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).parent.with_name("graph_diff.schema.json")
SCHEMA_VERSION = 1


@dataclass
class NodeChange:
    node: str  # origin key, e.g. "showo.model.layers.0.mlp.gate_proj:linear#0"
    op: str
    before: str | None  # "op(inputs) -> shape"; None for an added node
    after: str | None  # None for a removed node
    replaces: str | None = None  # origin key of the node an added node stands for


@dataclass
class ParamChange:
    name: str  # parameter FQN
    shape_before: list[int]
    shape_after: list[int]
    bytes_before: int
    bytes_after: int


@dataclass
class ModuleChange:
    path: str
    added: list[NodeChange] = field(default_factory=list)
    removed: list[NodeChange] = field(default_factory=list)
    replaced: list[NodeChange] = field(default_factory=list)  # rewritten by the pass or now reading another input
    reshaped: list[NodeChange] = field(default_factory=list)  # same op and inputs, another output shape
    params: list[ParamChange] = field(default_factory=list)
    flops_before: int = 0
    flops_after: int = 0


@dataclass
class GuardInfo:
    kind: str  # the guard function, e.g. "layer_guard"
    region: str  # the outlined submodule it calls
    module: str  # module path of the value it stands for
    nodes: int  # nodes moved into the region
    modules: dict[str, int]  # module path -> how many of its nodes the region now holds
    reads: str
    refresh: str
    shapes: str


@dataclass
class NodeDivergence:
    node: str
    module: str
    shape_before: list[int]
    shape_after: list[int]
    max_abs: float | None  # None when the shapes differ
    cosine: float | None
    diverges: bool


@dataclass
class Divergence:
    step: int  # the model call of a request both graphs ran as
    tolerance: float  # max-abs relative to the unrewritten value's largest magnitude
    compared: int
    shape_changed: int
    diverging: int
    first: NodeDivergence | None  # the first diverging node in the unrewritten graph's order
    first_new: NodeDivergence | None = None  # the first that was within tolerance after the previous pass
    nodes: list[NodeDivergence] = field(default_factory=list)


@dataclass
class PassDiff:
    name: str
    changed: bool
    seconds: float
    stats: dict[str, Any]
    skipped_reason: str | None
    nodes_before: int
    nodes_after: int
    param_bytes_before: int
    param_bytes_after: int
    flops_before: int
    flops_after: int
    modules: list[ModuleChange]
    guards: list[GuardInfo]
    divergence: Divergence | None


@dataclass
class GraphReport:
    index: int
    task: str | None  # None when no pass ran on this graph
    nodes: int
    param_bytes: int
    flops: int
    passes: list[PassDiff]


@dataclass
class GraphDiff:
    options: dict[str, Any]
    step: int
    calls: int
    tolerance: float
    graphs: list[GraphReport]
    recompiles: int  # graphs compiled while serving steps 1..step of a request, after the first call
    compile_seconds: float  # first call of the compiled function: tracing, passes, lowering and one run
    version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
