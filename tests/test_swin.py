"""Swin modules (reference and fast) against timm: constructor, state dict, buffers, outputs and gradients."""
import pytest
import torch

import vitkernels
from vitkernels.reference import swin as reference

from helpers import (
    OpCalls,
    compile_recording_graphs,
    import_timm,
    linears_on_own_gemm,
    vitkernels_op_or_skip,
    vitkernels_ops,
)

pytestmark = pytest.mark.timm

BLOCK_CASES = [  # (input_resolution, window, shift, always_partition)
    ((14, 14), 7, 3, False),
    ((9, 10), 7, 3, False),     # padding
    ((14, 7), 7, 3, False),     # W <= window: shift clamped to 0 on that axis only
    ((5, 6), 7, 3, False),      # window clamped to the resolution, no shift
    ((9, 10), 7, 3, True),      # always_partition keeps the window and shift, pads
    ((10, 13), (3, 4), (1, 2), False),
]
IMPLS = {"reference": reference.SwinTransformerBlock, "fast": vitkernels.SwinBlock}


def timm_block(*args, **kwargs):
    import_timm()
    from timm.models.swin_transformer import SwinTransformerBlock

    return SwinTransformerBlock(*args, **kwargs)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", BLOCK_CASES, ids=[f"{c[0]}w{c[1]}s{c[2]}{'A' if c[3] else ''}" for c in BLOCK_CASES])
def test_block_matches_timm(impl, case):
    res, window, shift, always = case
    kwargs = dict(dim=24, input_resolution=res, num_heads=3, window_size=window, shift_size=shift,
                  always_partition=always)
    theirs = timm_block(**kwargs).double()
    ours = IMPLS[impl](**kwargs).double()
    assert ours.window_size == theirs.window_size and ours.shift_size == theirs.shift_size
    # same keys, same shapes, both directions; non-persistent buffers stay out of the state dict
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert "attn.relative_position_index" not in ours.state_dict() and "attn_mask" not in ours.state_dict()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(ours.attn.relative_position_index, theirs.attn.relative_position_index)
    if theirs.attn_mask is None:
        assert ours.attn_mask is None
    else:
        assert torch.equal(ours.attn_mask, theirs.attn_mask)

    x = torch.randn(2, *res, 24, dtype=torch.float64)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out_ours)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-9, atol=1e-9)
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(ours_grads[name], p.grad, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_block_matches_timm_sdpa_path_float32(impl):
    theirs = timm_block(32, (14, 14), 4, window_size=7, shift_size=3)
    theirs.attn.fused_attn = True  # timm's scaled_dot_product_attention path
    ours = IMPLS[impl](32, (14, 14), 4, window_size=7, shift_size=3)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 14, 14, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_window_attention_module_matches_timm(impl):
    import_timm()
    from timm.models.swin_transformer import WindowAttention as TimmWindowAttention

    cls = reference.WindowAttention if impl == "reference" else vitkernels.WindowAttention
    theirs = TimmWindowAttention(24, 3, window_size=(3, 4)).double()
    ours = cls(24, 3, window_size=(3, 4)).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 12, 24, dtype=torch.float64)
    mask = torch.where(torch.rand(3, 12, 12) > 0.5, 0.0, -100.0).double()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours(x, mask), theirs(x, mask), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("old,new", [((4, 4), (6, 6)), ((3, 4), (5, 5)), ((2, 3), (2, 2))],
                         ids=["square", "non-square", "non-square-to-a-table-of-a-square-size"])
def test_window_attention_set_window_size_matches_timm(impl, old, new):
    """The bias table is resized by the installed timm's resize_rel_pos_bias_table, called as that timm's own
    WindowAttention.set_window_size calls it (old_window_size= where the function takes it, timm >= 1.0.31). Where
    that timm cannot resize a non-square window's table (timm 1.0.29 reads it as square: it raises, or hands the
    table back unresized and its module indexes the stale table) ours raises and is left as it was."""
    import_timm()
    from timm.models.swin_transformer import WindowAttention as TimmWindowAttention

    cls = reference.WindowAttention if impl == "reference" else vitkernels.WindowAttention
    theirs = TimmWindowAttention(24, 3, window_size=old).double()
    ours = cls(24, 3, window_size=old).double()
    ours.load_state_dict(theirs.state_dict())
    table = ours.relative_position_bias_table
    try:
        theirs.set_window_size(new)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            ours.set_window_size(new)
        assert ours.window_size == old and ours.relative_position_bias_table is table
        return
    if theirs.relative_position_bias_table.shape[0] != (2 * new[0] - 1) * (2 * new[1] - 1):
        with pytest.raises(ValueError, match="cannot resize a non-square window's table"):
            ours.set_window_size(new)
        assert ours.window_size == old and ours.relative_position_bias_table is table
        return
    ours.set_window_size(new)
    assert ours.window_size == theirs.window_size == new
    assert ours.relative_position_bias_table.dtype == theirs.relative_position_bias_table.dtype
    assert torch.equal(ours.relative_position_bias_table, theirs.relative_position_bias_table)
    assert torch.equal(ours.relative_position_index, theirs.relative_position_index)
    x = torch.randn(5, new[0] * new[1], 24, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_patch_merging_matches_timm():
    import_timm()
    from timm.models.swin_transformer import PatchMerging as TimmPatchMerging

    theirs = TimmPatchMerging(8, out_dim=12).double()
    ours = vitkernels.PatchMerging(8, out_dim=12).double()
    ours.load_state_dict(theirs.state_dict())
    for shape in [(2, 6, 8, 8), (1, 7, 5, 8)]:  # odd sizes are padded
        x = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [reference.SwinTransformerStage, vitkernels.SwinTransformerStage])
def test_stage_matches_timm(cls):
    import_timm()
    from timm.models.swin_transformer import SwinTransformerStage as TimmStage

    kwargs = dict(dim=16, out_dim=32, input_resolution=(18, 20), depth=2, downsample=True, num_heads=2,
                  window_size=7, drop_path=[0.0, 0.1])
    theirs, ours = TimmStage(**kwargs).double().eval(), cls(**kwargs).double().eval()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 18, 20, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_fast_block_backend_attribute_reaches_the_op():
    block = vitkernels.SwinBlock(16, (14, 14), 2, window_size=7, shift_size=3, backend="reference")
    assert block.attn.backend == "reference"
    block.backend = "triton"
    assert block.attn.backend == "triton"
    call = vitkernels.dispatch.Call(torch.device("cpu"), torch.float32)
    if vitkernels.ops.window_attention.op.reasons(call)["triton"]:
        with pytest.raises(vitkernels.BackendUnavailableError, match="window_attention"):
            block(torch.randn(1, 14, 14, 16))


def test_attention_dropout_in_training_takes_the_reference_path():
    torch.manual_seed(0)
    ours = vitkernels.SwinBlock(16, (14, 14), 2, window_size=7, shift_size=3, attn_drop=0.5).train()
    ref = reference.SwinTransformerBlock(16, (14, 14), 2, window_size=7, shift_size=3, attn_drop=0.5).train()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 14, 14, 16)
    torch.manual_seed(1)
    a = ours(x)
    torch.manual_seed(1)
    b = ref(x)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", [reference.SwinTransformer, vitkernels.SwinTransformer])
def test_whole_model_loads_timm_weights_and_matches(cls):
    timm = import_timm()
    kwargs = dict(img_size=(64, 96), window_size=4, depths=(2, 2, 2, 2), embed_dim=32, num_heads=(1, 2, 4, 8),
                  num_classes=10)
    theirs = timm.create_model("swin_tiny_patch4_window7_224", **kwargs).double().eval()
    ours = cls(**kwargs).double().eval()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), rtol=1e-10, atol=1e-10)


# --- vitkernels.compat.timm: swapping a timm model's blocks, official checkpoints ----------------------------------

from vitkernels.compat.timm import convert_official_swin_checkpoint, patch_model  # noqa: E402

SMALL_SWIN = dict(img_size=(32, 48), window_size=4, depths=(2, 2), embed_dim=16, num_heads=(1, 2), num_classes=5)


def _small_timm_swin(dtype=torch.float64):
    timm = import_timm()
    return timm.create_model("swin_tiny_patch4_window7_224", **SMALL_SWIN).to(dtype).eval()


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_patched_timm_model_matches_unpatched_outputs_and_gradients(backend):
    import copy

    device = "cpu"
    if backend == "triton":  # on the GPU where there is one, else under the interpreter
        from helpers import triton_interpreter_or_cuda

        device = "cuda" if torch.cuda.is_available() else "cpu"
        triton_interpreter_or_cuda(device)
    if backend == "native" and not vitkernels._native.is_loaded():
        pytest.skip(vitkernels._native.IMPORT_ERROR)
    dtype = torch.float32 if backend == "triton" else torch.float64
    original = _small_timm_swin(dtype).to(device)
    patched = patch_model(copy.deepcopy(original), backend=backend)
    blocks = [m for m in patched.modules() if isinstance(m, vitkernels.SwinBlock)]
    assert len(blocks) == 4 and all(b.backend == backend for b in blocks)
    assert not any(type(m).__name__ == "SwinTransformerBlock" and not isinstance(m, vitkernels.SwinBlock)
                   for m in patched.modules())
    assert list(patched.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 32, 48, dtype=dtype, device=device)
    with torch.backends.cudnn.flags(allow_tf32=False):  # the patch-embed conv, on a GPU
        out_p, out_o = patched(x), original(x)
        tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out_p, out_o, **tol)
        grad = torch.randn_like(out_o)
        out_p.backward(grad)
        out_o.backward(grad)
    grads_p = dict(patched.named_parameters())
    for name, param in original.named_parameters():
        torch.testing.assert_close(grads_p[name].grad, param.grad, **tol, msg=name)


@pytest.mark.parametrize("resize", [dict(img_size=(48, 40)), dict(img_size=(48, 40), window_size=6),
                                    dict(img_size=(44, 44), window_size=5)],
                         ids=["new-resolution", "new-resolution-and-window", "odd-merged-resolution"])
def test_set_input_size_on_a_patched_timm_model_matches_timm(resize):
    """timm's model.set_input_size reaches the swapped blocks (set_input_size / set_window_size, bias-table resize)
    and the resized models still agree. odd-merged-resolution: the 11 x 11 patch grid merges to 6 x 6, which
    timm >= 1.0.31's stage gives its blocks (window 5, shifted, padded) and timm 1.0.29's as floor 5 x 5 (window 5
    = the map: not shifted); the swapped stage keeps the installed timm's rule."""
    import copy

    original = _small_timm_swin()
    patched = patch_model(copy.deepcopy(original))
    original.set_input_size(**resize)
    patched.set_input_size(**resize)
    blocks = [m for m in patched.modules() if isinstance(m, vitkernels.SwinBlock)]
    theirs = [m for m in original.modules() if type(m).__name__ == "SwinTransformerBlock"]
    assert [(b.window_size, b.shift_size, b.input_resolution) for b in blocks] == \
        [(b.window_size, b.shift_size, b.input_resolution) for b in theirs]
    for ours_block, their_block in zip(blocks, theirs):
        assert torch.equal(ours_block.attn.relative_position_bias_table, their_block.attn.relative_position_bias_table)
        assert torch.equal(ours_block.attn.relative_position_index, their_block.attn.relative_position_index)
    if "window_size" in resize:
        assert blocks[0].window_size == (resize["window_size"],) * 2
    x = torch.randn(2, 3, *resize["img_size"], dtype=torch.float64)
    torch.testing.assert_close(patched(x), original(x), rtol=1e-9, atol=1e-9)


def test_patch_model_shares_parameters_and_patches_a_stage_or_block():
    original = _small_timm_swin()
    params_before = {id(p) for p in original.parameters()}
    stage = patch_model(original.layers[0])
    assert all(isinstance(b, vitkernels.SwinBlock) for b in stage.blocks)
    assert {id(p) for p in original.parameters()} == params_before  # same Parameter objects: optimizers still valid
    timm_block = _small_timm_swin().layers[1].blocks[1]  # 4 x 6 input, window 4: shift clamped to (0, 2)
    block = patch_model(timm_block)
    assert isinstance(block, vitkernels.SwinBlock)
    assert (block.window_size, block.shift_size) == (timm_block.window_size, timm_block.shift_size) == ((4, 4), (0, 2))


def test_official_swin_checkpoint_keys_load():
    """An official-layout checkpoint (downsample at the end of a stage, ``head.``, index / mask buffers saved)."""
    import re

    theirs = _small_timm_swin()
    official = {}
    for key, value in theirs.state_dict().items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        official[key.replace("head.fc.", "head.")] = value
    official["layers.0.blocks.1.attn_mask"] = torch.zeros(6, 16, 16)
    official["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    ours = vitkernels.SwinTransformer(**SMALL_SWIN).double().eval()
    ours.load_state_dict(convert_official_swin_checkpoint({"model": official}))
    x = torch.randn(1, 3, 32, 48, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    # a timm-layout dict passes through (minus buffers)
    assert convert_official_swin_checkpoint(theirs.state_dict()).keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_fast_block_inference_path_is_bitwise_the_training_arithmetic(backend):
    """Eval + no_grad takes the in-place inference path; it must give exactly the numbers of the autograd path."""
    if backend == "native" and not vitkernels._native.is_loaded():
        pytest.skip(vitkernels._native.IMPORT_ERROR)
    block = vitkernels.SwinBlock(32, (9, 10), 2, window_size=7, shift_size=3, backend=backend).eval()
    x = torch.randn(2, 9, 10, 32)
    x_copy = x.clone()
    with torch.no_grad():
        fast = block(x)
    assert torch.equal(x, x_copy)  # the in-place adds never touch the input
    slow = block(x)  # grad enabled: the inherited forward
    assert slow.requires_grad and not fast.requires_grad
    assert torch.equal(fast, slow.detach())
    with torch.inference_mode():
        assert torch.equal(block(x), fast)
    assert torch.equal(x, x_copy)


def test_fast_block_inference_under_autocast_keeps_the_promotions():
    """Under autocast an fp32 input plus the bf16 attention / MLP branches is fp32 (out-of-place promotion): the
    eval / no-grad path must give what the autograd path gives, dtype included."""
    block = vitkernels.SwinBlock(32, (9, 10), 2, window_size=7, shift_size=3).eval()
    x = torch.randn(2, 9, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            fast = block(x)
        slow = block(x)
    assert fast.dtype == slow.dtype == torch.float32
    assert torch.equal(fast, slow.detach())


# --- the fused CPU path of the fast block (GEMMs + native row ops) -------------------------------------------------

def _same_outputs_and_gradients(ours, theirs, x, seed, tol=1e-9):
    """Both modules on ``x`` (the same random stream: drop path), then backward of the same output gradient:
    outputs, the input's gradient and every parameter's gradient agree (float64)."""
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(seed)
    out_ours = ours(x_ours)
    torch.manual_seed(seed)
    out_theirs = theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, rtol=tol, atol=tol)
    grad = torch.randn_like(out_ours)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=tol, atol=tol)
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(ours_grads[name], p.grad, rtol=tol, atol=tol, msg=name)


def _fused_cpu_or_skip():
    from vitkernels.modules import swin as fast_swin

    if not fast_swin._FUSED_CPU_AVAILABLE:
        pytest.skip("the native CPU ops are not built")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fused_cpu_block_in_training_with_drop_path_matches_timm(approximate):
    """Drop path active: the fused ops apply the per-sample factors timm draws (same calls, same random stream);
    outputs and every gradient agree with timm's block, float64."""
    _fused_cpu_or_skip()
    import functools

    kwargs = dict(dim=24, input_resolution=(9, 10), num_heads=3, window_size=7, shift_size=3, drop_path=0.4,
                  act_layer=functools.partial(torch.nn.GELU, approximate=approximate))
    theirs = timm_block(**kwargs).double().train()
    ours = vitkernels.SwinBlock(**kwargs).double().train()
    ours.load_state_dict(theirs.state_dict())
    assert ours._fused_cpu_ready(torch.zeros(1, 9, 10, 24, dtype=torch.float64))
    _same_outputs_and_gradients(ours, theirs, torch.randn(5, 9, 10, 24, dtype=torch.float64), seed=3)


def test_fused_cpu_block_float32_matches_timm_and_inference_is_bitwise_training():
    _fused_cpu_or_skip()
    theirs = timm_block(96, (14, 14), 3, window_size=7, shift_size=3).eval()
    ours = vitkernels.SwinBlock(96, (14, 14), 3, window_size=7, shift_size=3).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 14, 14, 96)
    with torch.no_grad():
        fused_inplace = ours(x)
        expected = theirs(x)
    torch.testing.assert_close(fused_inplace, expected, rtol=1e-4, atol=2e-5)
    assert torch.equal(fused_inplace, ours(x).detach())


def test_stage_one_mlp_runs_blocked_in_inference_and_training_with_the_same_numbers(monkeypatch):
    """At Swin-T stage 1's width and a hidden activation of 9.6 MB the fused path runs the MLP as the blocked native
    gelu_mlp (where ATen's GEMM is the CPU GEMM): in inference (gelu_mlp) and in training (gelu_mlp_train, its
    backward gelu_mlp_backward) alike, so the two keep the same numbers, bitwise; timm's to rounding (outputs and
    gradients); and the unblocked path's output to GEMM rounding."""
    _fused_cpu_or_skip()
    import vitkernels.modules.swin as swin_module
    from vitkernels.ops import linear as linear_module

    monkeypatch.setattr(linear_module, "CPU_GEMM", "aten")
    theirs = timm_block(96, (56, 56), 3, window_size=7, shift_size=3).eval()
    ours = vitkernels.SwinBlock(96, (56, 56), 3, window_size=7, shift_size=3).eval()
    ours.load_state_dict(theirs.state_dict())
    if not vitkernels.ops.gelu_mlp.native_preferred(torch.empty(6272, 96), ours.mlp.fc1.weight, ours.mlp.fc2.weight):
        pytest.skip("the native gelu_mlp is not available")
    x = torch.randn(2, 56, 56, 96)
    with torch.no_grad(), OpCalls() as calls:
        blocked = ours(x)
    assert "vitkernels::gelu_mlp" in calls.names and "vitkernels::bias_gelu_" not in calls.names
    xg = x.clone().requires_grad_()
    with OpCalls() as calls:
        trained = ours(xg)
        trained.pow(2).sum().backward()
    assert "vitkernels::gelu_mlp_train" in calls.names and "vitkernels::gelu_mlp_backward" in calls.names
    assert torch.equal(blocked, trained.detach())
    xt = x.clone().requires_grad_()
    expected = theirs(xt)
    expected.pow(2).sum().backward()
    torch.testing.assert_close(trained.detach(), expected.detach(), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(xg.grad, xt.grad, rtol=1e-4, atol=1e-4)
    for name in ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "norm2.weight"):
        got, want = ours.get_parameter(name).grad, theirs.get_parameter(name).grad
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    with torch.no_grad():
        monkeypatch.setattr(swin_module, "_blocked_mlp_pays", lambda a, mlp: False)
        torch.testing.assert_close(ours(x), blocked, rtol=1e-6, atol=1e-6)  # the unblocked in-place path


@pytest.mark.parametrize("library, avx2", [("aten", False), ("onednn", True), ("onednn", False)])
def test_stage_one_mlp_runs_blocked_where_it_pays_beside_the_cpu_gemm(monkeypatch, library, avx2):
    """The fused path's MLP at Swin-T stage 1's width (a 9.6 MB hidden activation) runs blocked beside ATen's GEMM
    and, beside oneDNN, on an AVX2-only CPU (gelu_mlp.layers_take_it); else unblocked (oneDNN GEMMs + bias_gelu), in
    inference and training alike; either way timm's numbers to rounding."""
    _fused_cpu_or_skip()
    from vitkernels.ops import linear as linear_module

    if library == "onednn" and not linear_module.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN")
    monkeypatch.setattr(linear_module, "CPU_GEMM", library)
    monkeypatch.setattr(linear_module, "_AVX2_CPU", avx2)
    # the own GEMM as its rule would take it on that machine (unblocked, it runs the MLP as gelu_mlp_eager instead)
    monkeypatch.setattr(linear_module, "OWN_GEMM", linear_module.own_gemm_takes_it(
        env="", capability="AVX2" if avx2 else "AVX512", cpu_gemm=library)[0])
    theirs = timm_block(96, (56, 56), 3, window_size=7, shift_size=3)
    ours = vitkernels.SwinBlock(96, (56, 56), 3, window_size=7, shift_size=3)
    ours.load_state_dict(theirs.state_dict())
    if not vitkernels.ops.gelu_mlp.native_preferred(torch.empty(6272, 96), ours.mlp.fc1.weight, ours.mlp.fc2.weight):
        pytest.skip("the native gelu_mlp is not available")
    blocked = library == "aten" or avx2
    x = torch.randn(2, 56, 56, 96)
    with torch.no_grad(), OpCalls() as calls:
        inferred = ours.eval()(x)
    assert ("vitkernels::gelu_mlp" in calls.names) == blocked
    assert ("vitkernels::bias_gelu_" in calls.names) == (not blocked)
    xg = x.clone().requires_grad_()
    with OpCalls() as calls:
        trained = ours.train()(xg)
        trained.sum().backward()
    assert ("vitkernels::gelu_mlp_backward" in calls.names) == blocked
    assert ("vitkernels::bias_gelu_backward" in calls.names) == (not blocked)
    xt = x.clone().requires_grad_()
    expected = theirs.train()(xt)
    expected.sum().backward()
    torch.testing.assert_close(inferred, expected.detach(), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(trained.detach(), expected.detach(), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(xg.grad, xt.grad, rtol=1e-4, atol=1e-4)


def test_mlp_runs_gelu_mlp_eager_where_the_linears_run_the_own_gemm(monkeypatch):
    """At a stage-3-like block (weights too large beside the hidden activation for the blocks to pay) where the
    Linears run vitkernels' own GEMM (OWN_GEMM, oneDNN as the CPU GEMM: an AVX2-only AMD CPU) the fused path runs
    the MLP as vitkernels::gelu_mlp_eager (eager_takes_it), recording for autograd in training and not in inference:
    timm's numbers (float64) to float32 rounding, outputs and every gradient, and inference bitwise training's
    forward; with eager_takes_it False the unblocked fc1 + bias_gelu + fc2 path, timm's numbers too."""
    _fused_cpu_or_skip()
    vitkernels_op_or_skip("gelu_mlp_eager")
    import vitkernels.modules.swin as swin_module
    from vitkernels.ops import gelu_mlp as gelu_mlp_module

    linears_on_own_gemm(monkeypatch)
    theirs = timm_block(96, (14, 14), 3, window_size=7, shift_size=3)
    ours = vitkernels.SwinBlock(96, (14, 14), 3, window_size=7, shift_size=3)
    ours.load_state_dict(theirs.state_dict())
    theirs.double()
    fc1, fc2 = ours.mlp.fc1, ours.mlp.fc2
    tokens = torch.empty(2 * 14 * 14, 96)
    assert not swin_module._blocked_mlp_pays(tokens, ours.mlp)
    assert gelu_mlp_module.eager_takes_it(tokens, fc1.weight, fc1.bias, fc2.weight)

    calls = []
    op = torch.ops.vitkernels.gelu_mlp_eager

    def counting(*args):
        out = op(*args)
        calls.append(out.grad_fn.name() if out.grad_fn is not None else None)
        return out

    monkeypatch.setattr(torch.ops.vitkernels, "gelu_mlp_eager", counting)
    x = torch.randn(2, 14, 14, 96)
    xt = x.double().requires_grad_()
    expected = theirs.train()(xt)
    grad = torch.randn(expected.shape, dtype=torch.float64)
    expected.backward(grad)

    def check(eager):
        calls.clear()
        xg = x.clone().requires_grad_()
        ours.zero_grad()
        trained = ours.train()(xg)
        trained.backward(grad.float())
        if eager:  # recorded by the op's C++ autograd Function
            assert len(calls) == 1 and "EagerGeluMlp" in calls[0], calls
        else:
            assert calls == []
        torch.testing.assert_close(trained.detach().double(), expected.detach(), rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(xg.grad.double(), xt.grad, rtol=1e-4, atol=1e-4)
        ours_grads = {n: p.grad for n, p in ours.named_parameters()}
        for name, p in theirs.named_parameters():
            want = p.grad
            torch.testing.assert_close(ours_grads[name].double(), want, rtol=1e-4,
                                       atol=1e-4 * want.abs().max().item(), msg=name)
        calls.clear()
        with torch.no_grad():
            inferred = ours.eval()(x)
        assert calls == ([None] if eager else [])  # the forward alone, nothing recorded
        torch.testing.assert_close(inferred.double(), expected.detach(), rtol=1e-4, atol=2e-5)
        assert torch.equal(inferred, trained.detach())

    check(eager=True)
    monkeypatch.setattr(gelu_mlp_module, "eager_takes_it", lambda *args: False)
    check(eager=False)


def test_compiled_block_runs_gelu_mlp_own_where_the_linears_run_the_own_gemm(monkeypatch):
    """torch.compile (fullgraph) of a stage-3-like block where the Linears run vitkernels' own GEMM (OWN_GEMM,
    oneDNN as the CPU GEMM: an AVX2-only AMD CPU) traces the MLP as vitkernels::gelu_mlp_own (the GELU in the own
    GEMM's epilogues, gelu_mlp.compiled_takes_it), in the inference and the training graph: the eager block's
    outputs and every gradient (eager runs gelu_mlp_eager, the same GEMMs)."""
    _fused_cpu_or_skip()
    vitkernels_op_or_skip("gelu_mlp_own")
    linears_on_own_gemm(monkeypatch)
    block = vitkernels.SwinBlock(96, (14, 14), 3, window_size=7, shift_size=3)
    compiled, graphs = compile_recording_graphs(block)
    x = torch.randn(2, 14, 14, 96)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), block.eval()(x), rtol=1e-5, atol=1e-5)
    assert vitkernels_ops(graphs)["gelu_mlp_own"] == 1 and not vitkernels_ops(graphs)["bias_gelu_"]
    grad = torch.randn(x.shape)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    results = []
    for module, xg in ((compiled, xs[0]), (block, xs[1])):
        block.zero_grad()
        out = module.train()(xg)
        out.backward(grad)
        results.append((out.detach(), xg.grad, {n: p.grad.clone() for n, p in block.named_parameters()}))
    assert vitkernels_ops(graphs)["gelu_mlp_own"] == 2 and not vitkernels_ops(graphs)["bias_gelu"]
    (out_c, gx_c, grads_c), (out_e, gx_e, grads_e) = results
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-4, atol=1e-5)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(), msg=name)


def test_fused_cpu_path_is_skipped_where_it_cannot_serve():
    _fused_cpu_or_skip()
    block = vitkernels.SwinBlock(24, (9, 10), 3, window_size=7, shift_size=3)
    x = torch.randn(1, 9, 10, 24)
    assert block._fused_cpu_ready(x)
    block.backend = "reference"
    assert not block._fused_cpu_ready(x)
    block.backend = None
    block.mlp.drop1.p = 0.1  # an active dropout inside the MLP: not fused
    assert not block._fused_cpu_ready(x) and block.eval()._fused_cpu_ready(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not block._fused_cpu_ready(x)  # float32 tokens under autocast: timm's promotions, unfused
        assert block._fused_cpu_ready(x.bfloat16())  # bf16 tokens under bf16 autocast: fused
    with torch.autocast("cpu", dtype=torch.float16):
        assert not block._fused_cpu_ready(x.half())


def test_patch_model_swaps_patch_merging_and_it_matches_timm():
    _fused_cpu_or_skip()
    import copy

    original = _small_timm_swin().train()
    patched = patch_model(copy.deepcopy(original))
    merges = [m for m in patched.modules() if type(m).__name__ == "PatchMerging"]
    assert merges and all(isinstance(m, vitkernels.PatchMerging) for m in merges)
    assert list(patched.state_dict()) == list(original.state_dict())
    _same_outputs_and_gradients(patched, original, torch.randn(2, 3, 32, 48, dtype=torch.float64), seed=4)


# --- the Swin stem: timm's PatchEmbed (NHWC output) projecting through the fused patch-embedding op ----------------

def _stem_op_calls(monkeypatch):
    """The calls of the patch-embedding op (vitkernels.ops.patch_embed.patch_embed) while the test runs."""
    from vitkernels.ops import patch_embed as patch_embed_ops

    calls = []
    original = patch_embed_ops.patch_embed

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(patch_embed_ops, "patch_embed", spy)
    return calls


def test_patch_model_switches_the_swin_stem_and_it_matches_timm(monkeypatch):
    """The stem keeps its object, submodules, parameters and state-dict keys, runs the op (its tokens contiguous,
    NHWC a view of them) and gives timm's outputs and gradients; unpatch_model switches it back; a pickled or
    deep-copied patched model keeps the class."""
    _fused_cpu_or_skip()
    import copy
    import io
    import pickle

    from vitkernels.compat._patching import is_patched, unpatch_model

    import_timm()
    from timm.layers.patch_embed import PatchEmbed as TimmPatchEmbed

    original = _small_timm_swin().train()
    patched = copy.deepcopy(original)
    stem, proj, norm = patched.patch_embed, patched.patch_embed.proj, patched.patch_embed.norm
    patched = patch_model(patched)
    assert patched.patch_embed is stem and stem.proj is proj and stem.norm is norm
    assert isinstance(stem, TimmPatchEmbed) and type(stem) is not TimmPatchEmbed and is_patched(stem)
    assert list(patched.state_dict()) == list(original.state_dict())
    calls = _stem_op_calls(monkeypatch)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    with torch.no_grad():
        tokens = stem(x)
    assert calls == [None] and tokens.shape == (2, 8, 12, 16) and tokens.is_contiguous()
    _same_outputs_and_gradients(stem, original.patch_embed, x, seed=0)
    _same_outputs_and_gradients(patched, original, x, seed=5)
    for other in (copy.deepcopy(patched), pickle.loads(pickle.dumps(patched))):
        assert type(other.patch_embed) is type(stem)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False).patch_embed) is type(stem)
    unpatch_model(patched)
    assert type(stem) is TimmPatchEmbed and not hasattr(stem, "vitkernels_backend")


def test_the_patched_swin_stem_leaves_what_the_op_cannot_serve_to_timm(monkeypatch):
    """timm's forward (and its errors, its hooks) wherever the op would not compute what timm does: a hook on the
    projection, an image size timm rejects, a dtype the weights do not have; on a device other than the CPU the
    backend left to auto keeps timm's convolution, a pinned backend runs the op where it has an implementation for
    the call."""
    _fused_cpu_or_skip()
    import copy

    from vitkernels.compat.timm import _patch_embed_serves

    original = _small_timm_swin()
    patched = patch_model(copy.deepcopy(original))
    stem, theirs = patched.patch_embed, original.patch_embed
    calls = _stem_op_calls(monkeypatch)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    with torch.no_grad():
        seen = []
        handle = stem.proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        torch.testing.assert_close(stem(x), theirs(x), rtol=1e-12, atol=1e-12)
        handle.remove()
        assert seen == [(2, 16, 8, 12)] and calls == []
        for bad in (torch.randn(2, 3, 32, 40, dtype=torch.float64), x.float()):
            with pytest.raises(Exception) as ours_error:
                stem(bad)
            with pytest.raises(Exception) as their_error:
                theirs(bad)
            assert type(ours_error.value) is type(their_error.value)
        assert calls == []
        stem(x)
        assert calls == [None]
    meta = copy.deepcopy(stem).to("meta")
    x_meta = x.to("meta")
    assert not _patch_embed_serves(meta, x_meta, None) and _patch_embed_serves(meta, x_meta, "reference")
    # a backend pinned where it has no implementation for the call (the native op is CPU-only): the convolution
    assert not _patch_embed_serves(meta, x_meta, "native")
    patch_model(patched, backend="reference")
    assert stem.vitkernels_backend == "reference"
    with torch.no_grad():
        torch.testing.assert_close(stem(x), theirs(x), rtol=1e-12, atol=1e-12)
    assert calls == [None, "reference"]


def test_the_patched_swin_stem_under_bf16_autocast_gives_timms_dtype():
    _fused_cpu_or_skip()
    import copy

    original = _small_timm_swin(torch.float32)
    patched = patch_model(copy.deepcopy(original))
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = patched.patch_embed(x), original.patch_embed(x)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


# --- the chained stage: each block's tail also computes the next block's LayerNorm1 --------------------------------

# Chained vs the blocks one by one, |difference| / max |value| of each output / gradient tensor (measured worst in
# these tests: float64 1.6e-15, float32 1.2e-6). In half precision the chain normalises the block's unrounded sum
# where the next block's LayerNorm1 reads the rounded output: bf16 / fp16 rounding noise (measured 3.2e-3 fp16,
# 3.7e-2 bf16, the worst on LayerNorm weight / bias gradients, summed over every row; the first block's norm1 as far
# off as the chained ones); against float64 both are as far off (root mean square, forward).
CHAIN_TOL = {torch.float64: 1e-13, torch.float32: 4e-6, torch.float16: 8e-3, torch.bfloat16: 6e-2}
CHAIN_RES = {"shifted": (18, 20), "unshifted": (10, 12)}  # after the merge: 9 x 10 (shift 3, padding), 5 x 6 (no shift)


def _chain_stage(dtype=torch.float32, res=(18, 20), depth=3, drop_path=0.0, seed=0):
    """A fast stage (merge + ``depth`` blocks) with parameters moved off their init (non-trivial LayerNorm affines)."""
    torch.manual_seed(seed)
    stage = vitkernels.SwinTransformerStage(dim=16, out_dim=32, input_resolution=res, depth=depth, num_heads=2,
                                            window_size=7, drop_path=drop_path)
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return stage.to(dtype)


def _unchained(stage):
    """The blocks called one by one (each computing its own LayerNorm1): the path before the chain."""
    return lambda x: stage.blocks(stage.downsample(x))


class _ChainSpy:
    """Records each fused block call's (a given, next norm given) while a test runs."""

    def __init__(self, monkeypatch):
        from vitkernels.modules.swin import SwinTransformerBlock

        self.calls = []
        original = SwinTransformerBlock._forward_fused

        def spy(block, x, a=None, next_norm=None):
            self.calls.append((a is not None, next_norm is not None))
            return original(block, x, a, next_norm)

        monkeypatch.setattr(SwinTransformerBlock, "_forward_fused", spy)

    def chained(self, depth):
        """The calls were one chained stage of ``depth`` blocks."""
        return self.calls == [(False, True)] + [(True, True)] * (depth - 2) + [(True, False)]

    def unchained(self, depth):
        return self.calls == [(False, False)] * depth


def _run(fn, module, x, seed, grad):
    """Output, input gradient and every parameter gradient of ``fn(x)`` (backward of ``grad``)."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = fn(x)
    out.backward(grad)
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def _close(actual, expected, tol, msg=""):
    """|actual - expected| <= tol * max|expected| (the error relative to the tensor's scale)."""
    scale = expected.double().abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=tol * scale, msg=msg or None)


@pytest.mark.parametrize("dtype", list(CHAIN_TOL), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("res", list(CHAIN_RES.values()), ids=list(CHAIN_RES))
def test_chained_stage_inference_matches_the_blocks_one_by_one(dtype, res, monkeypatch):
    """Eval, no grad (the in-place ops): close to the unchained blocks, and bitwise the chained autograd path."""
    _fused_cpu_or_skip()
    stage = _chain_stage(dtype, res).eval()
    x = torch.randn(3, *res, 16, dtype=dtype)
    x_copy = x.clone()
    spy = _ChainSpy(monkeypatch)
    with torch.no_grad():
        chained = stage(x)
        assert spy.chained(3)
        spy.calls.clear()
        unchained = _unchained(stage)(x)
        assert spy.unchained(3)
    assert torch.equal(x, x_copy)
    _close(chained, unchained, CHAIN_TOL[dtype])
    assert torch.equal(chained, stage(x).detach())  # grad enabled: the functional ops, same numbers


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_chained_stage_in_half_precision_is_no_further_from_float64(dtype):
    """The chain's half-precision outputs are as close to the float64 stage's as the blocks one by one (root mean
    square error: measured within 1.2% of each other, either way)."""
    _fused_cpu_or_skip()
    stage = _chain_stage(torch.float64, depth=4).eval()
    x = torch.randn(3, 18, 20, 16, dtype=torch.float64)
    half = _chain_stage(dtype, depth=4).eval()
    with torch.no_grad():
        expected = stage(x)
        chained, unchained = half(x.to(dtype)).double(), _unchained(half)(x.to(dtype)).double()
    assert (chained - expected).norm() <= 1.1 * (unchained - expected).norm()


@pytest.mark.parametrize("dtype", list(CHAIN_TOL), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("res", list(CHAIN_RES.values()), ids=list(CHAIN_RES))
def test_chained_stage_training_with_drop_path_matches_the_blocks_one_by_one(dtype, res, monkeypatch):
    """Training with drop path (a fixed seed, some samples dropped): the chain draws the factors in the same order,
    so outputs, the input gradient and every parameter gradient (the next norm1's included) agree closely."""
    _fused_cpu_or_skip()
    stage = _chain_stage(dtype, res, depth=4, drop_path=[0.5, 0.3, 0.6, 0.4]).train()
    x = torch.randn(6, *res, 16, dtype=dtype)
    grad = torch.randn(6, (res[0] + 1) // 2, (res[1] + 1) // 2, 32, dtype=dtype)
    spy = _ChainSpy(monkeypatch)
    out_c, gx_c, gp_c = _run(stage, stage, x, 5, grad)
    assert spy.chained(4)
    out_u, gx_u, gp_u = _run(_unchained(stage), stage, x, 5, grad)
    tol = CHAIN_TOL[dtype]
    _close(out_c, out_u, tol)
    _close(gx_c, gx_u, tol)
    for name, g in gp_u.items():
        _close(gp_c[name], g, tol, msg=name)
    # drop path did act: another seed gives other numbers
    other, _, _ = _run(stage, stage, x, 6, grad)
    assert not torch.allclose(other, out_c)


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward", "sequential", "global"])
def test_hooks_force_the_stage_to_call_its_blocks(kind, monkeypatch):
    """A hook on a block (or on the blocks' Sequential, or a global module hook) must fire: the stage then calls the
    blocks one by one, each on the per-block fused path, with the unchained numbers; a global hook must fire for
    every submodule as in timm, so there the blocks run their modules (not the fused path, which calls submodules
    by their weights)."""
    _fused_cpu_or_skip()
    stage = _chain_stage().eval()
    x = torch.randn(2, 18, 20, 16)
    with torch.no_grad():
        expected = _unchained(stage)(x)
    fired = []
    hook = lambda *args: fired.append(kind)  # noqa: E731  (returns None: changes nothing)
    if kind == "forward":
        handle = stage.blocks[1].register_forward_hook(hook)
    elif kind == "forward_pre":
        handle = stage.blocks[2].register_forward_pre_hook(hook)
    elif kind == "full_backward":
        handle = stage.blocks[0].register_full_backward_hook(hook)
    elif kind == "sequential":
        handle = stage.blocks.register_forward_hook(hook)
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
    spy = _ChainSpy(monkeypatch)
    try:
        if kind == "full_backward":
            out = stage(x.clone().requires_grad_())
            out.sum().backward()
        else:
            with torch.no_grad():
                out = stage(x)
    finally:
        handle.remove()
    assert fired
    if kind == "global":
        assert spy.calls == [] and len(fired) > 3 * 10  # every block's submodules fired too
        torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5)
    else:
        assert spy.unchained(3)
        assert torch.equal(out.detach(), expected)
    spy.calls.clear()
    with torch.no_grad():
        stage(x)
    assert spy.chained(3)  # hook removed: chained again


def test_a_hook_on_a_submodule_fires_and_keeps_timms_numbers():
    """The fused path calls the block's Linears and norms by their weights, so a hook on one of them (here fc1's
    output, as feature-extraction code registers) sends the block through its modules: the hook fires, with the
    block's numbers."""
    _fused_cpu_or_skip()
    stage = _chain_stage().eval()
    x = torch.randn(2, 18, 20, 16)
    with torch.no_grad():
        expected = stage(x)
    seen = []
    handle = stage.blocks[1].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with torch.no_grad():
            out = stage(x)
    finally:
        handle.remove()
    assert seen and seen[0][-1] == stage.blocks[1].mlp.fc1.out_features
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_grad_checkpointing_stage_calls_its_blocks_and_matches(monkeypatch):
    """Activation checkpointing needs the block boundaries: with grad, the blocks run one by one through
    torch.utils.checkpoint (the unchained numbers, bitwise); without grad nothing is checkpointed and the chain runs."""
    _fused_cpu_or_skip()
    stage = _chain_stage(drop_path=0.3).train()
    x = torch.randn(4, 18, 20, 16)
    grad = torch.randn(4, 9, 10, 32)
    expected = _run(_unchained(stage), stage, x, 2, grad)
    stage.grad_checkpointing = True
    spy = _ChainSpy(monkeypatch)
    out, gx, gp = _run(stage, stage, x, 2, grad)
    assert spy.calls and all(call == (False, False) for call in spy.calls)  # forward + recomputation
    assert torch.equal(out, expected[0]) and torch.equal(gx, expected[1])
    for name, g in expected[2].items():
        assert torch.equal(gp[name], g), name
    spy.calls.clear()
    with torch.no_grad():
        stage.eval()(x)
    assert spy.chained(3)


def test_stage_chain_is_skipped_where_a_block_cannot_serve(monkeypatch):
    _fused_cpu_or_skip()
    stage = _chain_stage().eval()
    x = torch.randn(2, 18, 20, 16)
    spy = _ChainSpy(monkeypatch)
    stage.blocks[2].mlp.drop1.p = 0.1  # one block off the fused path (in training): the stage calls its blocks
    stage.train()
    stage(x)
    assert spy.calls == [(False, False), (False, False)]  # blocks 0, 1 fused alone, block 2 on timm's arithmetic
    spy.calls.clear()
    one = _chain_stage(depth=1).eval()
    with torch.no_grad():
        one(x)
    assert spy.unchained(1)


def _patched_small_swin(dtype=torch.float64):
    import copy

    original = _small_timm_swin(dtype)
    return original, patch_model(copy.deepcopy(original))


def _vitkernels_ops_in(graph_module):
    """The vitkernels ops a traced graph calls, by name (``bias_residual_layernorm``, ...)."""
    return {str(n.target).split(".")[1] for n in graph_module.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("vitkernels.")}


def test_exported_patched_model_matches_eager():
    """torch.export of a patched timm Swin traces the fused CPU path (the custom ops, not a fallback) and the
    exported program gives the eager model's outputs, at the traced batch size and another one (dynamic batch)."""
    _fused_cpu_or_skip()
    original, patched = _patched_small_swin(torch.float32)
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(patched, (torch.randn(2, 3, 32, 48),), dynamic_shapes=({0: batch},))
    assert {"window_attention_add_bias", "bias_residual_layernorm", "bias_gelu"} <= _vitkernels_ops_in(
        program.graph_module)
    exported = program.module()
    for n in (2, 3):
        x = torch.randn(n, 3, 32, 48)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), patched(x), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(exported(x), original(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
def test_compiled_patched_model_with_dynamic_batch(grad):
    """torch.compile(dynamic=True) of a patched timm Swin (the ops' fake kernels on symbolic shapes): one graph
    serves two batch sizes, with timm's outputs and, with autograd, its gradients."""
    _fused_cpu_or_skip()
    original, patched = _patched_small_swin(torch.float32)
    original.train(), patched.train()
    torch._dynamo.reset()
    compiled = torch.compile(patched, dynamic=True, backend="aot_eager")
    for n in (3, 5):
        x = torch.randn(n, 3, 32, 48)
        with torch.set_grad_enabled(grad):
            torch.manual_seed(n)  # the same drop-path draws in both models
            out = compiled(x)
            torch.manual_seed(n)
            ref = original(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        if grad:
            out.square().sum().backward()
            ref.square().sum().backward()
            theirs = dict(original.named_parameters())
            for name, p in patched.named_parameters():
                torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=name)
            patched.zero_grad(), original.zero_grad()


def _autocast_swin(depths=(2, 2, 2)):
    """A small timm Swin (float32, drop path 0.1, LayerNorm affines moved off their init) for bf16 autocast runs."""
    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=(64, 96), window_size=4, embed_dim=32,
                              depths=depths, num_heads=(2, 4, 8)[:len(depths)], num_classes=10, drop_path_rate=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _autocast_run(model, x, train, amp=True):
    """(output as float, parameter gradients of sum(out^2) or None) under bf16 autocast (or none), drop path
    drawn from seed 1."""
    model.train(train)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), torch.set_grad_enabled(train):
        out = model(x.to(next(model.parameters()).dtype))
    if not train:
        return out, None
    out.float().square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _relative_error(a, b):
    """||a - b|| / ||b||, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_fused_cpu_path_under_bfloat16_autocast(train, monkeypatch):
    """Under bf16 autocast the patched model runs the fused CPU path (every block), returns timm's dtype and is as
    close to a float64 run as timm under autocast is: output, and the parameter gradients' median and worst
    relative errors (measured: output 3.7e-3 / 5.1e-3 vs timm's 4.7e-3 / 4.8e-3; gradients median 5.4e-3 vs 6.6e-3,
    worst 6.5e-2 vs 6.4e-2, both on a LayerNorm bias)."""
    import copy
    import statistics

    _fused_cpu_or_skip()
    from vitkernels.modules import swin as fast_swin

    original = _autocast_swin()
    patched = patch_model(copy.deepcopy(original))
    reference = copy.deepcopy(original).double()
    fused_calls = []
    forward_fused = fast_swin.SwinTransformerBlock._forward_fused
    monkeypatch.setattr(fast_swin.SwinTransformerBlock, "_forward_fused",
                        lambda self, *a, **k: fused_calls.append(self) or forward_fused(self, *a, **k))
    x = torch.randn(2, 3, 64, 96)
    ours, our_grads = _autocast_run(patched, x, train)
    assert len(fused_calls) == 6  # every block of the three stages
    theirs, their_grads = _autocast_run(original, x, train)
    exact, exact_grads = _autocast_run(reference, x, train, amp=False)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert _relative_error(ours, exact) <= max(1.5 * _relative_error(theirs, exact), 1e-2)
    if train:
        assert all(our_grads[n].dtype == torch.float32 for n in our_grads)
        ours_rel = [_relative_error(our_grads[n], exact_grads[n]) for n in exact_grads]
        theirs_rel = [_relative_error(their_grads[n], exact_grads[n]) for n in exact_grads]
        assert statistics.median(ours_rel) <= 1.5 * statistics.median(theirs_rel)
        assert max(ours_rel) <= 1.5 * max(theirs_rel)


def test_compiled_patched_model_under_bfloat16_autocast():
    """torch.compile (inductor) of a patched Swin under bf16 autocast keeps the fused ops (their fake kernels give
    the dtypes the eager ops give) and is as close to a float64 run as eager autocast is, inference and a training
    step. Against float64 rather than eager: inductor's own LayerNorm1 / patch-embedding norm kernels round
    differently, which moves the first blocks' LayerNorm-bias gradients by up to ~9% relative from eager's, for timm
    compiled as much (measured; the compiled runs are the closer ones to float64: worst gradient 1.3e-2 relative for
    the patched model, 1.4e-2 for timm; eager 6.5e-2 / 6.4e-2). Two stages (shifted and unshifted blocks, a patch
    merging): inductor's compile time grows with the blocks it inlines (three stages: 68 s here, two: 48 s)."""
    import copy
    import statistics

    _fused_cpu_or_skip()
    patched = patch_model(_autocast_swin(depths=(2, 2)))
    reference = copy.deepcopy(patched).double()
    from torch._inductor.compile_fx import compile_fx

    traced_ops = set()

    def inductor(gm, example_inputs):  # inductor, noting the vitkernels ops of each graph it is given
        traced_ops.update(_vitkernels_ops_in(gm))
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(patched, backend=inductor)
    x = torch.randn(2, 3, 64, 96)

    for train in (False, True):
        got, got_grads = _autocast_run(compiled, x, train)
        exact, exact_grads = _autocast_run(reference, x, train, amp=False)
        assert got.dtype == torch.bfloat16
        assert _relative_error(got, exact) < 1e-2
        assert {"window_attention_add_bias", "bias_gelu" + ("" if train else "_"),
                "bias_residual_layernorm" + ("" if train else "_")} <= traced_ops, traced_ops
        if train:
            assert len(got_grads) == len(exact_grads)
            # by position: the compiled module's parameter names carry a "_orig_mod." prefix
            errors = [_relative_error(g, w) for g, w in zip(got_grads.values(), exact_grads.values())]
            assert statistics.median(errors) < 1e-2 and max(errors) < 5e-2, max(errors)


def test_patched_model_serves_concurrent_threads():
    """One patched model called from four Python threads at once (eval, no grad: the in-place fused path, whose
    scratch tensors belong to each call) gives each thread the outputs of a call made alone (float64)."""
    import threading

    _fused_cpu_or_skip()
    _, patched = _patched_small_swin()
    inputs = [torch.randn(2, 3, 32, 48, dtype=torch.float64) for _ in range(4)]
    with torch.no_grad():
        alone = [patched(x) for x in inputs]
    outputs, errors = [[] for _ in inputs], []

    def serve(i):
        try:
            with torch.no_grad():
                for _ in range(5):
                    outputs[i].append(patched(inputs[i]))
        except Exception as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, expected in enumerate(alone):
        assert len(outputs[i]) == 5
        for out in outputs[i]:
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_patch_model_swaps_stages_and_the_chain_matches_timm_in_training(monkeypatch):
    """A patched timm Swin's stages are vitkernels stages holding the same modules; in training (drop path, a fixed
    seed) the chained stages give timm's outputs and gradients (float64)."""
    _fused_cpu_or_skip()
    original, patched = _patched_small_swin()
    assert all(isinstance(s, vitkernels.SwinTransformerStage) for s in patched.layers)
    assert [type(s).__name__ for s in original.layers] == ["SwinTransformerStage"] * 2
    for ours, theirs in zip(patched.layers, original.layers):
        assert (ours.dim, ours.input_resolution, ours.output_resolution, ours.depth) == \
            (theirs.dim, theirs.input_resolution, theirs.output_resolution, theirs.depth)
    assert list(patched.state_dict()) == list(original.state_dict())
    original.train()
    patched.train()
    spy = _ChainSpy(monkeypatch)
    _same_outputs_and_gradients(patched, original, torch.randn(4, 3, 32, 48, dtype=torch.float64), seed=9)
    assert spy.calls == [(False, True), (True, False)] * 2
    # timm's set_grad_checkpointing reaches the new stages
    patched.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in patched.layers)


def test_patched_feature_extractors_match_timm():
    """Detection / segmentation use a Swin as a backbone: ``features_only=True`` (timm's feature wrapper around the
    stages) and ``forward_intermediates``. Patched, both run the fused CPU path and give timm's feature maps and
    gradients in training (drop path, a fixed seed; float64)."""
    import copy

    _fused_cpu_or_skip()
    timm = import_timm()
    config = {k: v for k, v in SMALL_SWIN.items() if k != "num_classes"}
    original = timm.create_model("swin_tiny_patch4_window7_224", features_only=True, drop_path_rate=0.2, **config)
    original = original.double().train()
    patched = patch_model(copy.deepcopy(original))
    assert sum(isinstance(m, vitkernels.SwinBlock) for m in patched.modules()) == 4
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    torch.manual_seed(3)
    theirs = original(x)
    torch.manual_seed(3)
    with OpCalls() as calls:
        ours = patched(x)
    assert "vitkernels::window_attention_add_bias" in calls.names and "vitkernels::bias_residual" in calls.names
    assert [t.shape for t in ours] == [t.shape for t in theirs] == [(2, 8, 12, 16), (2, 4, 6, 32)]
    grads = [torch.randn_like(t) for t in theirs]
    torch.autograd.backward(theirs, grads)
    torch.autograd.backward(ours, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    ours_grads = dict(patched.named_parameters())
    for name, param in original.named_parameters():
        torch.testing.assert_close(ours_grads[name].grad, param.grad, rtol=1e-9, atol=1e-9, msg=name)

    original, patched = _patched_small_swin()
    with torch.no_grad(), OpCalls() as calls:
        final, features = patched.forward_intermediates(x, indices=2)
    assert "vitkernels::bias_residual_layernorm_" in calls.names
    want_final, want_features = original.forward_intermediates(x, indices=2)
    torch.testing.assert_close(final, want_final, rtol=1e-9, atol=1e-9)
    for a, b in zip(features, want_features, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_patch_model_keeps_a_hooked_timm_stage():
    """The new stage would not carry the old one's hooks: such a stage stays timm's (its blocks are still swapped)."""
    import copy

    original = _small_timm_swin()
    hooked = copy.deepcopy(original)
    hooked.layers[1].register_forward_hook(lambda *args: None)
    patched = patch_model(hooked)
    assert isinstance(patched.layers[0], vitkernels.SwinTransformerStage)
    assert not isinstance(patched.layers[1], vitkernels.SwinTransformerStage)
    assert all(isinstance(b, vitkernels.SwinBlock) for b in patched.layers[1].blocks)
    x = torch.randn(1, 3, 32, 48, dtype=torch.float64)
    torch.testing.assert_close(patched(x), original(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
def test_compiled_patched_model_runs_the_chain_fullgraph(grad):
    """torch.compile(fullgraph=True) of a patched timm Swin traces the chained stages (aot_eager: no codegen, to
    keep it quick): each stage's first block ends with bias_residual_layernorm, its last with bias_residual."""
    _fused_cpu_or_skip()
    original, patched = _patched_small_swin(torch.float32)
    compiled, graphs = compile_recording_graphs(patched)
    x = torch.randn(2, 3, 32, 48)
    with torch.set_grad_enabled(grad):
        out = compiled(x)
        eager = patched(x)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, original(x), rtol=1e-4, atol=1e-5)
    ops = vitkernels_ops(graphs)
    suffix = "" if grad else "_"  # without grad, the in-place variants
    # 2 stages x 2 blocks: LayerNorm2 in every block + the one chained tail per stage; bias_residual in last blocks
    assert ops["bias_residual_layernorm" + suffix] == 6 and ops["bias_residual" + suffix] == 2, ops
    if grad:
        out.sum().backward()
        assert all(p.grad is not None for p in patched.parameters())
