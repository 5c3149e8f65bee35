"""Where one forward's device time goes: a profiler trace of a few forwards, each XLA op's time
summed and attributed, through the compiled HLO's op metadata, to the E-DiT scopes it came from
("elastic_router", "elastic_block") or to the rest of the step. Prints JSON.

    python -m edit_jax.eval.profile_step --preset flux-small --mode infer
    python -m edit_jax.eval.profile_step --preset flux-dev --height 64 --width 64 --txt 512 \\
        --dtype bfloat16 --attention cudnn --mode infer                  # GPU, full size

On CPU the op events need XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true before JAX starts; this
script adds it when run as a program. On the GPU, XLA runs most ops inside command buffers (CUDA
graphs), which the trace shows as one op each, so no op could be given its scope: run as a program,
the script turns them off (--xla_gpu_enable_command_buffer=) unless XLA_FLAGS names that option;
the wall time is then a few percent above the benchmarks' (FLUX.1-dev on an H200: 145.7 ms against
142.4 ms with them). Modes: dense, infer (fresh routers: every block open at full
width), forced_all_open (every block through the switch, no routers), forced_pattern (bench_elastic's).
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    for _option, _value in (("xla_cpu_enable_xprof_traceme", "true"), ("xla_gpu_enable_command_buffer", "")):
        if _option not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_option}={_value}".strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from edit_jax.eval.bench_elastic import all_open, build, forced_pattern, forwards  # noqa: E402
from edit_jax.eval.bench_forward import model_arguments  # noqa: E402
from edit_jax.eval.report import emit, environment, run_script  # noqa: E402

MODES = ("dense", "infer", "forced_all_open", "forced_pattern")
SCOPES = ("elastic_router", "elastic_block")
# lines a profiler may derive from the stream lines (counting them would count kernels twice)
_DERIVED_LINES = ("XLA Ops", "XLA Modules", "Framework", "TensorFlow", "Steps", "Source")
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name="([^"]*)"')


_CONTAINER = re.compile(r"\s(?:while|conditional|call)\(")


def op_names(hlo_text: str) -> tuple[dict[str, str], set[str]]:
    """(HLO instruction name -> the JAX op_name (name stack) in its metadata, the names of the
    control-flow ops, whose trace events hold their bodies' and must not be counted again)."""
    names, containers = {}, set()
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            names[m.group(1)] = m.group(2)
            if _CONTAINER.search(line.split("=", 1)[1]):
                containers.add(m.group(1))
    return names, containers


_SHAPED = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(")


def op_shapes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> "its output shape and opcode" (e.g. "bf16[15360,3072]{1,0} fusion"):
    what a copy or a concatenation moves, also for the ops XLA made that carry no op_name."""
    return {m.group(1): f"{m.group(2)} {m.group(3)}" for m in map(_SHAPED.match, hlo_text.splitlines()) if m}


def scope_of(op_name: str) -> str:
    """The E-DiT scope an op belongs to ("other" outside both)."""
    parts = op_name.split("/")
    return next((s for s in SCOPES if s in parts), "other")


def op_times(trace_dir: str) -> tuple[dict[str, list[float]], list[str]]:
    """(device time (ms) of each execution of each XLA op in a trace, the trace lines read).
    GPU: the kernels on its stream lines that name their hlo_op (else the "XLA Ops" line, if the
    trace has one); CPU: the thunks that carry an hlo_op."""
    from jax.profiler import ProfileData

    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    planes = list(ProfileData.from_file(path).planes)
    gpus = [p for p in planes if p.name.startswith("/device:GPU")]
    times, lines = collections.defaultdict(list), set()
    if gpus:
        for line in (ln for p in gpus for ln in p.lines if not ln.name.startswith(_DERIVED_LINES)):
            for ev in line.events:
                op = dict(ev.stats).get("hlo_op")
                if op is not None:
                    times[op].append(ev.duration_ns / 1e6)
                    lines.add(line.name)
        if not times:
            for line in (ln for p in gpus for ln in p.lines if ln.name == "XLA Ops"):
                for ev in line.events:
                    times[ev.name].append(ev.duration_ns / 1e6)
                    lines.add(line.name)
        return times, sorted(lines)
    for line in (ln for p in planes for ln in p.lines):
        for ev in line.events:
            op = dict(ev.stats).get("hlo_op")
            if op is not None and not ev.name.startswith("end: "):
                times[op].append(ev.duration_ns / 1e6)
                lines.add("cpu threads")
    return times, sorted(lines)


def forward(mode: str, model, static: dict, num_blocks: int) -> tuple:
    """(jitted fn(variables, arrays, *extra), extra) of the mode, as `eval.bench_elastic` times it.

    Args:
      mode: "dense", "infer" or "forced". model: the transformer. static: its static inputs.
      num_blocks: L.
    """
    jitted = forwards(model, static)
    if mode in ("dense", "infer"):
        return jitted[mode], ()
    return jitted["forced"], (forced_pattern(num_blocks) if mode == "forced_pattern" else all_open(num_blocks),)


def write_text(path: str, text: str) -> None:
    """Writes text to path, gzipped when the name ends in .gz."""
    data = text.encode()
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if path.endswith(".gz") else data)


def rounded(row: dict) -> dict:
    return {**row, "ms_per_step": round(row["ms_per_step"], 4)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p)
    p.add_argument("--mode", default="infer", choices=MODES)
    p.add_argument("--steps", type=int, default=3, help="forwards traced (after one warm-up)")
    p.add_argument("--top", type=int, default=25, help="ops listed, by total time (overall, and per scope)")
    p.add_argument("--out", help="write the JSON result here too")
    p.add_argument("--hlo-out", help="write the compiled program's HLO text here (gzipped if the name ends in .gz), "
                                     "to read the ops of a device run later without the device")
    args = p.parse_args(argv)

    config, model, variables, arrays, static = build(args)
    num_blocks = config.num_blocks
    fn, extra = forward(args.mode, model, static, num_blocks)
    hlo = fn.lower(variables, arrays, *extra).compile().as_text()
    (names, containers), shapes = op_names(hlo), op_shapes(hlo)
    if args.hlo_out:
        write_text(args.hlo_out, hlo)
    jax.block_until_ready(fn(variables, arrays, *extra))

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                jax.block_until_ready(fn(variables, arrays, *extra))
            wall_ms = 1000 * (time.perf_counter() - t0) / args.steps
        times, lines = op_times(trace_dir)
    if not times:
        print("warning: the trace holds no XLA op events (on CPU, XLA_FLAGS must hold "
              "--xla_cpu_enable_xprof_traceme=true before JAX starts: run this as a program)", file=sys.stderr)
    if any(op.startswith("command_buffer") for op in times):
        print("warning: the trace shows command buffers, not their ops, so their time counts as 'other' "
              "(XLA_FLAGS=--xla_gpu_enable_command_buffer= turns them off: run this as a program)", file=sys.stderr)

    by_scope = {s: {"ms": 0.0, "ops": 0} for s in (*SCOPES, "other")}
    rows = []
    for op, ts in times.items():
        if op in containers:
            continue
        op_name = names.get(op, "")
        scope = scope_of(op_name)
        by_scope[scope]["ms"] += sum(ts) / args.steps
        by_scope[scope]["ops"] += len(ts) / args.steps
        rows.append({"op": op, "scope": scope, "ms_per_step": sum(ts) / args.steps,
                     "calls_per_step": len(ts) / args.steps, "hlo": shapes.get(op, ""), "op_name": op_name})
    total = sum(s["ms"] for s in by_scope.values())
    rows.sort(key=lambda r: -r["ms_per_step"])
    result = {
        **environment(),
        "preset": args.preset,
        "overrides": args.set,
        "mode": args.mode,
        "tokens": {"image": args.height * args.width, "text": args.txt, "batch": args.batch},
        "dtype": args.dtype,
        "attention": args.attention,
        "blocks": num_blocks,
        "trace_lines": lines,
        "wall_ms_per_step": round(wall_ms, 3),
        "op_ms_per_step": round(total, 3),
        "op_calls_per_step": round(sum(s["ops"] for s in by_scope.values()), 1),
        "by_scope": {k: {"ms": round(v["ms"], 3), "share": round(v["ms"] / total, 4) if total else None,
                         "op_calls": round(v["ops"], 1)} for k, v in by_scope.items()},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "top_ops": [rounded(r) for r in rows[: args.top]],
        "top_ops_by_scope": {s: [rounded(r) for r in rows if r["scope"] == s][: args.top] for s in by_scope},
    }
    return emit(result, args.out)


if __name__ == "__main__":
    run_script(main)
