"""Moving FAISS indexes to and from the GPU, with a CPU fallback that says why."""

from __future__ import annotations

import importlib.metadata
import logging

from indexers.kinds import supports_gpu, unwrap

log = logging.getLogger(__name__)
GPU_MAX_K = 2048  # classic GPU indexes cannot return more than this many neighbours or probe more lists


def faiss_gpu_count() -> int:
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return faiss.get_num_gpus()
    except Exception:  # a broken CUDA install must not stop a CPU build
        return 0


def both_faiss_packages() -> bool:
    """True when faiss-cpu and faiss-gpu are installed together (they overwrite each other's files)."""
    names = set()
    for dist in ("faiss-cpu", "faiss-gpu"):
        try:
            importlib.metadata.version(dist)
            names.add(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return len(names) == 2


def resolve_faiss_device(device: str, notes: list[str]) -> str:
    """'auto' | 'cpu' | 'cuda' → 'cuda' when faiss-gpu sees a GPU, else 'cpu' (with a note if cuda was asked)."""
    if device == "cpu":
        return "cpu"
    if both_faiss_packages():
        notes.append("faiss-cpu and faiss-gpu are both installed; uninstall one of them")
    if faiss_gpu_count() > 0:
        return "cuda"
    if device.startswith("cuda"):
        notes.append("no GPU usable by FAISS (faiss-gpu not installed or no CUDA device): using the CPU")
    return "cpu"


def to_gpu(index, notes: list[str]):
    """Clone an index onto GPU 0; on any failure keep the CPU index and add a note."""
    import faiss

    if not supports_gpu(index):
        notes.append(f"{type(unwrap(index)).__name__} has no GPU version: staying on the CPU")
        return index, "cpu"
    try:
        resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = False
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index, options)
        gpu_index.referenced_resources = resources  # keep the resources alive with the index
        return gpu_index, "cuda"
    except Exception as e:
        notes.append(f"could not move the index to the GPU ({str(e).splitlines()[0]}): using the CPU")
        return index, "cpu"


def to_cpu(index):
    import faiss

    return faiss.index_gpu_to_cpu(index) if hasattr(faiss, "index_gpu_to_cpu") and _on_gpu(index) else index


def _on_gpu(index) -> bool:
    return "Gpu" in type(index).__name__ or "Gpu" in type(getattr(index, "index", None)).__name__
