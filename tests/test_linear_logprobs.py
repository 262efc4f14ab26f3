"""linear_logprobs on every backend against an eager float64 ``hidden @ W.T + b → log_softmax → gather``:
values, entropy and the gradients of hidden, weight and bias; chunking; bf16 under the 2x rule."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cpu_backends, gpu_backends
from loops import eager_logprobs_from_hidden
from numerics import assert_close_fp32, assert_within_2x

from fastrlhf.ops import available_backends, linear_logprobs
from fastrlhf.ops._linear_chunks import (
    BLOCK_IGNORE,
    column_block_width,
    default_chunk_rows,
    forward_by_columns,
    labels_in_block,
)


def make_case(rows, hidden_size, vocab, dtype=torch.float32, ignore_frac=0.2, with_bias=True, lead=None):
    shape = (rows,) if lead is None else lead
    hidden = torch.randn(*shape, hidden_size).to(dtype)
    # lm_head-like scale: logits of a few nats, so the softmax is neither flat nor one-hot.
    weight = (torch.randn(vocab, hidden_size) * (2.0 / math.sqrt(hidden_size))).to(dtype)
    bias = (torch.randn(vocab) * 0.5).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignore_frac] = -100
    return hidden, weight, bias, labels


def grads_of(fn, hidden, weight, bias, g, h):
    """Values and gradients of ``Σ g·logp + Σ h·entropy`` w.r.t. hidden, weight, bias (leaf copies)."""
    leaves = [
        t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)
    ]
    lp, ent = fn(*leaves)
    loss = (lp * g.to(lp.dtype)).sum() + (ent * h.to(ent.dtype)).sum()
    loss.backward()
    return lp.detach(), ent.detach(), [None if t is None else t.grad for t in leaves]


def reference64(hidden, weight, bias, labels, g, h, temperature=1.0, ignore_index=-100):
    def fn(x, w, b):
        return eager_logprobs_from_hidden(x, w, labels, b, temperature, ignore_index)

    return grads_of(
        fn, hidden.double(), weight.double(), None if bias is None else bias.double(), g.double(), h.double()
    )


def fused(backend, hidden, weight, bias, labels, g, h, temperature=1.0, ignore_index=-100, chunk_size=None):
    def fn(x, w, b):
        return linear_logprobs(
            x,
            w,
            labels,
            b,
            temperature,
            ignore_index,
            return_entropy=True,
            chunk_size=chunk_size,
            backend=backend,
        )

    return grads_of(fn, hidden, weight, bias, g, h)


def assert_matches(got, want, grad_rtol=1e-4, grad_atol=1e-5):
    lp, ent, grads = got
    ref_lp, ref_ent, ref_grads = want
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert_close_fp32("logprobs", lp, ref_lp, atol=3e-5)
    assert_close_fp32("entropy", ent, ref_ent, atol=3e-5)
    for name, got_grad, want_grad in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        if want_grad is None:
            assert got_grad is None
            continue
        assert_close_fp32(f"grad {name}", got_grad, want_grad, rtol=grad_rtol, atol=grad_atol)


# odd N, H and V; N not a multiple of the chunk; V=1; a single row
SHAPES = [(37, 19, 1003, 8), (5, 3, 1, 2), (1, 64, 777, None), (64, 33, 509, 64), (29, 17, 2049, 100)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("rows,hidden_size,vocab,chunk", SHAPES)
def test_fp32_matches_float64_eager(backend, rows, hidden_size, vocab, chunk):
    hidden, weight, bias, labels = make_case(rows, hidden_size, vocab)
    g, h = torch.randn(rows), torch.randn(rows)
    got = fused(backend, hidden, weight, bias, labels, g, h, temperature=0.7, chunk_size=chunk)
    want = reference64(hidden, weight, bias, labels, g, h, temperature=0.7)
    assert_matches(got, want)
    ignored = labels == -100
    assert torch.all(got[0][ignored] == 0) and torch.all(got[1][ignored] == 0)
    assert torch.all(got[2][0][ignored] == 0), "ignored rows get no hidden gradient"


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
def test_no_bias_three_d_and_custom_ignore_index(backend):
    hidden, weight, _, labels = make_case(None, 24, 301, with_bias=False, ignore_frac=0.0, lead=(3, 7))
    labels[1, 2:5] = -1
    g, h = torch.randn(3, 7), torch.randn(3, 7)
    got = fused(backend, hidden, weight, None, labels, g, h, ignore_index=-1, chunk_size=4)
    want = reference64(hidden, weight, None, labels, g, h, ignore_index=-1)
    assert got[0].shape == (3, 7)
    assert_matches(got, want)


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
def test_frozen_weight_and_frozen_hidden(backend):
    """A frozen lm_head (LoRA) skips d(weight); hidden without grad skips d(hidden)."""
    hidden, weight, bias, labels = make_case(21, 16, 211)
    g = torch.randn(21)
    x = hidden.clone().requires_grad_(True)
    lp = linear_logprobs(x, weight, labels, bias, chunk_size=5, backend=backend)
    (lp * g).sum().backward()
    x64 = hidden.double().requires_grad_(True)
    ref_lp, _ = eager_logprobs_from_hidden(x64, weight.double(), labels, bias.double())
    (ref_lp * g.double()).sum().backward()
    assert_close_fp32("grad hidden", x.grad, x64.grad, rtol=1e-4, atol=1e-5)

    w = weight.clone().requires_grad_(True)
    lp = linear_logprobs(hidden, w, labels, chunk_size=5, backend=backend)
    (lp * g).sum().backward()
    w64 = weight.double().requires_grad_(True)
    ref_lp, _ = eager_logprobs_from_hidden(hidden.double(), w64, labels)
    (ref_lp * g.double()).sum().backward()
    assert_close_fp32("grad weight", w.grad, w64.grad, rtol=1e-4, atol=1e-5)


def logits_gemms(fn) -> list[tuple[int, int]]:
    """The ``[rows, cols]`` shape of every block of logits ``fn`` makes: the products ``[r, H] @ [H, c]``
    that torch's profiler records, whether Python (the chunk engine) or C++ (the compiled op) calls them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    blocks = []
    for event in prof.events():
        if event.name == "aten::mm" and len(event.input_shapes) >= 2:
            a, b = event.input_shapes[:2]
            if len(a) == 2 and len(b) == 2 and a[1] == b[0] == HIDDEN_OF_CHUNK_CASE:
                blocks.append((a[0], b[1]))
    return blocks


HIDDEN_OF_CHUNK_CASE = 12


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
def test_never_more_than_one_chunk_of_logits(backend):
    """Every block of logits the op makes holds at most ``chunk_size × V`` values. The backward makes
    vocabulary-column blocks of every row; the forward makes the same column blocks with the C++ CPU
    kernels (which fold them into running softmax states) and row blocks elsewhere. Each pass covers the
    logits once."""
    rows, vocab, chunk = 45, 333, 8
    hidden, weight, bias, labels = make_case(rows, HIDDEN_OF_CHUNK_CASE, vocab)
    x = hidden.clone().requires_grad_(True)
    made = logits_gemms(
        lambda: linear_logprobs(x, weight, labels, bias, chunk_size=chunk, backend=backend).sum().backward()
    )
    row_blocks = [s for s in made if s[1] == vocab]
    column_blocks = [s for s in made if s[0] == rows and s[1] < vocab]
    assert len(row_blocks) + len(column_blocks) == len(made)
    assert all(r * v <= chunk * vocab for r, v in made)
    assert all(v <= column_block_width(rows, vocab, chunk) for _, v in column_blocks)
    if forward_by_columns(True, backend, torch.device("cpu"), rows, chunk):
        assert not row_blocks
        assert sum(v for _, v in column_blocks) == 2 * vocab
    else:
        assert len(row_blocks) == math.ceil(rows / chunk)
        assert sum(r for r, _ in row_blocks) == rows
        assert sum(v for _, v in column_blocks) == vocab
    # With no backward to follow, the forward goes by rows on every backend (the fused PPO loss's blocks)
    with torch.no_grad():
        made = logits_gemms(
            lambda: linear_logprobs(x, weight, labels, bias, chunk_size=chunk, backend=backend)
        )
    assert [r for r, _ in made] == [min(chunk, rows - start) for start in range(0, rows, chunk)]
    assert all(v == vocab for _, v in made)


def extreme_logits(rows: int, vocab: int, labels: torch.Tensor) -> torch.Tensor:
    """``[rows, vocab]`` logits of a few nats, with rows at |z| ~ 1e4, some -inf logits, a row of only -inf,
    a -inf at a label, one NaN and a near-one-hot row."""
    x = torch.randn(rows, vocab) * 3
    x[1] = x[1] * 3000 + 5000
    x[2] = float("-inf")
    x[3, 5::7] = float("-inf")
    x[4, vocab // 2] = float("nan")
    x[5, labels[5]] = float("-inf")
    x[6, labels[6]] = 60.0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [1, 97, 512, 2049, 4099])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_folding_column_blocks_gives_the_one_pass_forward(dtype, width, with_entropy):
    """The C++ fold over blocks of vocabulary columns (linear_logprobs' CPU forward), then finalize, gives
    what one pass over the whole rows gives: the float64 values within fp32 rounding, the same row max to
    the bit (a max does not depend on order), and the same -inf, 0 and NaN in the degenerate rows."""
    if not available_backends()["cpp"].available:
        pytest.skip(f"cpp: {available_backends()['cpp'].reason}")
    from fastrlhf._extension import extension

    ext = extension()
    rows, vocab, temperature = 23, 4099, 0.7
    labels = torch.randint(0, vocab, (rows,))
    labels[[0, 9, 17]] = -100
    logits = extreme_logits(rows, vocab, labels).to(dtype)
    inv_t = 1.0 / temperature
    one_pass = ext.gather_logprobs_forward(logits, labels, inv_t, -100, with_entropy)

    state = ext.empty_softmax_states(rows)
    label_logit = torch.zeros(rows)
    ignored = labels == -100
    for start in range(0, vocab, width):
        end = min(start + width, vocab)
        block = logits[:, start:end]  # a strided view: rows keep the full row stride
        block_labels = labels_in_block(labels, ignored, start, end)
        ext.gather_logprobs_fold(block, block_labels, inv_t, BLOCK_IGNORE, with_entropy, state, label_logit)
    logprobs, stats, entropy = ext.gather_logprobs_finalize(
        state, label_logit, labels, inv_t, -100, with_entropy
    )
    assert entropy.shape == ((rows,) if with_entropy else (0,))

    # float64 reference, z as the kernels form it: the float32 inverse temperature times the logit
    z = logits.double() * torch.tensor(inv_t, dtype=torch.float32).double()
    log_p = torch.log_softmax(z, dim=-1)
    ref_lp = log_p.gather(1, labels.clamp(min=0)[:, None])[:, 0].masked_fill(ignored, 0.0)
    ref_ent = -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1).masked_fill(ignored, 0.0)
    regular = torch.ones(rows, dtype=torch.bool)
    regular[[2, 4]] = False  # only -inf; a NaN
    counted = regular & ~ignored  # ignored rows have stats 0
    magnitude = z.nan_to_num(neginf=0.0).abs().amax(-1)
    bound = 1e-5 + 4e-7 * magnitude  # fp32 rounding of a shifted logit of size |z|

    def error(got, want):  # equal infinities are exact
        got = got.double()
        return torch.where(got == want, torch.zeros_like(want), (got - want).abs())

    assert (error(logprobs, ref_lp)[regular] <= bound[regular]).all()
    assert logprobs[5] == float("-inf") and one_pass[0][5] == float("-inf")
    if with_entropy:
        assert (error(entropy, ref_ent)[regular] <= bound[regular]).all()
    assert torch.equal(stats[regular, 0], one_pass[1][regular, 0])
    ref_log_s = torch.logsumexp(z - stats[:, :1].double(), dim=-1)
    # fp32 rounding, as in one pass (~5e-7 here); one-column blocks fold 4099 states, each with a rescale
    assert (error(stats[:, 1], ref_log_s)[counted] <= (2e-5 if width == 1 else 1e-6)).all()
    # only -inf: m and log_s -inf, logprob -inf, entropy 0, as in one pass; a NaN logit: NaN outputs
    assert torch.equal(logprobs[2], one_pass[0][2]) and logprobs[2] == float("-inf")
    assert torch.equal(stats[2], one_pass[1][2])
    assert logprobs[4].isnan() and one_pass[0][4].isnan()
    if with_entropy:
        assert entropy[2] == 0 and entropy[4].isnan() and one_pass[2][4].isnan()
    assert (logprobs[ignored] == 0).all() and (stats[ignored] == 0).all()


def test_fold_names_a_label_past_the_block():
    if not available_backends()["cpp"].available:
        pytest.skip(f"cpp: {available_backends()['cpp'].reason}")
    from fastrlhf._extension import extension

    ext = extension()
    state, label_logit = ext.empty_softmax_states(3), torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"block_labels\[1\] = 8 is past the block's 8 columns"):
        ext.gather_logprobs_fold(
            torch.randn(3, 8), torch.tensor([0, 8, -2]), 1.0, -1, True, state, label_logit
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
def test_compiled_op_gives_the_chunk_engines_bits(dtype, chunk):
    """The C++ op (cpp) and the Python chunk engine (under the Triton backend's custom op, run here on
    the cpp gather kernels) make the same GEMMs on the same blocks: the same values and gradients, bit
    for bit, with and without the entropy's gradient."""
    from fastrlhf.ops.linear_logprobs import _forward_op

    if not available_backends()["cpp"].available:
        pytest.skip(f"cpp: {available_backends()['cpp'].reason}")
    hidden, weight, bias, labels = make_case(37, 24, 301, dtype=dtype)
    g, h = torch.randn(37), torch.randn(37)
    rows = default_chunk_rows(37, 24, 301, "cpu") if chunk is None else chunk

    def compiled(x, w, b):
        return linear_logprobs(x, w, labels, b, 0.9, return_entropy=True, chunk_size=chunk, backend="cpp")

    def engine(x, w, b):
        lp, _stats, ent = _forward_op(x, w, b, labels, 1.0 / 0.9, -100, True, rows, True, "cpp")
        return lp, ent

    for with_entropy_grad in (True, False):
        scale = h if with_entropy_grad else torch.zeros(37)
        got = grads_of(compiled, hidden, weight, bias, g, scale)
        want = grads_of(engine, hidden, weight, bias, g, scale)
        for name, a, b in zip(("logprobs", "entropy"), got[:2], want[:2], strict=True):
            assert torch.equal(a, b), name
        for name, a, b in zip(("hidden", "weight", "bias"), got[2], want[2], strict=True):
            assert a.dtype == b.dtype == dtype and torch.equal(a, b), name


def test_default_chunk_follows_n_h_v():
    # fp32 [chunk, V] about the size of [N, H]: N·H/V = 4096·512/32000 ≈ 66 → 128 on CPU
    assert default_chunk_rows(4096, 512, 32000, "cpu") == 128
    # a GPU never goes below its GEMM-efficiency floor, nor above N
    assert default_chunk_rows(16384, 4096, 151936, "cuda") == 512
    assert default_chunk_rows(100, 4096, 151936, "cuda") == 100
    assert default_chunk_rows(10, 8, 1000, "cpu") == 10
    # a small vocabulary relative to H means the whole batch fits in one chunk
    assert default_chunk_rows(1000, 4096, 512, "cpu") == 1000


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
def test_chunk_size_does_not_change_the_result(backend):
    hidden, weight, bias, labels = make_case(40, 20, 401)
    g, h = torch.randn(40), torch.randn(40)
    one = fused(backend, hidden, weight, bias, labels, g, h, chunk_size=1000)
    many = fused(backend, hidden, weight, bias, labels, g, h, chunk_size=3)
    assert_matches(many, (one[0].double(), one[1].double(), [t.double() for t in one[2]]))


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
def test_non_contiguous_hidden(backend):
    wide = torch.randn(2, 9, 50)
    hidden = wide[:, :, 5:37]  # [2, 9, 32] with a row stride of 50
    _, weight, bias, labels = make_case(None, 32, 123, lead=(2, 9))
    g, h = torch.randn(2, 9), torch.randn(2, 9)
    got = fused(backend, hidden, weight, bias, labels, g, h, chunk_size=5)
    want = reference64(hidden, weight, bias, labels, g, h)
    assert_matches(got, want)


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
def test_large_vocab_and_hidden_cpp(backend):
    if backend == "triton":
        pytest.skip("the Triton interpreter is too slow at this size; covered on GPU")
    hidden, weight, bias, labels = make_case(130, 256, 32003)
    g, h = torch.randn(130), torch.randn(130)
    got = fused(backend, hidden, weight, bias, labels, g, h)
    want = reference64(hidden, weight, bias, labels, g, h)
    assert_matches(got, want, grad_atol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_2x_of_torch(backend, dtype):
    """bf16/fp16 hidden and weight: fp32 products make the error far below eager's bf16 logits."""
    hidden, weight, bias, labels = make_case(33, 48, 517, dtype=dtype)
    g, h = torch.randn(33), torch.randn(33)
    got = fused(backend, hidden, weight, bias, labels, g, h, chunk_size=7)
    want = reference64(hidden, weight, bias, labels, g, h)

    def eager_lowp(x, w, b):
        lp, ent = eager_logprobs_from_hidden(x, w, labels, b)
        return lp.float(), ent.float()

    torch_lowp = grads_of(eager_lowp, hidden, weight, bias, g, h)
    assert_within_2x("logprobs", got[0], want[0], torch_lowp[0])
    assert_within_2x("entropy", got[1], want[1], torch_lowp[1])
    for name, got_grad, want_grad, torch_grad in zip(
        ("hidden", "weight", "bias"), got[2], want[2], torch_lowp[2], strict=True
    ):
        assert got_grad.dtype == dtype
        assert_within_2x(f"grad {name}", got_grad, want_grad, torch_grad)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_float64(backend, dtype):
    hidden, weight, bias, labels = make_case(1030, 256, 32003, dtype=dtype)
    hidden, weight, bias, labels = (t.cuda() for t in (hidden, weight, bias, labels))
    g, h = torch.randn(1030, device="cuda"), torch.randn(1030, device="cuda")
    got = fused(backend, hidden, weight, bias, labels, g, h)
    want = reference64(hidden, weight, bias, labels, g, h)
    if dtype == torch.float32:
        # TF32 may be on for fp32 GEMMs on a GPU; the bound is the fp32-with-TF32 one
        assert_close_fp32("logprobs", got[0], want[0], rtol=1e-3, atol=2e-3)
        return
    torch_lowp = grads_of(
        lambda x, w, b: eager_logprobs_from_hidden(x, w, labels, b), hidden, weight, bias, g, h
    )
    assert_within_2x("logprobs", got[0], want[0], torch_lowp[0].float())
    for name, got_grad, want_grad, torch_grad in zip(
        ("hidden", "weight", "bias"), got[2], want[2], torch_lowp[2], strict=True
    ):
        assert_within_2x(f"grad {name}", got_grad, want_grad, torch_grad)


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(weight=a["weight"][:, :-1]), "hidden's last dimension"),
        (lambda a: a.update(weight=a["weight"].double()), "give both in one dtype"),
        (lambda a: a.update(labels=a["labels"][:-1]), "labels has shape"),
        (lambda a: a.update(bias=a["bias"][:-1]), "bias must have shape"),
        (lambda a: a.update(chunk_size=0), "chunk_size"),
        (lambda a: a.update(temperature=0.0), "temperature"),
        (lambda a: a.update(weight=a["weight"][0]), "weight must be 2-D"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    hidden, weight, bias, labels = make_case(6, 8, 50)
    args = dict(hidden=hidden, weight=weight, labels=labels, bias=bias)
    change(args)
    with pytest.raises(ValueError, match=message):
        linear_logprobs(**args)


def test_label_out_of_range():
    hidden, weight, bias, labels = make_case(6, 8, 50, ignore_frac=0.0)
    labels[2] = 50
    with pytest.raises(ValueError, match="labels"):
        linear_logprobs(hidden, weight, labels, bias)
