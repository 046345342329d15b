"""Text → 384-dim unit vectors with a local ONNX model, run off the event loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from cachetools import LRUCache

from proxy.denormals import flush_denormals_in_this_thread
from proxy.model_store import ONNX_FILE, ensure_offline_model
from proxy.settings import LEGACY_OFFLINE_MODEL_NAME, OFFLINE_MODEL_NAME
from proxy.telemetry import silence_onnxruntime

DIMENSIONS = 384
Vector = npt.NDArray[np.float32]


class EmbeddingModelError(RuntimeError):
    """The configured embedding model cannot be used (wrong size, not loadable)."""


# The models made from the locked wheels, and whether each is the one quantized
# for int8 arithmetic (proxy.model_store).
_OFFLINE_MODELS = {OFFLINE_MODEL_NAME: True, LEGACY_OFFLINE_MODEL_NAME: False}


def _register_offline_model(name: str) -> None:
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    known = {model["model"].lower() for model in TextEmbedding.list_supported_models()}
    if name.lower() in known:
        return
    TextEmbedding.add_custom_model(
        model=name,
        pooling=PoolingType.MEAN,
        normalization=True,
        # Never fetched: the files come from specific_model_path.
        sources=ModelSource(hf="sentence-transformers/all-MiniLM-L6-v2"),
        dim=DIMENSIONS,
        model_file=ONNX_FILE,
    )


# onnxruntime fuses each residual Add and the LayerNormalization after it into
# one SkipLayerNormalization node, whose CPU kernel (onnxruntime 1.31) took
# 330 µs for 8 texts of 20 tokens where the two nodes apart take 50: a fifth of
# the whole model call, for a fusion meant to save a pass over memory.
SLOW_FUSIONS = ["SkipLayerNormFusion"]


def onnx_session(model_file: Path, threads: int | None) -> Any:
    """An onnxruntime session for `model_file`, with every optimisation but the slow fusions."""
    silence_onnxruntime()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = options.inter_op_num_threads = threads
    return onnxruntime.InferenceSession(
        str(model_file),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=SLOW_FUSIONS,
    )


def load_model(name: str, models_dir: Path, threads: int | None = 1) -> Any:
    """Load `name` with fastembed; the default offline model comes from `models_dir`.

    One intra-op thread: onnxruntime's thread pool spin-waits, and on two cores
    two threads doubled the CPU per query (12.6 vs 6.0 ms) for no faster answer
    under load. Throughput comes from micro-batching instead.
    """
    silence_onnxruntime()
    from fastembed import TextEmbedding
    from fastembed.text.onnx_embedding import OnnxTextEmbedding

    if name in _OFFLINE_MODELS:
        _register_offline_model(name)
        folder = ensure_offline_model(models_dir / name, quantized=_OFFLINE_MODELS[name])
        model = TextEmbedding(name, specific_model_path=str(folder), threads=threads)
        # fastembed tokenizes and pools; the network runs in a session of ours,
        # since fastembed has no way to pass it the fusions to leave out.
        network = model.model
        if not isinstance(network, OnnxTextEmbedding):
            raise EmbeddingModelError(f"fastembed loaded {name} as {type(network).__name__}")
        network.model = onnx_session(folder / ONNX_FILE, threads)
        return model
    dims = {m["model"]: m["dim"] for m in TextEmbedding.list_supported_models()}
    if dims.get(name) != DIMENSIONS:
        raise EmbeddingModelError(
            f"ENGRAM_EMBEDDING_MODEL={name!r} is not a {DIMENSIONS}-dimension fastembed model"
        )
    return TextEmbedding(name, cache_dir=str(models_dir / "fastembed"), threads=threads)


# A model call pads every text to its longest, and sixteen LoCoMo turns of mixed
# lengths cost twice as much in one call as in calls of texts of like length
# (7.5 against 3.9 ms of CPU per text). A call takes texts up to half as long
# again as its shortest, plus a few words.
_LIKE_LENGTH_RATIO = 1.5
_LIKE_LENGTH_SLACK = 16  # characters


def like_lengths(texts: list[str]) -> list[list[int]]:
    """The indices of `texts` in groups of like length, shortest first."""
    groups: list[list[int]] = []
    for index in sorted(range(len(texts)), key=lambda i: len(texts[i])):
        shortest = len(texts[groups[-1][0]]) if groups else 0
        if not groups or len(texts[index]) > _LIKE_LENGTH_RATIO * shortest + _LIKE_LENGTH_SLACK:
            groups.append([])
        groups[-1].append(index)
    return groups


@dataclass
class Embedder:
    """A loaded model, run in threads of their own so the event loop never waits on it.

    Concurrent requests are micro-batched: while a model call runs, the texts
    that arrive wait and then go together in the next call, which costs far
    less per text than one call each. An idle embedder adds no delay.

    Up to `lanes` model calls run at once (onnxruntime releases the GIL while it
    computes, and one session serves several threads): with a single lane, a
    text that arrived just after a batch started waited for that whole batch,
    then for its own. Batching past a few texts barely lowers the cost per text
    (1.6-1.9 ms of CPU for a short question in a call of 4 to 32 on this
    machine, 2.2-2.5 alone), so splitting a burst between the lanes costs
    nothing and halves its wait. The lanes' threads read denormal floats as
    zero (proxy.denormals).
    """

    name: str
    model: Any
    executor: ThreadPoolExecutor
    lanes: int = 2
    max_batch: int = 32
    # Recent texts: a retried or regenerated request repeats its last turn.
    recent: LRUCache[str, Vector] = field(default_factory=lambda: LRUCache(maxsize=2048))
    _pending: list[tuple[str, asyncio.Future[Vector]]] = field(default_factory=list)
    _running: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def load(cls, name: str, models_dir: Path, lanes: int = 2) -> Embedder:
        model = load_model(name, models_dir)
        executor = ThreadPoolExecutor(
            lanes, thread_name_prefix="embed", initializer=flush_denormals_in_this_thread
        )
        return cls(name, model, executor, lanes)

    def embed_now(self, texts: list[str]) -> list[Vector]:
        """Blocking: embed `texts` in the calling thread, a model call per group of like length."""
        vectors: dict[int, Vector] = {}
        for group in like_lengths(texts):
            embedded = self.model.embed([texts[index] for index in group])
            for index, vector in zip(group, embedded, strict=True):
                vectors[index] = np.asarray(vector, dtype=np.float32)
        return [vectors[index] for index in range(len(texts))]

    async def embed(self, text: str) -> Vector:
        cached = self.recent.get(text)
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Vector] = loop.create_future()
        self._pending.append((text, future))
        if self._live_lanes(loop) < self.lanes:
            lane = loop.create_task(self._drain())
            self._running.add(lane)
            lane.add_done_callback(self._running.discard)
        return await future

    def _live_lanes(self, loop: asyncio.AbstractEventLoop) -> int:
        """Lanes that will still look for waiting texts.

        A finished lane stays in `_running` until its done-callback runs, and a
        lane of an event loop that has since closed never finishes: counting
        either would leave a text waiting with no lane to take it.
        """
        return sum(lane.get_loop() is loop and not lane.done() for lane in self._running)

    async def embed_many(self, texts: list[str]) -> list[Vector]:
        return list(await asyncio.gather(*(self.embed(text) for text in texts)))

    async def _drain(self) -> None:
        """One lane: run model calls until nothing waits; each takes all that arrived meanwhile."""
        loop = asyncio.get_running_loop()
        while self._pending:
            # Texts that arrive together are shared out between the lanes, so a
            # burst of 16 is two calls of 8 side by side, not one of 16 (twice as
            # long for all 16) next to an idle lane.
            lanes = self._live_lanes(loop) or 1
            size = min(self.max_batch, -(-len(self._pending) // lanes))
            batch = self._pending[:size]
            del self._pending[:size]
            try:
                vectors = await loop.run_in_executor(
                    self.executor, self.embed_now, [text for text, _ in batch]
                )
            except Exception as error:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                for (text, future), vector in zip(batch, vectors, strict=True):
                    self.recent[text] = vector
                    if not future.done():  # its request may have gone away
                        future.set_result(vector)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
