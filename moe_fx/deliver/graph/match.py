"""Find the MoE blocks in the FX graph that Dynamo captured, and map each to the model's canonical block spec.

A match is the chain router projection -> softmax/sigmoid (+bias, correction) -> top-k (-> renormalisation,
scaling) -> experts computation -> combine. It is found from the experts side, the part every family shares:
the nodes that ran inside a module holding fused 3D expert tensors (``gate_up_proj``/``up_proj``/``down_proj``)
form the *experts region*; its inputs from outside are the hidden states, the top-k index and the top-k weights;
it has one output, the ``[T, H]`` routed output that the block combines with its shared experts. Upstream of
the index, the latest projection by an ``[E, D]`` weight is the router; the routing rule between them is read
with the same reader as :mod:`moe_fx.model.fx_check`. Whatever implementation computes the experts (``grouped_mm``,
``batched_mm``, ``moe_fx``) the region's boundary is the same, so passes can replace it whole.

A block that looks like experts but does not fit the chain, or that disagrees with the spec, is reported in
:attr:`MatchReport.unmatched` with the reason; a pass never skips one silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from moe_fx.deliver.graph.names import module_path, tensor_name, tensor_value, within
from moe_fx.model.fx_check import GraphRouting, op_name, reachable, read_routing, spec_mismatches
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec

EXPERT_TENSORS = ("gate_up_proj", "up_proj", "down_proj")
"""Leaf names of the fused expert tensors of transformers 5 experts modules (what marks an experts module)."""

_PROJECTIONS = {"linear", "matmul", "mm", "addmm"}
_PASS_THROUGH = {"to", "type", "float", "half", "bfloat16", "t", "transpose", "contiguous", "T", "detach"}


@dataclass
class GraphMoEBlock:
    """One matched MoE block: the graph nodes of its routing and experts computation, and its canonical spec."""

    path: str
    """Module path of the block (the common parent of router and experts)."""
    router_path: str
    experts_path: str
    num_experts: int
    routing: GraphRouting
    """The routing rule read from the graph (checked against :attr:`spec` when the model's spec is known)."""
    implementation: str
    """What computes the experts in the graph: ``grouped_mm``, ``batched_mm``, ``moe_fx`` or ``other``."""
    router_weight: fx.Node
    router_input: fx.Node
    logits: fx.Node
    """The router projection's output ``[T, E]`` (bias included)."""
    hidden: fx.Node
    top_k_index: fx.Node
    top_k_weights: fx.Node
    region: tuple[fx.Node, ...]
    """The experts computation, in graph order; :attr:`output` is its only value used outside."""
    output: fx.Node
    tensors: dict[str, fx.Node]
    """Model-relative name -> graph input, for every tensor of the router and the experts module the graph reads."""
    spec: MoEBlockSpec | None = None

    def describe(self) -> dict:
        r = self.routing
        return {"block": self.path, "experts": self.num_experts, "top_k": r.top_k, "score": r.score_fn,
                "renormalised": r.normalized, "implementation": self.implementation, "nodes": len(self.region),
                "spec": self.spec is not None}


@dataclass(frozen=True)
class Unmatched:
    """A block (or experts-like module) of the graph that is not an MoE block the passes can work on, and why."""

    path: str
    reason: str


@dataclass
class MatchReport:
    """The matches of one graph; ``absent``: spec blocks that are not in this graph (another graph has them, or none)."""

    blocks: list[GraphMoEBlock] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)


def _implementation(region: tuple[fx.Node, ...]) -> str:
    """Which experts implementation computed ``region``. moe_fx's forward calls torch's grouped GEMM directly on CUDA
    in bf16 (:func:`moe_fx.kernels.grouped_mm.grouped_matmul`), so it is told from transformers' ``grouped_mm``
    by how it counts rows per expert: ``searchsorted`` (transformers uses ``histc``)."""
    names = {str(n.target) for n in region}
    if any("moe_fx" in t for t in names) or any(op_name(n) == "searchsorted" for n in region):
        return "moe_fx"
    if any("grouped_mm" in t for t in names):
        return "grouped_mm"
    if any(op_name(n) in {"bmm", "baddbmm"} for n in region):
        return "batched_mm"
    return "other"


def _weight_source(node: object) -> fx.Node | None:
    """The graph input a projection's weight operand comes from, through casts and transposes."""
    while isinstance(node, fx.Node):
        if tensor_name(node) is not None:
            return node
        if node.op not in ("call_method", "call_function") or op_name(node) not in _PASS_THROUGH and node.target is not getattr:
            return None
        node = node.args[0] if node.args else None
    return None


def _router(candidates: set[fx.Node], order: dict[fx.Node, int], num_experts: int) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(projection, weight input, projection input)`` of the latest projection by an ``[E, D]`` weight among
    ``candidates`` (``D`` may differ from the experts' width: muse_spark routes before projecting for its experts)."""
    for n in sorted(candidates, key=order.get, reverse=True):
        if n.op not in ("call_function", "call_method") or op_name(n) not in _PROJECTIONS or len(n.args) < 2:
            continue
        operands = [a for a in n.args[:3] if isinstance(a, fx.Node)]
        for i, arg in enumerate(operands):
            w = _weight_source(arg)
            value = tensor_value(w) if w is not None else None
            if value is not None and value.ndim == 2 and value.shape[0] == num_experts:
                x = next((a for j, a in enumerate(operands) if j != i), None)
                if x is not None:
                    return n, w, x
    return None


def _classify_inputs(inputs: list[fx.Node], hidden_size: int) -> tuple[fx.Node | None, fx.Node | None, fx.Node | None]:
    """``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` among the experts region's inputs."""
    values = {n: tensor_value(n) for n in inputs}
    idx = next((n for n, v in values.items() if v is not None and v.ndim == 2 and not v.is_floating_point()), None)
    idx_shape = _shape_key(values[idx]) if idx is not None else None
    weights = next((n for n, v in values.items() if v is not None and v.is_floating_point() and _shape_key(v) == idx_shape), None)
    hidden = next((n for n, v in values.items() if v is not None and v.is_floating_point() and v.ndim == 2
                   and v.shape[-1] == hidden_size and n is not weights), None)
    return hidden, idx, weights


def _shape_key(value) -> tuple[str, ...]:
    """A shape compared as text: symbolic sizes (dynamic shapes) must not be evaluated, which would add guards."""
    return tuple(str(d) for d in value.shape)


def _common_parent(a: str, b: str) -> str:
    pa, pb = a.split("."), b.split(".")
    n = 0
    while n < min(len(pa), len(pb)) and pa[n] == pb[n]:
        n += 1
    return ".".join(pa[:n])


def experts_modules(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Module path -> its fused 3D expert tensors read by the graph (the candidates of a match)."""
    out: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        name = tensor_name(n)
        value = tensor_value(n)
        if name and value is not None and value.ndim == 3 and name.rsplit(".", 1)[-1] in EXPERT_TENSORS:
            out.setdefault(name.rsplit(".", 1)[0], []).append(n)
    return out


def _match_one(path: str, weights: list[fx.Node], calls: dict[fx.Node, str | None], order: dict[fx.Node, int]) -> GraphMoEBlock | Unmatched:
    """Match the experts module at ``path``; ``calls``: every call node of the graph with its module path, in order."""
    num_experts = int(tensor_value(weights[0]).shape[0])
    region = tuple(n for n, p in calls.items() if within(p, path))
    if not region:
        return Unmatched(path, "its expert tensors are read, but no node ran inside the experts module")
    members = set(region)
    # tensors only: with dynamic shapes, size nodes inside the region (symbolic token counts) feed later code too
    outputs = [n for n in region if tensor_value(n) is not None and any(u not in members for u in n.users)]
    if len(outputs) != 1:
        return Unmatched(path, f"the experts computation has {len(outputs)} outputs used outside it (expected one routed output)")
    output = outputs[0]
    out_value = tensor_value(output)
    if out_value is None or out_value.ndim != 2:
        return Unmatched(path, "the experts computation does not return a [tokens, hidden] tensor (a dense or pre-scaled experts call)")
    hidden_size = int(out_value.shape[-1])
    inputs = list(dict.fromkeys(a for n in region for a in n.all_input_nodes if a not in members))
    tensors = {tensor_name(a): a for a in inputs if tensor_name(a) and within(tensor_name(a).rsplit(".", 1)[0], path)}
    hidden, idx, top_w = _classify_inputs([a for a in inputs if a not in tensors.values()], hidden_size)
    if idx is None or top_w is None or hidden is None:
        return Unmatched(path, "the experts call does not take hidden states, a top-k index and top-k weights "
                         "(a dense or pre-scaled experts call): not a routed experts call the passes can rewrite")
    upstream = reachable([idx, top_w], lambda n: n.all_input_nodes) | {idx, top_w}
    router = _router(upstream, order, num_experts)
    if router is None:
        return Unmatched(path, f"no projection by an [{num_experts}, D] router weight feeds the experts call's top-k")
    logits, weight, router_input = router
    # the routing subgraph: from the router projection to the experts call's index and weights
    routing_nodes = {logits} | reachable([logits], lambda n: n.users, keep=upstream.__contains__)
    score_fn, top_k, normalized = read_routing(sorted(routing_nodes, key=order.get), num_experts)
    if top_k is None or score_fn is None:
        return Unmatched(path, "no softmax/sigmoid and top-k over the experts between the router and the experts call")
    router_name = tensor_name(weight)
    router_path = router_name.rsplit(".", 1)[0]
    for a in (logits.args[2:3] if op_name(logits) == "linear" else ()):
        if isinstance(a, fx.Node) and tensor_name(a):
            tensors[tensor_name(a)] = a
    tensors[router_name] = weight
    tensors.update({tensor_name(a): a for a in upstream if tensor_name(a) and within(tensor_name(a).rsplit(".", 1)[0], router_path)})
    return GraphMoEBlock(
        path=_common_parent(router_path, path), router_path=router_path, experts_path=path, num_experts=num_experts,
        routing=GraphRouting(score_fn, top_k, normalized, num_experts), implementation=_implementation(region),
        router_weight=weight, router_input=router_input, logits=logits, hidden=hidden, top_k_index=idx,
        top_k_weights=top_w, region=region, output=output, tensors=tensors,
    )


def match_moe_blocks(gm: fx.GraphModule, spec: MoEModelSpec | None = None) -> MatchReport:
    """Every MoE block of ``gm``'s graph, joined to ``spec``'s blocks when given (by experts path).

    With a spec, a match whose routing disagrees with its block's spec (or that has no block) is unmatched,
    and the spec's blocks that this graph does not contain are listed in ``absent``."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    by_experts = {b.experts.path: b for b in spec.blocks} if spec is not None else {}
    report = MatchReport()
    candidates = experts_modules(gm.graph)
    calls = {n: module_path(n) for n in nodes if n.op in ("call_function", "call_method", "call_module")}
    for path, weights in candidates.items():
        found = _match_one(path, weights, calls, order)
        if isinstance(found, Unmatched) and path in by_experts:
            found = Unmatched(by_experts[path].path, found.reason)  # named as the spec names the block
        if isinstance(found, GraphMoEBlock) and spec is not None:
            block = by_experts.get(path)
            if block is None:
                found = Unmatched(found.path, f"experts at {path} belong to no block of the model's spec")
            else:
                mismatches = spec_mismatches(found.routing, block)
                if mismatches:
                    found = Unmatched(block.path, "routing in the graph differs from the spec: " + "; ".join(mismatches))
                else:
                    found.spec, found.path = block, block.path
        (report.blocks if isinstance(found, GraphMoEBlock) else report.unmatched).append(found)
    report.absent = [b.path for p, b in by_experts.items() if p not in candidates]
    return report

