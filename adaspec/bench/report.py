"""Reports of a benchmark run: tables, plots, JSON, and the accelerator projection.

A run is a list of ``RequestRecord`` (one per served request and configuration; multi-turn conversations give one
record per turn). Configurations are compared on the *same* requests, so every ratio is a median of per-request
ratios, which cancels most of the noise of a shared machine (:func:`summarize`; :func:`project_speedup`).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from ..files import write_atomic

if TYPE_CHECKING:
    from ..engine import RequestStats


RENAMED_CONFIGS = {"adaspec-plain": "plain", "adaspec": "adaptive"}
"""Configuration names of runs made before the benchmark took the engine's mode names; still read and accepted."""


def config_name(name: str) -> str:
    """The current name of a configuration (an earlier spelling, with or without a ``@backend`` suffix, renamed)."""
    base, at, backend = name.partition("@")
    return RENAMED_CONFIGS.get(base, base) + at + backend


@dataclass
class RequestRecord:
    """One request served by one configuration."""

    config: str  # configuration name, e.g. "adaptive", "plain", "oracle", "llama.cpp", "hf-pld"
    request_id: str  # the work item (and turn) id: equal across configurations, so results pair up
    index: int  # position in the request stream (0-based), the x axis of the stream plots
    phase: int  # phase index (drift phase, RL step, or 0)
    phase_name: str
    domain: str
    scenario: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    wall_seconds: float = 0.0  # the whole request: prefill and decode
    ttft_seconds: float | None = None
    forwards: int = 0  # target forwards that emitted tokens, the prefill included; 0 = unknown (peers)
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # draft tokens accepted
    speculator_mix: dict[str, int] = field(default_factory=dict)  # steps per verified draft's source; "none" = no draft
    matches_reference: bool | None = None  # output == the reference greedy output, when checked
    step_emitted: list[int] = field(default_factory=list)  # per verification step: tokens emitted (accepted + 1)
    step_drafted: list[int] = field(default_factory=list)  # per verification step: draft tokens verified
    overhead_share: float | None = None  # share of decode time outside target forwards (adaspec configs)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens per second after the first token (the prefill left out); None without a first-token time."""
        if self.ttft_seconds is None or self.output_tokens < 2 or self.wall_seconds <= self.ttft_seconds:
            return None
        return (self.output_tokens - 1) / (self.wall_seconds - self.ttft_seconds)

    @property
    def accepted_per_forward(self) -> float:
        """Output tokens per target forward (1.00 for plain decoding); NaN when forwards are unknown."""
        return self.output_tokens / self.forwards if self.forwards > 0 else math.nan

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_stats(cls, config: str, item: Any, index: int, stats: RequestStats, request_id: str | None = None,
                   step_emitted: Sequence[int] | None = None, step_drafted: Sequence[int] | None = None,
                   matches_reference: bool | None = None) -> "RequestRecord":
        """From a work item (``id, phase, phase_name, domain, scenario``) and the engine's ``RequestStats``.

        The per-step lists (for the projection) are the stats' own unless given.
        """
        if step_emitted is None:
            step_emitted = stats.step_emitted
        if step_drafted is None:
            step_drafted = stats.step_drafted
        return cls(config, request_id or item.id, index, item.phase, item.phase_name, item.domain, item.scenario,
                   prompt_tokens=stats.prompt_tokens, output_tokens=stats.output_tokens, wall_seconds=stats.wall_s,
                   ttft_seconds=stats.prefill_s, forwards=stats.forwards, drafted=stats.drafted,
                   accepted=stats.accepted, speculator_mix=dict(stats.chosen), matches_reference=matches_reference,
                   step_emitted=list(step_emitted), step_drafted=list(step_drafted),
                   overhead_share=stats.overhead_share)

    @classmethod
    def from_peer(cls, item: Any, index: int, result: Any, request_id: str | None = None) -> "RequestRecord":
        """From a work item and a ``peers.PeerResult`` (forwards unknown: 0)."""
        return cls(result.peer, request_id or item.id, index, item.phase, item.phase_name, item.domain, item.scenario,
                   prompt_tokens=result.prompt_tokens, output_tokens=len(result.tokens), wall_seconds=result.seconds,
                   ttft_seconds=result.ttft_seconds, matches_reference=result.matches_reference,
                   drafted=result.drafted, accepted=result.accepted)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RequestRecord":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"tok_s", "accepted_per_forward", "decode_tok_s"}
        if unknown:
            raise ValueError(f"unknown RequestRecord fields {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class ReportConfig:
    """Which configurations the ratios refer to, and how the plots smooth."""

    baseline: str = "plain"  # "speedup" column: ratio to this configuration
    peer: str = "llama.cpp"  # "vs llama.cpp" column
    server_peer: str = "llama-server"  # "vs llama-server" column
    oracle: str = "oracle"  # "of oracle" column
    window: int = 9  # rolling-median window of the stream plots, in requests
    flat_k: int = 16  # projection: forwards of up to flat_k tokens cost as much as one
    draft_share: float = 0.05  # projection: drafting cost of a speculating step, as a fraction of c(1)


# ---------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------

def flat_cost(k: int, flat_k: int = 16) -> float:
    """ĉ(k): the cost of a forward over k tokens relative to one token (see project_speedup)."""
    if k < 1:
        raise ValueError("a forward verifies at least one token")
    return 1.0 if k <= flat_k else k / flat_k


def project_speedup(step_emitted: Sequence[int], step_drafted: Sequence[int], flat_k: int = 16,
                    draft_share: float = 0.0) -> float:
    """The accelerator projection; NaN for no steps.

    On a GPU a forward over k tokens costs about as much as a forward over one
    token until k reaches the point where the matmuls stop being memory-bound. With
    the flat cost model (cost relative to one token, ``K`` = ``flat_k``)::

        ĉ(k) = 1        for k <= K
        ĉ(k) = k / K    for k >  K

    and a draft-cost share δ (drafting time of a speculating step, as a fraction of
    c(1)), a run whose step i verified ``d_i`` draft tokens (plus the pending token,
    so k_i = d_i + 1) and emitted ``e_i`` tokens (accepted + 1) has the projected
    speedup over plain decoding (one token per c(1))::

        S = Σ_i e_i / Σ_i [ ĉ(d_i + 1) + δ · 1{d_i > 0} ]

    Example: steps with d = (8, 8, 0) and e = (5, 3, 1) give S = 9 / (3 + 2δ) = 3.0 at δ = 0.
    """
    if len(step_emitted) != len(step_drafted):
        raise ValueError("step_emitted and step_drafted must have one entry per step")
    if not step_emitted:
        return math.nan
    if draft_share < 0 or flat_k < 1:
        raise ValueError("draft_share must be >= 0 and flat_k >= 1")
    cost = sum(flat_cost(d + 1, flat_k) + (draft_share if d > 0 else 0.0) for d in step_drafted)
    return float(sum(step_emitted)) / cost


def project_records(records: Iterable[RequestRecord], flat_k: int = 16, draft_share: float = 0.0) -> float:
    """The projection over all steps of several requests (NaN if none recorded steps)."""
    e: list[int] = []
    d: list[int] = []
    for r in records:
        e += r.step_emitted
        d += r.step_drafted
    return project_speedup(e, d, flat_k, draft_share)


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------

@dataclass
class SummaryRow:
    config: str
    phase: str  # "all" or the phase name ("<index>:<name>" when names repeat)
    requests: int
    output_tokens: int
    tok_s_median: float
    tok_s_total: float  # all output tokens / all wall seconds
    decode_tok_s_median: float | None  # median over requests of tokens after the first / seconds after the first
    speedup: float | None  # median paired ratio to ReportConfig.baseline
    vs_peer: float | None  # ... to ReportConfig.peer
    vs_server: float | None  # ... to ReportConfig.server_peer
    of_oracle: float | None  # ... to ReportConfig.oracle
    accepted_per_forward: float | None  # Σ output tokens / Σ forwards over requests with known forwards
    acceptance_rate: float | None  # Σ accepted / Σ drafted draft tokens, when any were drafted
    mix: dict[str, float]  # share of steps per draft source
    projected_speedup: float | None  # accelerator projection (flat c(k)), when steps were recorded
    reference_matches: str | None  # "matched/checked", when outputs were checked


def _median(xs: Sequence[float]) -> float:
    return float(np.median(xs)) if len(xs) else math.nan


def _paired_ratio(rs: Sequence[RequestRecord], base: Mapping[str, RequestRecord]) -> float | None:
    ratios = [r.tok_s / base[r.request_id].tok_s for r in rs
              if r.request_id in base and base[r.request_id].tok_s > 0 and r.wall_seconds > 0]
    return _median(ratios) if ratios else None


def _phase_labels(records: Sequence[RequestRecord]) -> dict[int, str]:
    names: dict[int, str] = {}
    for r in records:
        names.setdefault(r.phase, r.phase_name)
    dup = Counter(names.values())
    return {p: (f"{p}:{n}" if dup[n] > 1 else n) for p, n in names.items()}


def _row(config: str, phase: str, rs: Sequence[RequestRecord], by_config: Mapping[str, Mapping[str, RequestRecord]],
         cfg: ReportConfig) -> SummaryRow:
    out_tokens = sum(r.output_tokens for r in rs)
    wall = sum(r.wall_seconds for r in rs)
    known = [r for r in rs if r.forwards > 0]
    mix: Counter[str] = Counter()
    for r in rs:
        mix.update(r.speculator_mix)
    steps = sum(mix.values())
    checked = [r for r in rs if r.matches_reference is not None]
    stepped = [r for r in rs if r.step_emitted]

    def ratio(other: str) -> float | None:
        return None if other == config or other not in by_config else _paired_ratio(rs, by_config[other])

    decode = [d for r in rs if (d := r.decode_tok_s) is not None]
    drafted = sum(r.drafted for r in rs)
    return SummaryRow(
        config=config, phase=phase, requests=len(rs), output_tokens=out_tokens,
        tok_s_median=_median([r.tok_s for r in rs]), tok_s_total=out_tokens / wall if wall > 0 else math.nan,
        decode_tok_s_median=_median(decode) if decode else None,
        speedup=ratio(cfg.baseline), vs_peer=ratio(cfg.peer), vs_server=ratio(cfg.server_peer),
        of_oracle=ratio(cfg.oracle),
        accepted_per_forward=(sum(r.output_tokens for r in known) / sum(r.forwards for r in known)) if known else None,
        acceptance_rate=sum(r.accepted for r in rs) / drafted if drafted else None,
        mix={k: v / steps for k, v in sorted(mix.items(), key=lambda kv: -kv[1])} if steps else {},
        projected_speedup=project_records(stepped, cfg.flat_k, cfg.draft_share) if stepped else None,
        reference_matches=f"{sum(bool(r.matches_reference) for r in checked)}/{len(checked)}" if checked else None,
    )


def summarize(records: Sequence[RequestRecord], cfg: ReportConfig = ReportConfig()) -> list[SummaryRow]:
    """One row per configuration over the whole run, then one per configuration and phase.

    Table columns (per configuration, overall and per phase):

    * ``tok/s``: median over requests of output tokens / wall seconds (prefill included);
    * ``decode tok/s``: median over requests of the tokens after the first / the seconds after the first token;
    * ``speedup``: median of tok/s(config) / tok/s(baseline) on the same requests (baseline: adaspec plain);
    * ``vs llama.cpp``: the same ratio against llama.cpp plain (llama-cpp-python, in process);
    * ``vs llama-server``: the same ratio against llama-server plain (over HTTP);
    * ``of oracle``: the same ratio against the oracle speculator (every draft accepted: the ceiling on this hardware);
    * ``acc/fwd``: output tokens / target forwards, the prefill counted (Spec-Bench's mean accepted tokens; plain = 1.00);
    * ``acc. rate``: accepted / drafted draft tokens (llama-server's from its ``timings``);
    * ``mix``: share of steps whose verified draft came from each speculator ("none" = no speculation);
    * ``ref match``: outputs equal to the reference: adaspec plain of the same backend, or for the llama-server
      peers llama-server plain.
    """
    if not records:
        raise ValueError("no records to summarize")
    configs = list(dict.fromkeys(r.config for r in records))
    by_config: dict[str, dict[str, RequestRecord]] = defaultdict(dict)
    for r in records:
        if r.request_id in by_config[r.config]:
            raise ValueError(f"configuration {r.config!r} has two records for request {r.request_id!r}")
        by_config[r.config][r.request_id] = r
    labels = _phase_labels(records)
    rows = [_row(c, "all", list(by_config[c].values()), by_config, cfg) for c in configs]
    if len(labels) > 1:
        for p in sorted(labels):
            for c in configs:
                rs = [r for r in by_config[c].values() if r.phase == p]
                if rs:
                    rows.append(_row(c, labels[p], rs, by_config, cfg))
    return rows


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


TABLE_COLUMNS = ("config", "phase", "requests", "tok/s", "decode tok/s", "speedup", "vs llama.cpp",
                 "vs llama-server", "of oracle", "acc/fwd", "acc. rate", "proj. speedup", "mix", "ref match")


def markdown_table(rows: Sequence[SummaryRow]) -> str:
    """The summary as a markdown table (columns: ``TABLE_COLUMNS``)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        mix = ", ".join(f"{k} {v:.0%}" for k, v in list(r.mix.items())[:4])
        cells = [r.config, r.phase, str(r.requests), _fmt(r.tok_s_median, ".1f"), _fmt(r.decode_tok_s_median, ".1f"),
                 _fmt(r.speedup, ".2f", "x"), _fmt(r.vs_peer, ".2f", "x"), _fmt(r.vs_server, ".2f", "x"),
                 _fmt(r.of_oracle, ".0%") if r.of_oracle is not None else "–", _fmt(r.accepted_per_forward),
                 _fmt(r.acceptance_rate, ".0%") if r.acceptance_rate is not None else "–",
                 _fmt(r.projected_speedup, ".2f", "x"), mix or "–", r.reference_matches or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rolling_median(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing median over the last ``window`` values (fewer at the start); NaNs are skipped."""
    v = np.asarray(values, dtype=np.float64)  # [n]
    out = np.full(len(v), np.nan)
    for i in range(len(v)):
        w = v[max(0, i - window + 1): i + 1]
        w = w[~np.isnan(w)]
        if len(w):
            out[i] = np.median(w)
    return out


def phase_boundaries(records: Sequence[RequestRecord]) -> list[tuple[int, int, str]]:
    """(first index, last index, phase label) of each phase along the stream, in stream order."""
    labels = _phase_labels(records)
    spans: dict[int, list[int]] = {}
    for r in records:
        s = spans.setdefault(r.phase, [r.index, r.index])
        s[0], s[1] = min(s[0], r.index), max(s[1], r.index)
    return sorted((a, b, labels[p]) for p, (a, b) in spans.items())


STREAM_METRICS = {"tok_s": ("tokens / second", lambda r: r.tok_s),
                  "accepted_per_forward": ("tokens per target forward", lambda r: r.accepted_per_forward)}


def plot_stream(records: Sequence[RequestRecord], path: str | os.PathLike, metric: str = "tok_s",
                cfg: ReportConfig = ReportConfig(), title: str | None = None) -> Path:
    """A metric along the request stream: rolling median, one line per configuration, phases shaded."""
    if metric not in STREAM_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(STREAM_METRICS)}")
    ylabel, get = STREAM_METRICS[metric]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    try:
        for config in dict.fromkeys(r.config for r in records):
            rs = sorted((r for r in records if r.config == config), key=lambda r: r.index)
            y = rolling_median([get(r) for r in rs], cfg.window)
            if np.all(np.isnan(y)):
                continue  # e.g. forwards unknown for a peer
            ax.plot([r.index for r in rs], y, label=config, linewidth=1.6)
        for i, (a, b, label) in enumerate(phase_boundaries(records)):
            if i:
                ax.axvline(a - 0.5, color="0.4", linestyle="--", linewidth=0.8)
            ax.text((a + b) / 2, 1.01, label, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=9)
        ax.set_xlabel("request (stream order)")
        ax.set_ylabel(f"{ylabel} (rolling median of {cfg.window}, log scale)")
        ax.set_yscale("log", base=2)  # ratios between configurations read as equal distances
        from matplotlib import ticker

        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        if title:
            ax.set_title(title, pad=18)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


def _save_figure(fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_cost_curve(costs: Mapping[str, Mapping[int, float]], path: str | os.PathLike, flat_k: int | None = 16,
                    title: str = "cost of one target forward over k tokens") -> Path:
    """c(k) per backend: milliseconds (left) and relative to c(1) (right, with the flat model for reference)."""
    if not costs or not any(costs.values()):
        raise ValueError("no cost measurements to plot")
    plt = _pyplot()
    from matplotlib import ticker

    fig, (ax, rel) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        kmax = 1
        for backend, curve in costs.items():
            ks = sorted(int(k) for k in curve)
            if not ks:
                continue
            secs = np.array([curve[k] for k in ks], dtype=np.float64)
            kmax = max(kmax, ks[-1])
            ax.plot(ks, secs * 1e3, marker="o", label=backend)
            if 1 in curve and curve[1] > 0:
                rel.plot(ks, secs / curve[1], marker="o", label=backend)
        if flat_k:
            kk = np.arange(1, kmax + 1)
            rel.plot(kk, [flat_cost(int(k), flat_k) for k in kk], color="0.5", linestyle=":",
                     label=f"flat model (K={flat_k})")
        for a, yl in ((ax, "milliseconds"), (rel, "c(k) / c(1)")):
            a.set_xscale("log", base=2)
            a.xaxis.set_major_formatter(ticker.ScalarFormatter())
            a.set_xlabel("k (tokens in the forward)")
            a.set_ylabel(yl)
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.suptitle(title)
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# JSON and the whole report
# ---------------------------------------------------------------------------------------------

def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, int dict keys -> str."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def save_run(path: str | os.PathLike, records: Sequence[RequestRecord], meta: Mapping[str, Any] | None = None,
             summary: Sequence[SummaryRow] | None = None,
             costs: Mapping[str, Mapping[int, float]] | None = None) -> Path:
    """Write the run as JSON (atomically): meta, records, and optionally the summary and cost curves."""
    blob = {"format": "adaspec-run/1", "meta": dict(meta or {}), "records": [r.to_dict() for r in records]}
    if summary is not None:
        blob["summary"] = [asdict(s) for s in summary]
    if costs is not None:
        blob["costs"] = {b: {str(k): v for k, v in c.items()} for b, c in costs.items()}
    path = Path(path)
    write_atomic(path, json.dumps(_clean(blob), indent=1))
    return path


@dataclass
class Run:
    records: list[RequestRecord]
    meta: dict[str, Any]
    summary: list[dict[str, Any]] | None = None
    costs: dict[str, dict[int, float]] | None = None


def load_run(path: str | os.PathLike) -> Run:
    """Read a run written by ``save_run``."""
    blob = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(blob, dict) or blob.get("format") != "adaspec-run/1":
        raise ValueError(f"{path} is not an adaspec run file (format adaspec-run/1)")
    costs = blob.get("costs")
    records = [RequestRecord.from_dict({**r, "config": config_name(r["config"])}) for r in blob["records"]]
    meta = blob.get("meta", {})
    if isinstance(meta.get("configs"), list):
        meta["configs"] = [config_name(c) for c in meta["configs"]]
    return Run(records, meta, blob.get("summary"),
               {b: {int(k): v for k, v in c.items()} for b, c in costs.items()} if costs is not None else None)


@dataclass
class ReportFiles:
    markdown: Path
    json: Path
    plots: dict[str, Path]


def write_report(records: Sequence[RequestRecord], out_dir: str | os.PathLike, cfg: ReportConfig = ReportConfig(),
                 costs: Mapping[str, Mapping[int, float]] | None = None, meta: Mapping[str, Any] | None = None,
                 title: str = "adaspec benchmark") -> ReportFiles:
    """summary.md, run.json, stream_tok_s.png, stream_accepted.png (and cost_curve.png given costs) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records, cfg)
    plots = {"tok_s": plot_stream(records, out / "stream_tok_s.png", "tok_s", cfg, f"{title}: throughput"),
             "accepted_per_forward": plot_stream(records, out / "stream_accepted.png", "accepted_per_forward", cfg,
                                                 f"{title}: tokens per forward")}
    if costs:
        plots["cost_curve"] = plot_cost_curve(costs, out / "cost_curve.png", cfg.flat_k)
    md = [f"# {title}", "", markdown_table(rows), "",
          f"Ratios are medians of per-request ratios on the same requests; baseline `{cfg.baseline}`, "
          f"peers `{cfg.peer}` and `{cfg.server_peer}`, ceiling `{cfg.oracle}`. Projected speedup: flat c(k) up to k={cfg.flat_k}, "
          f"draft cost {cfg.draft_share:.0%} of c(1) per speculating step.", ""]
    md += [f"![{k}]({p.name})" for k, p in plots.items()]
    md_path = out / "summary.md"
    write_atomic(md_path, "\n".join(md) + "\n")
    json_path = save_run(out / "run.json", records, {**dict(meta or {}), "report_config": asdict(cfg)}, rows, costs)
    return ReportFiles(md_path, json_path, plots)
