"""XLA's own accounting of a compiled program, with loops counted: bytes accessed, FLOP and the ops
that move memory (copies, dynamic-slices of stacked weights, converts of whole matrices).

`compiled.cost_analysis()` counts a while loop's body once, whatever its trip count; `hlo_costs`
walks the optimized HLO text (`compiled.as_text()`) instead and multiplies every loop body by its
`known_trip_count`. Per top-level instruction, bytes = output + operands, where a fusion operand
that the fusion only slices counts as the slice (what XLA's own analysis does) and a
dynamic-update-slice counts its update; FLOP = 2 x output x contraction of every dot.

Used as the CPU proxy of a GPU decode step (`--what decode`: bytes per token against the weight
and state bytes) and for the compiled peak memory of the training step (`--what train`):

    PYTHONPATH=. python benchmarks/hlo_cost.py --what decode --model 7b --batches 1,16
    PYTHONPATH=. python benchmarks/hlo_cost.py --what train --preset medium --batch 16 --seq-len 2048

On CPU, XLA upcasts bf16 dots to float32 (a convert of each bf16 weight per use); `--dtype float32`
shows the program without that artefact. Only lowering and compilation: nothing is allocated.
"""

import argparse
import collections
import json
import math
import os
import re
import sys

_DT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "iota", "while", "call", "conditional", "opt-barrier"}
BIG = 1 << 20  # a convert / copy / slice of at least this many bytes is "of a weight or state"


def _shapes_bytes(text):
    """(total bytes, list of (dtype, dims)) of every array shape in `text`."""
    found = []
    for dt, dims in _SHAPE.findall(text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        found.append((dt, n, dims))
    return sum(_DT_BYTES.get(dt, 4) * n for dt, n, _ in found), found


def _split_operands(args):
    """The operand list of an instruction: the text up to the matching ')'."""
    depth, out = 1, []
    for ch in args:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                break
        out.append(ch)
    return "".join(out), args[len(out) + 1:]


def parse_hlo(text):
    """{computation name: [instruction dict]}, and the ENTRY computation's name."""
    comps, entry, cur = {}, None, None
    for line in text.splitlines():
        if line.startswith("ENTRY ") or (line.startswith("%") and line.rstrip().endswith("{")):
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            cur = comps.setdefault(name, [])
            if line.startswith("ENTRY"):
                entry = name
            continue
        if cur is None or line.strip() == "}":
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, out_type, op, rest = m.groups()
        operands, attrs = _split_operands(rest)
        out_bytes, _ = _shapes_bytes(out_type)
        ops = re.findall(r"%([\w.\-]+)", operands)  # operand names (their shapes: by name)
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
        instr = dict(name=name, op=op, out_bytes=out_bytes, out_type=out_type, operands=ops,
                     raw=operands.strip(),
                     attrs=attrs, trip=int(trip.group(1)) if trip else None,
                     calls=re.findall(r"(?:calls|body|condition|to_apply|branch_computations)="
                                      r"\{?%?([\w.\-]+)", attrs))
        body = re.search(r"body=%?([\w.\-]+)", attrs)
        instr["body"] = body.group(1) if body else None
        cur.append(instr)
    return comps, entry


def _sliced_params(comp):
    """{parameter number: bytes read} of a fused computation's parameters whose only users are
    (dynamic-)slices or gathers of them."""
    index = {i["name"]: int(i["raw"]) for i in comp if i["op"] == "parameter"}
    users = collections.defaultdict(list)
    for i in comp:
        for src in i["operands"]:
            users[src].append(i)
    sliced = {}
    for pname, num in index.items():
        us = users.get(pname, [])
        if us and all(u["op"] in ("dynamic-slice", "slice", "gather")
                      and u["operands"][0] == pname for u in us):
            sliced[num] = sum(u["out_bytes"] for u in us)
    return sliced


def hlo_costs(text, big=BIG) -> dict:
    """Bytes accessed and FLOP of one execution of the program, loop bodies times their trip
    counts, plus counts (executions) of copies, dynamic-slices, converts and transposes of
    arrays >= `big` bytes, and of dots. See the module docstring."""
    comps, entry = parse_hlo(text)
    totals = collections.Counter()

    def dot_flops(instr, comp_index):
        out_elems = sum(n for _, n, _ in _shapes_bytes(instr["out_type"])[1])
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr["attrs"])
        lhs = instr["operands"][0] if instr["operands"] else ""
        shape = comp_index.get(lhs)
        k = 1
        if dims and shape is not None:
            sizes = [int(d) for d in shape.split(",") if d]
            k = math.prod(sizes[int(d)] for d in dims.group(1).split(",") if d)
        return 2 * out_elems * k

    def shapes_of(comp):
        out = {}
        for i in comp:
            found = _shapes_bytes(i["out_type"])[1]
            if len(found) == 1:
                out[i["name"]] = found[0][2]
        return out

    def record(i, mult, idx):
        """Counts of the ops that matter, per execution of instruction i."""
        op = i["op"]
        if op == "dot":
            totals["dot"] += mult
            totals["flops"] += mult * dot_flops(i, idx)
        elif op in ("copy", "dynamic-slice", "convert", "transpose", "slice") and \
                i["out_bytes"] >= big:
            totals[f"{op} (>= {big >> 20} MiB)"] += mult
            totals[f"{op} bytes"] += mult * i["out_bytes"]

    def count_inside(comp_name, mult):
        comp = comps.get(comp_name, [])
        idx = shapes_of(comp)
        for i in comp:
            record(i, mult, idx)
            if i["op"] == "fusion":
                for c in i["calls"]:
                    count_inside(c, mult)

    def walk(comp_name, mult):
        comp = comps.get(comp_name, [])
        idx = shapes_of(comp)
        size = {i["name"]: i["out_bytes"] for i in comp}
        for i in comp:
            op = i["op"]
            if op == "while":
                n = i["trip"] or 1
                totals["while loops"] += mult
                walk(i["body"], mult * n)
                continue
            if op in ("call", "conditional"):
                for c in i["calls"]:
                    walk(c, mult)
                continue
            if op in _FREE:
                continue
            byts = i["out_bytes"]
            if op == "fusion":
                fused = comps.get(i["calls"][0], []) if i["calls"] else []
                sliced = _sliced_params(fused)
                for num, src in enumerate(i["operands"]):
                    byts += sliced.get(num, size.get(src, 0))
                dus = [f for f in fused if f["op"] == "dynamic-update-slice"]
                if dus and any(f["name"] == fused[-1]["name"] for f in dus):
                    # an in-place update writes (and reads) only the update
                    fsize = {f["name"]: f["out_bytes"] for f in fused}
                    upd = fsize.get(dus[-1]["operands"][1], 0)
                    byts = (byts - i["out_bytes"] - max(size.get(o, 0) for o in i["operands"])
                            + 2 * upd)
                count_inside(i["calls"][0] if i["calls"] else "", mult)
            elif op == "dynamic-update-slice":
                byts = 2 * size.get(i["operands"][1], 0)
            elif op in ("dynamic-slice", "slice"):
                byts = 2 * i["out_bytes"]
            else:
                byts += sum(size.get(o, 0) for o in i["operands"])
            record(i, mult, idx)
            totals["bytes accessed"] += mult * byts
            totals["kernels"] += mult

    walk(entry, 1)
    return dict(totals)


def loop_body_costs(text, trip, big=BIG) -> dict:
    """`hlo_costs` of one iteration of the while loop in ENTRY that runs `trip` times (e.g. the
    token loop of `generate`: max_new_tokens - 1), nested loops counted."""
    comps, entry = parse_hlo(text)
    loops = [i for i in comps[entry] if i["op"] == "while" and i["trip"] == trip]
    if len(loops) != 1:
        raise ValueError(f"expected one loop of {trip} iterations in ENTRY, found {len(loops)}")
    loop = loops[0]
    body = loop["body"]
    # Re-root the text at the body: the walker starts at ENTRY, so rename.
    lines = []
    for line in text.splitlines():
        if line.startswith("ENTRY "):
            line = "%" + line[len("ENTRY "):].lstrip("%")
        if line.startswith("%" + body + " ") or line.startswith(body + " "):
            line = "ENTRY " + line
        lines.append(line)
    return hlo_costs("\n".join(lines), big)


# ----------------------------------------------------------------------------------------------
# The model programs
# ----------------------------------------------------------------------------------------------

def model_config(name, dtype, **overrides):
    import jax.numpy as jnp

    from tfla_jax.layers import xLSTMConfig

    dt = jnp.dtype(dtype)
    if name == "7b":
        return xLSTMConfig.xlstm_7b(param_dtype=dt, dtype=dt if dt == jnp.float32 else
                                    jnp.bfloat16, scan_blocks=True, **overrides)
    return getattr(xLSTMConfig, name)(param_dtype=dt, dtype=dt if dt == jnp.float32 else
                                      jnp.bfloat16, **overrides)


def decode_costs(cfg, batch, new_tokens=8) -> dict:
    """Per decode step of `generate` (one iteration of its token loop), from the compiled HLO on
    this backend, against the weight and state bytes. Abstract: nothing is allocated."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tfla_jax import layers

    model = nnx.eval_shape(lambda: layers.xLSTMLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, variables = nnx.split(model)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(variables))
    state = jax.eval_shape(lambda: model.init_state(batch))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    prompt = jax.ShapeDtypeStruct((batch, 4), jnp.int32)
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt)  # noqa: E731
    compiled = layers._generate.lower(
        graphdef, variables, prompt, None, jax.eval_shape(lambda: jax.random.key(0)),
        scalar(jnp.float32), True, scalar(jnp.int32),
        max_new_tokens=new_tokens, top_k=None).compile()
    text = compiled.as_text()
    step = loop_body_costs(text, new_tokens - 1)
    return dict(batch=batch, weight_gb=weight_bytes / 1e9, state_gb=state_bytes / 1e9,
                step_gb=step.get("bytes accessed", 0) / 1e9,
                ratio=step.get("bytes accessed", 0) / (weight_bytes + 2 * state_bytes),
                step_gflop=step.get("flops", 0) / 1e9, counts=step)


def train_memory(preset, batch, seq_len, remat=None, loss_chunk=None) -> dict:
    """Compiled memory analysis of examples/train_lm.py's train step (lowering only)."""
    import jax

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "examples"))
    import train_lm

    flags = ["--preset", preset, "--batch-size", str(batch), "--seq-len", str(seq_len),
             "--dtype", "bfloat16", "--max-corpus-bytes", "2000000", "--out-dir", "/tmp/hlo_cost"]
    flags.append("--remat" if remat else "--no-remat")
    if loss_chunk is not None:
        flags += ["--loss-chunk", str(loss_chunk)]
    run = train_lm.setup(train_lm.build_parser().parse_args(flags))
    step = train_lm.make_train_step(run.graphdef, run.tx, run.schedule, run.mesh, run.param_dims,
                                    run.param_specs, run.state_shardings,
                                    **train_lm.step_options(run.args))
    tokens = jax.ShapeDtypeStruct((1, batch, seq_len + 1), jax.numpy.int32,
                                  sharding=run.batch_sharding)
    m = step.lower(run.abstract_state(), tokens).compile().memory_analysis()
    gb = lambda b: b / 1e9  # noqa: E731
    return dict(preset=preset, batch=batch, seq_len=seq_len, remat=run.args.remat,
                loss_chunk=run.args.loss_chunk, argument_gb=gb(m.argument_size_in_bytes),
                output_gb=gb(m.output_size_in_bytes), temp_gb=gb(m.temp_size_in_bytes),
                alias_gb=gb(m.alias_size_in_bytes),
                peak_gb=gb(m.argument_size_in_bytes + m.output_size_in_bytes
                           + m.temp_size_in_bytes - m.alias_size_in_bytes))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", choices=("decode", "train"), default="decode")
    p.add_argument("--model", default="7b", help="decode: 7b or an xLSTMConfig preset name")
    p.add_argument("--dtype", default="bfloat16", help="decode: parameter (and compute) dtype")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--preset", default="medium")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--remat", action="store_true", help="train: train_lm --remat")
    p.add_argument("--loss-chunk", type=int, help="train: train_lm --loss-chunk")
    args = p.parse_args(argv)
    if args.what == "decode":
        cfg = model_config(args.model, args.dtype)
        for b in (int(x) for x in args.batches.split(",")):
            print(json.dumps(decode_costs(cfg, b)), flush=True)
    else:
        print(json.dumps(train_memory(args.preset, args.batch, args.seq_len, args.remat,
                                      args.loss_chunk)), flush=True)


if __name__ == "__main__":
    main()
