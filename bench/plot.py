#!/usr/bin/env python3
"""PNG plots of a bench/run.py JSON: throughput against size, and peak memory against size.

    python bench/plot.py RESULTS.json OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

GiB = 1 << 30
MiB = 1 << 20

STYLE = {"cp": ("black", "o", "-"), "to_meg": ("tab:blue", "s", "-"), "to_meg_2ranks": ("tab:cyan", "s", ":"),
         "to_hf": ("tab:green", "^", "-"), "relayout": ("tab:purple", "D", "-"),
         "peer_to_meg": ("tab:blue", "s", "--"), "peer_to_hf": ("tab:green", "^", "--"),
         "peer_relayout": ("tab:purple", "D", "--"), "to_deepseek": ("tab:red", "*", "none"),
         "peer_deepseek": ("tab:red", "x", "none"), "to_bf16": ("tab:orange", "*", "none"),
         "peer_bf16": ("tab:orange", "x", "none")}


def _series(rows, cache, key):
    """(kind, step) -> (sizes, values, label): dense sizes make lines, the MoE its own points."""
    out: dict[tuple[str, str], tuple[list, list, str]] = {}
    for r in rows:
        if r["cache"] != cache or "wall_s" not in r:
            continue
        label = r["label"] + (" [fp8 MoE]" if r["kind"] != "dense" and r["step"] == "cp" else "")
        xs, ys, label = out.setdefault((r["kind"], r["step"]), ([], [], label))
        xs.append(r["source_bytes"] / GiB)
        ys.append(key(r))
    return out


def plot(info: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    rows = info["rows"]
    caches = [c for c in ("warm", "cold") if any(r["cache"] == c for r in rows)]
    written = []
    figures = (
        ("throughput_vs_size.png", "GB written per second (wall time of the whole command)",
         lambda r: r["written_gb_per_s"], False),
        ("memory_vs_size.png", "peak resident anonymous memory, MiB (whole process tree)",
         lambda r: r["peak_rss_anon_bytes"] / MiB, True),
    )
    for fname, ylabel, key, log in figures:
        fig, axes = plt.subplots(1, len(caches), figsize=(max(10, 7 * len(caches)), 6.5), squeeze=False)
        for ax, cache in zip(axes[0], caches):
            for (kind, step), (xs, ys, label) in sorted(_series(rows, cache, key).items()):
                color, marker, line = STYLE.get(step, ("gray", ".", "-"))
                if kind != "dense":
                    line = "none"
                    marker = "P" if step == "cp" else marker
                ax.plot(xs, ys, color=color, marker=marker, linestyle=line, label=label, markersize=8)
            if log:
                # The target: 512 MiB + the largest tensor, per dense source.
                dense = sorted({(r["source_bytes"] / GiB, (512 * MiB + r["largest_tensor"]["bytes"]) / MiB)
                                for r in rows if r["kind"] == "dense"})
                if dense:
                    ax.plot([d[0] for d in dense], [d[1] for d in dense], color="gray", linestyle="-.", marker="_",
                            markersize=14, label="target: 512 MiB + largest tensor (dense)")
                ax.set_yscale("log")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("source checkpoint, GiB (log scale)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{cache} page cache")
            ax.grid(True, alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=2 if len(caches) == 1 else 3, fontsize=8)
        load = info.get("loadavg1") or {}
        fig.suptitle(f"pyconv benchmark, {info['date']}, {info['machine']['cpus']} CPUs"
                     + (f", load average {load.get('min', 0):.1f}-{load.get('max', 0):.1f} (shared machine)"
                        if load else ""), fontsize=10)
        fig.tight_layout(rect=(0, 0.2, 1, 1))
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        for p in plot(json.load(f), sys.argv[2]):
            print(p)
