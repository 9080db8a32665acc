"""The speed–fidelity picture's bookkeeping (tests/plot_pareto.py): which points it pairs and which form the front.

No ComfyUI; small hand-made csv files in the benchmarks' formats.
"""
import csv

import plot_pareto

SPEED = [  # model, method, ratio, speedup_vs_none
    ("sd15@768", "none", 0.0, 1.0),
    ("sd15@768", "builtin", 0.5, 1.10),
    ("sd15@768", "itm-cfg", 0.5, 1.30),
    ("sd15@768", "itm-random", 0.5, 1.26),
    ("sd15@768", "itm-cfg-queries", 0.5, 1.16),
    ("sd15@768", "itm-cfg-transformer", 0.5, 1.40),
    ("sd15@512", "itm-cfg", 0.5, 9.0),  # another model: never used for sd15@768
]
QUALITY = [  # label, method, options, ratio, psnr
    ("none", "none", "", 0.0, ""),
    ("builtin@0.5", "builtin", "", 0.5, "47.0"),
    ("itm-random@0.5", "itm-random", "", 0.5, "47.5"),
    ("itm-cfg@0.5", "itm-cfg", "", 0.5, "46.0"),
    ("itm-cfg[protect=0.1]@0.5", "itm-cfg", "protect=0.1", 0.5, "48.0"),
    ("itm-cfg[scope=queries]@0.5", "itm-cfg", "scope=queries", 0.5, "49.0"),
    ("itm-cfg[scope=transformer]@0.5", "itm-cfg", "scope=transformer", 0.5, "35.0"),
    ("itm-cfg@0.7", "itm-cfg", "", 0.7, "44.0"),  # no speed figure at 0.7: left out
]


def _write(tmp_path):
    speed, quality = tmp_path / "speed.csv", tmp_path / "quality.csv"
    with open(speed, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "method", "ratio", "speedup_vs_none"])
        writer.writerows(SPEED)
    with open(quality, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "method", "options", "ratio", "psnr", "psnr_ci"])
        writer.writerows([row + ("0.3",) for row in QUALITY])
    return str(speed), str(quality)


def _table(path):
    rows = {}
    for line in open(path, encoding="utf-8").read().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = (float(cells[1].rstrip("×")), float(cells[2].split()[0]), cells[3] == "yes")
    return rows


def test_points_pair_equal_cost_settings_and_the_front(tmp_path):
    speed, quality = _write(tmp_path)
    out = tmp_path / "pareto.png"
    assert plot_pareto.main(["--speed", speed, "--quality", quality, "--out", str(out)]) == 0
    rows = _table(tmp_path / "pareto.md")
    # importance and random ToMe cost the same: both take the mean of their measured speed-ups, whatever the options
    assert rows["itm-cfg@0.5"][0] == rows["itm-random@0.5"][0] == rows["itm-cfg[protect=0.1]@0.5"][0] == 1.28
    assert rows["itm-cfg[scope=queries]@0.5"][0] == 1.16 and rows["itm-cfg[scope=transformer]@0.5"][0] == 1.40
    assert "itm-cfg@0.7" not in rows and "none" not in rows
    front = {label for label, (_, _, on) in rows.items() if on}
    # the built-in node (1.10×, 47 dB) is beaten by the queries site (1.16×, 49 dB); protect beats both other 1.28× rows
    assert front == {"itm-cfg[scope=queries]@0.5", "itm-cfg[protect=0.1]@0.5", "itm-cfg[scope=transformer]@0.5"}
    assert out.exists() and out.stat().st_size > 0


def test_exclude_drops_rows_before_the_front_is_drawn(tmp_path):
    speed, quality = _write(tmp_path)
    out = tmp_path / "pareto.png"
    assert plot_pareto.main(["--speed", speed, "--quality", quality, "--out", str(out),
                             "--exclude", r"scope=queries|protect=0\.1"]) == 0
    rows = _table(tmp_path / "pareto.md")
    assert "itm-cfg[scope=queries]@0.5" not in rows and "itm-cfg[protect=0.1]@0.5" not in rows
    front = {label for label, (_, _, on) in rows.items() if on}
    # what is left: random ToMe (1.28×, 47.5 dB) beats the built-in node and importance without protect
    assert front == {"itm-random@0.5", "itm-cfg[scope=transformer]@0.5"}
