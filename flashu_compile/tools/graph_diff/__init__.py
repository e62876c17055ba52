"""``flashu-compile graph-diff``: what every flashu pass did to a model's graphs.

Per pass: changes per module (nodes added / removed / replaced, parameter shapes and bytes,
FLOPs of one model call), the nodes it made in words (each pass's ``describe`` hook in the pass
registry), compile time, and the numeric divergence of every matched node from the unrewritten
graph on the example input. The JSON form follows ``graph_diff.schema.json`` beside this package.

Parts, each doing one thing: ``report`` (the data), ``nodes`` (origin keys and graph views),
``interpret`` (running a snapshot), ``compare`` (one pass's changes), ``capture`` (the
compilation and the report), ``render`` (terminal and HTML), ``sample`` (the default Show-o2
call) and ``cli`` (the subcommand).
"""

from .capture import graph_diff, to_json
from .cli import add_parser, cmd_graph_diff
from .render import render_html, render_terminal
from .report import (
    SCHEMA_PATH,
    SCHEMA_VERSION,
    Divergence,
    GraphDiff,
    GraphReport,
    GuardInfo,
    ModuleChange,
    NodeChange,
    NodeDivergence,
    ParamChange,
    PassDiff,
)
from .sample import sample_call

__all__ = ["SCHEMA_PATH", "SCHEMA_VERSION", "Divergence", "GraphDiff", "GraphReport", "GuardInfo", "ModuleChange",
           "NodeChange", "NodeDivergence", "ParamChange", "PassDiff", "add_parser", "cmd_graph_diff", "graph_diff",
           "render_html", "render_terminal", "sample_call", "to_json"]
