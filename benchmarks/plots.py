"""PNG plots of a results JSON: one figure per benchmark of issue 4, each labelled with machine and date.

    write_plots(report, directory) -> {benchmark name: path of its PNG}

matplotlib (the ``bench`` extra) with the Agg backend, imported here only: a
run without matplotlib writes its JSON and says that plots were skipped.
Every figure has a title, axes with units, log scales where sizes span
decades, and bars or bands from p10 to p90 where the runs give a spread.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["write_plots", "machine_line", "PLOTTED"]

MiB, GiB = 1 << 20, 1 << 30
PLOTTED = ("primary_map", "attach", "control_plane", "handoff", "hugepages")
COLORS = {"hugeshmd": "tab:blue", "hugeshmd heap": "tab:cyan", "hugeshmd array": "tab:purple",
          "shared_memory": "tab:orange", "queue": "tab:red",
          "plasma": "tab:green",
          "bare": "tab:gray", "shm": "tab:orange"}


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    load = report.get("loadavg_after") or m.get("loadavg")
    commit = (report.get("code", {}).get("commit") or "?")[:10]
    return (f"{m['cpu']}, {m['cores']} vCPU, Linux {m['kernel']}, Python {m['python']}; "
            f"run {m['date']}, load avg {load}; hugeshmd {commit}")


def write_plots(report: dict[str, Any], directory: str, stem: str = "") -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    makers: dict[str, Callable[[Any, dict[str, Any]], Any]] = {
        "primary_map": _primary_map, "attach": _attach, "control_plane": _control_plane,
        "handoff": _handoff, "hugepages": _hugepages,
    }
    written = {}
    os.makedirs(directory, exist_ok=True)
    for name, make in makers.items():
        result = report["benchmarks"].get(name)
        if result is None:
            continue
        fig = make(plt, result)
        fig.text(0.5, 0.005, machine_line(report) + ("  [QUICK: tiny sizes]" if report.get("quick") else ""),
                 ha="center", va="bottom", fontsize=7, color="dimgray")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = os.path.join(directory, f"{stem}{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[name] = path
    return written


# -- helpers ---------------------------------------------------------------------------------


def _size_axis(ax: Any, sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([_short(s) for s in sizes])
    ax.minorticks_off()


def _short(size: int) -> str:
    return f"{size // GiB} GiB" if size >= GiB else f"{size // MiB} MiB" if size >= MiB else f"{size // 1024} KiB"


def _band(ax: Any, xs: list[float], rows: list[dict[str, float]], scale: float, **style: Any) -> None:
    """A line of medians with p10-p90 error bars."""
    med = [r["median"] * scale for r in rows]
    low = [max(0.0, (r["median"] - r["p10"]) * scale) for r in rows]
    high = [max(0.0, (r["p90"] - r["median"]) * scale) for r in rows]
    ax.errorbar(xs, med, yerr=[low, high], capsize=3, marker="o", markersize=4, **style)


def _metric(result: dict[str, Any], key: str) -> dict[str, float] | None:
    row: dict[str, float] | None = result["metrics"].get(key)
    return row


# -- one figure per benchmark -------------------------------------------------------------------


def _primary_map(plt: Any, result: dict[str, Any]) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    series = result["details"]["series"]
    for page_size in sorted({s["page_size"] for s in series}):
        rows = [s for s in series if s["page_size"] == page_size]
        xs = [s["bytes"] for s in rows]
        label = "4 KiB (fallback)" if rows[0]["directory"] == "/dev/shm" else _short(page_size)
        style = "-" if page_size < GiB else "--"
        _band(left, xs, [s["start"] for s in rows], 1e3, color="tab:blue", linestyle=style,
              label=f"hugeshmd Primary.start(), {label} pages")
        _band(left, xs, [s["bare"] for s in rows], 1e3, color="tab:gray", linestyle=style,
              label=f"bare open+ftruncate+mmap(MAP_POPULATE), {label} pages")
        right.plot(xs, [s["ratio"] for s in rows], marker="o", color="tab:blue", linestyle=style,
                   label=f"{label} pages")
    sizes = sorted({s["bytes"] for s in series})
    for ax in (left, right):
        _size_axis(ax, sizes)
        ax.set_xlabel("memory mapped and populated")
        ax.grid(True, which="both", alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("time (ms, median; bars p10-p90)")
    left.set_title("Primary start vs a bare populate of the same pages")
    left.legend(fontsize=7)
    right.axhline(1.10, color="tab:red", linestyle=":", label="target 1.10")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_ylabel("hugeshmd / bare (medians, same run)")
    right.set_title("Overhead over the kernel's limit")
    right.legend(fontsize=8)
    return fig


def _attach(plt: Any, result: dict[str, Any]) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    rows = result["details"].get("by_segments", [])
    if rows:
        xs = [r["segments"] for r in rows]
        attach = [_metric(result, f"attach, {n} segments") for n in xs]
        _band(left, xs, [a for a in attach if a], 1e6, color="tab:blue", label="hugeshmd.attach()")
        left.plot(xs, [r["bare_p50"] * 1e6 for r in rows], marker="s", color="tab:gray",
                  label="bare: reserve window + N x (open, mmap MAP_FIXED, close)")
        left.set_xscale("log", base=2)
        left.set_yscale("log")
        left.set_xticks(xs)
        left.set_xticklabels([str(x) for x in xs])
        left.minorticks_off()
    left.set_xlabel("segments in the table (one mapping each)")
    left.set_ylabel("attach time (us, median; bars p10-p90)")
    left.set_title("Attach vs table size")
    left.legend(fontsize=8)
    conc = result["details"].get("concurrent", [])
    if conc:
        xs = [r["workers"] for r in conc]
        right.plot(xs, [r["attach_p50"] * 1e6 for r in conc], marker="o", color="tab:blue", label="p50")
        right.plot(xs, [r["attach_p99"] * 1e6 for r in conc], marker="o", linestyle="--", color="tab:blue",
                   label="p99")
        right.set_xscale("log", base=2)
        right.set_xticks(xs)
        right.set_xticklabels([str(x) for x in xs])
        right.minorticks_off()
        right.set_yscale("log")
    right.set_xlabel("workers attaching at once (2 vCPUs)")
    right.set_ylabel("each worker's attach() (us)")
    right.set_title("Concurrent attach, released together each round")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    return fig


def _control_plane(plt: Any, result: dict[str, Any]) -> Any:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    rounds = result["details"]["rounds"]
    ops = {"reserve": "tab:blue", "lookup": "tab:green", "free": "tab:orange"}
    for ax, path, title in ((axes[0], "api", "Worker API (in the worker, shared table)"),
                            (axes[1], "zmq", "Primary over ZeroMQ (REQ client)")):
        rows = [r for r in rounds if r["path"] == path]
        xs = [r["workers"] for r in rows]
        for op, color in ops.items():
            ax.plot(xs, [r[f"{op}_p50"] * 1e6 for r in rows], marker="o", color=color, label=f"{op} p50")
            ax.plot(xs, [r[f"{op}_p99"] * 1e6 for r in rows], marker="o", color=color, linestyle="--",
                    label=f"{op} p99")
        ax.set_yscale("log")
        ax.set_ylabel("latency per call (us)")
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=2)
    for path, color, label in (("api", "tab:blue", "worker API (reserve+lookup+free calls)"),
                               ("zmq", "tab:red", "primary over ZeroMQ (requests)")):
        rows = [r for r in rounds if r["path"] == path]
        xs = [r["workers"] for r in rows]
        med = [sorted(r["ops_per_s"])[len(r["ops_per_s"]) // 2] for r in rows]
        low = [m - min(r["ops_per_s"]) for m, r in zip(med, rows, strict=True)]
        high = [max(r["ops_per_s"]) - m for m, r in zip(med, rows, strict=True)]
        axes[2].errorbar(xs, med, yerr=[low, high], marker="o", capsize=3, color=color, label=label)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("calls per second, all workers (median; bars min-max of runs)")
    axes[2].set_title("Throughput")
    axes[2].legend(fontsize=8)
    for ax in axes:
        workers = sorted({r["workers"] for r in rounds})
        ax.set_xscale("log", base=2)
        ax.set_xticks(workers)
        ax.set_xticklabels([str(w) for w in workers])
        ax.minorticks_off()
        ax.set_xlabel("concurrent workers (2 vCPUs)")
        ax.grid(True, which="both", alpha=0.3)
    return fig


def _handoff(plt: Any, result: dict[str, Any]) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    table = result["details"]["by_size"]
    plasma = "Arrow Plasma 11 " + ("(-h, 2 MiB pages)" if result["params"].get("plasma_hugepages") else "(4 KiB pages)")
    names = {"hugeshmd": "hugeshmd zone", "hugeshmd heap": "hugeshmd heap (alloc, buffer)",
             "hugeshmd array": "hugeshmd shared array (multiprocessing.Queue)",
             "shared_memory": "multiprocessing.shared_memory",
             "queue": "multiprocessing.Queue (pickle)", "plasma": plasma}
    for method in result["params"]["methods"]:
        rows = [r for r in table if r["method"] == method]
        xs = [r["size"] for r in rows]
        _band(left, xs, [r["total"] for r in rows], 1e3, color=COLORS[method], label=names[method])
        right.plot(xs, [r["gib_per_s"] for r in rows], marker="o", color=COLORS[method], label=names[method])
    sizes = sorted({r["size"] for r in table})
    for ax in (left, right):
        _size_axis(ax, sizes)
        ax.set_xlabel("array size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("make, hand over, read all (ms; p10-p90)")
    left.set_title("Zero-copy handoff: producer to consumer")
    right.set_ylabel("array size / total time (GiB/s)")
    right.set_title("Effective handoff rate")
    return fig


def _hugepages(plt: Any, result: dict[str, Any]) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    gathers = result["details"]["gathers"]
    backings = [b for b in ("hugeshmd 1 GiB", "hugeshmd 2 MiB", "shm 4 KiB") if any(b in g["ns_median"]
                                                                                    for g in gathers)]
    colors = {"hugeshmd 1 GiB": "tab:purple", "hugeshmd 2 MiB": "tab:blue", "shm 4 KiB": "tab:orange"}
    width = 0.8 / max(1, len(backings))
    for i, backing in enumerate(backings):
        xs = [j + i * width for j, g in enumerate(gathers) if backing in g["ns_median"]]
        ys = [g["ns_median"][backing] for g in gathers if backing in g["ns_median"]]
        bars = left.bar(xs, ys, width, color=colors[backing], label=f"{backing} pages")
        left.bar_label(bars, fmt="%.0f", fontsize=7)
    left.set_xticks([j + width * (len(backings) - 1) / 2 for j in range(len(gathers))])
    left.set_xticklabels([_short(g["size"]) for g in gathers])
    left.set_xlabel("array size (uint64)")
    left.set_ylabel("time per random 8-byte gather (ns, median)")
    left.set_title("Random gathers: numpy.take over the array")
    left.legend(fontsize=8)
    fresh = result["details"]["fresh"]
    size = _short(result["params"]["fresh_bytes"])
    parts = ("first", "second")
    for i, (kind, label) in enumerate((("hugeshmd", "hugeshmd zone, 2 MiB pages"), ("shm", "/dev/shm, 4 KiB pages"))):
        xs = [j + i * 0.4 for j in range(len(parts))]
        bars = right.bar(xs, [fresh[kind][p] * 1e3 for p in parts], 0.4, color=COLORS[kind], label=label)
        right.bar_label(bars, labels=[f"{fresh[kind]['first'] * 1e3:.1f} ms\n{fresh[kind]['faults']:.0f} faults",
                                      f"{fresh[kind]['second'] * 1e3:.1f} ms"], fontsize=7)
    right.set_xticks([0.2, 1.2])
    right.set_xticklabels(["first read (maps pages in)", "second read (no faults)"])
    right.set_ylabel("time to read every byte (ms, median)")
    right.set_title(f"Fresh worker reads a {size} array")
    right.legend(fontsize=8)
    right.margins(y=0.2)
    for ax in (left, right):
        ax.grid(True, axis="y", alpha=0.3)
    return fig
