"""Fuzzing the kernel-level ops (tests/fuzz_kernels.py) in a subprocess, plus regression tests
for what the fuzzer and the edge-input table found. A crash (SIGSEGV, SIGFPE, abort) fails the
test with the seed and the last case printed instead of killing the test run.

MIXKERNELS_FUZZ_BUDGET (seconds, default 30) and MIXKERNELS_FUZZ_SEED (default: random,
printed) control the fuzz run; a failure names the seed and every failing case as a replay
command (``python tests/fuzz_kernels.py --device cpu --seed S --case N``).
"""
import os
import random
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from mixkernels import _ext

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _python(code_or_args, timeout=600):
    args = ["-c", textwrap.dedent(code_or_args)] if isinstance(code_or_args, str) else code_or_args
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _explain(r, what):
    sig = f" (killed by signal {-r.returncode})" if r.returncode < 0 else ""
    return f"{what} exited with {r.returncode}{sig}\n--- stdout (tail)\n{r.stdout[-4000:]}\n--- stderr (tail)\n{r.stderr[-4000:]}"


needs_cpu_ext = pytest.mark.skipif(_ext.cpu_error is not None, reason=f"no CPU extension: {_ext.cpu_error}")


def _fuzz(device):
    """Run the fuzzer in a subprocess; on failure, the seed and a replay command per failing case."""
    budget = float(os.environ.get("MIXKERNELS_FUZZ_BUDGET", "30"))
    seed = int(os.environ.get("MIXKERNELS_FUZZ_SEED", random.SystemRandom().randrange(2**31)))
    print(f"fuzz {device}: seed {seed} (MIXKERNELS_FUZZ_SEED={seed} reruns this run)")
    r = _python([os.path.join(HERE, "fuzz_kernels.py"), "--device", device, "--budget", str(budget), "--seed",
                 str(seed), "--verbose"], timeout=budget + 600)
    if r.returncode == 0:
        return
    cases = [m.group(1) for m in re.finditer(r"^FAIL seed \d+ case (\d+)", r.stdout, re.M)]
    if not cases:  # a crash: the last case announced is the one it died in
        cases = re.findall(r"^seed \d+ case (\d+)$", r.stdout, re.M)[-1:]
    replay = "\n".join(f"  python tests/fuzz_kernels.py --device {device} --seed {seed} --case {c}" for c in cases)
    summary = [ln for ln in r.stdout.splitlines() if ln.startswith(("fuzz:", "FAIL"))]
    pytest.fail(_explain(r, f"{device} fuzzer (seed {seed})") + "\n" + "\n".join(summary[-30:])
                + f"\nseed {seed}; replay:\n{replay or '  (no case reached)'}", pytrace=False)


@needs_cpu_ext
def test_fuzz_cpu_kernels():
    _fuzz("cpu")


@pytest.mark.gpu
def test_fuzz_cuda_kernels():
    _fuzz("cuda")


# ---------------------------------------------------------------- regressions (each crashed or misbehaved on main)
REGRESSIONS = {
    # uniform ops had no input checks: SIGFPE on unit 0, out-of-bounds reads on wrong shapes,
    # a null mask_token dereferenced when secondary was given without it.
    "uniform_scatter_unit0": ("uniform_scatter", "(torch.randn(2, 1, 1, 3), torch.zeros(2, 1, 1, dtype=torch.uint8), 0)"),
    "uniform_sample_bad_keep_shape": ("uniform_sample", "(torch.randn(1, 8, 8, 3), torch.zeros(1, 1, 1, dtype=torch.uint8), "
                                                        "1, None, None)"),
    "uniform_sample_secondary_without_token": (
        "uniform_sample", "(torch.randn(1, 4, 4, 3), torch.zeros(1, 2, 2, dtype=torch.uint8), 1, None, "
                          "torch.ones(1, 2, 2, dtype=torch.uint8))"),
    "uniform_sample_backward_int64_keep": ("uniform_sample_backward", "(torch.randn(1, 2, 2, 3), torch.zeros(1, 2, 2, "
                                                                      "dtype=torch.int64), 1, None, False)"),
    # mixmim loss read its mask unchecked: SIGSEGV on an empty mask.
    "mixmim_loss_backward_empty_mask": ("mixmim_loss_backward", "(torch.randn(2, 6), torch.randn(4, 6, 48), "
                                                                "torch.randn(2, 3, 8, 12), torch.zeros(0, dtype=torch.uint8), "
                                                                "4, True, 0.0)"),
    "mixmim_loss_mask_length": ("mixmim_loss", "(torch.randn(4, 4, 48), torch.randn(2, 3, 8, 8), "
                                               "torch.zeros(1, 3, dtype=torch.uint8), 4, True, 1e-6)"),
    # a non-contiguous (stride-0) patch_idx was read as if contiguous: wrong rows, silently.
    "masked_loss_noncontiguous_idx": ("masked_recon_loss_backward", "(torch.randn(1, 3), torch.randn(1, 3, 48), "
                                                                    "torch.randn(1, 3, 4, 12), torch.tensor([[0, 2, 1, 0, 2, 1]])[:, ::2], "
                                                                    "4, False, 0.0)"),
    # sizes from callers overflowed int64 (undefined behaviour) instead of being refused.
    "window_merge_size_overflow": ("window_merge", "(torch.zeros(0, 4, 0), 8, 2**62, 4, 1, 2, 0)"),
    "window_attention_huge_coord_range": ("window_attention", "(torch.randn(1, 4, 4, 6), 1, 4, 4, 0, 0, torch.zeros(9, 1), "
                                                              "None, None, torch.zeros(1, 4, 4, 2, dtype=torch.int64), 2**62, "
                                                              "1, 1.0)"),
}


@needs_cpu_ext
def test_regressions_raise_clear_errors():
    # One subprocess for all (each start costs seconds); a crash names the case it died in.
    calls = "\n".join(f"    ({name!r}, {op!r}, lambda: {args})," for name, (op, args) in sorted(REGRESSIONS.items()))
    r = _python(f"""
import torch, mixkernels
CASES = [
{calls}
]
for name, op, args in CASES:
    print("running", name, flush=True)
    try:
        getattr(torch.ops.mixkernels_C, op)(*args())
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # TORCH_CHECK / _VALUE / _TYPE
        print("raised", name, "|", type(e).__name__, str(e).splitlines()[0], flush=True)
    else:
        print("returned", name, flush=True)
""")
    assert r.returncode == 0, _explain(r, "regressions")
    for name, (op, _) in REGRESSIONS.items():
        line = [ln for ln in r.stdout.splitlines() if ln.split()[1:2] == [name] and not ln.startswith("running")]
        assert line and line[0].startswith("raised"), f"{name}: {line or r.stdout[-2000:]}"
        msg = line[0].split("|", 1)[1]
        assert any(w in msg for w in (op.split("_backward")[0], "window_", "losses")), f"unclear: {line[0]}"


@needs_cpu_ext
def test_regression_coords_bias_grads_with_small_coord_range():
    """Backward with coords + attn_bias + rpb gradients and a coord_range smaller than the window
    wrote the window-local dRPB gather into the (smaller) coords table: heap corruption."""
    r = _python("""
        import torch, mixkernels as mk
        from mixkernels import reference as ref
        torch.manual_seed(0)
        for R in [(1, 1), (1, 3), (3, 1)]:
            qkv = torch.randn(2, 8, 8, 96, dtype=torch.float64, requires_grad=True)
            rpb = torch.randn((2 * R[0] - 1) * (2 * R[1] - 1), 2, dtype=torch.float64, requires_grad=True)
            ab = torch.randn(2, 16, 16, dtype=torch.float64, requires_grad=True)
            c = torch.randint(0, 3, (8, 8, 2))
            kw = dict(rel_pos_bias=rpb, attn_bias=ab, coords=c, coord_range=R)
            for _ in range(10):
                g = torch.autograd.grad(mk.window_attention(qkv, 2, 4, backend="cpu", **kw).sum(), (qkv, rpb, ab))
            want = torch.autograd.grad(ref.window_attention(qkv, 2, 4, **kw).sum(), (qkv, rpb, ab))
            for a, b in zip(g, want):
                torch.testing.assert_close(a, b)
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, _explain(r, "coords backward")


def _fuzzer():
    sys.path.insert(0, HERE)
    try:
        import fuzz_kernels as fk
    finally:
        sys.path.remove(HERE)
    return fk


@needs_cpu_ext
def test_regression_wattn_backward_given_out_and_lse():
    """Fuzz seed 1300986669 case 17386 (window 2x2, shift (1,0), coords with range (3,1), rpb and
    attn_bias, scale 3), in float64 with the bfloat16 forward's out/lse (not the float64
    forward's own). The kernel-level backward's contract is P = exp(S - lse) with the given lse
    and delta = rowsum(dout * out) with the given out; the spec used to differentiate the
    reference instead (ignoring out and lse) and disagreed with the kernel by 0.11."""
    fk = _fuzzer()
    v1 = sorted(n for n in fk.OPS if n not in fk.OPS_V2)  # the op set that case was drawn from
    name, args, _, _ = fk.make_case(1300986669, 17386, v1)
    assert name == "window_attention_backward"
    a = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
    assert fk._check(name, a, "case 17386 in float64", "cpu") is None
    g = torch.Generator().manual_seed(0)
    shift = torch.rand(a[3].shape, generator=g, dtype=torch.float64)
    b = list(a)
    b[3] = a[3] + shift  # any lse: also not a log-sum-exp of anything
    assert fk._check(name, b, "case 17386, lse + U(0,1)", "cpu") is None
    # Independent of the spec: dv = P^T dout is linear in P = exp(S - lse), so lse + c scales it by exp(-c).
    b[3] = a[3] + 0.5
    dv = [torch.ops.mixkernels_C.window_attention_backward(*x)[0][..., 8:] for x in (a, b)]
    torch.testing.assert_close(dv[1], dv[0] * torch.exp(torch.tensor(-0.5, dtype=torch.float64)), rtol=1e-12, atol=1e-14)


@needs_cpu_ext
def test_regression_cosine_backward_dlogit_scale_precision():
    """Fuzz seed 749608968 case 64749 (float32, coords, head scale ~49): d logit_scale sums
    dS_ij <q'_i, k'_j> over rows whose dS sums to 0 only up to rounding; accumulated in float it
    was 2.5e-5 off (rule: 1e-5, the float32 spec being exact there). The CPU kernel now runs cosine
    backward in double and rounds once; checked against the float64 spec much tighter than the rule."""
    fk = _fuzzer()
    name, args, what, _ = fk.make_case(749608968, 64749)
    assert (name, what) == ("window_attention_cosine_backward", "well-formed")
    assert fk._check(name, args, "case 64749", "cpu") is None
    got = torch.ops.mixkernels_C.window_attention_cosine_backward(*args)
    _, spec, _ = fk.OPS[name]
    want = spec(*[t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args])
    for i in (0, 3):  # dqkv, d logit_scale: within a few float32 roundings of the float64 values
        torch.testing.assert_close(got[i].double(), want[i].double(), rtol=4e-7, atol=1e-7)


def test_fuzzer_is_deterministic_per_seed_and_case():
    fk = _fuzzer()
    for case in range(40):
        a, b = fk.make_case(7, case), fk.make_case(7, case)
        assert a[0] == b[0] and a[2] == b[2]
        for x, y in zip(a[1], b[1]):
            assert type(x) is type(y)
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.double().nan_to_num(), y.double().nan_to_num())


@needs_cpu_ext
def test_every_kernel_op_is_fuzzed():
    """A new schema (csrc/ops.cpp) needs a spec and a generator here, or the fuzzer never sees it."""
    fk = _fuzzer()
    schemas = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mixkernels_C::")}
    schemas = {n.split(".", 1)[0] for n in schemas}  # overload names
    assert len(schemas) > 15
    assert schemas - {"limits"} == set(fk.OPS)
