"""Whole models, as users run them: timm Swin-T / Swin-B, Swin V2-T, a DeiT and a DINOv2 ViT with the fused embedding,
the MAE pre-training step.

Peers for every model and mode (the same weights, random, created locally with ``pretrained=False``):

* ``timm eager`` / ``timm torch.compile``: the timm model as it comes (for MAE: ``official eager`` /
  ``official torch.compile``, the official ``models_mae.py`` steps built from timm's ``PatchEmbed`` and ``Block``);
* ``patched eager`` / ``patched torch.compile``: the same model after the one-call vitkernels patch
  (``vitkernels.compat.timm.patch_model`` for Swin; ``patch_model(patch_vit_embedding(net))`` for DeiT and DINOv2:
  the fused embedding, and the blocks' fused row ops in inference; for MAE the fused patch embedding,
  ``random_masking`` with the pos-embed add, ``mae_unshuffle`` and ``mae_loss``).

Two floors, not peers: the model's ``nn.Linear`` and ``nn.Conv2d`` layers alone, at the shapes one call of the
model gives them (captured by forward hooks), forward (and, for ``train``, backward to inputs and weights), nothing
else. The gap between a peer and its floor is what attention, norms, activations, copies and the framework cost.
(Attention's own batched matmuls are not in them.)

* ``GEMM floor (Linear + Conv only)``: the Linears through ``F.linear`` (ATen ``addmm``; on CPU MKL sgemm), the
  floor of the unpatched ``timm`` peers.
* ``GEMM floor (vitkernels linear)``: the Linears through :func:`vitkernels.linear`, the GEMM backend the patched
  models use (``patch_model`` swaps every Linear to it; on CPU float32 the machine's CPU GEMM,
  ``vitkernels.ops.linear.CPU_GEMM``: MKL through ``F.linear`` on Intel, oneDNN elsewhere; off the CPU ``F.linear``),
  the floor of the ``patched`` peers. Convs through ``F.conv2d`` in both.

Every peer but the baseline (``timm eager`` / ``official eager``) is also timed in alternation with the baseline,
10 pairs, one warm-up call each, before its own timing: ``extra_info["vs_baseline"]`` (median and quartiles of the
per-pair speedups; the report's "speedup, interleaved" column). pytest-benchmark times each peer in its own stretch of
time, and on the shared 2-core VM the machine's speed drifted by up to ~30% within minutes (Swin-B's training step:
timm eager measured 782 ms in one run and 957 ms in the next, patched 841 and 708): the separate medians' ratio
then says more about the drift than about the peers, the interleaved one does not.

Modes: ``inference`` (eval, ``torch.no_grad``) and ``train`` (train mode: forward, loss -- cross-entropy on random
labels, or the MAE loss -- and backward to every parameter's gradient; the optimizer update, the same for every peer,
is left out). Models are built with ``drop_path_rate=0`` so that a training step is deterministic and the peers can
be compared. Before timing, each peer's output (train: its loss and every parameter gradient) is checked against
the timm / official model run in float64 (relative error of each tensor's norm).

Sizes: on CUDA, batch 128 (Swin-T, Swin V2-T, DeiT-S, MAE ViT-B) and 64 (Swin-B) under bf16 autocast. On a 2-core CPU,
in fp32: Swin-T and Swin V2-T (``swinv2_tiny_window8_256``, 256 x 256 images; no GEMM floors: its qkv projection is
not an ``nn.Linear`` call) batch 4 (inference) / 2 (train), Swin-B batch 1 with 5 rounds, DeiT-S 4 / 2, MAE ViT-B 2,
DINOv2 ViT-S/14
with 4 registers (``vit_small_patch14_reg4_dinov2`` at 224 x 224: 256 patches + 5 prefix tokens, LayerScale blocks)
batch 4 in inference only (its training runs timm's block code, as DeiT-S's does); and Swin-T
converted to bfloat16 whole (``swin_tiny_bf16``: weights, activations and images; inference, batch 4), how bf16 models
are served on CPUs with bf16 GEMMs (AVX-512 BF16 / AMX), checked against float64 at the bf16 tolerance; and Swin-T
in float32 under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (``swin_tiny_amp``: inference batch 4, train batch
2), how such CPUs train and serve a float32 checkpoint, at the same tolerance. On CPU the
``torch.compile`` peers (one to four minutes of compilation each on 2 cores) and every Swin-B case are marked
``heavy``; ``-m "not heavy"`` runs the eager peers of Swin-T, Swin V2-T, DeiT-S and MAE only.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkernels
from vitkernels.compat.timm import patch_model, patch_vit_embedding

from conftest import (
    DEVICE, assert_agrees, compiled_or_skip, interleaved_speedup, linear_floor, run_benchmark, timm_or_skip,
)

ON_GPU = DEVICE.type == "cuda"

# name -> (timm model name or "mae", {mode: batch} on GPU, {mode: batch} on CPU, CPU rounds or None)
MODELS = {
    "swin_tiny": ("swin_tiny_patch4_window7_224", {"inference": 128, "train": 128}, {"inference": 4, "train": 2}, None),
    "swin_base": ("swin_base_patch4_window7_224", {"inference": 64, "train": 64}, {"inference": 1, "train": 1}, 5),
    "swinv2_tiny": ("swinv2_tiny_window8_256", {"inference": 128, "train": 128}, {"inference": 4, "train": 2}, None),
    "deit_small": ("deit_small_distilled_patch16_224", {"inference": 128, "train": 128},
                   {"inference": 4, "train": 2}, None),
    "mae_vit_base": ("mae", {"train": 128}, {"train": 2}, None),
    "dinov2_small": ("vit_small_patch14_reg4_dinov2", {"inference": 128, "train": 128}, {"inference": 4}, None),
    # CPU only (on a GPU every case runs under bf16 autocast): the whole model in bfloat16 (weights and
    # activations), and the float32 model under bf16 autocast
    "swin_tiny_bf16": ("swin_tiny_patch4_window7_224", {}, {"inference": 4}, None),
    "swin_tiny_amp": ("swin_tiny_patch4_window7_224", {}, {"inference": 4, "train": 2}, None),
}
MODES = ("inference", "train")
CREATE_KWARGS = {"dinov2_small": {"img_size": 224}}  # timm.create_model's extra arguments (DINOv2's default is 518)
IMAGE_SIZE = {"swinv2_tiny": 256}  # the rest: 224 x 224
BF16_MODELS = {"swin_tiny_bf16"}  # converted to bfloat16 whole (model.bfloat16(), bfloat16 images)
CPU_AMP_MODELS = {"swin_tiny_amp"}  # float32 weights and images, run under torch.autocast("cpu", torch.bfloat16)


def _dtype(model):
    """The dtype the model's weights and images are created in: None (the default, float32) or bfloat16."""
    return torch.bfloat16 if model in BF16_MODELS else None


def _amp_dtype(model):
    """The autocast dtype the model runs under: bfloat16 on a GPU (every model) and for CPU_AMP_MODELS, else None."""
    return torch.bfloat16 if ON_GPU or model in CPU_AMP_MODELS else None


def _precision(model):
    if _amp_dtype(model) is not None:
        return "bf16 autocast"
    return "bf16" if model in BF16_MODELS else "fp32"


GEMM_FLOOR = "GEMM floor (Linear + Conv only)"
GEMM_FLOOR_VK = "GEMM floor (vitkernels linear)"
FLOORS = (GEMM_FLOOR, GEMM_FLOOR_VK)


def _peers(model):
    if model.startswith("mae"):
        return ("official eager", "official torch.compile", "patched eager", "patched torch.compile", *FLOORS)
    if model == "swinv2_tiny":
        # no floors: timm's V2 attention runs its qkv projection as F.linear on the module's weight (with
        # cat(q_bias, 0, v_bias)), not as an nn.Linear call, so the hooks that capture the floors' shapes miss it
        return ("timm eager", "timm torch.compile", "patched eager", "patched torch.compile")
    return ("timm eager", "timm torch.compile", "patched eager", "patched torch.compile", *FLOORS)


def _params():
    for model, (_, gpu_batches, cpu_batches, _) in MODELS.items():
        batches = gpu_batches if ON_GPU else cpu_batches
        for mode in MODES:
            if mode not in batches:
                continue
            for peer in _peers(model):
                heavy = not ON_GPU and (peer.endswith("torch.compile") or model == "swin_base")
                heavy = heavy and peer not in FLOORS
                yield pytest.param(model, mode, peer, marks=[pytest.mark.heavy] if heavy else [],
                                   id=f"{model}-{mode}-{peer}")


# --- MAE: the official model's steps, with the official or the vitkernels data path -------------------------------

def official_random_masking(x, mask_ratio, noise):
    """facebookresearch/mae ``MaskedAutoencoderViT.random_masking`` (noise passed in, as every peer draws it alike)."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


class MAE(nn.Module):
    """MAE pre-training model (official ``models_mae.py`` layout: timm ``PatchEmbed`` and ``Block``, fixed position
    embeddings, mask token, ``norm_pix_loss``). ``fused=True`` swaps the data path for vitkernels' ops: patch
    embedding, masking with the pos-embed add, decoder unshuffle with mask tokens and pos-embed, loss."""

    def __init__(self, img=224, patch=16, dim=768, depth=12, heads=12, dec_dim=512, dec_depth=8, dec_heads=16,
                 mask_ratio=0.75, fused=False):
        super().__init__()
        from functools import partial

        from timm.models.vision_transformer import Block, PatchEmbed

        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch, self.mask_ratio, self.fused = patch, mask_ratio, fused
        self.patch_embed = PatchEmbed(img, patch, 3, dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, L + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        self.norm = norm(dim)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(0.02 * torch.randn(1, L + 1, dec_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dec_dim, dec_heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(dec_depth))
        self.decoder_norm = norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, patch * patch * 3)

    def forward(self, imgs, noise):
        if self.fused:
            w, b = self.patch_embed.proj.weight, self.patch_embed.proj.bias
            x, mask, ids_restore = vitkernels.random_masking(
                vitkernels.patch_embed(imgs, w, b), self.mask_ratio, noise, self.pos_embed[:, 1:, :])
        else:
            x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
            x, mask, ids_restore = official_random_masking(x, self.mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        if self.fused:
            x = vitkernels.mae_unshuffle(x, ids_restore, self.mask_token, self.decoder_pos_embed)
        else:
            mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
            x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
            x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        if self.fused:
            return vitkernels.mae_loss(imgs, pred, mask, self.patch, norm_pix_loss=True)
        return self._official_loss(imgs, pred, mask)

    def _official_loss(self, imgs, pred, mask):
        p = self.patch
        h = w = imgs.shape[2] // p
        target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(imgs.shape[0], 3, h, p, w, p))
        target = target.reshape(imgs.shape[0], h * w, p * p * 3)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()


# --- building the peers -----------------------------------------------------------------------------------------

def _base_model(model):
    """The unpatched model (random weights, seed 0, drop path 0) in fp32 on DEVICE."""
    timm = timm_or_skip()
    name = MODELS[model][0]
    torch.manual_seed(0)
    if name == "mae":
        net = MAE()
    else:
        net = timm.create_model(name, pretrained=False, drop_path_rate=0.0, **CREATE_KWARGS.get(model, {}))
    return net.to(device=DEVICE, dtype=_dtype(model))


def _patched(model, net):
    """The one-call vitkernels patch; patch_model also swaps every remaining nn.Linear to vitkernels.Linear."""
    if model.startswith("mae"):
        net.fused = True
        return patch_model(net)
    if model.startswith(("deit", "dinov2")):
        return patch_model(patch_vit_embedding(net))
    return patch_model(net)


def _inputs(model, mode, batch):
    torch.manual_seed(1)
    size = IMAGE_SIZE.get(model, 224)
    imgs = torch.randn(batch, 3, size, size, device=DEVICE, dtype=_dtype(model))
    if model.startswith("mae"):
        return imgs, torch.rand(batch, 196, device=DEVICE)  # the masking noise, the same for every peer
    return imgs, torch.randint(0, 1000, (batch,), device=DEVICE)


def _loss(model, net, imgs, extra):
    if model.startswith("mae"):
        return net(imgs, extra)
    out = net(imgs)
    if isinstance(out, tuple):  # DeiT distilled in train mode: (class head, distillation head)
        out = (out[0] + out[1]) / 2
    return F.cross_entropy(out, extra)


def _step(model, mode, net, params):
    """The timed call: inference (no_grad) or forward + loss + backward."""
    amp = _amp_dtype(model)
    autocast = torch.autocast(DEVICE.type, dtype=amp, enabled=amp is not None)

    if mode == "inference":
        def infer(imgs, extra):
            with torch.no_grad(), autocast:
                return net(imgs, extra) if model.startswith("mae") else net(imgs)
        return infer

    def train(imgs, extra):
        for p in params:
            p.grad = None
        with autocast:
            loss = _loss(model, net, imgs, extra)
        loss.backward()
        return loss

    return train


def _result(mode, out, params):
    """What is compared: the output (inference) or the loss and every parameter gradient (train)."""
    if mode == "inference":
        return (out.float() if isinstance(out, torch.Tensor) else out,)
    return (out,) + tuple(p.grad for p in params)


# The float64 result of the last (model, mode, batch) asked for: the peers of a group run one after another and
# compare against the same unpatched model (seed 0) on the same inputs, so it is computed once per group (a float64
# MAE ViT-B training step takes ~10 s on 2 cores). One slot: a Swin-B / ViT-B float64 gradient set is ~1 GB.
_FLOAT64_EXPECTED = {}


def _float64_expected(model, mode, batch, base, imgs, extra):
    """``_result`` of the unpatched model ``base`` run in float64 on ``imgs`` (``base`` is converted in place)."""
    key = (model, mode, batch, str(DEVICE))
    if key not in _FLOAT64_EXPECTED:
        _FLOAT64_EXPECTED.clear()
        reference64 = base.double().train(mode == "train")
        ref_params = [p for p in reference64.parameters() if p.requires_grad]
        out = _step(model, mode, reference64, ref_params)(imgs.double(), extra)
        _FLOAT64_EXPECTED[key] = _result(mode, out, ref_params)
    return _FLOAT64_EXPECTED[key]


def _gemm_floor(model, mode, net, imgs, extra, vitkernels_linear=False):
    """The floor step (conftest ``linear_floor``): every Linear / Conv2d of ``net`` at the input shapes one call gives
    them, nothing else; the Linears through ``F.linear``, or with ``vitkernels_linear`` through
    :func:`vitkernels.linear`. Returns (floor(imgs, extra), its flops)."""
    floor, flops = linear_floor(net, lambda: _step(model, "inference", net, [])(imgs, extra), mode == "train",
                                linear=vitkernels.linear if vitkernels_linear else F.linear,
                                amp_dtype=_amp_dtype(model))
    return lambda imgs_, extra_: floor(), flops


def _assert_no_farther_than(benchmark, got, theirs, expected, factor=1.5, slack=3e-2):
    """Each tensor of ``got`` within ``factor`` x (the baseline's ``theirs`` relative norm error) + ``slack`` of
    ``expected`` (float64): for results whose rounding noise varies by orders of magnitude between tensors."""
    for i, (g, t, e) in enumerate(zip(got, theirs, expected)):
        e64 = e.detach().double().cpu()
        norm = e64.norm().clamp_min(1e-30)
        ours = ((g.detach().double().cpu() - e64).norm() / norm).item()
        baseline = ((t.detach().double().cpu() - e64).norm() / norm).item()
        if ours > factor * baseline + slack:
            raise AssertionError(
                f"output[{i}] of peer {benchmark.extra_info.get('peer')!r}: relative norm error {ours:.3g} against "
                f"float64, the baseline's {baseline:.3g} (bound {factor} x that + {slack})")


# pairs (baseline, peer) timed in alternation, per peer: with 6, two runs of the same code differed by up to 0.13x
INTERLEAVED_ROUNDS = 10


def _interleaved(benchmark, baseline_step, fn, baseline_peer, imgs, extra):
    """The peer's speedup over the unpatched eager model timed in alternation with it (conftest
    ``interleaved_speedup``): on a VM whose speed drifts, the ratio the separate medians give can be off by more
    than their quartiles; this one is not. Skipped for the baseline itself, and in ``--benchmark-disable`` runs
    (CI's smoke run of the benchmarks: nothing is timed there)."""
    if baseline_step is None or getattr(benchmark, "disabled", False):
        return
    interleaved_speedup(benchmark, lambda: baseline_step(imgs, extra), fn, baseline=baseline_peer,
                        rounds=INTERLEAVED_ROUNDS)


# The floors a CPU smoke run (--benchmark-disable: nothing timed) runs: the float32 Swin-T's, both modes, and the bf16
# autocast one's inference (the floor's autocast branch). Every model's floor is the same capture-and-replay code
# (_gemm_floor) and computes no result to check; the other models' floors were a quarter of the smoke run (~60 s).
SMOKE_FLOORS = {("swin_tiny", "inference"), ("swin_tiny", "train"), ("swin_tiny_amp", "inference")}


@pytest.mark.parametrize("model,mode,peer", list(_params()))
def test_model(benchmark, model, mode, peer):
    cpu_smoke_run = not ON_GPU and getattr(benchmark, "disabled", False)  # --benchmark-disable: nothing timed
    if peer in FLOORS and cpu_smoke_run and (model, mode) not in SMOKE_FLOORS:
        pytest.skip("smoke run: the GEMM floors of the float32 Swin-T and the autocast Swin-T's inference only "
                    "(the same code for every model, no result to check)")
    name, gpu_batches, cpu_batches, cpu_rounds = MODELS[model]
    batch = (gpu_batches if ON_GPU else cpu_batches)[mode]
    if cpu_smoke_run and model in BF16_MODELS | CPU_AMP_MODELS:
        # a smoke run (nothing timed): the bf16 rows at batch 1, the same code; on a CPU without bf16 instructions
        # (AMD Zen 2) a bf16 autocast training step at batch 2 took 11.6 s against 0.6 s in float32
        batch = 1
    benchmark.group = (f"model {model} {mode} | {name if name != 'mae' else 'mae vit-b/16 r0.75'} b{batch} "
                       f"{_precision(model)}")
    benchmark.extra_info["peer"] = peer
    base = _base_model(model)
    net = _patched(model, copy.deepcopy(base)) if peer.startswith("patched") else copy.deepcopy(base)
    net.train(mode == "train")
    params = [p for p in net.parameters() if p.requires_grad]
    baseline_peer = _peers(model)[0]  # timm eager / official eager
    baseline_step = baseline_params = None
    if peer != baseline_peer:  # the unpatched eager model, timed in alternation with this peer (see below)
        baseline_net = copy.deepcopy(base).train(mode == "train")
        baseline_params = [p for p in baseline_net.parameters() if p.requires_grad]
        baseline_step = _step(model, mode, baseline_net, baseline_params)
    fn = net
    if peer.endswith("torch.compile"):
        fn = compiled_or_skip(net, dynamic=False, ours=peer.startswith("patched"))
    imgs, extra = _inputs(model, mode, batch)
    # multiply-accumulates per image of a forward (timm's model cards; MAE counted: encoder on 49 + 1 tokens, decoder
    # on 197; DINOv2 ViT-S/14 at 224: 261 tokens, Linears 5.6e9 + attention 0.6e9); a FLOP is 2 MACs, a training
    # step ~3 forwards
    macs = {"swin_tiny": 4.5e9, "swin_tiny_bf16": 4.5e9, "swin_tiny_amp": 4.5e9, "swin_base": 15.5e9,
            "swinv2_tiny": 5.9e9, "deit_small": 4.6e9, "mae_vit_base": 9.4e9, "dinov2_small": 6.2e9}[model]
    flops = 2 * macs * batch * (1 if mode == "inference" else 3)
    if peer in FLOORS:
        floor, floor_flops = _gemm_floor(model, mode, net, imgs, extra, vitkernels_linear=peer == GEMM_FLOOR_VK)
        _interleaved(benchmark, baseline_step, lambda: floor(imgs, extra), baseline_peer, imgs, extra)
        run_benchmark(benchmark, lambda: floor(imgs, extra), peer=peer, flops=int(floor_flops),
                      rounds=None if ON_GPU else cpu_rounds)
        return
    step = _step(model, mode, fn, params)

    # agreement with the unpatched model in float64 (relative norm error per tensor)
    got = _result(mode, step(imgs, extra), params)
    expected = _float64_expected(model, mode, batch, base, imgs, extra)
    rel = 3e-2 if ON_GPU or model in BF16_MODELS | CPU_AMP_MODELS else 1e-3
    if mode == "train" and _amp_dtype(model) is not None:
        # bf16 autocast gradients, tensor by tensor, are too noisy for a fixed bound: timm eager itself is 0.76 off
        # float64 on the first block's LayerNorm1 bias (CPU, batch 2: a sum over every token of bf16-rounded terms
        # that nearly cancel). So each tensor no farther than timm eager's own run of this step (x 1.5, + 3e-2), and
        # the loss and all the gradients as one vector at 3e-2.
        if baseline_step is not None:
            theirs = _result(mode, baseline_step(imgs, extra), baseline_params)
            _assert_no_farther_than(benchmark, got, theirs, expected)
        got, expected = [(r[0], torch.cat([g.flatten().double() for g in r[1:]])) for r in (got, expected)]
    assert_agrees(benchmark, got, expected, rel_norm=rel)

    _interleaved(benchmark, baseline_step, lambda: step(imgs, extra), baseline_peer, imgs, extra)
    run_benchmark(benchmark, lambda: step(imgs, extra), peer=peer, flops=int(flops),
                  rounds=None if ON_GPU else cpu_rounds, smoke_checked=True)
