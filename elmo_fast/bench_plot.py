"""The benchmark plot: elmo_fast's speedup over the reference per op against batch size, one panel
per mode, one line per (op, threads). Kept apart from the driver (haste's report.py habit);
matplotlib is the `bench` extra, so a missing matplotlib skips the plot with a message."""
from collections import defaultdict
from typing import List, Optional


def plot_speedups(results: List, path: str) -> Optional[str]:
    """Write a PNG to `path`; returns None on success, else why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'elmo_fast[bench]'): no plot"
    modes = sorted({r.mode for r in results})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        lines = defaultdict(list)
        for r in results:
            if r.mode == mode and r.impl == "elmo_fast":
                lines[(r.op, r.threads)].append((int(r.shape.split("x")[0]), r.speedup))
        for (op, threads), points in sorted(lines.items()):
            points.sort()
            ax.plot([b for b, _ in points], [s for _, s in points], marker="o", label=f"{op}, {threads} thr")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # speedups span 1x (GEMM-bound highway) to 20x (char-CNN)
        ax.set_xlabel("batch (sentences)")
        ax.set_ylabel("speedup over the reference")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    if results:
        r = results[0]
        fig.suptitle(f"elmo_fast vs reference, {r.model} model, {r.dtype}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
