"""Read a block's routing rule from its torch.fx graph, to verify adapters and describe unknown families.

transformers 5 has no fx tracer and ``torch.fx.symbolic_trace`` fails on its models, but
``torch.export(strict=False)`` captures a whole MoE block as an fx graph when the experts run with the
``grouped_mm`` implementation. From that graph we read what the code *really* does: the ``topk`` over the
expert axis and its ``k``, whether softmax or sigmoid is applied before or after it, whether the top-k
weights are renormalised (a division by their sum), and the expert count of the fused tensors. Comparing
this with the adapter's declared spec is how moe-fx stays correct when transformers changes a family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn

from moe_fx.errors import UnsupportedFamilyError, first_line
from moe_fx.kernels.implementation import experts_implementation
from moe_fx.model.modules import expert_count, is_routed_experts
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec

_SOFTMAX = {"softmax", "_softmax", "_safe_softmax", "log_softmax"}
_SIGMOID = {"sigmoid"}


@dataclass(frozen=True)
class GraphRouting:
    """Routing facts read from an exported block graph."""

    score_fn: str | None
    top_k: int | None
    normalized: bool
    num_experts: int | None


@dataclass(frozen=True)
class BlockCheck:
    """The comparison of one block's spec with its graph."""

    block: str
    ok: bool
    graph: GraphRouting | None
    mismatches: tuple[str, ...]
    error: str | None = None


def op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _weighted_identity(hidden_states: torch.Tensor, *routing: torch.Tensor) -> torch.Tensor:
    """Stand-in for an experts call without data-dependent loops.

    Routed call ``(hidden, top_k_index, top_k_weights)``: scale by the summed weights so they stay in the
    graph; dense pre-scaled call ``(hidden,)`` (Llama 4): the scores are already in ``hidden``.
    """
    if not routing:
        return hidden_states
    return hidden_states * routing[-1].sum(dim=-1, keepdim=True).to(hidden_states.dtype)


def _switchable(experts: nn.Module) -> bool:
    """Whether ``experts`` was built by transformers' ``use_experts_implementation`` (it sets ``has_gate``)."""
    return getattr(experts, "has_gate", None) is not None


@contextlib.contextmanager
def _loop_experts_stubbed(block: nn.Module) -> Iterator[None]:
    """Replace the forward of routed experts that have no grouped_mm implementation by :func:`_weighted_identity`.

    Such experts loop over the experts hit, which export cannot trace (data-dependent control flow); the
    routing rule lies upstream of the experts call, so the stand-in leaves what :func:`analyze` reads intact.
    """
    stubbed = [m for m in block.modules() if is_routed_experts(m) and not _switchable(m)]
    for m in stubbed:
        m.forward = _weighted_identity
    try:
        yield
    finally:
        for m in stubbed:
            del m.forward


def export_block(model: nn.Module, block_path: str, tokens: int = 8) -> torch.export.ExportedProgram:
    """torch.export the block at ``block_path`` on a random ``[1, tokens, H]`` input (grouped_mm experts)."""
    block = model.get_submodule(block_path)
    param = next(block.parameters())
    hidden = _hidden_size(block)
    x = torch.randn(1, tokens, hidden, dtype=param.dtype, device=param.device)
    with experts_implementation(model, "grouped_mm", required=False), _loop_experts_stubbed(block), torch.no_grad():
        return torch.export.export(block, (x,), strict=False)


def _router_weight(block: nn.Module) -> tuple[str, int]:
    """The block-relative name of the ``[E, H]`` router weight and ``E``, the count of the routed experts.

    ``E`` comes from the experts module itself: blocks may carry other integer attributes with a
    count-like name (OpenAI privacy filter's block holds the top-k in one).
    """
    e = next((expert_count(m) for m in block.modules() if is_routed_experts(m)), None)
    name = next((n for n, t in block.named_parameters() if e and t.ndim == 2 and t.shape[0] == e), None)
    if name is None:
        raise UnsupportedFamilyError(f"cannot find an [E, H] router weight in {type(block).__name__}")
    return name, e


def _hidden_size(block: nn.Module) -> int:
    return block.get_parameter(_router_weight(block)[0]).shape[1]


def reachable(starts: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]],
              keep: Callable[[fx.Node], bool] = lambda n: True) -> set[fx.Node]:
    """The nodes reached from ``starts`` by repeated ``step`` (``users``: descendants, ``all_input_nodes``:
    ancestors), going only through nodes ``keep`` accepts; the starts themselves are not included."""
    seen, stack = set(), list(starts)
    while stack:
        for m in step(stack.pop()):
            if m not in seen and keep(m):
                seen.add(m)
                stack.append(m)
    return seen


def _descendants(start: fx.Node) -> set[fx.Node]:
    return reachable([start], lambda n: n.users)


def _ancestors(node: fx.Node, depth: int) -> set[fx.Node]:
    out, frontier = set(), {node}
    for _ in range(depth):
        frontier = {a for n in frontier for a in n.all_input_nodes} - out
        out |= frontier
    return out


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    """The node's tensor shape: ``val`` in export graphs, ``example_value`` in the graphs Dynamo hands a backend."""
    val = node.meta.get("val", node.meta.get("example_value"))
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


_DIV = {"div", "div_", "truediv", "itruediv"}


def _topk_k(node: fx.Node) -> int:
    return int(node.args[1] if len(node.args) > 1 else node.kwargs["k"])


def read_routing(nodes: list[fx.Node], num_experts: int) -> tuple[str | None, int | None, bool]:
    """``(score_fn, top_k, normalized)`` of the routing computed by ``nodes``, in graph order: the nodes between
    the router weight and the top-k result (a whole block's descendants of the weight in an export graph, the
    routing subgraph of one block in a Dynamo graph). The main top-k is the last one over the expert axis."""
    order = {n: i for i, n in enumerate(nodes)}
    topks = [n for n in nodes if op_name(n) == "topk" and (_shape(n.args[0]) or (0,))[-1] == num_experts]
    main_topk = topks[-1] if topks else None
    top_k = _topk_k(main_topk) if main_topk is not None else None
    score_nodes = [n for n in nodes if op_name(n) in _SOFTMAX | _SIGMOID]
    score_fn = None
    if score_nodes:
        first = score_nodes[0]
        kind = "softmax" if op_name(first) in _SOFTMAX else "sigmoid"
        after = main_topk is not None and order[main_topk] < order[first]
        score_fn = f"{kind}_after_topk" if after else kind
    normalized = False
    if main_topk is not None:
        for n in _descendants(main_topk) & set(nodes):
            if op_name(n) in _DIV and len(n.args) > 1 and isinstance(n.args[1], fx.Node):
                if any(op_name(a) in {"sum", "norm", "linalg_vector_norm"} for a in _ancestors(n.args[1], 2) | {n.args[1]}):
                    normalized = True
                    break
    return score_fn, top_k, normalized


def analyze(ep: torch.export.ExportedProgram, router_weight: str, num_experts: int) -> GraphRouting:
    """Routing facts downstream of the placeholder of ``router_weight`` (name relative to the block)."""
    gs = ep.graph_signature
    names = {**gs.inputs_to_parameters, **gs.inputs_to_buffers}
    graph = ep.graph_module.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    weight_node = next((placeholders[p] for p, fqn in names.items() if fqn == router_weight), None)
    if weight_node is None:
        raise UnsupportedFamilyError(f"router weight {router_weight!r} is not an input of the exported graph")
    order = {n: i for i, n in enumerate(graph.nodes)}
    score_fn, top_k, normalized = read_routing(sorted(_descendants(weight_node), key=order.get), num_experts)
    experts_e = None
    for p, fqn in names.items():
        shape = _shape(placeholders[p])
        if shape and len(shape) == 3 and fqn.rsplit(".", 1)[-1] in {"gate_up_proj", "up_proj", "down_proj"}:
            experts_e = shape[0]
            break
    return GraphRouting(score_fn=score_fn, top_k=top_k, normalized=normalized, num_experts=experts_e)


def _rel(name: str, block_path: str) -> str:
    return name[len(block_path) + 1 :] if block_path and name.startswith(block_path + ".") else name


def graph_routing(model: nn.Module, block: MoEBlockSpec) -> GraphRouting:
    ep = export_block(model, block.path)
    return analyze(ep, _rel(block.router.weight, block.path), block.num_experts)


def infer_routing(model: nn.Module, block_path: str) -> GraphRouting:
    """The routing rule of a block whose family has no adapter, read from its exported graph."""
    block = model.get_submodule(block_path)
    weight, e = _router_weight(block)
    try:
        routing = analyze(export_block(model, block_path), weight, e)
    except Exception as exc:
        raise UnsupportedFamilyError(
            f"no adapter for {type(block).__name__} and its routing rule could not be read from a torch.export "
            f"graph ({type(exc).__name__}: {first_line(exc, 160)}); register a FamilyAdapter"
        ) from exc
    if routing.score_fn is None:
        raise UnsupportedFamilyError(f"no softmax/sigmoid found after the router of {block_path}; register a FamilyAdapter")
    if routing.top_k is None:
        raise UnsupportedFamilyError(f"no top-k over the expert axis found after the router of {block_path}; register a FamilyAdapter")
    return routing


def spec_mismatches(g: GraphRouting, block: MoEBlockSpec) -> list[str]:
    """How the routing read from a graph differs from the block's spec (empty when they agree)."""
    r = block.router
    mismatches = []
    if g.top_k != r.top_k:
        mismatches.append(f"top_k spec={r.top_k} graph={g.top_k}")
    if g.score_fn != r.score_fn:
        mismatches.append(f"score_fn spec={r.score_fn} graph={g.score_fn}")
    # softmax over the k selected logits is normalised by construction; the spec flag covers explicit renormalisation.
    expect_norm = r.norm_topk_prob and not r.score_fn.startswith("softmax_after")
    if g.normalized != expect_norm:
        mismatches.append(f"norm_topk_prob spec={r.norm_topk_prob} graph={'renormalised' if g.normalized else 'not renormalised'}")
    if g.num_experts is not None and g.num_experts != block.num_experts:
        mismatches.append(f"num_experts spec={block.num_experts} graph={g.num_experts}")
    return mismatches


def check_block(model: nn.Module, block: MoEBlockSpec) -> BlockCheck:
    """Compare the spec of one block with what its exported graph computes."""
    try:
        g = graph_routing(model, block)
    except Exception as exc:
        return BlockCheck(block.path, False, None, (), f"{type(exc).__name__}: {first_line(exc, 200)}")
    mismatches = spec_mismatches(g, block)
    return BlockCheck(block.path, not mismatches, g, tuple(mismatches))


def verify(model: nn.Module, spec: MoEModelSpec, *, all_blocks: bool = False) -> list[BlockCheck]:
    """Check blocks against their graphs: one per distinct block class unless ``all_blocks``."""
    checks, seen = [], set()
    for block in spec.blocks:
        key = type(model.get_submodule(block.path)).__name__, block.num_experts, block.top_k
        if not all_blocks and key in seen:
            continue
        seen.add(key)
        checks.append(check_block(model, block))
    return checks
