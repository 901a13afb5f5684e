"""The bench's results: per-cell summaries, the goals as ratios, and the table, JSON and chart."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

FLOOR = "psycopg2"
"""The contender every ratio is to: raw psycopg2 on a plain table of the cache's shape."""
LIB_SQL = "psycopg2, library SQL"
LIB = "FastPgCache"


@dataclass
class Result:
    """Latencies of one contender on one workload, summarised."""

    workload: str
    contender: str
    items_per_call: int
    samples: int
    p50_us: float
    p95_us: float
    p99_us: float
    mean_us: float
    ops_per_s: float
    p50_vs_floor: float | None = None
    ops_vs_floor: float | None = None


@dataclass
class Goal:
    """One speed goal of issues #3 and #8, as a ratio measured in this run."""

    goal: str
    ratio: float | None
    target: str
    met: bool | None


@dataclass
class Report:
    meta: dict
    results: list[Result] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def result(self, workload: str, contender: str) -> Result | None:
        """The result of one cell of the table, or None when that contender did not run it."""
        return next((r for r in self.results if r.workload == workload and r.contender == contender), None)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "results": [asdict(r) for r in self.results],
                "goals": [asdict(g) for g in self.goals], "notes": self.notes}


# -- goals --------------------------------------------------------------------------------

def goals(report: Report, settings) -> list[Goal]:
    """The speed goals of issues #3 and #8 as ratios from this run (None: not measured here)."""
    load = f"load {settings.threads}x{settings.thread_ops}"
    p50 = lambda w, c: _field(report, w, c, "p50_us")  # noqa: E731
    ops = lambda w, c: _field(report, w, c, "ops_per_s")  # noqa: E731
    return [
        _goal("get hit p50, FastPgCache / psycopg2", _div(p50("get hit", LIB), p50("get hit", FLOOR)), "<=", 1.25),
        _goal("set p50, FastPgCache / psycopg2", _div(p50("set", LIB), p50("set", FLOOR)), "<=", 1.25),
        _goal("set_many(1000) p50, FastPgCache / psycopg2 execute_values",
              _div(p50("set_many(1000)", LIB), p50("set_many(1000)", FLOOR)), "<=", 2),
        _goal("1000 x set() p50 / one set_many(1000) p50, FastPgCache",
              _div(_times(p50("set", LIB), 1000), p50("set_many(1000)", LIB)), ">=", 15),
        _goal("get_many(100) p50 / get hit p50, FastPgCache",
              _div(p50("get_many(100)", LIB), p50("get hit", LIB)), "<", 3),
        _goal(f"{load} throughput, shared FastPgCache / psycopg2 connection per thread",
              _div(ops(load, LIB), ops(load, FLOOR)), ">=", 0.8),
        _goal("get hit throughput, FastPgCache / Django DatabaseCache",
              _div(ops("get hit", LIB), ops("get hit", "Django DatabaseCache")), ">=", 3),
        _goal("set throughput, FastPgCache / Django DatabaseCache",
              _div(ops("set", LIB), ops("set", "Django DatabaseCache")), ">=", 3),
        _goal("set_many(1000) p50, FastPgCache / Redis MSET",
              _div(p50("set_many(1000)", LIB), p50("set_many(1000)", "Redis")), "<=", 1.5),
        _goal("set p50, FastPgCache LOGGED / UNLOGGED (information)",
              _div(p50("set", f"{LIB} LOGGED"), p50("set", LIB)), None, None),
        _goal(f"{load} throughput, FastPgCache UNLOGGED / LOGGED (information)",
              _div(ops(load, LIB), ops(load, f"{LIB} LOGGED")), None, None),
    ]


def _field(report: Report, workload: str, contender: str, name: str) -> float | None:
    result = report.result(workload, contender)
    return None if result is None else getattr(result, name)


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _times(a: float | None, factor: float) -> float | None:
    return None if a is None else a * factor


def _goal(name: str, ratio: float | None, op: str | None, target: float | None) -> Goal:
    checks = {"<=": lambda r: r <= target, "<": lambda r: r < target, ">=": lambda r: r >= target}
    met = None if ratio is None or op is None else checks[op](ratio)
    return Goal(name, ratio, f"{op} {target:g}" if op else "-", met)


# -- output --------------------------------------------------------------------------------

def format_table(report: Report) -> str:
    """The results as a fixed-width text table, then the goals, then the notes."""
    head = (f"{'workload':<17} {'contender':<24} {'p50 µs':>9} {'p95 µs':>9} {'p99 µs':>9} {'ops/s':>9} "
            f"{'p50 x floor':>11}")
    lines = [f"{report.meta['server']}, fsync={report.meta['fsync']}, {report.meta['machine']}, "
             f"layout {report.meta['layout']}", "", head,
             "-" * len(head)]
    previous = None
    for r in report.results:
        if previous and previous != r.workload:
            lines.append("")
        previous = r.workload
        ratio = "" if r.p50_vs_floor is None else f"{r.p50_vs_floor:.2f}"
        lines.append(f"{r.workload:<17} {r.contender:<24} {r.p50_us:>9.1f} {r.p95_us:>9.1f} {r.p99_us:>9.1f} "
                     f"{r.ops_per_s:>9.0f} {ratio:>11}")
    lines += ["", "goals (ratios from this run):"]
    for g in report.goals:
        verdict = {True: "met", False: "MISSED", None: ""}[g.met]
        ratio = "n/a" if g.ratio is None else f"{g.ratio:.2f}"
        lines.append(f"  {g.goal:<72} {ratio:>7} {g.target:>7} {verdict}")
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def write_json(report: Report, path: str) -> None:
    """Write the whole report (meta, every cell, goals, notes) as indented JSON."""
    with open(path, "w") as handle:
        json.dump(report.to_dict(), handle, indent=2)
        handle.write("\n")


def plot(report: Report, path: str) -> None:
    """Draw p50 (bar) and p95 (whisker) per workload and contender, log scale, into a PNG."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'fastpgcache[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in report.results))
    contenders = list(dict.fromkeys(r.contender for r in report.results))
    height = 0.8 / len(contenders)
    figure, axes = plt.subplots(figsize=(11, 0.55 * len(workloads) * max(2, len(contenders) / 2.5)))
    for index, contender in enumerate(contenders):
        rows = [(workloads.index(r.workload), r) for r in report.results if r.contender == contender]
        y = [pos + index * height for pos, _ in rows]
        p50 = [r.p50_us for _, r in rows]
        spread = [[0] * len(rows), [r.p95_us - r.p50_us for _, r in rows]]
        axes.barh(y, p50, height=height, xerr=spread, label=contender, capsize=2)
    axes.set_yticks([pos + 0.4 - height / 2 for pos in range(len(workloads))], workloads)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("latency per call, µs (bar p50, whisker p95; log scale)")
    axes.set_title(f"fastpgcache bench: {report.meta['server']}, {report.meta['machine']}, "
                   f"layout {report.meta['layout']}")
    axes.legend(loc="lower right", fontsize="small")
    axes.grid(axis="x", which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
