"""`glmchat bench offload`: all resident vs accelerate's hooks vs the glmchat runtime, side by
side in one run, with one placement, one prompt and greedy decoding.

Method (docs/offload.md says why):
- the placement is computed once (accelerate's ``infer_auto_device_map`` with the given
  ``--cpu-memory``/``--gpu-memory``) and given to both offloading engines;
- the engines are loaded (timed) side by side, then run prefill (its time is the TTFT) and
  ``--new-tokens`` greedy tokens over our decode loop, taking turns one step each, so load from
  elsewhere on the machine hits them alike; decode tokens/s = 1 / median step time (the mean
  is in the JSON);
- warm regime: an untimed pass first, so the weight files are in the page cache;
- cold regime: before every forward (prefill and each token) the weight files are evicted from
  the page cache with posix_fadvise(DONTNEED), for every engine alike; our reader is stopped
  first, so nothing staged survives into the next token (the eviction is not timed). It stands
  for a model larger than RAM, so ours runs with the reader ``--offload-reader auto`` picks for
  one (``direct``); ``glmchat:mmap`` is shown beside it;
- the bound: streamed bytes per token ÷ the read throughput of exactly those bytes from a cold
  page cache, the best of 64 MiB buffered preads, kernel readahead and one O_DIRECT read per
  module (best of two each, up front); in the cold regime it is also measured before every
  step, taking turns with the engines, and the higher of the up-front best and the median of
  those is used (the disk's speed drifts). On a GPU: ÷ a pinned host→device copy.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from glmchat.usage import Parser

PROMPT = ("The lighthouse keeper found a bottle on the rocks one grey morning. Inside was a "
          "letter, and the first line read:")
ENGINES = ("resident", "accelerate", "glmchat")
REGIMES = ("warm", "cold")
READ_CHUNK = 64 << 20


@dataclass
class Run:
    engine: str
    regime: str
    load_s: float = 0.0
    ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    bytes_per_token: int = 0
    effective_gb_per_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    reader_wait_s: float = 0.0
    mean_tokens_per_s: float = 0.0  # decode_tokens_per_s is from the median step
    cached_after_eviction: float = -1.0  # cold: fraction of the files still in the page cache
    reader: str = ""  # glmchat on CPU: the reader the runtime used ("mmap" | "direct")
    dtype: str = ""  # compute dtype
    scheme: str = "none"  # the weights: "none" | "int8" | "int4-g32" ...
    layers_per_tier: dict[str, int] = field(default_factory=dict)  # quantized: its placement


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="glmchat bench offload",
                    description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model directory (or 'default')")
    parser.add_argument("--cpu-memory", type=float, required=True, metavar="GIB")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB")
    parser.add_argument("--dtype", default="stored",
                        choices=("stored", "bfloat16", "float32", "float16"),
                        help="compute dtype (stored = as in the checkpoint: zero-copy)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--prefetch", type=int, default=1,
                        help="layers the glmchat reader stages ahead of the one computing")
    parser.add_argument("--reader", choices=("auto", "mmap", "direct"), default="auto",
                        help="glmchat on CPU: how disk-tier layers are read (auto: mmap in the "
                             "warm regime, direct in the cold one, as auto picks for a model "
                             "that fits in RAM and for one that does not)")
    parser.add_argument("--release-behind", choices=("auto", "yes", "no"), default="auto",
                        help="glmchat on CPU: unmap streamed pages after use (auto: when the "
                             "model would not stay in the page cache anyway)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--quantize", default="", metavar="SCHEMES",
                        help="also run ours on quantized weights, each with its own placement "
                             "under the same budget: comma-separated int8, int4, int4-g64 ...")
    parser.add_argument("--no-defaults", action="store_true",
                        help="skip glmchat:default (ours with the settings a user gets: "
                             "--dtype auto, --offload-reader auto)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results here")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    # As the worker does (model/worker.py): idle OpenMP workers must not spin.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from accelerate import init_empty_weights
    from glmchat.model import offload, sources
    from glmchat.model import placement as place
    from glmchat.model.mapped import MappedCheckpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from glmchat.protocol import ModelSpec

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    resolved = sources.resolve(args.model)
    if resolved.needs_conversion:
        sources.convert_gguf(resolved, lambda done, total, what: None)
    weights_dir = resolved.weights_dir
    files = sources.weight_files(weights_dir)
    config = AutoConfig.from_pretrained(weights_dir)
    checkpoint = MappedCheckpoint(files)
    stored = next(iter(checkpoint.locations.values())).dtype
    dtype = stored if args.dtype == "stored" else getattr(torch, args.dtype)
    from glmchat.model.family_transformers import pick_dtype as _pick_dtype

    auto_dtype = _pick_dtype("auto", config)  # what a user gets without --dtype
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    spec = ModelSpec(cpu_memory=args.cpu_memory, gpu_memory=args.gpu_memory)
    device_map = place.compute_device_map(meta, spec, dtype)
    assert device_map is not None
    device = offload.compute_device(device_map)
    layers_name, layer_list = offload.decoder_layers(meta)
    n_layers = len(layer_list)
    del meta
    streamed_tiers = offload.STREAMED_TIERS[device.type]
    streamed_keys = [key for key in checkpoint.locations
                     if offload.module_tier(key, device_map) in streamed_tiers]
    streamed_locations = [checkpoint.locations[k] for k in streamed_keys]
    accelerate_bytes = sum(loc.nbytes for loc in streamed_locations)
    probe = DiskProbe(_by_module(streamed_keys, checkpoint, layers_name))
    per_tier: dict[str, int] = {}
    for i in range(n_layers):
        tier = offload.module_tier(f"{layers_name}.{i}", device_map)
        per_tier[tier] = per_tier.get(tier, 0) + 1

    tokenizer = AutoTokenizer.from_pretrained(weights_dir)
    prompt_ids = torch.tensor([tokenizer(PROMPT)["input_ids"]], dtype=torch.long)
    engines = [e for e in args.engines.split(",") if e]
    schemes = [_scheme_label(s) for s in args.quantize.split(",") if s and s != "none"]
    quantized: dict[str, Any] = {}  # label → quant.QuantResult
    for label in schemes:
        from glmchat.model import quant

        scheme, _, group = label.partition("-g")
        result = quant.prepare(weights_dir, resolved.digest, scheme, int(group or 32),
                               lambda done, total, what: None, device.type)
        assert result is not None
        quantized[label] = result
    regimes = [r for r in args.regimes.split(",") if r]
    total_bytes = sum(f.stat().st_size for f in files)
    if "resident" in engines and total_bytes * (dtype.itemsize / stored.itemsize) > \
            0.6 * _available_ram():
        print("resident: skipped, the model does not fit in RAM")
        engines.remove("resident")

    print(f"model: {weights_dir} ({total_bytes / 1e9:.2f} GB on disk, {n_layers} layers, "
          f"stored {_name(stored)}, compute {_name(dtype)} on {device}; "
          f"--dtype auto computes {_name(auto_dtype)})")
    print(f"placement (--cpu-memory {args.cpu_memory}"
          + (f", --gpu-memory {args.gpu_memory}" if args.gpu_memory is not None else "")
          + f"): layers per tier {per_tier}")
    print(f"machine: {_machine()}, torch threads {torch.get_num_threads()}")
    methods = probe.measure() if probe.total else {}
    disk_gbps = max(methods.values(), default=0.0)
    print("disk read throughput of the streamed bytes (cold page cache): "
          + ", ".join(f"{name} {gbps:.2f}" for name, gbps in methods.items()) + " GB/s")
    h2d_gbps = _pinned_copy_gbps(device) if device.type == "cuda" else 0.0
    if h2d_gbps:
        print(f"pinned host→device copy: {h2d_gbps:.2f} GB/s")

    # All engines are loaded side by side and take turns token by token, so that whatever
    # else the machine is doing slows them alike; decode speed comes from the median step.
    release = {"auto": None, "yes": True, "no": False}[args.release_behind]
    # Engine instances by (engine, requested reader), loaded when a regime first needs them.
    loaded: dict[tuple[str, str], tuple[Any, Any, float]] = {}
    runs: list[Run] = []
    bounds: dict[str, float] = {}
    for regime in regimes:
        cold = regime == "cold"
        wanted = _regime_engines(engines, regime, args.reader, device.type)
        if "glmchat" in engines and not args.no_defaults:
            wanted["glmchat:default"] = ("glmchat-default", "auto")
        for label in schemes:
            q_reader = ("direct" if cold and args.reader == "auto" and device.type == "cpu"
                        else args.reader)
            wanted[f"glmchat:{label}"] = (f"glmchat-q:{label}", q_reader)
        for key in [key for key in loaded if key not in wanted.values()]:
            # Done with: pages it keeps mapped (the resident loader's, our mmap reader's) would
            # survive the cold regime's evictions.
            _model, runtime, _s = loaded.pop(key)
            if runtime is not None:
                runtime.close()
            del _model, runtime
            gc.collect()
        for engine, reader in wanted.values():
            if (engine, reader) not in loaded:
                t0 = time.perf_counter()
                if engine.startswith("glmchat-q:"):
                    model, runtime = _load_quantized(quantized[engine.split(":", 1)[1]],
                                                     spec, dtype, device, args.prefetch,
                                                     release, reader or "auto")
                else:
                    model, runtime = _load(engine, weights_dir, config, device_map,
                                           auto_dtype if engine == "glmchat-default" else dtype,
                                           device, args.prefetch,
                                           None if engine == "glmchat-default" else release,
                                           reader or "auto")
                loaded[(engine, reader)] = (model, runtime, time.perf_counter() - t0)
        taking_part = {name: loaded[key][:2] for name, key in wanted.items()}
        use_probe = cold and device.type == "cpu" and probe.total > 0
        results, samples = _generate_interleaved(taking_part, prompt_ids, args.new_tokens,
                                                 device, files if cold else None,
                                                 probe if use_probe else None)
        # The disk's speed drifts: the bound is the higher of the up-front best and the median
        # of the reads between steps (the stricter bound for us).
        bounds[regime] = max([disk_gbps, statistics.median(samples)] if samples else [disk_gbps])
        if samples:
            print(f"  disk, read between the steps: median {statistics.median(samples):.2f} "
                  f"GB/s (min {min(samples):.2f}, max {max(samples):.2f})", flush=True)
        for name, run in results.items():
            engine, reader = wanted[name]
            _model, runtime, load_s = loaded[(engine, reader)]
            run.engine, run.regime, run.load_s = name, regime, load_s
            run.dtype = _name(auto_dtype if engine == "glmchat-default" else dtype)
            if engine.startswith("glmchat-q:"):
                run.scheme = engine.split(":", 1)[1]
                run.layers_per_tier = _layers_per_tier(runtime)
            run.reader = runtime.stats.reader if runtime is not None else ""
            run.bytes_per_token = (runtime.stats.bytes_per_token if runtime is not None
                                   else accelerate_bytes if engine == "accelerate" else 0)
            run.effective_gb_per_s = run.bytes_per_token * run.decode_tokens_per_s / 1e9
            runs.append(run)
            print(f"  {name:15s} {regime}: {run.decode_tokens_per_s:.3f} tok/s", flush=True)
    for _model, runtime, _s in loaded.values():
        if runtime is not None:
            runtime.close()
    loaded.clear()
    probe.close()
    checkpoint.close()
    gc.collect()

    if device.type == "cuda":
        bounds = {regime: h2d_gbps for regime in regimes}
    _report(runs, bounds, "pinned H2D" if device.type == "cuda" else "disk")
    if args.json:
        args.json.write_text(json.dumps({
            "model": str(weights_dir), "cpu_memory": args.cpu_memory,
            "gpu_memory": args.gpu_memory, "dtype": _name(dtype),
            "auto_dtype": _name(auto_dtype), "layers_per_tier": per_tier,
            "machine": _machine(), "disk_read_gb_per_s": disk_gbps,
            "disk_read_methods_gb_per_s": methods, "bound_gb_per_s": bounds,
            "pinned_h2d_gb_per_s": h2d_gbps, "runs": [asdict(r) for r in runs]}, indent=1))
    return 0


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {_available_ram() / 2**30:.0f} GiB RAM free"


def _by_module(keys: list[str], checkpoint: Any, layers_name: str) -> list[list[Any]]:
    """The streamed tensors' locations grouped by the module that streams them (a decoder
    layer, the head...), in file order."""
    depth = layers_name.count(".") + 2
    groups: dict[str, list[Any]] = {}
    for key in keys:
        unit = (".".join(key.split(".")[:depth]) if key.startswith(layers_name + ".")
                else key.rsplit(".", 1)[0])
        groups.setdefault(unit, []).append(checkpoint.locations[key])
    return sorted(groups.values(), key=lambda locs: (str(locs[0].file.path), locs[0].start))


class DiskProbe:
    """Reads exactly the streamed byte ranges from a cold page cache, three ways: 64 MiB
    buffered preads (dd-like), the kernel's readahead (WILLNEED + MADV_POPULATE_READ over each
    range) and one O_DIRECT pread per module range (dd iflag=direct, bs = a layer)."""

    def __init__(self, modules: list[list[Any]]) -> None:
        from glmchat.model.mapped import merged_ranges, read_buffer

        self.modules = [merged_ranges(locations) for locations in modules]
        self.ranges = merged_ranges([loc for locations in modules for loc in locations])
        self.paths = sorted({mapped.path for mapped, _s, _e in self.ranges})
        self.total = sum(end - start for _m, start, end in self.ranges)
        widest = max((end - start for ranges in self.modules for _m, start, end in ranges),
                     default=0)
        # as our reader's slots; room for alignment padding at both ends of a range
        self._direct = read_buffer(max(widest + 2 * (64 << 10), READ_CHUNK))
        self._fds: dict[Path, int] = {}

    def _cold(self) -> None:
        from glmchat.model.mapped import evict_files

        for mapped, _s, _e in self.ranges:
            mapped.drop(0, mapped.size)
        evict_files(self.paths)

    def _timed(self, read: Any) -> float:
        self._cold()
        t0 = time.perf_counter()
        read()
        return self.total / (time.perf_counter() - t0) / 1e9

    def pread(self) -> float:
        view = memoryview(self._direct)[:READ_CHUNK]

        def read() -> None:
            for mapped, start, end in self.ranges:
                offset = start
                while offset < end:
                    n = os.preadv(mapped.fd, [view[:min(READ_CHUNK, end - offset)]], offset)
                    if n <= 0:
                        break
                    offset += n
        return self._timed(read)

    def readahead(self) -> float:
        def read() -> None:
            for mapped, start, end in self.ranges:
                mapped.will_need(start, end)
                mapped.populate(start, end)
        return self._timed(read)

    def direct(self) -> float:
        from glmchat.model.backends import DIRECT_ALIGN, O_DIRECT
        from glmchat.model.mapped import read_range

        view = memoryview(self._direct)

        def read() -> None:
            for ranges in self.modules:
                for mapped, start, end in ranges:
                    start -= start % DIRECT_ALIGN
                    end += -end % DIRECT_ALIGN
                    fd = self._fds.get(mapped.path)
                    if fd is None:
                        fd = self._fds[mapped.path] = os.open(mapped.path,
                                                              os.O_RDONLY | O_DIRECT)
                    read_range(fd, view, start, end)
        return self._timed(read)

    def measure(self) -> dict[str, float]:
        """Each way twice; the best of each."""
        best: dict[str, float] = {}
        for _ in range(2):
            for name, method in (("pread", self.pread), ("readahead", self.readahead),
                                 ("direct", self.direct)):
                try:
                    best[name] = max(best.get(name, 0.0), method())
                except OSError:  # no O_DIRECT on this filesystem
                    best.setdefault(name, 0.0)
        self._cold()
        return best

    def sample(self) -> float:
        """One reading between engine steps: the fastest of the three ways."""
        best = 0.0
        for method in (self.pread, self.readahead, self.direct):
            with contextlib.suppress(OSError):  # no O_DIRECT on this filesystem
                best = max(best, method())
        self._cold()
        return best

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._direct.close()


def _regime_engines(engines: list[str], regime: str, reader: str, device_type: str
                    ) -> dict[str, tuple[str, str]]:
    """Display name → (engine, requested reader) for one regime. The cold regime stands for a
    model larger than RAM: with ``--reader auto`` ours then runs with the reader auto picks for
    such a model (direct), and the mmap reader is shown beside it."""
    out: dict[str, tuple[str, str]] = {}
    for engine in engines:
        if engine == "resident" and regime == "cold":
            continue
        if engine != "glmchat":
            out[engine] = (engine, "")
        elif regime == "cold" and reader == "auto" and device_type == "cpu":
            out["glmchat"] = ("glmchat", "direct")
            out["glmchat:mmap"] = ("glmchat", "mmap")
        else:
            out["glmchat"] = ("glmchat", reader)
    return out


def _pinned_copy_gbps(device: Any) -> float:
    import torch

    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty_like(host, device=device)
    gpu.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(4):
        gpu.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    return 4 * host.numel() / (time.perf_counter() - t0) / 1e9


def _load(engine: str, weights_dir: Path, config: Any, device_map: dict[str, str], dtype: Any,
          device: Any, prefetch: int, release_behind: bool | None, reader: str
          ) -> tuple[Any, Any]:
    from accelerate import init_empty_weights
    from glmchat.model import offload
    from transformers import AutoModelForCausalLM

    if engine == "resident":
        model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=dtype)
        return model.to(device).eval(), None
    if engine == "accelerate":
        offload_dir = tempfile.mkdtemp(prefix="glmchat-bench-offload-")
        model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=dtype,
                                                     device_map=device_map,
                                                     offload_folder=offload_dir)
        return model.eval(), None
    if engine in ("glmchat", "glmchat-default"):
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        runtime = offload.load_offloaded(model, weights_dir, device_map, dtype, device,
                                         prefetch=prefetch, release_behind=release_behind,
                                         reader=reader)
        return model.eval(), runtime
    raise SystemExit(f"unknown engine {engine!r}; use {', '.join(ENGINES)}")


def _scheme_label(text: str) -> str:
    """"int4" → "int4-g32" (the default group); "int8", "int4-g64" as they are."""
    from glmchat.model import quant

    scheme, _, group = text.partition("-g")
    quant.check_scheme(scheme, int(group) if group.isdigit() else 32)
    if group and not group.isdigit():
        raise SystemExit(f"glmchat bench offload: error: bad scheme {text!r}; use int8, int4, "
                         "int4-g64 ...")
    return scheme if scheme == "int8" else f"int4-g{group or 32}"


def _load_quantized(result: Any, spec: Any, dtype: Any, device: Any, prefetch: int,
                    release_behind: bool | None, reader: str) -> tuple[Any, Any]:
    """Ours on the quantized copy, placed under the same budget (its smaller bytes: more
    layers fit)."""
    from accelerate import init_empty_weights
    from glmchat.model import offload
    from glmchat.model import placement as place
    from glmchat.model.qlinear import lookup_on_disk, swap_linears
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(result.runtime_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    swap_linears(model, result.runtime_dir, result.scheme, result.group_size)
    device_map = place.compute_device_map(
        model, spec, dtype, lookup_on_disk(model, result.runtime_dir, dtype)) or {"": str(device)}
    runtime = offload.load_offloaded(model, result.runtime_dir, device_map, dtype, device,
                                     prefetch=prefetch, release_behind=release_behind,
                                     reader=reader)
    runtime.quantize = result.label
    return model.eval(), runtime


def _layers_per_tier(runtime: Any) -> dict[str, int]:
    stats = runtime.stats
    return {"resident": stats.resident_layers, "streamed": stats.streamed_layers}


def _generate_interleaved(engines: dict[str, tuple[Any, Any]], prompt_ids: Any,
                          new_tokens: int, device: Any, evict: list[Path] | None,
                          probe: DiskProbe | None = None) -> tuple[dict[str, Run], list[float]]:
    """Greedy decoding on every engine, one step each in turn. ``evict``: the cold regime's
    files, evicted before every engine's every forward (not timed). ``probe``: also read the
    streamed bytes from disk once per round (the bound, measured under the same conditions)."""
    import statistics

    import torch
    from glmchat.model import generate as gen
    from glmchat.model.mapped import cached_fraction, evict_files
    from transformers import DynamicCache

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def prepare(_runtime: Any) -> None:
        if evict is not None:
            for _model, runtime in engines.values():
                if runtime is not None:  # unmap ours first: DONTNEED skips mapped pages
                    runtime.evict()
            evict_files(evict)

    runs = {name: Run(engine=name, regime="") for name in engines}
    samples: list[float] = []
    state: dict[str, tuple[Any, Any, int]] = {}
    steps: dict[str, list[float]] = {name: [] for name in engines}
    waits = {name: rt.stats.wait_s if rt is not None else 0.0
             for name, (_m, rt) in engines.items()}
    with torch.inference_mode():
        for name, (model, runtime) in engines.items():
            if evict is None:  # warm: one untimed pass fills the page cache and warms kernels
                gen.prefill(model, prompt_ids, DynamicCache(config=model.config))
            cache = DynamicCache(config=model.config)
            prepare(runtime)
            if evict is not None:
                runs[name].cached_after_eviction = cached_fraction(evict)
            t0 = time.perf_counter()
            logits = gen.prefill(model, prompt_ids, cache)
            sync()
            runs[name].ttft_s = time.perf_counter() - t0
            token = torch.argmax(logits, dim=-1)  # (1,)
            runs[name].token_ids.append(int(token[0]))
            state[name] = (cache, token, prompt_ids.shape[1])
        for _ in range(new_tokens - 1):
            if probe is not None:
                prepare(None)
                samples.append(probe.sample())
            for name, (model, runtime) in engines.items():
                cache, token, past = state[name]
                prepare(runtime)
                t0 = time.perf_counter()
                logits = gen.decode_one(model, token, cache, past)
                sync()
                steps[name].append(time.perf_counter() - t0)
                token = torch.argmax(logits, dim=-1)
                runs[name].token_ids.append(int(token[0]))
                state[name] = (cache, token, past + 1)
    for name, (_model, runtime) in engines.items():
        if runtime is not None:
            runtime.idle()
            runs[name].reader_wait_s = runtime.stats.wait_s - waits[name]
        if steps[name]:
            runs[name].decode_tokens_per_s = 1.0 / statistics.median(steps[name])
            runs[name].mean_tokens_per_s = len(steps[name]) / sum(steps[name])
    return runs, samples


def _report(runs: list[Run], bounds: dict[str, float], bound_name: str) -> None:
    print()
    header = (f"{'regime':6s} {'engine':15s} {'reader':6s} {'load s':>7s} {'TTFT s':>7s} "
              f"{'tok/s':>8s} {'MB/token':>9s} {'GB/s':>6s} {'bound tok/s':>11s} "
              f"{'ours/acc':>8s} {'ours/bound':>10s} {'vs resident':>11s}")
    print(header)
    print("-" * len(header))
    by = {(r.engine, r.regime): r for r in runs}
    resident = by.get(("resident", "warm"))
    for run in runs:
        gbps = bounds.get(run.regime, 0.0)
        bound = gbps * 1e9 / run.bytes_per_token if run.bytes_per_token and gbps else 0.0
        ours = run.engine.startswith("glmchat")
        acc = by.get(("accelerate", run.regime))
        vs_acc = (run.decode_tokens_per_s / acc.decode_tokens_per_s
                  if ours and acc and acc.decode_tokens_per_s else 0.0)
        vs_bound = run.decode_tokens_per_s / bound if ours and bound else 0.0
        vs_res = (run.decode_tokens_per_s / resident.decode_tokens_per_s
                  if resident and resident.decode_tokens_per_s and run.engine != "resident"
                  else 0.0)
        print(f"{run.regime:6s} {run.engine:15s} {run.reader or '-':6s} {run.load_s:7.2f} "
              f"{run.ttft_s:7.2f} {run.decode_tokens_per_s:8.3f} "
              f"{run.bytes_per_token / 1e6:9.1f} {run.effective_gb_per_s:6.2f} "
              f"{_cell(bound, 11)} {_cell(vs_acc, 8, 'x')} {_cell(vs_bound * 100, 9, '%')} "
              f"{_cell(vs_res, 10, 'x')}")
    print(f"bound = streamed bytes per token ÷ {bound_name} throughput ("
          + ", ".join(f"{regime} {gbps:.2f} GB/s" for regime, gbps in bounds.items())
          + "; the best of the reads above and, cold, the median of the reads between steps)")
    cold = [r.cached_after_eviction for r in runs if r.cached_after_eviction >= 0]
    if cold:
        print(f"cold: after each eviction at most {max(cold) * 100:.1f}% of the weight files "
              "was still in the page cache")
    for dtype, scheme in sorted({(r.dtype, r.scheme) for r in runs}):
        outputs = {tuple(r.token_ids) for r in runs if (r.dtype, r.scheme) == (dtype, scheme)}
        weights = "" if scheme == "none" else f", {scheme} weights"
        print(f"greedy tokens identical across engines and regimes ({dtype} compute{weights}): "
              + ("yes" if len(outputs) == 1 else f"NO ({len(outputs)} different outputs)"))
    for run in runs:
        full = by.get(("glmchat", run.regime))
        if run.scheme != "none" and full is not None and full.decode_tokens_per_s:
            speedup = run.decode_tokens_per_s / full.decode_tokens_per_s
            ratio = run.bytes_per_token / max(full.bytes_per_token, 1)
            print(f"{run.engine} {run.regime}: {speedup:.2f}x full width, {ratio:.2f}x its "
                  f"bytes per token (layers per tier {run.layers_per_tier})")
    _scheme_table(runs, bounds)


def _scheme_table(runs: list[Run], bounds: dict[str, float]) -> None:
    """The compact summary: ours per scheme, warm and cold, against ours at full width — the
    fastest full-width row of the regime (``glmchat``, ``glmchat:mmap`` or ``:default``), so a
    slow reader at full width does not flatter the quantized runs."""
    by = {(r.engine, r.regime): r for r in runs}
    for regime in REGIMES:
        widths = [r for r in runs if r.regime == regime and r.scheme == "none"
                  and r.engine.startswith("glmchat")]
        if widths:
            by[("glmchat", regime)] = max(widths, key=lambda r: r.decode_tokens_per_s)
    schemes = ["none", *sorted({r.scheme for r in runs if r.scheme != "none"})]
    if len(schemes) < 2:
        return
    print()
    header = (f"{'weights':9s} {'MB/token':>9s} {'warm tok/s':>10s} {'x full':>7s} "
              f"{'cold tok/s':>10s} {'x full':>7s} {'cold % bound':>12s}  "
              "(x full: against the fastest full-width row of the regime)")
    print(header)
    print("-" * len(header))
    for scheme in schemes:
        engine = "glmchat" if scheme == "none" else f"glmchat:{scheme}"
        cells = [f"{'full' if scheme == 'none' else scheme:9s}"]
        mb = next((r.bytes_per_token / 1e6 for r in runs if r.engine == engine), 0.0)
        cells.append(f"{mb:9.1f}")
        bound_pct = 0.0
        for regime in ("warm", "cold"):
            run, full = by.get((engine, regime)), by.get(("glmchat", regime))
            tps = run.decode_tokens_per_s if run else 0.0
            ratio = tps / full.decode_tokens_per_s if full and full.decode_tokens_per_s else 0.0
            cells += [_cell(tps, 10), _cell(ratio, 7, "x")]
            if regime == "cold" and run and run.bytes_per_token and bounds.get("cold"):
                bound_pct = 100 * tps / (bounds["cold"] * 1e9 / run.bytes_per_token)
        cells.append(_cell(bound_pct, 11, "%"))
        print(" ".join(cells))
    for regime in REGIMES:
        best = by.get(("glmchat", regime))
        if best is not None:
            print(f"full width {regime}: {best.engine} ({best.reader}) "
                  f"{best.decode_tokens_per_s:.3f} tok/s")


def _cell(value: float, width: int, suffix: str = "") -> str:
    if not value:
        return " " * (width - 1) + "-" + (" " if suffix else "")
    return f"{value:{width}.2f}{suffix}" if suffix != "%" else f"{value:{width}.0f}%"
