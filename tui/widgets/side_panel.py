"""The side panel: the model and its load progress, live speed (decode tok/s with a sparkline of
recent steps, prefill tok/s, time to first token), memory per device, where the layers live and
the settings in force. The app calls the ``show_*`` methods; the panel only draws."""

from __future__ import annotations

from collections import deque

from glmchat.tui.format import duration, human_bytes, human_count, streaming, token_count
from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import ProgressBar, Sparkline, Static

from glmchat.params import GenerationParams
from glmchat.protocol import GenerationResult, Loaded, Memory, Placement, StepStats

GIB = 1 << 30
SPARK_STEPS = 48  # decode steps the sparkline shows
TIER_ORDER = ("cuda", "mps", "cpu", "disk")


def _rows(*rows: tuple[str, str | Text]) -> Table:
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column(style="dim", no_wrap=True)
    table.add_column(justify="right", ratio=1)
    for label, value in rows:
        table.add_row(label, value)
    return table


def usage_bar(used: int, total: int, width: int = 12) -> Text:
    fraction = min(1.0, used / total) if total > 0 else 0.0
    filled = round(fraction * width)
    style = "red" if fraction > 0.9 else "yellow" if fraction > 0.7 else "green"
    bar = Text("█" * filled, style=style)
    bar.append("░" * (width - filled), style="dim")
    return bar


def _tier_key(tier: str) -> tuple[int, str]:
    for rank, prefix in enumerate(TIER_ORDER):
        if tier.startswith(prefix):
            return rank, tier
    return len(TIER_ORDER), tier


def placement_table(placement: Placement) -> Table:
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column(no_wrap=True)
    table.add_column(justify="right")
    table.add_column(justify="right", ratio=1)
    tiers = sorted(set(placement.layers_per_tier) | set(placement.bytes_per_tier), key=_tier_key)
    for tier in tiers:
        layers = placement.layers_per_tier.get(tier, 0)
        table.add_row(tier, f"{layers}/{placement.n_layers} layers",
                      human_bytes(placement.bytes_per_tier.get(tier, 0)))
    return table


class SidePanel(VerticalScroll):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.decode_steps: deque[float] = deque(maxlen=SPARK_STEPS)

    def on_mount(self) -> None:
        self.query_one("#load-bar").display = False  # until there is progress to show
        self.query_one("#load-what").display = False
        self.query_one("#stream-rows").display = False  # until a layer streams

    def compose(self) -> ComposeResult:
        with Vertical(id="model-box", classes="box") as box:
            box.border_title = "Model"
            yield Static("starting the worker…", id="model-info")
            yield ProgressBar(total=None, show_eta=False, id="load-bar")
            yield Static("", id="load-what")
        with Vertical(id="speed-box", classes="box") as box:
            box.border_title = "Speed"
            yield Static(_rows(("decode", "–")), id="decode-rate")
            yield Sparkline([], id="decode-spark")
            yield Static(_rows(("prefill", "–"), ("TTFT", "–"), ("tokens", "–")),
                         id="speed-rows")
        with Vertical(id="memory-box", classes="box") as box:
            box.border_title = "Memory"
            yield Static("waiting for the worker…", id="memory-rows")
        with Vertical(id="placement-box", classes="box") as box:
            box.border_title = "Layers"
            yield Static("–", id="placement-rows")
            yield Static("", id="stream-rows")
        with Vertical(id="settings-box", classes="box") as box:
            box.border_title = "Settings"
            yield Static("", id="settings-rows")

    # ---- model ----------------------------------------------------------------------------------

    def show_status(self, text: str) -> None:
        self.query_one("#model-info", Static).update(Text(text))

    def show_loading(self, done: int, total: int, what: str, eta_text: str) -> None:
        bar = self.query_one("#load-bar", ProgressBar)
        bar.display = True
        bar.update(total=max(total, 1), progress=done)
        line = f"[{done}/{total}] {what}"
        if eta_text:
            line += f" · ETA {eta_text}"
        self.query_one("#load-what", Static).update(Text(line))
        self.query_one("#load-what").display = True

    def show_loaded(self, loaded: Loaded) -> None:
        info = loaded.info
        self.query_one("#load-bar").display = False
        self.query_one("#load-what").display = False
        text = Text(info.name, style="bold")
        if loaded.placement.runtime == "remote":  # a server that says only its model's name
            context = f"context {info.context_length}" if info.context_length else \
                "context not reported"
            text.append(f"\nserved by {info.backend}\n{context}", style="dim")
        else:
            weights = f" · {info.quantize} weights" if info.quantize != "none" else ""
            text.append(f"\n{human_count(info.n_params)} params · {info.dtype}{weights}\n"
                        f"{info.n_layers} layers · context {info.context_length}\n"
                        f"loaded in {duration(loaded.load_s)}", style="dim")
        self.query_one("#model-info", Static).update(text)
        self.show_placement(loaded.placement)

    def show_placement(self, placement: Placement) -> None:
        rows = self.query_one("#placement-rows", Static)
        if placement.runtime == "remote":
            rows.update(Text("not reported by this server", style="yellow"))
        else:
            rows.update(placement_table(placement))
        self.query_one("#placement-box").border_subtitle = placement.runtime + (
            f" · {placement.quantize}" if placement.quantize != "none" else "")

    # ---- speed ----------------------------------------------------------------------------------

    def start_reply(self) -> None:
        self.decode_steps.clear()

    def show_step(self, stats: StepStats) -> None:
        if stats.new_tokens > 1 and stats.step_s > 0:
            self.decode_steps.append(1.0 / stats.step_s)
            self.query_one("#decode-spark", Sparkline).data = list(self.decode_steps)
        self._speed(stats.decode_tokens_per_s, stats.prefill_tokens_per_s, stats.ttft_s,
                    stats.new_tokens)
        rows = streaming(stats.extra)
        if rows and stats.new_tokens > 1:  # the prefill step's rate is not a streaming rate
            stream = self.query_one("#stream-rows", Static)
            stream.update(_rows(*rows))
            stream.display = True

    def show_result(self, result: GenerationResult) -> None:
        t = result.timings
        self._speed(t.decode_tokens_per_s, t.prefill_tokens_per_s, t.ttft_s,
                    token_count(result))

    def _speed(self, decode: float, prefill: float, ttft: float, tokens: int) -> None:
        rate = Text(f"{decode:.1f} tok/s" if decode > 0 else "–", style="bold")
        self.query_one("#decode-rate", Static).update(_rows(("decode", rate)))
        self.query_one("#speed-rows", Static).update(_rows(
            ("prefill", f"{prefill:.0f} tok/s" if prefill > 0 else "–"),
            ("TTFT", duration(ttft) if ttft > 0 else "–"), ("tokens", str(tokens))))

    # ---- memory ---------------------------------------------------------------------------------

    def show_memory(self, memory: Memory) -> None:
        memory_rows = self.query_one("#memory-rows", Static)
        if not (memory.devices or memory.cpu_rss or memory.disk_bytes):  # a remote server
            memory_rows.update(Text(memory.note or "not reported", style="yellow"))
            return
        rows: list[tuple[str, str | Text]] = []
        for device in memory.devices:
            bar = usage_bar(device.used, device.total, width=10)
            bar.append(f" {device.used / GIB:.1f}/{device.total / GIB:.0f} GiB")
            rows.append((device.name.split(" ")[0], bar))
        rows.append(("CPU RSS", human_bytes(memory.cpu_rss)))
        rows.append(("disk", human_bytes(memory.disk_bytes)))
        table = _rows(*rows)
        if memory.gpu_available:
            memory_rows.update(table)
        else:
            note = Text(memory.note or "no GPU", style="yellow")
            memory_rows.update(Group(note, table))

    # ---- settings -------------------------------------------------------------------------------

    def show_settings(self, params: GenerationParams) -> None:
        rows: list[tuple[str, str | Text]] = [("strategy", params.strategy)]
        if params.strategy == "beam":
            rows.append(("beams", str(params.num_beams)))
            rows.append(("length penalty", f"{params.length_penalty:g}"))
        if params.strategy == "sample":
            rows += [("temperature", f"{params.temperature:g}"), ("top-k", str(params.top_k)),
                     ("top-p", f"{params.top_p:g}"),
                     ("seed", "fresh" if params.seed < 0 else str(params.seed))]
        rows.append(("max new tokens", str(params.max_new_tokens)))
        if params.system_prompt:
            rows.append(("system", params.system_prompt[:24]))
        self.query_one("#settings-rows", Static).update(_rows(*rows))
