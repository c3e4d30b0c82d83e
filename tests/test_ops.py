"""Pooling and normalisation numerics against PyTorch's functional ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo import ops
from zoo.spec import PoolSpec


def _nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("h,w", [(7, 7), (14, 13), (15, 22), (28, 29)])
@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (3, 2, 0), (2, 2, 0), (3, 1, 1), (5, 3, 2)])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_matches_torch(h, w, k, s, p, ceil_mode):
    x = torch.randn(2, 3, h, w) - 3.0  # all-negative inputs: padding must never win the max
    ref = F.max_pool2d(x, k, s, p, ceil_mode=ceil_mode).numpy().transpose(0, 2, 3, 1)
    out = ops.max_pool(_nhwc(x), PoolSpec("max", k, s, p, ceil_mode))
    np.testing.assert_array_equal(np.asarray(out), ref)


@pytest.mark.parametrize("platform", ["cpu", None])
@pytest.mark.parametrize("k,s,p,ceil_mode", [(3, 2, 1, False), (3, 2, 0, True), (2, 2, 0, True), (3, 1, 1, True)])
def test_max_pool_gradient_goes_where_torch_sends_it(platform, k, s, p, ceil_mode):
    """Compiled for a CPU, max pooling is a chain of selects (XLA:CPU's select-and-scatter, the
    gradient of `reduce_window`, took 25x PyTorch's time). Its values and its gradient are
    PyTorch's where that matters most: ties (zeros after a ReLU, repeated small integers), where
    PyTorch sends all of a window's gradient to its first maximum in row-major order, and NaNs,
    which win a window (the last one).
    The CPU program has no select-and-scatter; lowered for a GPU it keeps `reduce_window`."""
    g = torch.Generator().manual_seed(k * 100 + s * 10 + p)
    x = torch.cat([torch.relu(torch.randn(2, 3, 13, 16, generator=g)),
                   torch.randint(0, 3, (2, 3, 13, 16), generator=g).float()])
    x[0, 0, 4, 5] = float("nan")
    x.requires_grad_(True)
    y = F.max_pool2d(x, k, s, p, ceil_mode=ceil_mode)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    spec = PoolSpec("max", k, s, p, ceil_mode)

    def pool(x):
        with ops.tracing_for(platform):
            return ops.max_pool(x, spec)

    out, vjp = jax.vjp(jax.jit(pool), _nhwc(x.detach()))
    (dx,) = vjp(jnp.asarray(dy.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(np.asarray(out), y.detach().numpy().transpose(0, 2, 3, 1))
    # Where windows overlap, the input's gradient is a sum, added in another order than PyTorch's
    # (up to 1e-6 apart here); a gradient sent to another element of a window was off by 0.18-2.7.
    np.testing.assert_allclose(np.asarray(dx), x.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-5)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(pool(x) ** 2)))
    assert "select_and_scatter" not in grad.lower(_nhwc(x.detach())).as_text()
    if platform is None:
        for_gpu = jax.export.export(grad, platforms=["cuda"])(_nhwc(x.detach())).mlir_module()
        assert "reduce_window" in for_gpu and "select_and_scatter" in for_gpu


@pytest.mark.parametrize("h,w", [(7, 7), (14, 13), (15, 22)])
@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (2, 2, 0), (3, 1, 1), (5, 3, 2)])
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("count_include_pad", [False, True])
def test_avg_pool_matches_torch(h, w, k, s, p, ceil_mode, count_include_pad):
    x = torch.randn(2, 3, h, w)
    ref = F.avg_pool2d(x, k, s, p, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    out = ops.avg_pool(_nhwc(x), PoolSpec("avg", k, s, p, ceil_mode, count_include_pad))
    np.testing.assert_allclose(np.asarray(out), ref.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


def test_pools_on_chw_examples():
    x = torch.randn(3, 15, 22)
    ref = F.max_pool2d(x[None], 3, 2, 1, ceil_mode=True)[0]
    out = ops.max_pool(jnp.asarray(x.numpy()), PoolSpec("max", 3, 2, 1, True))
    np.testing.assert_array_equal(np.asarray(out), ref.numpy())


def test_bn_moments_across_vmapped_batch_match_torch():
    x = torch.randn(5, 4, 6, 7) * 3 + 1
    bn = torch.nn.BatchNorm2d(4).train()
    bn(x)
    mean, var, unbiased = jax.vmap(lambda e: ops.bn_moments(e, (1, 2), "b"), axis_name="b",
                                   out_axes=None)(jnp.asarray(x.numpy()))
    np.testing.assert_allclose(mean, x.mean((0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, x.var((0, 2, 3), unbiased=False).numpy(), rtol=1e-5)
    # PyTorch's running update: 0.9 * 1 + 0.1 * unbiased variance.
    np.testing.assert_allclose(0.9 + 0.1 * np.asarray(unbiased), bn.running_var.numpy(), rtol=1e-5)


def _bn_train_runs(layout, x, scale, offset):
    """Training-mode BatchNorm as Haiku calls it (NHWC batch, no axis name), as Equinox does (one
    HWC example, vmapped with an axis name) and across two named axes (a vmapped batch inside a
    data-parallel axis, Equinox's shard_map form: an NHWC array split as (2, N/2, ...)); returns
    the normalised map and the new running statistics."""
    rm, rv = jnp.zeros_like(scale), jnp.ones_like(scale)
    kw = dict(eps=1e-3, channel_axis=-1, momentum=0.1)
    if layout == "batch":
        return ops.batch_norm_train(x, rm, rv, scale, offset, axes=(0, 1, 2), axis_name=None, **kw)

    def one(e):
        return ops.batch_norm_train(e, rm, rv, scale, offset, axes=(0, 1), axis_name=names, **kw)

    if layout == "vmapped":
        names = "b"
        return jax.vmap(one, axis_name="b", out_axes=(0, None, None))(x)
    names = ("b", "d")
    split = x.reshape(2, x.shape[0] // 2, *x.shape[1:])
    y, m, v = jax.vmap(jax.vmap(one, axis_name="b", out_axes=(0, None, None)), axis_name="d",
                       out_axes=(0, None, None))(split)
    return y.reshape(x.shape), m, v


@pytest.mark.parametrize("layout", ["batch", "vmapped", "two-axes"])
def test_closed_form_batchnorm_derivative_is_autodiffs(layout, monkeypatch):
    """`ZOO_BN_GRAD=closed` (the default) writes training BatchNorm's
    derivative out, as PyTorch's kernel does, for BatchNorms without named axes (Haiku's); with
    them (Equinox's vmap, data parallel) autodiff's runs, remat included: in float64 its values, reverse-mode gradients (of the
    map and of the running statistics; with `jax.checkpoint` too) and forward-mode derivative are
    autodiff's to rounding; in
    float32 its gradients are PyTorch's; in bfloat16 the gradient keeps the input's dtype."""
    rng = np.random.default_rng(3)
    shape = (4, 5, 7, 6)
    arrays = [rng.standard_normal(shape) * 3 + 1, rng.uniform(0.5, 2, 6), rng.standard_normal(6),
              rng.standard_normal(shape), rng.standard_normal(6), rng.standard_normal(6)]

    def run(mode, dtype, how="grad"):
        monkeypatch.setattr(ops, "_BN_GRAD", mode)
        x, scale, offset, gy, gm, gv = (jnp.asarray(a, dtype) for a in arrays)

        def loss(x, scale, offset):
            y, m, v = _bn_train_runs(layout, x, scale, offset)
            return jnp.sum(y * gy) + jnp.sum(m * gm) + jnp.sum(v * gv)

        if how == "jvp":
            return jax.jvp(loss, (x, scale, offset), (gy, gm, gv))
        # remat: `jax.checkpoint` around the vmap, as zoo.training's `remat=True` puts it around an
        # Equinox model's vmapped forward; the derivative rule is then traced outside the vmap.
        return jax.jit(jax.value_and_grad(jax.checkpoint(loss) if how == "remat" else loss, argnums=(0, 1, 2)))(
            x, scale, offset)

    ops._batch_norm_train.clear_cache()  # remat first, before any trace of the rule is cached: a
    # cached trace hid the failure (a count taken inside the rule, outside the vmap's axis names)
    with jax.enable_x64(True):
        for how in ("remat", "grad", "jvp"):
            auto, closed = run("autodiff", jnp.float64, how), run("closed", jnp.float64, how)
            for a, c in zip(jax.tree_util.tree_leaves(auto), jax.tree_util.tree_leaves(closed)):
                assert a.dtype == c.dtype == jnp.float64
                np.testing.assert_allclose(c, a, rtol=1e-11, atol=1e-11 * float(np.max(np.abs(a))))

    monkeypatch.setattr(ops, "_BN_GRAD", "closed")
    scale32, offset32 = (jnp.asarray(a, jnp.float32) for a in arrays[1:3])
    jaxpr = jax.make_jaxpr(lambda x: _bn_train_runs(layout, x, scale32, offset32))(jnp.asarray(arrays[0], jnp.float32))
    # The closed form is what ran above in Haiku's layout; with named axes autodiff's path runs
    # (under jax.checkpoint, the rule's psums failed outside the vmap: `_batch_norm_train`).
    assert ("custom_jvp_call" in str(jaxpr)) == (layout == "batch")
    value, _ = run("closed", jnp.float32)
    x = torch.tensor(arrays[0], dtype=torch.float32).permute(0, 3, 1, 2).requires_grad_()
    scale, offset = (torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in arrays[1:3])
    bn = torch.nn.BatchNorm2d(6, eps=1e-3).train()
    with torch.no_grad():
        bn.weight.copy_(scale), bn.bias.copy_(offset)
    y = bn(x)
    ref = ((y.permute(0, 2, 3, 1) * torch.tensor(arrays[3], dtype=torch.float32)).sum()
           + (bn.running_mean * torch.tensor(arrays[4], dtype=torch.float32)).sum()
           + (bn.running_var * torch.tensor(arrays[5], dtype=torch.float32)).sum())
    ref.backward()
    # PyTorch's running statistics are not differentiated (buffers): compare the map's gradients
    # on a loss without them.
    _, grads = jax.value_and_grad(lambda *a: jnp.sum(_bn_train_runs(layout, *a)[0] * jnp.asarray(arrays[3], jnp.float32)),
                                  argnums=(0, 1, 2))(*(jnp.asarray(a, jnp.float32) for a in arrays[:3]))
    np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)
    for ours, theirs in [(grads[0], x.grad.permute(0, 2, 3, 1)), (grads[1], bn.weight.grad), (grads[2], bn.bias.grad)]:
        theirs = theirs.numpy()
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())

    monkeypatch.setattr(ops, "_BN_GRAD", "closed")
    half = jax.grad(lambda x: jnp.sum(_bn_train_runs(layout, x, *(jnp.asarray(a, jnp.float32) for a in arrays[1:3]))[0]
                                      .astype(jnp.float32)))(jnp.asarray(arrays[0], jnp.bfloat16))
    assert half.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(half)))
    with pytest.raises(ValueError, match="ZOO_BN_GRAD"):
        run("exact", jnp.float32)


def test_drop_path_zeroes_whole_samples_and_rescales():
    x = jnp.ones((64, 2, 2, 3))
    y = np.asarray(ops.drop_path(x, 0.5, jax.random.key(0), batch_axis=0))
    per_sample = y.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert all(len(np.unique(r)) == 1 for r in per_sample)
    assert ops.drop_path(x, 0.5, None, 0) is x


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dims", [("NHWC", "HWIO", "NHWC"), ("NHWC", "OIHW", "NHWC")])
def test_pointwise_conv_is_a_dot_with_torch_s_values_and_gradients(stride, dims):
    """1x1 convolutions run as dot products on a CPU (XLA:CPU's GEMM paths are much faster than its
    convolutions there, the kernel gradient above all): the forward and both gradients match
    PyTorch's conv2d, with stride (every s-th pixel) and odd sizes, and the program lowered for the
    CPU has no convolution left. Lowered for a GPU, they stay convolutions (cuDNN's were as fast or
    faster there)."""
    _check_dot_on_cpu_conv_on_gpu(torch.randn(2, 16, 15, 22), torch.randn(24, 16, 1, 1), stride, 0, 1, dims)


@pytest.mark.parametrize("per_example", [False, True], ids=["batch", "vmapped"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dims", [("NHWC", "HWIO", "NHWC"), ("NHWC", "OIHW", "NHWC")])
def test_dot_kernel_gradient_reads_the_output_gradient_in_place(k, dims, per_example):
    """A convolution run as a dot product (1x1; 3x3 on a 2x2 map: im2col) flattens the batch and
    map into one axis, so its kernel gradient contracts one axis and XLA:CPU reads the output
    gradient where it lies; under a vmap of single examples too (Equinox's models), where the
    batch joins the rows in `ops._rows_dot_p`'s batching rule. Contracting (N, H, W) as three
    axes, or (N, H*W) as two under vmap, it copied the output gradient transposed first
    (ResNet-50's train step at 224x224: Haiku 15% slower, Equinox 36 copies; docs/benchmarks.md)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 2, 16)), jnp.float32)
    w = jnp.ones((k, k, 16, 24) if dims[1] == "HWIO" else (24, 16, k, k), jnp.float32)
    g = jnp.ones((2, 2, 2, 24), jnp.float32)

    def conv(w):
        def one(x):
            return ops.conv2d(x, w, None, stride=1, padding=k // 2, dilation=1, groups=1, dimension_numbers=dims)

        return jax.vmap(lambda xi: one(xi[None])[0])(x) if per_example else one(x)

    with ops.tracing_for("cpu"):
        hlo = jax.jit(lambda w, g: jax.vjp(conv, w)[1](g)[0]).lower(w, g).compile().as_text()
    moved = [line for line in hlo.splitlines() if " = f32[" in line and ("copy" in line or "transpose" in line)
             and int(np.prod([int(d) for d in line.split("f32[")[1].split("]")[0].split(",") if d])) == g.size]
    assert not moved, moved


@pytest.mark.parametrize("w_axis", [0, 1])
def test_rows_dot_primitive_is_the_plain_product_under_every_transformation(w_axis):
    """`ops._channel_matmul` binds a primitive of zoo's (for its batching rule): under jit, grad,
    vmap (per-example inputs, batched kernels, per-example gradients), jvp, second order,
    checkpoint and eagerly it gives what the plain product `ops._rows_dot` gives."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4, 5, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((6, 7) if w_axis == 0 else (7, 6)), jnp.float32)
    ours, plain = (lambda x, w: ops._channel_matmul(x, w, w_axis)), (lambda x, w: ops._rows_dot(x, w, w_axis))

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    def per_example(f):
        return lambda x, w: jax.vmap(lambda xi: f(xi, w))(x)

    cases = {
        "eager": lambda f: f(x, w),
        "jit": lambda f: jax.jit(f)(x, w),
        "grad": lambda f: jax.jit(jax.grad(loss(f), (0, 1)))(x, w),
        "vmap grad": lambda f: jax.grad(loss(per_example(f)), (0, 1))(x, w),
        "batched kernels": lambda f: jax.vmap(lambda wi: f(x, wi))(jnp.stack([w, 2 * w])),
        "per-example grads": lambda f: jax.vmap(jax.grad(loss(f), 1), (0, None))(x, w),
        "jvp": lambda f: jax.jvp(f, (x, w), (x, w)),
        "hessian": lambda f: jax.hessian(lambda w: loss(f)(x[:1, :1], w))(w),
        "checkpoint": lambda f: jax.grad(jax.checkpoint(loss(f)), (0, 1))(x, w),
        "linear_transpose": lambda f: jax.linear_transpose(lambda w: f(x, w), w)(f(x, w)),
    }
    for name, run in cases.items():
        for a, b in zip(jax.tree_util.tree_leaves(run(ours)), jax.tree_util.tree_leaves(run(plain))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)
    assert "zoo_rows_dot" in str(jax.make_jaxpr(ours)(x, w))


def _check_dot_on_cpu_conv_on_gpu(x, w, stride, padding, dilation, dims):
    """`ops.conv2d`'s forward and both gradients against PyTorch's conv2d (kernel stored as `dims`
    says), and its CPU program without a convolution, its CUDA program without a dot product."""
    x, w, b = x.requires_grad_(True), w.requires_grad_(True), torch.randn(w.shape[0])
    y = F.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation)
    dy = torch.randn_like(y)
    y.backward(dy)
    w_layout = w.detach().numpy().transpose(2, 3, 1, 0) if dims[1] == "HWIO" else w.detach().numpy()

    def f(x, w):
        return ops.conv2d(x, w, jnp.asarray(b.numpy()), stride=stride, padding=padding, dilation=dilation,
                          groups=1, dimension_numbers=dims)

    xj, wj = _nhwc(x.detach()), jnp.asarray(w_layout)
    with jax.default_matmul_precision("highest"):
        out, vjp = jax.vjp(jax.jit(f), xj, wj)
        dx, dw = vjp(jnp.asarray(dy.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(out), y.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), x.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    dw_ref = w.grad.numpy().transpose(2, 3, 1, 0) if dims[1] == "HWIO" else w.grad.numpy()
    np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=1e-5, atol=1e-4)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
    assert "convolution" not in grad.lower(xj, wj).as_text()
    for_gpu = jax.export.export(grad, platforms=["cuda"])(xj, wj).mlir_module()
    assert "convolution" in for_gpu and "dot_general" not in for_gpu


@pytest.mark.parametrize("h,w,k,s,p,d", [
    (2, 2, 3, 1, 1, 1),  # a ResNet's 3x3 at the last stages of a 32x32 input
    (4, 4, 3, 2, 1, 1),  # strided: the 4x4 input is wide enough, its 2x2 output is not
    (1, 5, 3, 1, 1, 1),  # non-square, narrow along one axis only
    (4, 3, 5, 1, 2, 1),
    (2, 5, 3, 1, 2, 2),  # dilated
    (3, 3, 3, 1, 0, 1),  # no padding: a 1x1 output
])
@pytest.mark.parametrize("dims", [("NHWC", "HWIO", "NHWC"), ("NHWC", "OIHW", "NHWC")])
def test_conv_on_maps_narrower_than_its_kernel_is_im2col_with_torch_s_values_and_gradients(h, w, k, s, p, d, dims):
    """Where a map is narrower than the kernel (the input's, or the output's, which the input
    gradient convolves), XLA:CPU's convolutions run 10-40x slower than im2col and a dot product
    (docs/benchmarks.md), so on a CPU such convolutions are that: the forward and both gradients
    match PyTorch's conv2d, in both kernel layouts, and the program lowered for the CPU has no
    convolution left. Lowered for a GPU they stay convolutions."""
    _check_dot_on_cpu_conv_on_gpu(torch.randn(3, 6, h, w), torch.randn(5, 6, k, k), s, p, d, dims)


def test_conv_on_maps_as_wide_as_its_kernel_stays_a_convolution():
    """The other side of the rule: from maps as wide as the kernel up, XLA:CPU's convolutions were
    as fast or faster than im2col (3x3 on 3x3 maps level, on 7x7 and larger faster), so they stay;
    grouped convolutions too (not slow on narrow maps)."""
    assert ops.runs_as_im2col((3, 3), (2, 2), (2, 2), 1)
    assert ops.runs_as_im2col((3, 3), (4, 4), (2, 2), 1)
    assert ops.runs_as_im2col((3, 3), (9, 2), (9, 2), 1)
    assert not ops.runs_as_im2col((3, 3), (3, 3), (3, 3), 1)
    assert not ops.runs_as_im2col((3, 3), (7, 7), (7, 7), 1)
    assert not ops.runs_as_im2col((3, 3), (2, 2), (2, 2), 32)
    assert not ops.runs_as_im2col((1, 1), (1, 1), (1, 1), 1)  # a dot product anyway (`runs_as_dot`)
    x, w = jnp.ones((2, 3, 3, 4)), jnp.ones((3, 3, 4, 5))
    conv = jax.jit(lambda x, w: ops.conv2d(x, w, None, stride=1, padding=1, dilation=1, groups=1,
                                           dimension_numbers=("NHWC", "HWIO", "NHWC")))
    assert "convolution" in conv.lower(x, w).as_text()


@pytest.mark.parametrize("platform", ["cpu", None])
def test_relu_carries_nans_through_reductions_with_torch_s_gradient(platform):
    """jaxlib's CPU backend fuses reductions, with the elementwise work feeding them, into YNNPACK
    kernels whose maximum drops NaNs: `jnp.sum(jax.nn.relu(x))` of a NaN came out finite, and a
    training step fed a NaN pixel returned a finite loss. `ops.relu` keeps the NaN (as
    torch.relu) and PyTorch's gradient (zero where x <= 0, the incoming one at a NaN), traced for
    the CPU or for a platform chosen at lowering; lowered for a GPU it stays a maximum."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 9, 7, 16)).astype(np.float32)
    x[0, 3, 4, 5] = np.nan
    x[1, 2, 2, :4] = 0.0
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.relu(xt)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    yt.backward(torch.tensor(dy))

    def relu(a):  # a function of this test's own: JAX's trace cache is blind to `tracing_for`
        return ops.relu(a)

    def pooled(a):
        return jnp.sum(ops.relu(a), axis=(0, 1, 2))

    with ops.tracing_for(platform):
        y, vjp = jax.vjp(jax.jit(relu), jnp.asarray(x))
        (dx,) = vjp(jnp.asarray(dy))
        sums = jax.jit(pooled)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy())
    np.testing.assert_array_equal(np.asarray(dx), xt.grad.numpy())
    ref = torch.relu(torch.tensor(x)).sum(dim=(0, 1, 2)).numpy()
    np.testing.assert_array_equal(np.isnan(np.asarray(sums)), np.isnan(ref))
    assert np.isnan(ref).sum() == 1
    np.testing.assert_allclose(np.asarray(sums), ref, rtol=1e-5)
    if platform is None:
        module = jax.export.export(jax.jit(relu), platforms=["cuda"])(jnp.asarray(x)).mlir_module()
        for_gpu = "\n".join(line for line in module.splitlines() if not line.startswith("#loc"))
        assert "stablehlo.maximum" in for_gpu and "stablehlo.select" not in for_gpu
