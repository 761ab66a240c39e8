"""A symbolic batch axis for an ONNX graph exported by MindSpore (which writes every shape as a constant).

MindSpore's exporter cannot trace a dynamic batch: it writes Reshape targets, Expand shapes and constant
tensors (the outlook attention's zero token) for the batch size it compiled, and its `dynamic_axes` only
renames the input's axis, so the graph still fails at any other batch. Exported at batch 2 and at batch 3,
the two graphs are the same but for the constants that hold the batch size. `symbolic_batch` turns each of
them into a small computation from the input's batch size and gives input and outputs a symbolic axis 0.
Batch 2 and 3 rather than 1: at batch 1 the front end may simplify shapes, and 2 * k vs 3 * k tells a batch
dimension from a coincidence.
"""
import numpy as np
import onnx
from onnx import helper, numpy_helper

BATCH = "batch_size"  # the tensor that holds the input's batch size, (1,) int64
EXPORTED_BATCHES = (2, 3)


def _constants(graph):
    """name -> value of every Constant node output and initializer."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _check_same_structure(two, three):
    """The two exports must differ in constants only: same nodes, same inputs and outputs, same attributes."""
    if len(two.node) != len(three.node):
        raise ValueError(f"the exports at batch 2 and 3 have {len(two.node)} and {len(three.node)} nodes")
    for a, b in zip(two.node, three.node):
        if (a.op_type, list(a.input), list(a.output)) != (b.op_type, list(b.input), list(b.output)):
            raise ValueError(f"the exports at batch 2 and 3 differ at node {a.name} ({a.op_type} vs {b.op_type})")
        if a.op_type != "Constant" and a.attribute != b.attribute:
            raise ValueError(f"node {a.name} ({a.op_type}) has attributes that depend on the batch size")


def _shape_nodes(name, at_two, at_three):
    """Nodes computing the integer vector `name` for any batch: at_two + (batch - 2) * per_sample."""
    per_sample = at_three - at_two
    if np.any(at_two != 2 * per_sample, where=per_sample != 0):
        raise ValueError(f"constant {name} does not scale with the batch size: {at_two} vs {at_three}")
    dtype = at_two.dtype
    batch = BATCH if dtype == np.int64 else f"{name}/batch_size"
    cast = [] if batch == BATCH else [helper.make_node("Cast", [BATCH], [batch],
                                                       to=helper.np_dtype_to_tensor_dtype(dtype))]
    return cast + [
        _constant(f"{name}/per_sample", per_sample.astype(dtype)),
        _constant(f"{name}/fixed", (at_two - 2 * per_sample).astype(dtype)),
        helper.make_node("Mul", [f"{name}/per_sample", batch], [f"{name}/scaled"]),
        helper.make_node("Add", [f"{name}/fixed", f"{name}/scaled"], [name]),
    ]


def _constant(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))


def _tiled_nodes(name, at_two, at_three):
    """Nodes for a tensor that repeats one sample's block along axis 0 (like the zero token): Tile it."""
    rows = at_three.shape[0] - at_two.shape[0] if at_two.ndim else 0
    sample = at_two[:rows]
    if (rows == 0 or at_two.shape[1:] != at_three.shape[1:] or at_two.shape[0] != 2 * rows
            or not np.array_equal(np.concatenate([sample] * 3), at_three)):
        raise ValueError(f"constant {name} ({at_two.shape} vs {at_three.shape}) is not one block per sample")
    ones = np.ones(at_two.ndim - 1, np.int64)
    return [
        _constant(f"{name}/sample", sample),
        _constant(f"{name}/ones", ones),
        helper.make_node("Concat", [BATCH, f"{name}/ones"], [f"{name}/repeats"], axis=0),
        helper.make_node("Tile", [f"{name}/sample", f"{name}/repeats"], [name]),
    ]


def symbolic_batch(two, three):
    """The ModelProto `two` (exported at batch 2) with a symbolic batch axis; `three` is the export at batch 3."""
    _check_same_structure(two.graph, three.graph)
    graph = two.graph
    at_two, at_three = _constants(graph), _constants(three.graph)
    image = graph.input[0].name
    nodes = [helper.make_node("Shape", [image], [f"{BATCH}/shape"]),
             _constant(f"{BATCH}/zero", np.array([0], np.int64)), _constant(f"{BATCH}/one", np.array([1], np.int64)),
             helper.make_node("Slice", [f"{BATCH}/shape", f"{BATCH}/zero", f"{BATCH}/one"], [BATCH])]
    replaced = set()
    for name, value in at_two.items():
        other = at_three[name]
        if value.shape == other.shape and np.array_equal(value, other):
            continue
        if value.ndim == 1 and value.shape == other.shape and value.dtype.kind == "i":
            nodes += _shape_nodes(name, value, other)
        else:
            nodes += _tiled_nodes(name, value, other)
        replaced.add(name)
    kept = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in replaced)]
    initializers = [t for t in graph.initializer if t.name not in replaced]
    del graph.node[:], graph.initializer[:], graph.value_info[:]  # value_info would pin the old batch
    graph.node.extend(nodes + kept)  # the new nodes read only the input: first keeps the order topological
    graph.initializer.extend(initializers)
    for value_info in (*graph.input, *graph.output):
        value_info.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(two)
    return two
