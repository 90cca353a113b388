"""FLOPs and HBM bytes of a compiled XLA program with every loop body weighted by its trip count.

`compiled.cost_analysis()` counts the body of a `while` loop once, whatever its trip count (on
the TPU compiler of libtpu 0.0.42: a 10-step fori_loop of a matmul reports the FLOPs of one
matmul). Our programs are loops: the decoder scans its layers, the update scans its
micro-batches, the chunked log-prob walk and the decode loop are loops. So this reads the
optimized per-device HLO text (`compiled.as_text()`: the compiler's own fusions, rematerialization,
collectives and layouts) and counts:

- flops: 2 x multiply-adds of every `dot` and `convolution` (the TPU writes matmuls as
  convolutions; padded or dilated window taps that touch no input are not counted, as XLA's
  HloCostAnalysis does). Elementwise work is left out: it is a small share of a transformer's.
  So are custom calls: a Pallas kernel's FLOPs are not seen (the plan compiles the chunked
  log-prob walk, plain XLA; the splash attention kernels' ~4 % of a 2048-token update's FLOPs
  go uncounted), though their operands and outputs count as bytes.
- bytes: each top-level instruction (a fusion, a collective, a copy) reads its operands and writes
  its outputs once from HBM; a `dynamic-slice` reads only its slice and a `dynamic-update-slice`
  (in place) writes only its update, inside fusions too: the per-layer slice of the stacked
  weights is one layer's bytes, not all of them. Bookkeeping ops (tuples, bitcasts, parameters,
  constants) move nothing, and neither do arrays the compiler placed in another memory space
  (`S(1)` in the layout: the TPU's on-chip VMEM).

Counted with every body once instead, the FLOPs and bytes agree with the compiler's
cost_analysis() to within a few % on the paper's programs (experiments/results/tpu_plan.json:
*_once beside compiler_*_once).

A loop's trip count is read from its condition `i < constant` and the starting value of `i`. A
loop whose condition is anything else (the sampler's decode loop also stops when every row is
done; the top-p bisection stops when it converges) counts once, or `steps` times at the top
level: the decode program with steps = max_new_tokens - 1 is a whole generation, its one-off
work (casting the weights to bf16, relayouts of the cache) spread over the steps.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Optional

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$")
# Ops that move no HBM bytes of their own.
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "call",
         "conditional", "after-all", "opt-barrier", "partition-id", "replica-id", "iota"}
_SLICES = {"dynamic-slice", "slice", "gather"}


@dataclasses.dataclass
class _Op:
  name: str
  kind: str
  shape: str
  operands: list
  args: str  # The text inside the op's parentheses, e.g. a parameter's number.
  attrs: str
  root: bool


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...], bool]]:
  """(dtype, dims, in HBM) of each array in an HLO shape string. A layout's `S(n)` puts the
  array in another memory space (the TPU's on-chip VMEM): no HBM traffic."""
  return [(d, tuple(int(x) for x in dims.split(",") if x), "S(" not in layout)
          for d, dims, layout in _ARRAY.findall(shape) if d in _DTYPE_BYTES]


def shape_bytes(shape: str) -> int:
  """HBM bytes of an HLO shape string (a tuple's arrays summed)."""
  return sum(_DTYPE_BYTES[d] * math.prod(dims) for d, dims, hbm in _arrays(shape) if hbm)


def _closing(text: str, start: int) -> int:
  """Index just past the parenthesis that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  raise ValueError(f"unbalanced parentheses in {text[:80]!r}")


def _parse_op(line: str):
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  rest = m.group(3)
  end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  paren = rest.index("(")
  close = _closing(rest, paren)
  operands = re.findall(r"%([^\s,()]+)", rest[paren:close])
  return _Op(m.group(2), rest[:paren], shape, operands, rest[paren + 1:close - 1], rest[close:],
             bool(m.group(1)))


def parse_module(text: str) -> tuple[dict, str]:
  """{computation name: [ops]} of an HLO module's text, and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
    elif line.rstrip() == "}":
      # Only a lone brace ends a computation: an instruction's attributes can run over several
      # lines (a Pallas call's kernel_metadata), and their continuation may start with "}}".
      current = None
    elif current is not None:
      op = _parse_op(line)
      if op:
        current.append(op)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def _attr(attrs: str, key: str):
  m = re.search(rf"\b{key}=%?([^\s,}}]+)", attrs)
  return m and m.group(1)


def _conv_macs(op: _Op, shapes: dict) -> int:
  """Multiply-adds of a convolution, counting only window taps that land on the input."""
  labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", op.attrs).groups()
  lhs, rhs = (_arrays(shapes[o])[0][1] for o in op.operands[:2])
  out = _arrays(op.shape)[0][1]
  window = re.search(r"window=\{([^}]*)\}", op.attrs)
  fields = dict(f.split("=") for f in window.group(1).split()) if window else {}
  spatial = sorted(c for c in labels[0] if c.isdigit())
  per_dim = lambda key, default: ([int(v) for v in fields[key].split("x")]  # noqa: E731
                                  if key in fields else [default] * len(spatial))
  sizes, strides = per_dim("size", 1), per_dim("stride", 1)
  lhs_dil, rhs_dil = per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
  pads = ([tuple(int(p) for p in v.split("_")) for v in fields["pad"].split("x")]
          if "pad" in fields else [(0, 0)] * len(spatial))
  macs = math.prod(n for n, c in zip(out, labels[2]) if not c.isdigit())
  macs *= rhs[labels[1].index("i")]
  for k, d in enumerate(spatial):
    extent = (lhs[labels[0].index(d)] - 1) * lhs_dil[k] + 1
    p = (np.arange(out[labels[2].index(d)])[:, None] * strides[k] +
         np.arange(sizes[k])[None, :] * rhs_dil[k] - pads[k][0])
    macs *= int(np.sum((p >= 0) & (p < extent) & (p % lhs_dil[k] == 0)))
  return macs


def _flops(op: _Op, shapes: dict) -> int:
  if op.kind == "dot":
    lhs = _arrays(shapes[op.operands[0]])[0][1]
    contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", op.attrs).group(1)
    k = math.prod(lhs[int(i)] for i in contracting.split(",") if i)
    return 2 * math.prod(_arrays(op.shape)[0][1]) * k
  if op.kind == "convolution":
    return 2 * _conv_macs(op, shapes)
  return 0


def _users(ops: list) -> dict:
  users = collections.defaultdict(list)
  for o in ops:
    for i, name in enumerate(o.operands):
      users[name].append((o, i))
  return users


def _read(ops: list, value: str, full: int, computations: dict, then=None) -> int:
  """Bytes of `value` (inside fused computation `ops`) that its users read: the slices taken,
  none where it is updated in place, all of it otherwise. Bitcasts and nested fusions are
  followed to the ops that read; `then` continues past a nested fusion whose root this is."""
  users = _users(ops)[value]
  if not users:
    is_root = value == next(o for o in ops if o.root).name
    return (then() if then else full) if is_root else 0
  total = 0
  for user, j in users:
    if user.kind == "bitcast":
      total += _read(ops, user.name, full, computations, then)
    elif user.kind == "fusion":
      inner = computations[_attr(user.attrs, "calls")]
      param = next(o for o in inner if o.kind == "parameter" and int(o.args) == j)
      outer = lambda user=user: _read(ops, user.name, full, computations, then)  # noqa: E731
      total += _read(inner, param.name, full, computations, outer)
    elif user.kind in _SLICES and j == 0:
      total += shape_bytes(user.shape)
    elif not (user.kind == "dynamic-update-slice" and j == 0):
      return full
  return min(total, full)


def _fusion_bytes(op: _Op, computations: dict, shapes: dict) -> int:
  """HBM bytes of one fusion: its operands read (only the slices it takes of sliced ones, nothing
  of a buffer it updates in place) and its outputs written (only the update of in-place ones)."""
  fused = computations[_attr(op.attrs, "calls")]
  by_name = {o.name: o for o in fused}
  params = {int(o.args): o for o in fused if o.kind == "parameter"}
  total = 0
  for i, name in enumerate(op.operands):
    full = shape_bytes(shapes[name])
    total += _read(fused, params[i].name, full, computations) if i in params else full
  root = next(o for o in fused if o.root)
  outs = [by_name[n] for n in root.operands] if root.kind == "tuple" else [root]
  for out in outs:
    total += (shape_bytes(by_name[out.operands[1]].shape) if out.kind == "dynamic-update-slice"
              else shape_bytes(out.shape))
  return total


def _bytes(op: _Op, computations: dict, shapes: dict) -> int:
  if op.kind in _FREE:
    return 0
  if op.kind == "fusion":
    return _fusion_bytes(op, computations, shapes)
  if op.kind in _SLICES:
    return 2 * shape_bytes(op.shape)
  if op.kind == "dynamic-update-slice":
    return 2 * shape_bytes(shapes[op.operands[1]])
  reads = sum(shape_bytes(shapes[o]) for o in op.operands)
  if op.kind.endswith("-start"):  # Its output tuple repeats the operands; the -done writes.
    return reads
  return shape_bytes(op.shape) if op.kind.endswith("-done") else reads + shape_bytes(op.shape)


def _trip_count(loop: _Op, caller: list, computations: dict) -> Optional[int]:
  """`n - start` for a loop whose condition is `i < n` (n a constant, i a tuple element that
  starts as a constant, else 0); None for any other condition."""
  cond = computations[_attr(loop.attrs, "condition")]
  by_name = {o.name: o for o in cond}
  root = next(o for o in cond if o.root)
  if root.kind != "compare" or "direction=LT" not in root.attrs:
    return None
  index, bound = (by_name.get(n) for n in root.operands)
  if not (index and bound and index.kind == "get-tuple-element" and bound.kind == "constant"):
    return None
  start = 0
  init = {o.name: o for o in caller}.get(loop.operands[0])
  if init is not None and init.kind == "tuple":
    element = {o.name: o for o in caller}.get(init.operands[int(_attr(index.attrs, "index"))])
    if element is not None and element.kind == "constant":
      start = int(element.args)
  return max(int(bound.args) - start, 1)


@dataclasses.dataclass(frozen=True)
class Cost:
  """Per-device totals with loops expanded, and the same counts with each body taken once."""
  flops: float
  bytes: float
  flops_once: float
  bytes_once: float
  loops: tuple  # The trip counts found, outermost first.


def program_cost(hlo_text: str, steps: int = 1, named_trips: Optional[dict] = None) -> Cost:
  """FLOPs and bytes of the optimized HLO text of one device's program (see the module doc).

  steps: the trip count to assume for loops of the entry computation whose count cannot be read
  (the sampler's decode loop: max_new_tokens - 1); such loops nested deeper count once, except
  those whose op_name contains a key of `named_trips`, which count its value (the decode's walk
  over the generated cache, `attention.GEN_WALK_SCOPE`: its mean trip count over a
  generation)."""
  computations, entry = parse_module(hlo_text)
  shapes = {o.name: o.shape for ops in computations.values() for o in ops}
  totals = collections.Counter()
  loops = []

  def walk(name: str, weight: int, fused: bool):
    for op in computations[name]:
      flops = _flops(op, shapes)
      totals["flops"] += weight * flops
      totals["flops_once"] += flops
      if not fused:
        moved = _bytes(op, computations, shapes)
        totals["bytes"] += weight * moved
        totals["bytes_once"] += moved
      if op.kind == "while":
        trips = _trip_count(op, computations[name], computations)
        if trips is None:
          named = [t for key, t in (named_trips or {}).items() if key in op.attrs]
          trips = steps if name == entry else (named[0] if named else 1)
        loops.append(trips)
        walk(_attr(op.attrs, "body"), weight * trips, False)
      elif op.kind in ("call", "conditional"):
        for callee in re.findall(r"(?:to_apply|branch_computations=\{|,|true_computation|"
                                 r"false_computation)=?\s*%([^\s,}]+)", op.attrs):
          walk(callee, weight, False)
      elif op.kind == "fusion" or op.kind.endswith("-start") and _attr(op.attrs, "calls"):
        walk(_attr(op.attrs, "calls"), weight, True)

  walk(entry, 1, False)
  return Cost(float(totals["flops"]), float(totals["bytes"]), float(totals["flops_once"]),
              float(totals["bytes_once"]), tuple(loops))
