#!/usr/bin/env python3
"""PyTorch eager CPU baseline for SAM-UNet-50 inference (random weights).

Builds SAM-UNet-50 as described in shared/MODEL.md (official state_dict names)
and times it like `tools/bench.rs`: per box count, one warm-up run then the
median over --runs of
  image side: preprocessing (PIL bilinear resize of the longest side to 256,
              normalise, pad) + ResNet-50 + ViT-B with adapters + neck +
              multi-scale feature;
  decoder:    prompt encoder + two-way transformer + upscaling + mask feature
              + hf_mlp dot product for all boxes in one batch, then
              postprocessing (bilinear 64->256, crop, bilinear to the original
              size, threshold).

    python tools/pytorch_baseline.py --threads 2 --boxes 1,16 --runs 10

Prints one JSON line per box count on stdout, parameter counts on stderr.

With --train N it times training steps instead, as the authors' trainer takes
them and as `bench --train N --train-boxes K` does on the same inputs: train
mode (BatchNorm on batch statistics), the image encoder frozen, N images with K
masks each through the decoder, logits upsampled 64 -> 256, focal + 20 dice,
backward, Adam (lr 1e-4). One warm-up step, then the median per phase, and the
process's peak RSS.

With --autocast-bf16 the inference runs under
torch.autocast("cpu", dtype=torch.bfloat16), as a user would turn it on
(the figure `bench --dtype bf16` is compared with, issue 14).

    python tools/pytorch_baseline.py --threads 2 --train 2 --train-boxes 5 --runs 5
    python tools/pytorch_baseline.py --device cuda --train 16 --runs 5
"""

import argparse
import contextlib
import json
import math
import re
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

IMG = 256
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


class LayerNorm2d(nn.Module):
    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


# ---------------------------------------------------------------- ViT-B (SAM)

class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 16, stride=16)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)


class VitAttention(nn.Module):
    def __init__(self, dim, heads, size):
        super().__init__()
        self.heads = heads
        hd = dim // heads
        self.scale = hd ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, hd))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, hd))
        idx = torch.arange(size)[:, None] - torch.arange(size)[None, :] + size - 1
        self.register_buffer("rel_idx", idx, persistent=False)

    def forward(self, x):
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, h * w, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        rh = self.rel_pos_h[self.rel_idx]  # h x h x c
        rw = self.rel_pos_w[self.rel_idx]
        rq = q.reshape(b * self.heads, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, rw)
        attn = (attn.view(b * self.heads, h, w, h, w)
                + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(b * self.heads, h * w, h * w)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).view(b, self.heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(F.gelu(self.lin1(x)))


class VitBlock(nn.Module):
    def __init__(self, dim, heads, window):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VitAttention(dim, heads, window if window > 0 else IMG // 16)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)
        if self.window > 0:
            b, h, w, c = x.shape
            ws = self.window
            ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
            x = self.attn(x)
            x = x.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
            x = x[:, :h, :w, :].contiguous()
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class SamImageEncoder(nn.Module):
    def __init__(self, dim=768, depth=12, heads=12, global_idx=(2, 5, 8, 11)):
        super().__init__()
        g = IMG // 16
        self.patch_embed = PatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, dim))
        self.blocks = nn.ModuleList(
            VitBlock(dim, heads, 0 if i in global_idx else 14) for i in range(depth))
        self.neck = nn.Sequential(
            nn.Conv2d(dim, 256, 1, bias=False), LayerNorm2d(256),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), LayerNorm2d(256))


class ImageEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.sam_img_encoder = SamImageEncoder()


# ---------------------------------------------------------------- ResNet-50

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + idt)


class ResNet50(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3)):
        super().__init__()
        self.stage0 = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        cin = 64
        for s, (n, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(cin, width, 2 if (i == 0 and s > 0) else 1))
                cin = width * 4
            setattr(self, f"stage{s + 1}", nn.Sequential(*blocks))

    def forward(self, x):
        x = self.stage0(x)
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        f4 = self.stage4(f3)
        return f1, f2, f3, f4


# ---------------------------------------------------------------- adapters

class Reshaper(nn.Module):
    def __init__(self, c, size, dim):
        super().__init__()
        if size == 64:
            self.reshaper = nn.Sequential(
                nn.Conv2d(c, 2 * c, 3, 2, 1), LayerNorm2d(2 * c), nn.GELU(),
                nn.Conv2d(2 * c, 4 * c, 3, 2, 1), LayerNorm2d(4 * c), nn.GELU(),
                nn.Conv2d(4 * c, dim, 1))
        elif size == 32:
            self.reshaper = nn.Sequential(
                nn.Conv2d(c, 2 * c, 3, 2, 1), LayerNorm2d(2 * c), nn.GELU(),
                nn.Conv2d(2 * c, dim, 1))
        elif size == 16:
            self.reshaper = nn.Sequential(nn.Conv2d(c, dim, 1))
        else:
            self.reshaper = nn.Sequential(
                nn.ConvTranspose2d(c, c // 2, 2, 2), LayerNorm2d(c // 2), nn.GELU(),
                nn.Conv2d(c // 2, dim, 1))

    def forward(self, x):
        return self.reshaper(x)


def upscaler(cin, cmid, cout, final_gelu=False):
    mods = [nn.ConvTranspose2d(cin, cmid, 2, 2), LayerNorm2d(cmid), nn.GELU(),
            nn.ConvTranspose2d(cmid, cout, 2, 2)]
    if final_gelu:
        mods.append(nn.GELU())
    return nn.Sequential(*mods)


# ---------------------------------------------------------------- prompt encoder

class PositionEmbeddingRandom(nn.Module):
    def __init__(self, n=128):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, n))

    def pe(self, coords):  # coords in [0, 1], (..., 2) as (x, y)
        u = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(u), torch.cos(u)], dim=-1)

    def dense(self, g=16):
        ys = (torch.arange(g, dtype=torch.float32) + 0.5) / g
        xs = (torch.arange(g, dtype=torch.float32) + 0.5) / g
        grid = torch.stack([xs[None, :].expand(g, g), ys[:, None].expand(g, g)], dim=-1)
        return self.pe(grid).permute(2, 0, 1)  # 256 x g x g


class SamPromptEncoder(nn.Module):
    def __init__(self, dim=256):
        super().__init__()
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, 4, 2, 2), LayerNorm2d(4), nn.GELU(),
            nn.Conv2d(4, 16, 2, 2), LayerNorm2d(16), nn.GELU(),
            nn.Conv2d(16, dim, 1))
        self.no_mask_embed = nn.Embedding(1, dim)

    def forward(self, boxes):  # N x 4 in the 256 frame
        corners = (boxes + 0.5).reshape(-1, 2, 2) / IMG
        sparse = self.pe_layer.pe(corners)
        sparse[:, 0] += self.point_embeddings[2].weight[0]
        sparse[:, 1] += self.point_embeddings[3].weight[0]
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(boxes.shape[0], -1, 16, 16)
        return sparse, dense


class PromptEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.sam_prompt_encoder = SamPromptEncoder()


# ---------------------------------------------------------------- mask decoder

class Attention(nn.Module):
    def __init__(self, dim, heads, downsample=1):
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _split(self, x):
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, q, k, v):
        q = self._split(self.q_proj(q))
        k = self._split(self.k_proj(k))
        v = self._split(self.v_proj(v))
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        out = attn.softmax(dim=-1) @ v
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class MLPBlock(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayBlock(nn.Module):
    def __init__(self, dim, heads, mlp_dim, skip_first_pe):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, heads, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, heads, 2)
        self.skip_first_pe = skip_first_pe

    def forward(self, q, k, qpe, kpe):
        if self.skip_first_pe:
            q = self.self_attn(q, q, q)
        else:
            qq = q + qpe
            q = q + self.self_attn(qq, qq, q)
        q = self.norm1(q)
        q = self.norm2(q + self.cross_attn_token_to_image(q + qpe, k + kpe, k))
        q = self.norm3(q + self.mlp(q))
        k = self.norm4(k + self.cross_attn_image_to_token(k + kpe, q + qpe, q))
        return q, k


class TwoWayTransformer(nn.Module):
    def __init__(self, depth=2, dim=256, heads=8, mlp_dim=2048):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, mlp_dim, i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, src, pos, tokens):
        k = src.flatten(2).transpose(1, 2)
        kpe = pos.flatten(2).transpose(1, 2)
        q = tokens
        for layer in self.layers:
            q, k = layer(q, k, tokens, kpe)
        q = self.norm_final_attn(q + self.final_attn_token_to_image(q + tokens, k + kpe, k))
        return q, k


class SamMaskDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = TwoWayTransformer()
        self.output_upscaling = upscaler(256, 64, 32, final_gelu=True)


class MaskDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.sam_mask_decoder = SamMaskDecoder()
        self.med_token = nn.Embedding(1, 256)
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(32, 64, 3, padding=1), LayerNorm2d(64), nn.GELU(),
            nn.Conv2d(64, 32, 3, padding=1))
        self.hf_mlp = nn.Sequential(
            nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 32))

    def forward(self, image_embeddings, ms_feature, dense_pe, sparse, dense):
        n = sparse.shape[0]
        tokens = torch.cat([self.med_token.weight[None].expand(n, -1, -1), sparse], dim=1)
        src = image_embeddings.expand(n, -1, -1, -1) + dense
        pos = dense_pe[None].expand(n, -1, -1, -1)
        q, k = self.sam_mask_decoder.transformer(src, pos, tokens)
        med = q[:, 0]
        k = k.transpose(1, 2).reshape(n, 256, 16, 16)
        up = self.sam_mask_decoder.output_upscaling(k)
        feat = self.embedding_maskfeature(up) + ms_feature
        h = self.hf_mlp(med)
        return torch.einsum("nc,nchw->nhw", h, feat)[:, None]  # N x 1 x 64 x 64


# ---------------------------------------------------------------- SAM-UNet

class SamUnet(nn.Module):
    def __init__(self, dim=768):
        super().__init__()
        self.image_encoder = ImageEncoder()
        self.resnet = ResNet50()
        self.adapters_in = nn.ModuleList(
            Reshaper(c, s, dim) for c, s in zip((256, 512, 1024, 2048), (64, 32, 16, 8)))
        self.adapters_bridge = nn.ModuleList(upscaler(dim, 256, 32) for _ in range(3))
        self.embedding_encoder = upscaler(256, 64, 32)
        self.prompt_encoder = PromptEncoder()
        self.mask_decoder = MaskDecoder()

    def encode(self, x):
        vit = self.image_encoder.sam_img_encoder
        feats = self.resnet(x)
        t = vit.patch_embed(x) + vit.pos_embed
        bridges = []
        for i in range(4):
            t = vit.blocks[3 * i](t)
            t = vit.blocks[3 * i + 1](t)
            t = t + self.adapters_in[i](feats[i]).permute(0, 2, 3, 1)
            t = vit.blocks[3 * i + 2](t)
            if i < 3:
                bridges.append(self.adapters_bridge[2 - i](t.permute(0, 3, 1, 2)))
        emb = vit.neck(t.permute(0, 3, 1, 2))
        ms = self.embedding_encoder(emb) + bridges[0] + bridges[1] + bridges[2]
        return emb, ms

    def decode(self, emb, ms, boxes):
        pe = self.prompt_encoder.sam_prompt_encoder
        sparse, dense = pe(boxes)
        return self.mask_decoder(emb, ms, pe.pe_layer.dense(16), sparse, dense)


def preprocess(img):
    """img: H x W x 3 uint8 numpy -> (1 x 3 x 256 x 256 float tensor, h', w')."""
    H, W = img.shape[:2]
    scale = IMG / max(H, W)
    nh, nw = int(H * scale + 0.5), int(W * scale + 0.5)
    r = np.array(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    x = torch.from_numpy(r).permute(2, 0, 1).float()
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    x = F.pad(x, (0, IMG - nw, 0, IMG - nh))
    return x[None], nh, nw


def postprocess(logits, nh, nw, H, W):
    up = F.interpolate(logits, (IMG, IMG), mode="bilinear", align_corners=False)
    up = up[..., :nh, :nw]
    up = F.interpolate(up, (H, W), mode="bilinear", align_corners=False)
    return up > 0


def synthetic_image(s):
    # The same CT-like image as tools/bench.rs: a disc on a diagonal gradient.
    y, x = np.mgrid[0:s, 0:s]
    d = (np.sqrt((x - s / 2) ** 2 + (y - s / 2) ** 2) / s * 512.0).astype(np.int32)
    v = np.where(d < 120, 200, (x + y) * 255 // (2 * s)).clip(0, 255).astype(np.uint8)
    return np.repeat(v[:, :, None], 3, axis=2)


def focal_dice(logits, labels, dice_weight=20.0):
    """The authors' loss (MODEL.md, "Training") over all masks at once."""
    p = torch.sigmoid(logits)
    y = labels
    focal = (-0.25 * y * (1 - p) ** 2 * torch.log(p + 1e-12)
             - 0.75 * (1 - y) * p ** 2 * torch.log(1 - p + 1e-12)).mean()
    dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    return focal + dice_weight * dice


def bench_train(a, model):
    """The same batch as tools/bench.rs --train: a periodic ramp image, boxes
    offset per (image, mask), a 32-pixel checkerboard label. On --device cuda
    the phases are timed after a synchronisation and the peak is
    torch.cuda.max_memory_allocated."""
    import resource
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n, k, s = a.train, a.train_boxes, IMG
    x = ((torch.arange(n * 3 * s * s) % 977).float() / 977.0 - 0.5) * 3.0
    x = x.reshape(n, 3, s, s).to(dev)
    boxes = [torch.tensor([[10.0 + o, 20.0 + o, 150.0 + o, 170.0 + o]
                           for o in (float((i * 13 + j * 7) % 60) for j in range(k))]).to(dev)
             for i in range(n)]
    pix = torch.arange(k * s * s)
    lab = (((pix % s) // 32 + (pix // s % s) // 32) % 2).float().reshape(k, 1, s, s)
    labels = torch.cat([lab] * n).to(dev)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model.to(dev)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                           lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    fw, bw, ad, tot = [], [], [], []
    for run in range(a.runs + 1):
        sync()
        t0 = time.perf_counter()
        emb, ms = model.encode(x)
        low = torch.cat([model.decode(emb[i:i + 1], ms[i:i + 1], boxes[i]) for i in range(n)])
        up = F.interpolate(low, (s, s), mode="bilinear", align_corners=False)
        loss = focal_dice(up, labels)
        sync()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        t3 = time.perf_counter()
        if run > 0:
            fw.append((t1 - t0) * 1e3)
            bw.append((t2 - t1) * 1e3)
            ad.append((t3 - t2) * 1e3)
            tot.append((t3 - t0) * 1e3)
    med = lambda v: round(statistics.median(v), 1)
    print(json.dumps({
        "impl": "pytorch-eager", "torch_version": torch.__version__, "what": "train_step",
        "threads": torch.get_num_threads(), "images": n, "boxes_per_image": k, "runs": a.runs,
        "device": str(dev),
        "forward_ms": med(fw), "backward_ms": med(bw), "adam_ms": med(ad), "step_ms": med(tot),
        "images_per_s": round(n / (statistics.median(tot) / 1e3), 2),
        # ru_maxrss is in KiB on Linux; MiB like bench's VmHWM / 1024.
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "loss_last": round(loss.item(), 6),
    }), flush=True)
    # After the figures above (the profiler's own memory is not in their RSS).
    if a.profile:
        profile_step(model, opt, x, boxes, labels, n, s)


def profile_step(model, opt, x, boxes, labels, n, s):
    """One more training step under torch.profiler (--profile): the ops by
    self CPU time on stderr, and the share of the GEMM-type ops (matrix
    products and convolutions, forward and backward), the part of the step
    that the GEMM library's speed decides (tools/bench.rs's
    SAM_UNET_PROFILE=1 prints ours)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        emb, ms = model.encode(x)
        low = torch.cat([model.decode(emb[i:i + 1], ms[i:i + 1], boxes[i]) for i in range(n)])
        up = F.interpolate(low, (s, s), mode="bilinear", align_corners=False)
        loss = focal_dice(up, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    ev = prof.key_averages()
    print(ev.table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    total = sum(e.self_cpu_time_total for e in ev)
    # The kernels themselves (aten::linear, matmul, conv2d, ... only dispatch
    # to these: their self time is the dispatch).
    gemm = [e for e in ev if re.fullmatch(r"aten::(addmm|mm|bmm|baddbmm|.*convolution.*)", e.key)]
    gt = sum(e.self_cpu_time_total for e in gemm)
    gf = sum(e.flops for e in gemm if e.flops)
    print(f"profiled step: {total / 1e3:.1f} ms of op self time; GEMM-type ops "
          f"({', '.join(sorted(e.key for e in gemm))}): {gt / 1e3:.1f} ms "
          f"({100 * gt / max(total, 1):.1f} %); of them the profiler counts FLOPs for "
          f"mm/addmm/bmm only (not convolutions): {gf / 1e9:.1f} GFLOP", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--boxes", default="1,16")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--train", type=int, default=0,
                    help="time training steps on this many images instead")
    ap.add_argument("--train-boxes", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (training steps only)")
    ap.add_argument("--autocast-bf16", action="store_true",
                    help="inference under torch.autocast('cpu', dtype=torch.bfloat16)")
    ap.add_argument("--profile", action="store_true",
                    help="with --train: after the timed steps, one more under torch.profiler, "
                         "the ops and the GEMM-type share on stderr")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    model = SamUnet().eval()
    for p in model.image_encoder.parameters():
        p.requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ok = total == 138_428_204 and trainable == 51_755_564
    print(f"parameters: total {total:,} trainable {trainable:,} "
          f"({'matches' if ok else 'DOES NOT match'} 138,428,204 / 51,755,564)", file=sys.stderr)

    if a.profile and not a.train:
        ap.error("--profile profiles a training step: give --train N")
    if a.train:
        return bench_train(a, model)

    s = a.image_size
    img = synthetic_image(s)
    for n in (int(b) for b in a.boxes.split(",")):
        boxes = torch.tensor([[20.0 + (i * 7 % 50), 30.0 + (i * 7 % 50),
                               s / 2 + (i * 7 % 50), s / 2 + 10.0 + (i * 7 % 50)] for i in range(n)])
        enc, dec, tot = [], [], []
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if a.autocast_bf16
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            for run in range(a.runs + 1):
                t0 = time.perf_counter()
                x, nh, nw = preprocess(img)
                emb, ms = model.encode(x)
                t1 = time.perf_counter()
                b256 = boxes * torch.tensor([nw / s, nh / s, nw / s, nh / s])
                logits = model.decode(emb, ms, b256).float()
                masks = postprocess(logits, nh, nw, s, s)
                t2 = time.perf_counter()
                assert masks.shape == (n, 1, s, s)
                if run > 0:
                    enc.append((t1 - t0) * 1e3)
                    dec.append((t2 - t1) * 1e3)
                    tot.append((t2 - t0) * 1e3)
        d = statistics.median(dec)
        print(json.dumps({
            "impl": "pytorch-eager", "torch_version": torch.__version__,
            "dtype": "autocast-bf16" if a.autocast_bf16 else "f32",
            "threads": torch.get_num_threads(), "image": f"{s}x{s}", "boxes": n, "runs": a.runs,
            "image_side_ms": round(statistics.median(enc), 2),
            "decoder_ms": round(d, 2),
            "decoder_per_box_ms": round(d / n, 2),
            "total_ms": round(statistics.median(tot), 2),
        }), flush=True)


if __name__ == "__main__":
    main()
