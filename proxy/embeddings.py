"""Text → 384-dim unit vectors with a local ONNX model, run off the event loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.model_store import ONNX_FILE, ensure_offline_model
from proxy.settings import OFFLINE_MODEL_NAME

DIMENSIONS = 384
Vector = npt.NDArray[np.float32]


class EmbeddingModelError(RuntimeError):
    """The configured embedding model cannot be used (wrong size, not loadable)."""


def _register_offline_model() -> None:
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    known = {model["model"].lower() for model in TextEmbedding.list_supported_models()}
    if OFFLINE_MODEL_NAME.lower() in known:
        return
    TextEmbedding.add_custom_model(
        model=OFFLINE_MODEL_NAME,
        pooling=PoolingType.MEAN,
        normalization=True,
        # Never fetched: the files come from specific_model_path.
        sources=ModelSource(hf="sentence-transformers/all-MiniLM-L6-v2"),
        dim=DIMENSIONS,
        model_file=ONNX_FILE,
    )


def load_model(name: str, models_dir: Path, threads: int = 1) -> Any:
    """Load `name` with fastembed; the default offline model comes from `models_dir`."""
    from fastembed import TextEmbedding

    if name == OFFLINE_MODEL_NAME:
        _register_offline_model()
        folder = ensure_offline_model(models_dir / OFFLINE_MODEL_NAME)
        return TextEmbedding(name, specific_model_path=str(folder), threads=threads)
    dims = {m["model"]: m["dim"] for m in TextEmbedding.list_supported_models()}
    if dims.get(name) != DIMENSIONS:
        raise EmbeddingModelError(
            f"ENGRAM_EMBEDDING_MODEL={name!r} is not a {DIMENSIONS}-dimension fastembed model"
        )
    return TextEmbedding(name, cache_dir=str(models_dir / "fastembed"), threads=threads)


@dataclass
class Embedder:
    """A loaded model plus the threads it runs in, so the event loop never waits on it."""

    name: str
    model: Any
    executor: ThreadPoolExecutor

    @classmethod
    def load(cls, name: str, models_dir: Path, workers: int = 2) -> Embedder:
        model = load_model(name, models_dir)
        return cls(name, model, ThreadPoolExecutor(workers, thread_name_prefix="embed"))

    def embed_now(self, texts: list[str]) -> list[Vector]:
        """Blocking: embed `texts` in the calling thread."""
        return [np.asarray(v, dtype=np.float32) for v in self.model.embed(texts)]

    async def embed_many(self, texts: list[str]) -> list[Vector]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.embed_now, texts)

    async def embed(self, text: str) -> Vector:
        [vector] = await self.embed_many([text])
        return vector

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
