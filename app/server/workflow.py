"""A workflow saved from ComfyUI's canvas (UI format) turned into the API graph `/prompt` runs.

The UI format holds nodes with `widgets_values` (positional), `links`, modes and `definitions.subgraphs`; the API
format holds {id: {class_type, inputs}}. The conversion follows what ComfyUI's frontend does when it queues a
workflow (graphToPrompt), with the node schemas `/object_info` serves giving each widget value its input name:
- widget values are read in the schema's input order; an INT with `control_after_generate` (seeds) is followed
  by its control value ("randomize", "fixed", ...) and an image-upload combo (LoadImage) by its upload widget;
  an input linked to another node takes the link, not the stored value;
- subgraph nodes are expanded in place, inner nodes named "<outer id>:<inner id>" as ComfyUI names them; a
  subgraph input takes the outer node's link, else the outer node's promoted widget value, else the inner
  widget's own value; subgraphs may nest;
- bypassed nodes (mode 4) pass their input of the output's type through; muted nodes (mode 2) are dropped;
  Reroute nodes pass through, the frontend's PrimitiveNode gives its value to the widgets it feeds, and notes
  are skipped.
Node types without a schema here keep their links only; the graph check then refuses them by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.server.graph import GraphError

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SKIPPED = ("Note", "MarkdownNote", "Label (rgthree)", "Fast Groups Bypasser (rgthree)")
MUTED, BYPASS = 2, 4
SUBGRAPH_IN, SUBGRAPH_OUT = -10, -20


def is_ui_workflow(body: object) -> bool:
    return isinstance(body, dict) and isinstance(body.get("nodes"), list) and "links" in body


def _bad(message: str, details: str = "") -> GraphError:
    return GraphError("invalid_prompt", message, details)


def _widget_names(spec: dict | None) -> list[tuple[str, int]]:
    """(input name, extra widget values after it) for each widget input, in the schema's order."""
    if not spec:
        return []
    out = []
    for section in ("required", "optional"):
        for name in spec.get("input_order", {}).get(section, []):
            s = spec["input"].get(section, {}).get(name)
            if not s:
                continue
            kind, opts = s[0], (s[1] if len(s) > 1 and isinstance(s[1], dict) else {})
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput"):
                extra = 1 if opts.get("control_after_generate") or opts.get("image_upload") else 0
                out.append((name, extra))
    return out


def widget_inputs(spec: dict | None, values) -> dict:
    """A node's stored widget values by input name."""
    if isinstance(values, dict):  # some nodes store {name: value}
        return dict(values)
    values = list(values or [])
    names = _widget_names(spec)
    with_extras = sum(1 + e for _, e in names)
    use_extras = len(values) >= with_extras or len(values) != len(names)
    out, i = {}, 0
    for name, extra in names:
        if i >= len(values):
            break
        out[name] = values[i]
        i += 1 + (extra if use_extras else 0)
    return out


@dataclass
class _Graph:
    """One graph level (the workflow, or a subgraph definition) with its links by id."""

    nodes: dict
    links: dict  # link id -> (origin id, origin slot, target id, target slot, type)
    inputs: list = field(default_factory=list)  # subgraph input slots
    outputs: list = field(default_factory=list)


def _links(raw) -> dict:
    out = {}
    for link in raw or []:
        if isinstance(link, list) and len(link) >= 5:
            out[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
        elif isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                               link.get("type"))
    return out


def _level(d: dict) -> _Graph:
    nodes = {}
    for n in d.get("nodes") or []:
        if not isinstance(n, dict) or "id" not in n or not isinstance(n.get("type"), str):
            raise _bad("A workflow node has no id or type", "save the workflow again from ComfyUI")
        nodes[n["id"]] = n
    return _Graph(nodes, _links(d.get("links")), d.get("inputs") or [], d.get("outputs") or [])


class _Converter:
    def __init__(self, workflow: dict, schemas: dict):
        self.schemas = schemas
        self.subgraphs = {s["id"]: s for s in (workflow.get("definitions") or {}).get("subgraphs") or []
                          if isinstance(s, dict) and "id" in s}
        self.api: dict = {}
        self._expanded: dict = {}  # (prefix, subgraph node id) -> its output slots' sources

    # A source is ("node", api id, slot), ("value", v) or None (nothing connected).
    def expand(self, level: _Graph, prefix: str, outer_inputs):
        """Emit one level's nodes into self.api; return its output_of(node id, slot) -> source."""
        resolved: dict = {}

        def source_of(link_id, seen=()):
            if link_id is None or link_id not in level.links:
                return None
            origin, slot, *_ = level.links[link_id]
            return outer_inputs(slot) if origin == SUBGRAPH_IN else output_of(origin, slot, seen)

        def output_of(node_id, slot, seen=()):
            key = (node_id, slot)
            if key in resolved:
                return resolved[key]
            if key in seen:
                raise _bad("The workflow's links form a cycle", f"at node {prefix}{node_id}")
            seen = (*seen, key)
            node = level.nodes.get(node_id)
            if node is None:
                return None
            mode, kind = node.get("mode", 0), node["type"]
            if mode == MUTED:
                src = None
            elif mode == BYPASS or kind == "Reroute":
                src = self._pass_through(node, slot, source_of, seen)
            elif kind == "PrimitiveNode":
                src = ("value", (node.get("widgets_values") or [None])[0])
            elif kind in self.subgraphs:
                src = self._subgraph(node, prefix, source_of).get(slot)
            else:
                src = ("node", f"{prefix}{node_id}", slot)
            resolved[key] = src
            return src

        for node_id, node in level.nodes.items():
            kind, mode = node["type"], node.get("mode", 0)
            if kind in SKIPPED or kind in ("Reroute", "PrimitiveNode") or mode in (MUTED, BYPASS):
                continue
            if kind in self.subgraphs:
                self._subgraph(node, prefix, source_of)  # emits its inner nodes
                continue
            spec = self.schemas.get(kind)
            inputs = widget_inputs(spec, node.get("widgets_values"))
            for inp in node.get("inputs") or []:
                src = source_of(inp.get("link"))
                if src is None:
                    continue
                inputs[inp["name"]] = [src[1], src[2]] if src[0] == "node" else src[1]
            self.api[f"{prefix}{node_id}"] = {"class_type": kind, "inputs": inputs,
                                              "_meta": {"title": node.get("title") or kind}}
        return output_of

    @staticmethod
    def _pass_through(node, slot, source_of, seen):
        """A bypassed node or a reroute: its first input of the output's type (a reroute: its only input)."""
        outs = node.get("outputs") or []
        want = outs[slot].get("type") if slot is not None and slot < len(outs) else None
        for inp in node.get("inputs") or []:
            if node["type"] == "Reroute" or want in (None, "*") or inp.get("type") == want:
                if inp.get("link") is not None:
                    return source_of(inp["link"], seen)
        return None

    def _subgraph(self, node, prefix, source_of) -> dict:
        """Expand a subgraph node once; {output slot: source}."""
        key = (prefix, node["id"])
        if key in self._expanded:
            return self._expanded[key]
        self._expanded[key] = {}  # a subgraph that (wrongly) feeds itself sees no outputs
        level = _level(self.subgraphs[node["type"]])
        by_name = {i.get("name"): i for i in node.get("inputs") or []}
        widget_slots = [k for k, s in enumerate(level.inputs) if s.get("type") in WIDGET_TYPES]
        promoted = list(node.get("widgets_values") or []) if isinstance(node.get("widgets_values"), list) else []
        use_promoted = len(promoted) == len(widget_slots)

        def outer_inputs(k):
            if k >= len(level.inputs):
                return None
            inp = by_name.get(level.inputs[k].get("name"))
            if inp is not None and inp.get("link") is not None:
                return source_of(inp["link"])
            if use_promoted and k in widget_slots:
                return ("value", promoted[widget_slots.index(k)])
            return None  # the inner widget keeps its own value

        output_of = self.expand(level, f"{prefix}{node['id']}:", outer_inputs)
        outputs = {}
        for k, out in enumerate(level.outputs):
            for link_id in out.get("linkIds") or []:
                if link_id in level.links:
                    origin, oslot, *_ = level.links[link_id]
                    outputs[k] = outer_inputs(oslot) if origin == SUBGRAPH_IN else output_of(origin, oslot)
        self._expanded[key] = outputs
        return outputs


def to_api(workflow: dict, schemas: dict) -> dict:
    """The API graph of a UI-format workflow; GraphError (invalid_prompt) when it cannot be read."""
    try:
        conv = _Converter(workflow, schemas)
        conv.expand(_level(workflow), "", lambda k: None)
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise _bad("This workflow cannot be read as a ComfyUI UI-format workflow",
                   f"{type(e).__name__}: {e}; save it again from ComfyUI (or use Save (API format))") from None
    for spec in conv.api.values():
        for name, v in list(spec["inputs"].items()):
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] not in conv.api:
                del spec["inputs"][name]  # a link to a node that was not emitted (muted, skipped)
    return conv.api
