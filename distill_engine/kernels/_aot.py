"""Ahead-of-time compile and register/spill check of every Triton kernel for Hopper (sm_90a), no GPU needed.

For each kernel in ``distill_engine/kernels`` and every specialization its launcher can pick (the launcher's
own config tables, the dtypes bf16/fp16/fp32, the constexpr flags, the top-k widths), this

1. builds an ``ASTSource`` the way the JIT would at launch time (pointers 16-byte aligned, integer 1 folded to a
   constant, integers divisible by 16 marked so) and compiles it with the installed Triton for
   ``GPUTarget("cuda", 90, 32)`` -- Triton's own ptxas runs too, so a ptxas error is a compile error;
2. runs ``ptxas -v --gpu-name=sm_90a`` (the binary Triton ships) on the PTX and parses registers, spill
   stores/loads and stack; shared memory is Triton's dynamic allocation (``metadata.shared``);
3. prints one table row per specialization and fails on a compile error, shared memory over the sm_90 limit
   (227 KB per block), or any spill in a *hot* kernel (the ones on the training step's critical path).

Results are cached per specialization under ``.aot_cache/`` (gitignored), keyed by the Triton version, the
kernel's source key (Triton's ``cache_key``: its text and every jit function it calls) and the specialization,
so an unchanged kernel costs nothing on the next run.

Usage::

    python -m distill_engine.kernels._aot [--jobs 2] [--cache .aot_cache] [--only NAME] [--md FILE] [--json FILE]

Exit codes: 0 all good, 1 a check failed, 3 no ptxas found (nothing was checked).

Registering a kernel or a new constexpr flag: one ``Entry`` in ``REGISTRY`` below (``flags`` is the product of
constexpr values enumerated; ``args`` gives the runtime arguments as a launch at the target shape would see
them). A kernel that is only a ``@triton.jit`` helper inlined into others goes into ``HELPERS``; the test suite
fails when a kernel is in neither.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

SM90_SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
_KMOD = "distill_engine.kernels."
# Sample sizes of the target workload (N 8192, d 4096, V 128256): only alignment matters for codegen.
_D, _V, _C = 4096, 128256, 8192
_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One kernel: which specializations the launcher can pick, and how a launch at the target shape looks."""

    name: str                                    # short name in the table
    module: str                                  # module under distill_engine.kernels
    fn: str                                      # the @triton.jit kernel in it
    hot: bool                                    # spills fail the check
    dtypes: Tuple[str, ...]                      # input dtypes the launcher accepts
    configs: Callable[[object, str], List[dict]]  # (module, dtype) -> launch configs (constexpr tiles + warps/stages)
    flags: Dict[str, tuple]                      # constexpr flag -> values; the product is enumerated
    args: Callable[[str, dict], dict]            # (dtype, constexprs) -> runtime args: "*type" | int | float
    valid: Optional[Callable[[str, dict], bool]] = None  # drop combinations the launcher never forms
    fp16_all_configs: bool = False               # False: fp16 is compiled with the first config only (see below)


# ------------------------------------------------------------------------------------------------------------
# the registry: one Entry per launched kernel
# ------------------------------------------------------------------------------------------------------------
def _dl_lse_configs(m, dt):
    return list(m._CUDA_F32_CONFIGS if dt == "fp32" else m._CUDA_LP_CONFIGS)


def _dl_lse_args(dt, c):
    p = _PTR[dt]
    return dict(h_ptr=p, w_ptr=p, b_ptr=p, buf_ptr="*fp32", part_ptr="*fp32", C=_C, V=_V, D=_D, v_per_split=2048,
                inv_t=0.5, stride_hn=_D, stride_hd=1, stride_wv=_D, stride_wd=1, stride_b=1, stride_buf=_V,
                DOT_MODE=1 if dt == "fp32" else 0)


def _dl_lse_frombuf_configs(m, dt):
    return [dict(m._CUDA_FROM_BUF)]


def _dl_ew_configs(m, dt):
    return [dict(m._CUDA_EW, num_stages=3)]


def _dl_ew_args(dt, c):
    return dict(buf_ptr="*fp32", glp_ptr=_PTR[dt], dbp_ptr="*fp32", lse_t_ptr="*fp32", lse_1_ptr="*fp32",
                sq_ptr="*fp32", s1_ptr="*fp32", C=_C, V=_V, inv_t=0.5, g_scale=1.0, stride_buf=_V, stride_glp=_V,
                WRITE_F32=dt == "fp32", WRITE_LP=dt != "fp32", RTNE_FIX=False)


def _dl_rec_configs(m, dt):
    return [dict(m._CUDA_RECOMPUTE_F32 if dt == "fp32" else m._CUDA_LP_CONFIGS[0])]


def _dl_rec_args(dt, c):
    p = _PTR[dt]
    return dict(h_ptr=p, w_ptr=p, b_ptr=p, g_ptr=p, dbp_ptr="*fp32", lse_t_ptr="*fp32", lse_1_ptr="*fp32",
                sq_ptr="*fp32", s1_ptr="*fp32", C=_C, V=_V, D=_D, inv_t=0.5, g_scale=1.0, stride_hn=_D, stride_hd=1,
                stride_wv=_D, stride_wd=1, stride_b=1, stride_g=_V, DOT_MODE=1 if dt == "fp32" else 0,
                RTNE_FIX=False)


# candidate widths next_pow2(k): every tile class of k <= MAX_KERNEL_K (the first is the common k = 64)
_TT_KP = (64, 1, 16, 128, 256)


def _tt_topk_configs(m, dt):
    # the launcher's tile depends on KP and on FROM_BUF: one config per pair, both carried along as constexprs
    out = []
    for kp in _TT_KP:
        for from_buf in (False, True):
            cfg = m._cuda_config(_torch_dtype(dt), kp, from_buf)
            out.append(dict(BM=cfg["BM"], BV=cfg["BV"], BD=cfg["BD"], num_warps=cfg["num_warps"],
                            num_stages=cfg["num_stages"], KP=kp, K=kp, FROM_BUF=from_buf))
    return out


def _tt_topk_args(dt, c):
    p = _PTR[dt]
    return dict(h_ptr=p, w_ptr=p, b_ptr=p, pm_ptr="*fp32", ps_ptr="*fp32", cv_ptr="*fp32", ci_ptr="*i32",
                buf_ptr="*fp32", C=_C, V=_V, D=_D, stride_h=_D, stride_w=_D, stride_buf=_V, inv_t=0.5,
                SPLIT_LEN=4096, NSPLIT=32, GROUP_M=8, DOT_MODE=1 if dt == "fp32" else 0)


def _tt_topk_valid(dt, c):
    # pass 1 of sampling (DO_TOPK=False) runs with KP 16, K 1 on the fused tile GEMM; FROM_BUF is a top-k path only
    if not c["DO_TOPK"]:
        return c["KP"] == 16 and not c["FROM_BUF"]
    return True


def _tt_sample_configs(m, dt):
    cfg = m._cuda_config(_torch_dtype(dt), 16)
    return [dict(BM=cfg["BM"], BV=cfg["BV"], BD=cfg["BD"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])]


def _tt_sample_args(dt, c):
    p = _PTR[dt]
    return dict(h_ptr=p, w_ptr=p, b_ptr=p, lse_ptr="*fp32", u_ptr="*fp64", cs_ptr="*fp64", lo_ptr="*i32",
                hi_ptr="*i32", out_ptr="*i32", C=_C, V=_V, D=_D, stride_h=_D, stride_w=_D, inv_t=0.5,
                SPLIT_LEN=4096, NSPLIT=32, KD=64, DOT_MODE=1 if dt == "fp32" else 0)


def _proj_configs(m, dt):
    # _fwd_config reads the interpreter flag: this module runs compiled, so it returns the CUDA tiles
    bm, bn, bk, gm, nw, ns = m._fwd_config(_torch_dtype(dt))
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=nw, num_stages=ns)]


def _proj_args(dt, c):
    p = _PTR[dt]
    out = p if c["KIND"] == 0 else "*fp32"   # mse writes g in the input dtype, cosine the fp32 y
    return dict(h_ptr=p, w_ptr=p, b_ptr=p, t_ptr=p, scale_ptr="*fp32", part_ptr="*fp32", out_ptr=out,
                M=_C, D_T=_D, D_S=2048, stride_hm=2048, stride_hk=1, stride_wn=2048, stride_wk=1, stride_b=1,
                stride_tm=_D, stride_tn=1, stride_om=_D, stride_on=1, grad_coef=0.5, DOT_MODE=1 if dt == "fp32" else 0)


def _cos_configs(m, dt):
    return [dict(BLOCK_M=32, BLOCK_N=256, num_warps=4, num_stages=3)]


def _cos_args(dt, c):
    return dict(y_ptr="*fp32", t_ptr=_PTR[dt], alpha_ptr="*fp32", beta_ptr="*fp32", g_ptr=_PTR[dt], M=_C, D_T=_D,
                stride_ym=_D, stride_tm=_D, stride_gm=_D)


def _dl_buf_lse_configs(m, dt):
    return [dict(BLOCK_R=4, BLOCK_C=1024, num_warps=4, num_stages=3)]   # the launcher's CUDA tile


def _dl_buf_lse_args(dt, c):
    return dict(buf_ptr="*fp32", out_ptr="*fp32", C=_C, V=_V, inv_t=0.5, stride_buf=_V)


def _rel_configs(m, dt):
    # the launcher's CUDA tile (DISTILL_ENGINE_RELATION_TILE default 64, 32 for fp32) at d_head 64 for both models
    t = 32 if dt == "fp32" else 64
    return [dict(BQ=t, BK=t, BDS=64, BDT=64, num_warps=4, num_stages=3)]


def _rel_args(dt, c):
    p = _PTR[dt]
    L, H, d = 8192, 12, 768
    return dict(S_ptr=p, T_ptr=p, M_ptr="*u8", kl_ptr="*fp32", lses_ptr="*fp32", lset_ptr="*fp32", c_ptr="*fp32",
                g_ptr="*fp32", dS_ptr="*fp32", dT_ptr="*fp32", L=L, H=H, ds=64, dt=64, s_sb=L * d, s_sl=d, s_sd=1,
                t_sb=L * d, t_sl=d, t_sd=1, c_s=0.125, c_t=0.125, d_ss=d, d_ts=d, UPCAST=False, PREC="ieee")


def _rel_bwd_args(dt, c):
    a = _rel_args(dt, c)
    del a["kl_ptr"]  # forward-only
    return a


def _rel_fwd_args(dt, c):
    a = _rel_args(dt, c)
    for k in ("c_ptr", "g_ptr", "dS_ptr", "dT_ptr", "d_ss", "d_ts"):  # backward-only arguments
        del a[k]
    return a


_ALL = ("bf16", "fp16", "fp32")
REGISTRY: List[Entry] = [
    Entry("loss.logits_lse", "distill_loss", "_loss_logits_lse_kernel", True, _ALL, _dl_lse_configs,
          dict(STORE=(True, False), NEED_LSE1=(True, False), HAS_BIAS=(True, False), FROM_BUF=(False,)), _dl_lse_args),
    Entry("loss.logits_lse.from_buf", "distill_loss", "_loss_logits_lse_kernel", True, ("bf16",),
          _dl_lse_frombuf_configs,
          dict(STORE=(False,), NEED_LSE1=(True, False), HAS_BIAS=(True, False), FROM_BUF=(True,)), _dl_lse_args),
    Entry("loss.dense_grad", "distill_loss", "_loss_dense_grad_kernel", True, _ALL, _dl_ew_configs,
          dict(HAS_LSE1=(True, False), HAS_BIAS=(True, False)), _dl_ew_args),
    Entry("loss.recompute_grad", "distill_loss", "_loss_recompute_grad_kernel", True, _ALL, _dl_rec_configs,
          dict(HAS_LSE1=(True, False), HAS_BIAS=(True, False), WANT_DB=(True,)), _dl_rec_args),
    Entry("tt.topk", "teacher_targets", "_tt_topk_kernel", True, _ALL, _tt_topk_configs,
          dict(DO_TOPK=(True, False), HAS_BIAS=(True, False)), _tt_topk_args, _tt_topk_valid),
    Entry("tt.sample", "teacher_targets", "_tt_sample_kernel", False, _ALL, _tt_sample_configs,
          dict(HAS_BIAS=(True, False)), _tt_sample_args),
    Entry("proj.fwd", "projection_loss", "_proj_fwd_kernel", True, _ALL, _proj_configs,
          dict(KIND=(0, 1), WRITE=(True, False), HAS_BIAS=(True, False)), _proj_args),
    Entry("proj.cosine_grad", "projection_loss", "_proj_cosine_grad_kernel", False, _ALL, _cos_configs, {}, _cos_args),
    Entry("loss.rest_lse", "distill_loss", "_loss_buf_lse_kernel", True, ("fp32",), _dl_buf_lse_configs, {},
          _dl_buf_lse_args),
    Entry("relation.fwd", "token_relation", "_relation_fwd_kernel", False, _ALL, _rel_configs,
          dict(CAUSAL=(True, False)), _rel_fwd_args),
    Entry("relation.bwd_row", "token_relation", "_relation_bwd_kernel", False, _ALL, _rel_configs,
          dict(COL=(False,), CAUSAL=(True, False), NEED_S=(True,), NEED_T=(True, False)), _rel_bwd_args),
    Entry("relation.bwd_col", "token_relation", "_relation_bwd_kernel", False, _ALL, _rel_configs,
          dict(COL=(True,), CAUSAL=(True, False), NEED_S=(True,), NEED_T=(True, False)), _rel_bwd_args),
]
# @triton.jit device functions that are inlined into the kernels above (compiled as part of them).
# Keyed by the module that defines them (the shared ones in ``_tiles``, imported by the kernel modules).
HELPERS = {
    ("_tiles", "_logits_tile"), ("_tiles", "_online_lse"), ("_tiles", "_rtne_bf16"),
    ("distill_loss", "_dense_g"), ("distill_loss", "_store_scaled"), ("teacher_targets", "_block_split"),
    ("token_relation", "_head"), ("token_relation", "_key_ok"), ("token_relation", "_query_tiles"),
    ("token_relation", "_scores"), ("token_relation", "_valid"), ("token_relation", "_keys_end"),
    ("token_relation", "_row_stats"), ("token_relation", "_tile_grads"), ("token_relation", "_store_grad"),
}
# fp16 shares bf16's code path (16-bit tensor-core operands, fp32 accumulation); on Triton 3.9, compiled in every
# config, the two had the same spills and shared memory and registers within a few, so fp16 is compiled with each
# kernel's first (default) config only, to keep the check's cold run short (``fp16_all_configs=True`` widens it).
# HAS_BIAS is enumerated both ways: the bias-free code is not always the lighter one (fp32 top-k at KP = 128
# spilled 8 B without the bias and none with it, Triton 3.6).


def _torch_dtype(dt: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]


# ------------------------------------------------------------------------------------------------------------
# specializations
# ------------------------------------------------------------------------------------------------------------
_LAUNCH = ("num_warps", "num_stages")


def specializations(entries=None) -> List[dict]:
    """Every (kernel, dtype, config, flags) combination of the registry, as plain JSON-able dicts."""
    out = []
    for e in entries or REGISTRY:
        mod = importlib.import_module(_KMOD + e.module)
        keys = list(e.flags)
        for dt in e.dtypes:
            cfgs = e.configs(mod, dt)
            if dt == "fp16" and not e.fp16_all_configs:
                cfgs = cfgs[:1]
            for cfg in cfgs:
                for vals in itertools.product(*(e.flags[k] for k in keys)):
                    const = dict(zip(keys, vals))
                    const.update({k: v for k, v in cfg.items() if k not in _LAUNCH})
                    if e.valid is not None and not e.valid(dt, const):
                        continue
                    args = e.args(dt, const)
                    tiles = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in cfg.items()
                                     if k not in _LAUNCH and k not in ("K",))
                    flags = ",".join(f"{k}={int(v)}" for k, v in zip(keys, vals) if len(e.flags[k]) > 1)
                    out.append(dict(
                        kernel=e.name, module=e.module, fn=e.fn, hot=e.hot, dtype=dt,
                        config=f"{tiles} w{cfg['num_warps']} s{cfg['num_stages']}", flags=flags,
                        args=args, const=const, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    ))
    return out


def _source_key(module: str, fn_name: str) -> str:
    """Triton's own source key of the kernel (its text and every @triton.jit function it calls), else the module's
    whole source text (interpreted kernels carry no cache_key)."""
    fn = getattr(importlib.import_module(_KMOD + module), fn_name)
    key = getattr(fn, "cache_key", None)
    if isinstance(key, str):
        return key
    with open(importlib.util.find_spec(_KMOD + module).origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _cache_key(spec: dict, triton_version: str) -> str:
    blob = json.dumps([triton_version, _source_key(spec["module"], spec["fn"]), spec["fn"], spec["args"],
                       spec["const"], spec["num_warps"], spec["num_stages"], sys.version_info[:2]],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------------------------
# compile + ptxas
# ------------------------------------------------------------------------------------------------------------
def find_ptxas() -> Optional[str]:
    """The ptxas Triton itself would use for sm_90 (shipped in its nvidia backend), else one on PATH."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(90).path
        if path and os.access(path, os.X_OK):
            return path
    except Exception:  # an older/newer Triton layout or a missing backend: look elsewhere
        pass
    try:
        import triton
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        if os.access(cand, os.X_OK):
            return cand
    except ImportError:
        pass
    return shutil.which("ptxas")


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_STACK = re.compile(r"(\d+) bytes stack frame")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict:
    """Registers, spill stores/loads, stack frame and static shared memory from a ``ptxas -v`` log."""
    def first(rx, default=0):
        m = rx.search(log)
        return int(m.group(1)) if m else default
    m = _RE_SPILL.search(log)
    return dict(regs=first(_RE_REGS, -1), spill_st=int(m.group(1)) if m else 0, spill_ld=int(m.group(2)) if m else 0,
                stack=first(_RE_STACK), static_smem=first(_RE_SMEM))


def _infer_missing(fn, values: dict) -> Tuple[dict, List[str]]:
    """Fill runtime arguments the registry does not name yet (a kernel that gained an argument): ``*_ptr`` ->
    an aligned fp32 pointer, anything else -> an int divisible by 16. Constexprs are never guessed: they take
    the kernel's own default or the registry must name them."""
    values = dict(values)
    inferred = []
    for p in fn.params:
        if p.name in values:
            continue
        if p.is_constexpr:
            default = getattr(p, "default", inspect.Parameter.empty)
            if default is inspect.Parameter.empty:
                raise KeyError(f"{fn.__name__}: constexpr {p.name!r} has no value: add it to its Entry in "
                               f"distill_engine/kernels/_aot.py (flags or args)")
            values[p.name] = default
            continue
        values[p.name] = "*fp32" if p.name.endswith("_ptr") else 4096
        inferred.append(p.name)
    return values, inferred


def _signature(fn, values: dict):
    """(signature, constexprs, attrs) as the JIT forms them at launch for these argument values."""
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        v = values[name]
        if p.is_constexpr:
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, str) and v.startswith("*"):
            sig[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]          # torch allocations are 16-byte aligned
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif isinstance(v, int):
            if v == 1:                                       # the JIT folds integer 1 into a constant
                sig[name], const[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{fn.__name__}: unsupported sample value {v!r} for {name!r}")
    return sig, const, attrs


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "-"


def compile_one(spec: dict) -> dict:
    """Compile one specialization for sm_90a and measure it; never raises (errors go into the row)."""
    row = {k: spec[k] for k in ("kernel", "dtype", "config", "flags", "hot")}
    try:
        import triton
        from triton.compiler import ASTSource
        from triton.backends.compiler import GPUTarget
        mod = importlib.import_module(_KMOD + spec["module"])
        fn = getattr(mod, spec["fn"])
        values, inferred = _infer_missing(fn, {**spec["args"], **spec["const"]})
        if inferred:
            row["flags"] = (row["flags"] + " " if row["flags"] else "") + "inferred:" + "/".join(inferred)
        sig, const, attrs = _signature(fn, values)
        src = ASTSource(fn, sig, const, attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
        ptx = k.asm["ptx"]
        ptxas = find_ptxas()
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, "k.ptx")
            with open(p, "w") as f:
                f.write(ptx)
            r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", p, "-o", os.path.join(tmp, "k.cubin")],
                               capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            row["error"] = "ptxas: " + r.stderr.strip().splitlines()[-1][:300]
            return row
        row.update(parse_ptxas(r.stderr))
        row["smem"] = int(getattr(k.metadata, "shared", 0)) + row.pop("static_smem")
        row["mma"] = _mma_kind(ptx)
    except Exception as exc:  # a compile error is a result of the check, not a crash of it
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        row["error"] = f"{type(exc).__name__}: {(lines[-1] if lines else '')[:300]}"
    return row


def _worker_init():
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default, minus Triton 3.9's warning


def run_check(specs: List[dict], cache_dir: Optional[str], jobs: int, log=print) -> List[dict]:
    """Rows for every spec, cached ones read back, the rest compiled in ``jobs`` processes."""
    import triton
    rows: List[Optional[dict]] = [None] * len(specs)
    todo = []
    keys = [_cache_key(s, triton.__version__) for s in specs]
    for i, (s, key) in enumerate(zip(specs, keys)):
        path = os.path.join(cache_dir, key + ".json") if cache_dir else None
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    rows[i] = dict(json.load(f), cached=True)
                continue
            except (OSError, ValueError):
                pass
        todo.append(i)
    log(f"[aot] triton {triton.__version__}: {len(specs)} specializations, {len(specs) - len(todo)} cached, "
        f"{len(todo)} to compile with {jobs} process(es)")

    def done(i, row):
        rows[i] = row
        if cache_dir and "error" not in row:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = os.path.join(cache_dir, keys[i] + ".tmp")
            with open(tmp, "w") as f:
                json.dump(row, f)
            os.replace(tmp, os.path.join(cache_dir, keys[i] + ".json"))

    if jobs <= 1 or len(todo) <= 1:
        for i in todo:
            done(i, compile_one(specs[i]))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init) as ex:
            futs = {ex.submit(compile_one, specs[i]): i for i in todo}
            for fut in cf.as_completed(futs):
                done(futs[fut], fut.result())
    return rows


# ------------------------------------------------------------------------------------------------------------
# verdict + table
# ------------------------------------------------------------------------------------------------------------
def problems(rows: List[dict]) -> List[str]:
    out = []
    for r in rows:
        what = f"{r['kernel']} [{r['dtype']} {r['config']} {r['flags']}]"
        if "error" in r:
            out.append(f"{what}: compile error: {r['error']}")
            continue
        if r["smem"] > SM90_SMEM_LIMIT:
            out.append(f"{what}: shared memory {r['smem']} B over the sm_90 limit {SM90_SMEM_LIMIT} B")
        if r["hot"] and (r["spill_st"] or r["spill_ld"]):
            out.append(f"{what}: spills {r['spill_st']} B stores / {r['spill_ld']} B loads in a hot kernel")
    return out


def markdown(rows: List[dict]) -> str:
    lines = ["| kernel | dtype | config | flags | regs | spill st/ld (B) | stack (B) | smem (KB) | mma |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {r['config']} | {r['flags']} | ERROR: {r['error']} |||||")
            continue
        hot = "" if r["hot"] else " (cold)"
        lines.append(f"| {r['kernel']}{hot} | {r['dtype']} | {r['config']} | {r['flags']} | {r['regs']} | "
                     f"{r['spill_st']}/{r['spill_ld']} | {r['stack']} | {r['smem'] / 1024:.1f} | {r['mma']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    _worker_init()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=int(os.environ.get("AOT_JOBS", min(2, os.cpu_count() or 1))))
    p.add_argument("--cache", default=os.environ.get("AOT_CACHE_DIR", ".aot_cache"),
                   help="result cache folder ('' to disable)")
    p.add_argument("--only", default=None, help="check only the kernels whose name contains this")
    p.add_argument("--filter", default=None, help="check only rows whose 'kernel dtype config flags' text has this")
    p.add_argument("--md", default=None, help="also write the markdown table here")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    ptxas = find_ptxas()
    if ptxas is None:
        print("[aot] SKIP: no ptxas found (neither in Triton's nvidia backend nor on PATH)")
        return 3
    import triton
    cache = os.path.join(a.cache, f"triton-{triton.__version__}") if a.cache else None
    if cache:
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.abspath(os.path.join(cache, "triton")))
    entries = [e for e in REGISTRY if a.only is None or a.only in e.name]
    specs = [s for s in specializations(entries)
             if a.filter is None or a.filter in f"{s['kernel']} {s['dtype']} {s['config']} {s['flags']}"]
    rows = run_check(specs, cache, a.jobs)
    table = markdown(rows)
    print(f"[aot] ptxas {ptxas}, target sm_90a\n{table}")
    if a.md:
        with open(a.md, "w") as f:
            f.write(f"Triton {triton.__version__}, sm_90a\n\n{table}\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = problems(rows)
    for b in bad:
        print(f"[aot] FAIL {b}")
    print(f"[aot] {'FAILED' if bad else 'OK'}: {len(rows)} specializations, {len(bad)} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
