r"""Where a compiled step's device time goes: a profiler trace, bucketed by region and op family.

    python -m eflow_jax.bench.profile --suite=kinetics --settings=eflow,soflow_dense   # bench.train rows
    python -m eflow_jax.bench.profile --config=configs/kinetics.py:variant=B --set=batch_size=32
    python -m eflow_jax.bench.profile --suite=tiny --settings=eflow --steps=2            # CPU smoke run
    python -m eflow_jax.bench.train --suite=ablation --profile=soflow_dense,eflow      # inside the ablation

The program is the one `train.setup(config)` compiles (the training CLI's step): it is warmed up, then
`--steps` calls are traced with jax.profiler (python tracer off). The trace's device events carry the
HLO instruction they ran (`hlo_op`: XLA:GPU annotates every kernel, XLA:CPU every thunk); each is
looked up in the compiled executable's optimised HLO (`compiled.as_text()`), whose metadata gives the
jax op_name scopes (.../EFlowDiT.encode/EFlowDiT._trunk/middle/block_3/attn/attn._local/...) and the
Python call stack (pool_cells, gather_tokens, optax's update functions, ...). A fusion is classified by
the ops inside it (a dot or custom call first, else the most common op_name). Three labels per kernel:

  region  embed_head | encoder | drop_restore (gather, scatter, mask token, concat) | middle | fuse |
          decoder | loss (targets, interpolation, losses, RNG: everything of the objective outside the
          network) | optimizer (AdamW, EMA, norms: after the gradient) | other
  family  local_attention | global_attention | full_attention | pooling | attention_misc (RoPE,
          QK-norm, gates) | qkv_out_proj | mlp | adaln_norm_modulate (adaLN, RMSNorm, modulate,
          residual gates) | gather_scatter | fuse_linear | embed_head | loss_elementwise | rng |
          optimizer | other
  kind    matmul | attention (fused attention custom calls) | gather_scatter | reduce |
          copy_transpose | elementwise

Output: JSON lines on stdout (one per bucket, region x family cell and top kernel, and a summary
with the coverage: the share of device time matched to an HLO instruction), a markdown report on
stderr (and --md), and with --ops_out one gzipped JSON of per-instruction totals (op_name, frames,
labels), enough to re-bucket offline. Nothing beyond jax is needed on the GPU host: the trace is the
`*.trace.json.gz` that jax.profiler writes (the same events as its perfetto_trace.json.gz).
On a GPU, XLA runs command buffers (CUDA graphs) thunk by thunk while a profile is active
(xla_enable_command_buffers_during_profiling=false, its default), so every kernel is attributed; the
profiled step can be slower than the timed one: compare `device_ms_per_step` with the bench's step_ms.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable

REGIONS = ("embed_head", "encoder", "drop_restore", "middle", "fuse", "decoder", "loss", "optimizer", "other")
FAMILIES = ("local_attention", "global_attention", "full_attention", "pooling", "attention_misc",
            "qkv_out_proj", "mlp", "adaln_norm_modulate", "gather_scatter", "fuse_linear", "embed_head",
            "loss_elementwise", "rng", "optimizer", "other")
KINDS = ("matmul", "attention", "gather_scatter", "reduce", "copy_transpose", "elementwise")

# ---- the optimised HLO: instruction name -> opcode, op_name, Python frames, called computations ----


@dataclasses.dataclass
class Instr:
    name: str
    opcode: str
    op_name: str = ""
    frames: tuple[str, ...] = ()  # Function names of the Python call stack, innermost first.
    calls: tuple[str, ...] = ()  # Computations it runs (fusion bodies).
    target: str = ""  # custom_call_target
    operands: tuple[str, ...] = ()


@dataclasses.dataclass
class HloIndex:
    module: str
    instrs: dict[str, Instr]
    computations: dict[str, list[str]]  # computation -> its instruction names

    def inner(self, instr: Instr, depth: int = 3) -> list[Instr]:
        """The instruction and those of the computations it calls (fusion bodies), recursively."""
        out, todo = [instr], [(c, 0) for c in instr.calls]
        while todo:
            comp, d = todo.pop()
            for name in self.computations.get(comp, ()):
                sub = self.instrs[name]
                out.append(sub)
                if d + 1 < depth:
                    todo += [(c, d + 1) for c in sub.calls]
        return out


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s)}\]])([a-z][a-z0-9\-_]*)\(")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_CALLS = re.compile(r"\bcalls=(\{[^}]*\}|%?[\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_TABLE_ROW = re.compile(r"^(\d+)\s+(.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")


def _split_rhs(rhs: str) -> tuple[str, str]:
    """(opcode, rest) of an instruction's right-hand side 'type opcode(operands), attrs'."""
    m = _OPCODE.search(rhs)
    return (m.group(1), rhs[m.end():]) if m else ("", rhs)


def parse_hlo(text: str) -> HloIndex:
    """Indexes the optimised HLO text of a compiled executable (jax.stages.Compiled.as_text())."""
    lines = text.splitlines()
    module = lines[0].split()[1].rstrip(",") if lines and lines[0].startswith("HloModule") else ""
    tables: dict[str, dict[int, str]] = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {},
                                         "StackFrames": {}}
    instrs: dict[str, Instr] = {}
    computations: dict[str, list[str]] = {}
    table, comp = None, None
    for line in lines[1:]:
        if not line.strip():
            table = None
            continue
        if line in tables:
            table = line
            continue
        if table is not None:
            if m := _TABLE_ROW.match(line):
                tables[table][int(m.group(1))] = m.group(2)
            continue
        if not line.startswith(" ") and line.rstrip().endswith("{"):  # A computation header.
            head = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            comp = head.lstrip("%")
            computations[comp] = []
            continue
        if line.startswith("}"):
            comp = None
            continue
        m = _INSTR.match(line)
        if m is None or comp is None:
            continue
        name, rhs = m.group(1), m.group(2)
        opcode, rest = _split_rhs(rhs)
        op_name = (_OP_NAME.search(rest) or [None, ""])[1]
        fid = _FRAME_ID.search(rest)
        calls = ()
        if c := _CALLS.search(rest):
            calls = tuple(x.strip().lstrip("%") for x in c.group(1).strip("{}").split(",") if x.strip())
        target = (_TARGET.search(rest) or [None, ""])[1]
        operands = tuple(_OPERAND.findall(rest.split("),", 1)[0]))
        instrs[name] = Instr(name, opcode, op_name.replace("\\'", "'"), (int(fid.group(1)),) if fid else (),
                             calls, target, operands)
        computations[comp].append(name)
    frames = _frame_functions(tables)
    for ins in instrs.values():
        ins.frames = frames.get(ins.frames[0], ()) if ins.frames else ()
    return HloIndex(module, instrs, computations)


def _frame_functions(tables: dict[str, dict[int, str]]) -> dict[int, tuple[str, ...]]:
    """stack frame id -> function names from the innermost frame out.

    As XLA prints them, a frame's parent_frame_id is the parent's id + 1 (0: no parent)."""
    functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    loc_fn = {}
    for k, v in tables["FileLocations"].items():
        m = re.search(r"function_name_id=(\d+)", v)
        loc_fn[k] = functions.get(int(m.group(1)), "") if m else ""
    parent, loc = {}, {}
    for k, v in tables["StackFrames"].items():
        m1, m2 = re.search(r"file_location_id=(\d+)", v), re.search(r"parent_frame_id=(\d+)", v)
        loc[k] = int(m1.group(1)) if m1 else 0
        parent[k] = int(m2.group(1)) - 1 if m2 else 0
    out = {}
    for k in loc:
        chain, seen, f = [], set(), k
        while f in loc and f not in seen and len(chain) < 64:
            seen.add(f)
            chain.append(loc_fn.get(loc[f], ""))
            f = parent[f]
        out[k] = tuple(chain)
    return out


# ---- classification rules ----

_SKIP = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "iota", "broadcast"}
_EMBED_HEAD = ("patch_embed", "t_embed", "d_embed", "y_embed", "final", "final_adaln", "final_norm")
_RNG = ("threefry", "_uniform", "_normal", "random_bits", "random_split", "fold_in", "_gumbel", "_bernoulli")


def _kind(ins: Instr) -> str:
    op = ins.opcode
    if op == "custom-call":
        t = ins.target.lower()
        if "fmha" in t or "attention" in t or "flash" in t:
            return "attention"
        return "matmul" if ("gemm" in t or "matmul" in t or "cublas" in t or "triton" in t) else "elementwise"
    if op in ("dot", "convolution", "ragged-dot"):
        return "matmul"
    if op in ("gather", "scatter", "dynamic-slice", "dynamic-update-slice", "sort"):
        return "gather_scatter"
    if op in ("reduce", "reduce-window", "select-and-scatter"):
        return "reduce"
    if op in ("copy", "transpose", "copy-start", "copy-done", "concatenate", "pad", "slice", "reshape"):
        return "copy_transpose"
    return "elementwise"


_KIND_RANK = {"attention": 0, "matmul": 1, "gather_scatter": 2, "reduce": 3, "copy_transpose": 4,
              "elementwise": 5}


def representative(index: HloIndex, ins: Instr) -> tuple[Instr, str]:
    """(the op that labels a kernel, the kernel's kind): the heaviest kind inside a fusion; among ops
    of that kind the most common op_name (elementwise fusions mix several scopes)."""
    ops = [i for i in index.inner(ins) if i.opcode not in _SKIP and i.opcode != "fusion"] or [ins]
    best = min(_KIND_RANK[_kind(i)] for i in ops)
    kind = next(k for k, r in _KIND_RANK.items() if r == best)
    same = [i for i in ops if _KIND_RANK[_kind(i)] == best and i.op_name]
    if not same:
        named = [i for i in ops if i.op_name]
        return (named[0] if named else ins), kind
    counts = collections.Counter(i.op_name for i in same)
    top = counts.most_common(1)[0][0]
    return next(i for i in same if i.op_name == top), kind


_PARAM_KEY = re.compile(r"\['([^']+)'\]")


def param_scope(op_name: str) -> str:
    """A jit argument's op_name ("state.params['middle']['block_0']['mlp']...") as a scope path the
    rules read ("EFlowDiT.params/middle/block_0/mlp/..."); optimizer state and EMA: "state.opt_state"."""
    if op_name.startswith("state.params") or op_name.startswith("params"):
        return "EFlowDiT.params/" + "/".join(_PARAM_KEY.findall(op_name)) + "/"
    return op_name


def borrowed_name(index: HloIndex, ins: Instr, depth: int = 2) -> str:
    """An op_name for an instruction XLA left without metadata: its operands' most common one
    (a parameter's path names the layer: dots of the backward pass often lose theirs)."""
    frontier, seen = [ins], {ins.name}
    for _ in range(depth):
        names = []
        nxt = []
        for i in frontier:
            for o in i.operands:
                sub = index.instrs.get(o)
                if sub is None or sub.name in seen:
                    continue
                seen.add(sub.name)
                nxt.append(sub)
                if sub.op_name:
                    names.append(param_scope(sub.op_name))
        model = [n for n in names if "EFlowDiT." in n]
        if model or names:
            return collections.Counter(model or names).most_common(1)[0][0]
        frontier = nxt
    return ""


def _seg(op_name: str, name: str) -> bool:
    return f"/{name}/" in op_name + "/"


def region_of(op_name: str, frames: tuple[str, ...], train_step: bool = True) -> str:
    """train_step=False (a sampler, say): ops outside the network are 'other', not 'optimizer'."""
    op = op_name.split(";")[0]
    if not op:
        return "other"
    if "EFlowDiT." in op:
        for region in ("encoder", "middle", "decoder", "fuse"):
            if _seg(op, region):
                return region
        if any(_seg(op, n) for n in _EMBED_HEAD):
            return "embed_head"
        if "EFlowDiT._trunk" in op or "EFlowDiT._context" in op:
            return "drop_restore"
        return "embed_head"
    if "jvp(" in op or "transpose(" in op:
        return "loss"
    if op.startswith("state.opt_state") or op.startswith("state.ema_params"):
        return "optimizer"
    if "to_model_input" in frames or _is_rng(op, frames):
        return "other"
    if train_step and op.startswith("jit(") and "/" in op:  # The step's top level after the gradient.
        return "optimizer"
    return "other"


def _is_rng(op: str, frames: tuple[str, ...]) -> bool:
    return any(r in op for r in _RNG) or any(any(r in f for r in _RNG) for f in frames[:3])


def family_of(op_name: str, frames: tuple[str, ...], kind: str, region: str) -> str:
    op = op_name.split(";")[0]
    if region == "optimizer":
        return "optimizer"
    if region in ("loss", "other") or not op:
        if _is_rng(op, frames):
            return "rng"
        return "loss_elementwise" if region == "loss" else "other"
    if any(f in ("pool_cells", "pool_cells_onehot") for f in frames):
        return "pooling"
    if any(f in ("gather_tokens", "scatter_tokens") for f in frames) or (
            region == "drop_restore" and kind == "gather_scatter"):
        return "gather_scatter"
    if "attn._local" in op:
        return "local_attention"
    if "attn._global" in op:
        return "global_attention"
    if "attn._gated_sum" in op or _seg(op, "q_norm") or _seg(op, "k_norm") or "apply_rope" in frames:
        return "attention_misc"
    if _seg(op, "qkv") or _seg(op, "out") and _seg(op, "attn"):
        return "qkv_out_proj"
    if _seg(op, "attn"):  # mode='full': GLGA calls attend() itself, outside _local/_global.
        return "full_attention" if kind == "attention" or "attend" in frames else "attention_misc"
    if _seg(op, "mlp"):
        return "mlp"
    if (_seg(op, "adaln") or "RMSNorm" in op or _seg(op, "final_norm") or _seg(op, "final_adaln")
            or "modulate" in frames):
        return "adaln_norm_modulate"
    if _seg(op, "fuse"):
        return "fuse_linear"
    if any(_seg(op, n) for n in _EMBED_HEAD) or region == "embed_head":
        return "embed_head"
    if region in ("encoder", "middle", "decoder"):  # Block-level residual adds and gate products.
        return "adaln_norm_modulate"
    if region == "drop_restore":
        return "gather_scatter"
    return "other"


def classify(index: HloIndex, hlo_op: str) -> dict:
    """Labels of the instruction a kernel ran: region, family, kind, pass, op_name, frames."""
    ins = index.instrs.get(hlo_op)
    if ins is None:
        return dict(region="other", family="other", kind="elementwise", pass_="unmatched", op_name="",
                    frames=(), opcode="")
    rep, kind = representative(index, ins)
    op_name = param_scope(rep.op_name) or borrowed_name(index, rep) or borrowed_name(index, ins)
    region = region_of(op_name, rep.frames, "train_step" in index.module)
    family = family_of(op_name, rep.frames, kind, region)
    op = op_name.split(";")[0]
    pass_ = "bwd" if "transpose(" in op else "fwd" if "jvp(" in op else "step"
    return dict(region=region, family=family, kind=kind, pass_=pass_, op_name=op_name,
                frames=rep.frames[:6], opcode=ins.opcode if ins.opcode != "fusion" else f"fusion:{rep.opcode}")


# ---- the trace ----


def latest_trace_file(trace_dir: str) -> str:
    files = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}/plugins/profile")
    return max(files, key=os.path.getmtime)


@dataclasses.dataclass
class Kernel:
    name: str
    hlo_op: str
    module: str
    ts: float  # us
    dur: float  # us, exclusive of nested events on the same line (CPU thunks)
    line: str


def device_kernels(trace: dict, module: str = "") -> tuple[list[Kernel], dict]:
    """The kernels (GPU/TPU device lines) or op thunks (CPU host lines) that carry an hlo_op.

    Returns (kernels, facts): facts name the process and lines used, and the device time on those
    lines without an hlo_op (memcpys, unannotated kernels).
    """
    events = trace.get("traceEvents", [])
    pnames, tnames = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pnames[e.get("pid")] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            tnames[(e.get("pid"), e.get("tid"))] = e.get("args", {}).get("name", "")
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    annotated = [e for e in spans if "hlo_op" in e.get("args", {})]
    device_pids = {p for p, n in pnames.items() if n.startswith("/device:")}
    on_device = [e for e in annotated if e.get("pid") in device_pids]
    source = "device" if on_device else "host"
    chosen = on_device or annotated
    if source == "device":  # GPU: CUPTI's stream lines; skip derived lines (XLA Ops, ...) if present.
        streams = {(e["pid"], e["tid"]) for e in chosen if tnames.get((e["pid"], e["tid"]), "").startswith("Stream")}
        if streams:
            chosen = [e for e in chosen if (e["pid"], e["tid"]) in streams]
    if module and any("hlo_module" in e["args"] for e in chosen):
        chosen = [e for e in chosen if str(e["args"].get("hlo_module", "")).startswith(module)]
    lines = {(e["pid"], e["tid"]) for e in chosen}
    unannotated = sum(e["dur"] for e in spans if (e.get("pid"), e.get("tid")) in lines
                      and "hlo_op" not in e.get("args", {})) if source == "device" else 0.0
    kernels = _exclusive([(e, tnames.get((e["pid"], e["tid"]), str(e["tid"]))) for e in chosen])
    facts = dict(source=source, processes=sorted({pnames.get(e["pid"], "?") for e in chosen}),
                 lines=sorted({tnames.get(k, str(k[1])) for k in lines})[:16],
                 unannotated_us=unannotated, annotated_events=len(annotated))
    return kernels, facts


def _exclusive(events: list[tuple[dict, str]]) -> list[Kernel]:
    """Kernels with durations exclusive of events nested inside them on the same line (an XLA:CPU
    while or call thunk contains its body's thunks; GPU kernels on a stream do not nest)."""
    by_line = collections.defaultdict(list)
    for e, line in events:
        by_line[(e["pid"], e["tid"])].append((e, line))
    out = []
    for items in by_line.values():
        items.sort(key=lambda x: (x[0]["ts"], -x[0]["dur"]))
        stack: list[list] = []  # [end, Kernel]
        for e, line in items:
            k = Kernel(e.get("name", ""), str(e["args"]["hlo_op"]), str(e["args"].get("hlo_module", "")),
                       float(e["ts"]), float(e["dur"]), line)
            while stack and stack[-1][0] <= k.ts:
                stack.pop()
            if stack:
                stack[-1][1].dur -= k.dur
            stack.append([k.ts + float(e["dur"]), k])
            out.append(k)
    for k in out:
        k.dur = max(k.dur, 0.0)
    return out


# ---- the report ----


def analyze(trace: dict, index: HloIndex, steps: int, top: int = 20) -> dict:
    """Per-step device time by region, family, kind and region x family, the top kernels, and coverage."""
    kernels, facts = device_kernels(trace, index.module)
    labels: dict[str, dict] = {}
    per_op: dict[str, dict] = {}
    for k in kernels:
        lab = labels.setdefault(k.hlo_op, classify(index, k.hlo_op))
        agg = per_op.setdefault(k.hlo_op, dict(us=0.0, count=0, names=collections.Counter(), **lab))
        agg["us"] += k.dur
        agg["count"] += 1
        agg["names"][k.name] += k.dur
    total = sum(a["us"] for a in per_op.values())
    matched = sum(a["us"] for a in per_op.values() if a["pass_"] != "unmatched")

    def table(key) -> list[dict]:
        sums = collections.defaultdict(lambda: [0.0, 0])
        for a in per_op.values():
            cell = sums[key(a)]
            cell[0] += a["us"]
            cell[1] += a["count"]
        rows = [dict(key=k, ms_per_step=us / steps / 1e3, frac=us / total if total else 0.0,
                     kernels_per_step=n / steps, mean_us=us / max(n, 1)) for k, (us, n) in sums.items()]
        return sorted(rows, key=lambda r: -r["ms_per_step"])

    ops = sorted(per_op.items(), key=lambda kv: -kv[1]["us"])
    top_rows = [dict(hlo_op=op, kernel=a["names"].most_common(1)[0][0][:120], ms_per_step=a["us"] / steps / 1e3,
                     frac=a["us"] / total if total else 0.0, calls_per_step=a["count"] / steps,
                     region=a["region"], family=a["family"], kind=a["kind"], pass_=a["pass_"],
                     op_name=a["op_name"][-160:]) for op, a in ops[:top]]
    span = (max(k.ts + k.dur for k in kernels) - min(k.ts for k in kernels)) if kernels else 0.0
    return dict(
        summary=dict(device_ms_per_step=total / steps / 1e3, matched_frac=matched / total if total else 0.0,
                     kernels_per_step=len(kernels) / steps, distinct_hlo_ops=len(per_op),
                     unannotated_ms_per_step=facts["unannotated_us"] / steps / 1e3,
                     trace_span_ms_per_step=span / steps / 1e3, module=index.module, **{
                         k: facts[k] for k in ("source", "processes", "lines", "annotated_events")}),
        region=table(lambda a: a["region"]), family=table(lambda a: a["family"]),
        kind=table(lambda a: a["kind"]), pass_=table(lambda a: a["pass_"]),
        region_family=table(lambda a: f"{a['region']}/{a['family']}"), top=top_rows,
        ops=[dict(hlo_op=op, us_per_step=a["us"] / steps, calls_per_step=a["count"] / steps,
                  kernels=[n[:120] for n, _ in a["names"].most_common(3)], op_name=a["op_name"],
                  frames=list(a["frames"]), opcode=a["opcode"], region=a["region"], family=a["family"],
                  kind=a["kind"], pass_=a["pass_"]) for op, a in ops],
    )


def markdown(report: dict, title: str) -> str:
    s = report["summary"]
    out = [f"### {title}", "",
           f"device time {s['device_ms_per_step']:.2f} ms/step in {s['kernels_per_step']:.0f} kernels "
           f"({s['source']} lines), matched to HLO: {100 * s['matched_frac']:.1f}%"
           + (f", profiled wall {s['wall_ms_per_step']:.2f} ms/step" if "wall_ms_per_step" in s else "")
           + (f", timed step {s['step_ms']:.2f} ms" if s.get("step_ms") else ""), ""]

    def tab(name, rows, limit=None):
        out.extend([f"| {name} | ms/step | share | kernels/step | mean us |", "|---|---|---|---|---|"])
        for r in rows[:limit]:
            out.append(f"| {r['key']} | {r['ms_per_step']:.3f} | {100 * r['frac']:.1f}% | "
                       f"{r['kernels_per_step']:.0f} | {r['mean_us']:.1f} |")
        out.append("")

    tab("region", report["region"])
    tab("op family", report["family"])
    tab("kernel kind", report["kind"])
    tab("pass", report["pass_"])
    tab("region / family (top 25)", report["region_family"], 25)
    out.extend(["| top kernels | ms/step | share | calls/step | region | family | kind |",
                "|---|---|---|---|---|---|---|"])
    for r in report["top"]:
        out.append(f"| `{r['hlo_op']}` {r['kernel'][:60]} | {r['ms_per_step']:.3f} | {100 * r['frac']:.1f}% | "
                   f"{r['calls_per_step']:.0f} | {r['region']} | {r['family']} | {r['kind']} |")
    out.append("")
    return "\n".join(out)


def json_rows(report: dict, **tags) -> list[dict]:
    rows = [dict(bench="profile_summary", **tags, **report["summary"])]
    for table in ("region", "family", "kind", "pass_", "region_family"):
        rows += [dict(bench="profile", table=table.rstrip("_"), **tags, **r) for r in report[table]]
    rows += [dict(bench="profile_top", rank=i + 1, **tags, **r) for i, r in enumerate(report["top"])]
    return rows


# ---- tracing a program ----


def trace_calls(run: Callable[[], object], steps: int, trace_dir: str) -> float:
    """Runs `run` `steps` times under jax.profiler (python tracer off) and waits for the last result.

    Returns the wall seconds per call (the profiler's overhead included)."""
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    options.host_tracer_level = 1  # Enough for XLA:CPU's thunk events; fewer host events on a GPU.
    jax.profiler.start_trace(trace_dir, profiler_options=options)
    try:
        start = time.perf_counter()
        out = None
        for _ in range(steps):
            out = run()
        jax.block_until_ready(out)
        wall = (time.perf_counter() - start) / steps
    finally:
        jax.profiler.stop_trace()
    return wall


def profile_compiled(compiled, run: Callable[[], object], steps: int = 3, trace_dir: str | None = None,
                     top: int = 20) -> dict:
    """Traces `steps` calls of `run` (which calls the AOT-compiled `compiled`) and analyzes them."""
    own = trace_dir is None
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="eflow_profile_")
    wall = trace_calls(run, steps, trace_dir)
    with gzip.open(latest_trace_file(trace_dir), "rt") as f:
        trace = json.load(f)
    try:
        text = compiled.as_text() or ""
    except Exception:  # noqa: BLE001 - some loaded executables have no HLO text: totals only.
        text = ""
    report = analyze(trace, parse_hlo(text), steps, top)
    report["summary"]["wall_ms_per_step"] = 1e3 * wall
    report["summary"]["busy_frac"] = report["summary"]["device_ms_per_step"] / (1e3 * wall)
    if own:
        import shutil

        shutil.rmtree(trace_dir, ignore_errors=True)
    return report


def profile_program(prog, state, batch, steps: int = 3, trace_dir: str | None = None, top: int = 20):
    """(state, report) of `steps` traced train steps of a train.Program (the step donates the state)."""
    holder = {"state": state}

    def run():
        holder["state"], metrics = prog.step(holder["state"], batch)
        return metrics

    report = profile_compiled(prog.step, run, steps, trace_dir, top)
    return holder["state"], report


def write_ops(path: str, reports: dict[str, dict]) -> None:
    """Per-instruction totals of each profiled setting, gzipped JSON (offline re-bucketing)."""
    with gzip.open(path, "wt") as f:
        json.dump({name: dict(summary=r["summary"], ops=r["ops"]) for name, r in reports.items()}, f)


# ---- CLI ----


def _configs(a) -> list[tuple[str, object]]:
    from eflow_jax import config_file
    from eflow_jax.bench import train as bench_train

    if a.config:
        path, _, arg = a.config.partition(":")
        c = config_file.load(path, arg or None)
        t, h, _, ch = c.model.video_shape
        if not a.keep_data:  # The step does not depend on the source: synthetic needs no files.
            c.data.update(source="synthetic", path="", num_frames=t, resolution=h, channels=ch,
                          num_classes=c.model.num_classes, worker_count=0)
        for item in a.set:
            config_file.override(c, item)
        return [(os.path.basename(path) + (f":{arg}" if arg else ""), c)]
    suite = dict(bench_train.SUITES[a.suite])
    if a.batch:
        suite["batch"] = a.batch
    names = [s for s in (a.settings.split(",") if a.settings else suite["settings"]) if s]
    out = []
    for name in names:
        c = bench_train.build(suite, name, a.dtype, a.remat)
        for item in a.set:
            config_file.override(c, item)
        out.append((name, c))
    return out


def main(argv=None) -> None:
    from eflow_jax.bench import train as bench_train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="", help="A config file path[:arg] (the CLI's --config); else --suite.")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="Config overrides.")
    p.add_argument("--keep_data", action="store_true", help="Keep the config's data source (default: synthetic).")
    p.add_argument("--suite", default="kinetics", help="A bench.train suite (with --settings).")
    p.add_argument("--settings", default="eflow", help="Comma-separated settings of the suite.")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="none")
    p.add_argument("--steps", type=int, default=3, help="Traced steps (after --warmup untraced ones).")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--md", default="", help="Also write the markdown report here.")
    p.add_argument("--ops_out", default="", help="Write per-instruction totals here (.json.gz).")
    p.add_argument("--trace_dir", default="", help="Keep the raw trace here (default: a temp dir, deleted).")
    a = p.parse_args(argv)
    import jax

    from eflow_jax import train

    device = getattr(jax.devices()[0], "device_kind", jax.default_backend())
    reports, md = {}, []
    for name, c in _configs(a):
        prog = train.setup(c)
        state = prog.init_state(c.seed)
        batch = bench_train.random_batch(prog, c.model.num_classes)
        for _ in range(a.warmup):
            state, m = prog.step(state, batch)
        jax.block_until_ready(state)
        trace_dir = os.path.join(a.trace_dir, name.replace("/", "_")) if a.trace_dir else None
        state, report = profile_program(prog, state, batch, a.steps, trace_dir, a.top)
        tags = dict(setting=name, device=device, variant=c.model.variant, batch=c.batch_size,
                    objective=c.objective.name, mode=c.model.mode)
        for row in json_rows(report, **tags):
            print(json.dumps(row), flush=True)
        md.append(markdown(report, f"{name} ({c.objective.name}, {c.model.variant}, batch {c.batch_size}, {device})"))
        reports[name] = report
        del state, prog
    text = "\n".join(md)
    print(text, file=sys.stderr)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)
    if a.ops_out:
        write_ops(a.ops_out, reports)


if __name__ == "__main__":
    main()
