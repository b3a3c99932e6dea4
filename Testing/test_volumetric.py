"""3DSAM-adapter (volumetric engine): parity with the authors' code, their checkpoint layout,
the trainable-parameter count, and the session.

The REFERENCE below is a transcription of the authors' code (github.com/med-air/3DSAM-adapter,
commit f4fb8f3: 3DSAM-adapter/modeling/image_encoder.py ``ImageEncoderViT_3d_v2`` / ``Block_3d`` /
``Attention_3d``, modeling/prompt_encoder.py ``PromptEncoder`` / ``TwoWayTransformer``,
modeling/mask_decoder.py ``VIT_MLAHead_h``, and ``model_predict`` plus the crop of test.py),
written here from reading it; only the hard-coded 768 neck input became ``embed_dim``. It runs
on the same random weights as our model, in a small configuration (TEST-ONLY): width 32, 2 heads,
the full 12 blocks and 32^3 token grid (their shifted-window mask is built for 32^3), patch 2 x 2
and 2 slices per token so that a 64^3 crop feeds the encoder.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import PatchEmbed

from SAM3DSegmentLib.data.prompts import Box, Point, SlicePrompt
from SAM3DSegmentLib.data.volume import Volume
from SAM3DSegmentLib.engines.session import PropagationOptions
from SAM3DSegmentLib.engines.volumetric import (
    VolumetricOptions,
    VolumetricSession,
    cut_crop,
    normalise,
    plan_crop,
    resample_to_spacing,
)
from SAM3DSegmentLib.errors import CheckpointError, InputError, PromptError, PropagationCancelled
from SAM3DSegmentLib.models.sam3d_adapter import (
    DATASET_INTENSITY,
    Sam3DAdapter,
    Sam3DAdapterConfig,
    authors_checkpoint_layout,
    load_authors_checkpoint,
    load_authors_file,
    trainable_parameters,
)

torch.set_num_threads(1)

TINY = Sam3DAdapterConfig(  # TEST-ONLY small configuration (see module docstring)
    embed_dim=32, num_heads=2, patch_size=2, num_slice=2, pretrain_img_size=128, out_chans=16,
    decoder_channels=8, prompt_mlp_dim=32, prompt_heads=2, crop_size=64,
)


# ============================ REFERENCE (the authors' code, transcribed) ============================


class RefAdapter(nn.Module):
    def __init__(self, input_dim, mid_dim):
        super().__init__()
        self.linear1 = nn.Linear(input_dim, mid_dim)
        self.conv = nn.Conv3d(mid_dim, mid_dim, kernel_size=3, padding=1, groups=mid_dim)
        self.linear2 = nn.Linear(mid_dim, input_dim)

    def forward(self, features):
        out = F.relu(self.linear1(features))
        out = out.permute(0, 4, 1, 2, 3)
        out = self.conv(out)
        out = out.permute(0, 2, 3, 4, 1)
        out = F.relu(out)
        out = F.relu(self.linear2(out))
        return features + out


class RefLayerNorm3d(nn.Module):
    def __init__(self, num_channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


def ref_window_partition(x, window_size):
    B, H, W, D, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    pad_d = (window_size - D % window_size) % window_size
    if pad_h > 0 or pad_w > 0 or pad_d > 0:
        x = F.pad(x, (0, 0, 0, pad_d, 0, pad_w, 0, pad_h))
    Hp, Wp, Dp = H + pad_h, W + pad_w, D + pad_d
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, Dp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).contiguous().view(-1, window_size, window_size, window_size, C)
    return windows, (Hp, Wp, Dp)


def ref_window_unpartition(windows, window_size, pad_hw, hw):
    Hp, Wp, Dp = pad_hw
    H, W, D = hw
    B = windows.shape[0] // (Hp * Wp * Dp // window_size // window_size // window_size)
    x = windows.view(B, Hp // window_size, Wp // window_size, Dp // window_size, window_size, window_size,
                     window_size, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).contiguous().view(B, Hp, Wp, Dp, -1)
    if Hp > H or Wp > W or Dp > D:
        x = x[:, :H, :W, :D, :].contiguous()
    return x


def ref_get_rel_pos(q_size, k_size, rel_pos):
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos_resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
                                        size=max_rel_dist, mode="linear")
        rel_pos_resized = rel_pos_resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        rel_pos_resized = rel_pos
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos_resized[relative_coords.long()]


def ref_add_decomposed_rel_pos(attn, q, rel_pos_h, rel_pos_w, rel_pos_d, q_size, k_size, lr):
    q_h, q_w, q_d = q_size
    k_h, k_w, k_d = k_size
    Rh = ref_get_rel_pos(q_h, k_h, rel_pos_h)
    Rw = ref_get_rel_pos(q_w, k_w, rel_pos_w)
    Rd = ref_get_rel_pos(q_d, k_d, rel_pos_d)
    B, _, dim = q.shape
    r_q = q.reshape(B, q_h, q_w, q_d, dim)
    rel_h = torch.einsum("bhwdc,hkc->bhwdk", r_q, Rh)
    rel_w = torch.einsum("bhwdc,wkc->bhwdk", r_q, Rw)
    rel_d = torch.einsum("bhwdc,dkc->bhwdk", r_q, Rd)
    attn = (
        attn.view(B, q_h, q_w, q_d, k_h, k_w, k_d)
        + lr * rel_h[:, :, :, :, :, None, None]
        + lr * rel_w[:, :, :, :, None, :, None]
        + lr * rel_d[:, :, :, :, None, None, :]
    ).view(B, q_h * q_w * q_d, k_h * k_w * k_d)
    return attn


class RefAttention3d(nn.Module):
    def __init__(self, dim, num_heads, res_size):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * res_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * res_size[1] - 1, head_dim))
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * res_size[2] - 1, head_dim))
        self.lr = nn.Parameter(torch.tensor(1.))

    def forward(self, x, mask=None):
        B, H, W, D, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W * D, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q_sub = q.reshape(B * self.num_heads, H * W * D, -1)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = ref_add_decomposed_rel_pos(attn, q_sub, self.rel_pos_h, self.rel_pos_w, self.rel_pos_d,
                                          (H, W, D), (H, W, D), self.lr)
        attn = attn.reshape(B, self.num_heads, H * W * D, -1)
        if mask is None:
            attn = attn.softmax(dim=-1)
        else:
            nW = mask.shape[0]
            attn = attn.view(B // nW, nW, self.num_heads, H * W * D, H * W * D) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, H * W * D, H * W * D)
            attn = attn.softmax(dim=-1)
        x = (attn @ v).view(B, self.num_heads, H, W, D, -1).permute(0, 2, 3, 4, 1, 5).reshape(B, H, W, D, -1)
        return self.proj(x)


class RefBlock3d(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, norm_layer, window_size, res_size, shift):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = RefAttention3d(dim, num_heads=num_heads, res_size=(res_size, res_size, res_size))
        self.shift_size = shift
        if self.shift_size > 0:
            H, W, D = 32, 32, 32
            img_mask = torch.zeros((1, H, W, D, 1))
            slices = (slice(0, -window_size), slice(-window_size, -self.shift_size), slice(-self.shift_size, None))
            cnt = 0
            for h in slices:
                for w in slices:
                    for d in slices:
                        img_mask[:, h, w, d, :] = cnt
                        cnt += 1
            mask_windows = ref_window_partition(img_mask, window_size)[0]
            mask_windows = mask_windows.view(-1, window_size * window_size * window_size)
            attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        else:
            attn_mask = None
        self.register_buffer("attn_mask", attn_mask)
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=nn.GELU)
        self.window_size = window_size
        self.adapter = RefAdapter(input_dim=dim, mid_dim=dim // 2)

    def forward(self, x):
        x = self.adapter(x)
        shortcut = x
        x = self.norm1(x)
        H, W, D = x.shape[1], x.shape[2], x.shape[3]
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size, -self.shift_size), dims=(1, 2, 3))
        x, pad_hw = ref_window_partition(x, self.window_size)
        x = self.attn(x, mask=self.attn_mask)
        x = ref_window_unpartition(x, self.window_size, pad_hw, (H, W, D))
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size, self.shift_size), dims=(1, 2, 3))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class RefImageEncoderViT3dV2(nn.Module):
    def __init__(self, img_size, patch_size, patch_depth, embed_dim, depth, num_heads, mlp_ratio, out_chans,
                 norm_layer, window_size, cubic_window_size, global_attn_indexes, num_slice):
        super().__init__()
        self.patch_embed = PatchEmbed(kernel_size=(patch_size, patch_size), stride=(patch_size, patch_size),
                                      in_chans=3, embed_dim=embed_dim)
        self.num_slice = num_slice
        self.slice_embed = nn.Conv3d(embed_dim, embed_dim, kernel_size=(1, 1, num_slice),
                                     stride=(1, 1, num_slice), groups=embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, img_size // patch_size, img_size // patch_size, embed_dim))
        self.depth_embed = nn.Parameter(torch.ones(1, patch_depth, embed_dim))
        self.blocks = nn.ModuleList()
        for i in range(depth):
            self.blocks.append(RefBlock3d(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_layer=norm_layer,
                window_size=cubic_window_size,
                res_size=window_size if i not in global_attn_indexes else img_size // patch_size,
                shift=cubic_window_size // 2 if i % 2 == 0 else 0))
        self.neck_3d = nn.ModuleList()
        for i in range(4):
            self.neck_3d.append(nn.Sequential(
                nn.Conv3d(embed_dim, out_chans, 1, bias=False),  # their code: 768
                RefLayerNorm3d(out_chans),
                nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
                RefLayerNorm3d(out_chans)))

    def forward(self, x):
        with torch.no_grad():
            x = self.patch_embed(x)
        x = self.slice_embed(x.permute(3, 1, 2, 0).unsqueeze(0))
        x = x.permute(0, 2, 3, 4, 1)
        pos_embed = F.avg_pool2d(self.pos_embed.permute(0, 3, 1, 2), kernel_size=2).permute(0, 2, 3, 1).unsqueeze(3)
        pos_embed = pos_embed + (self.depth_embed.unsqueeze(1).unsqueeze(1))
        x = x + pos_embed
        idx = 0
        feature_list = []
        for blk in self.blocks[:6]:
            x = blk(x)
            idx += 1
            if idx % 3 == 0 and idx != 12:
                feature_list.append(self.neck_3d[idx // 3 - 1](x.permute(0, 4, 1, 2, 3)))
        for blk in self.blocks[6:12]:
            x = blk(x)
            idx += 1
            if idx % 3 == 0 and idx != 12:
                feature_list.append(self.neck_3d[idx // 3 - 1](x.permute(0, 4, 1, 2, 3)))
        x = self.neck_3d[-1](x.permute(0, 4, 1, 2, 3))
        return x, feature_list


class RefAttention(nn.Module):
    def __init__(self, embedding_dim, num_heads, downsample_rate=1):
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x, num_heads):
        b, n, c = x.shape
        return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)

    def _recombine_heads(self, x):
        b, n_heads, n_tokens, c_per_head = x.shape
        return x.transpose(1, 2).reshape(b, n_tokens, n_heads * c_per_head)

    def forward(self, q, k, v):
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        _, _, _, c_per_head = q.shape
        attn = q @ k.permute(0, 1, 3, 2)
        attn = attn / math.sqrt(c_per_head)
        attn = torch.softmax(attn, dim=-1)
        return self.out_proj(self._recombine_heads(attn @ v))


class RefTwoWayAttentionBlock(nn.Module):
    def __init__(self, embedding_dim, num_heads, mlp_dim):
        super().__init__()
        self.self_attn = RefAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = RefAttention(embedding_dim, num_heads, downsample_rate=2)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = RefAttention(embedding_dim, num_heads, downsample_rate=2)
        self.global_query = nn.parameter.Parameter(data=0.1 * torch.randn(1, 10, embedding_dim))

    def forward(self, img_embed, point_embed, img_pe, point_pe):
        q = torch.cat([self.global_query, point_embed], dim=1)
        self_out = self.self_attn(q=q, k=q, v=q)
        self_out = self.norm1(self_out)
        queries = q + self_out
        queries = self.norm2(queries)
        point_embed = queries[:, 10:, :]
        queries = queries[:, :10, :]
        mlp_out = self.mlp(queries)
        queries = queries + mlp_out
        queries = self.norm3(queries)
        attn_out = self.cross_attn_image_to_token(q=img_embed, k=queries, v=queries)
        keys = img_embed + attn_out
        keys = self.norm4(keys)
        return keys, point_embed


class RefTwoWayTransformer(nn.Module):
    def __init__(self, depth, embedding_dim, num_heads, mlp_dim):
        super().__init__()
        self.layers = nn.ModuleList(RefTwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim) for _ in range(depth))

    def forward(self, image_embedding, image_pe, point_coord):
        point_embedding = F.grid_sample(image_embedding, point_coord, align_corners=False).squeeze(2).squeeze(2)
        point_pe = F.grid_sample(image_pe, point_coord, align_corners=False).squeeze(2).squeeze(2)
        point_pe = point_pe.permute(0, 2, 1)
        point_embedding = point_embedding.permute(0, 2, 1)
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)
        image_pe = image_pe.flatten(2).permute(0, 2, 1)
        for layer in self.layers:
            image_embedding, point_embedding = layer(image_embedding, point_embedding, image_pe, point_pe)
        return image_embedding


class RefPromptEncoder(nn.Module):
    def __init__(self, transformer, num_pos_feats=128):
        super().__init__()
        self.transformer = transformer
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((3, num_pos_feats)))

    def forward(self, image_embeddings, point_coord, img_size=(512, 512, 32), feat_size=(32, 32, 32)):
        feat_size = list(feat_size)
        image_pe = self.get_img_pe(feat_size, device=image_embeddings.device).detach()
        point_coord[:, :, 0] = (point_coord[:, :, 0] + 0.5) * 2 / img_size[2] - 1
        point_coord[:, :, 1] = (point_coord[:, :, 1] + 0.5) * 2 / img_size[1] - 1
        point_coord[:, :, 2] = (point_coord[:, :, 2] + 0.5) * 2 / img_size[0] - 1
        point_coord = point_coord.reshape(1, 1, 1, -1, 3)
        features = self.transformer(image_embeddings, image_pe, point_coord)
        return features.transpose(1, 2).reshape([1, -1] + feat_size)

    def _pe_encoding(self, coords):
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * np.pi * coords * 3 / 2
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def get_img_pe(self, size, device):
        h, w, d = size
        grid = torch.ones((h, w, d), device=device, dtype=torch.float32)
        y_embed = (grid.cumsum(dim=0) - 0.5) / h
        x_embed = (grid.cumsum(dim=1) - 0.5) / w
        z_embed = (grid.cumsum(dim=2) - 0.5) / d
        pe = self._pe_encoding(torch.stack([x_embed, y_embed, z_embed], dim=-1))
        return pe.permute(3, 0, 1, 2).unsqueeze(0)


class RefMLAHead(nn.Module):
    def __init__(self, mla_channels, mlahead_channels):
        super().__init__()

        def head():
            return nn.Sequential(
                nn.Conv3d(mla_channels, mlahead_channels, 3, padding=1, bias=False),
                nn.InstanceNorm3d(mlahead_channels), nn.ReLU(),
                nn.Conv3d(mlahead_channels, mlahead_channels, 3, padding=1, bias=False),
                nn.InstanceNorm3d(mlahead_channels), nn.ReLU())

        self.head2, self.head3, self.head4, self.head5 = head(), head(), head(), head()

    def forward(self, mla_p2, mla_p3, mla_p4, mla_p5, scale_factor):
        head2 = F.interpolate(self.head2(mla_p2), scale_factor=scale_factor, mode="trilinear", align_corners=True)
        head3 = F.interpolate(self.head3(mla_p3), scale_factor=scale_factor, mode="trilinear", align_corners=True)
        head4 = F.interpolate(self.head4(mla_p4), scale_factor=scale_factor, mode="trilinear", align_corners=True)
        head5 = F.interpolate(self.head5(mla_p5), scale_factor=scale_factor, mode="trilinear", align_corners=True)
        return torch.cat([head2, head3, head4, head5], dim=1)


class RefVITMLAHeadH(nn.Module):
    def __init__(self, mla_channels=256, mlahead_channels=128, num_classes=2):
        super().__init__()
        self.mlahead = RefMLAHead(mla_channels, mlahead_channels)
        self.cls = nn.Sequential(nn.Conv3d(4 * mlahead_channels + 1, mlahead_channels, 3, padding=1, bias=False),
                                 nn.InstanceNorm3d(mlahead_channels), nn.ReLU(),
                                 nn.Conv3d(mlahead_channels, num_classes, 3, padding=1, bias=False))

    def forward(self, inputs, scale_factor1, scale_factor2):
        x = self.mlahead(inputs[0], inputs[1], inputs[2], inputs[3], scale_factor=scale_factor1)
        x = torch.cat([x, inputs[-1]], dim=1)
        x = self.cls(x)
        return F.interpolate(x, scale_factor=scale_factor2, mode="trilinear", align_corners=True)


def ref_build(cfg: Sam3DAdapterConfig):
    """The three parts as the authors' test.py builds them (sizes from ``cfg``)."""
    encoder = RefImageEncoderViT3dV2(
        img_size=cfg.pretrain_img_size, patch_size=cfg.patch_size, patch_depth=cfg.patch_depth,
        embed_dim=cfg.embed_dim, depth=12, num_heads=cfg.num_heads, mlp_ratio=4, out_chans=cfg.out_chans,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), window_size=14, cubic_window_size=8,
        global_attn_indexes=[2, 5, 8, 11], num_slice=cfg.num_slice)
    prompts = [RefPromptEncoder(RefTwoWayTransformer(2, cfg.out_chans, cfg.prompt_heads, cfg.prompt_mlp_dim),
                                num_pos_feats=cfg.out_chans // 2) for _ in range(4)]
    decoder = RefVITMLAHeadH(mla_channels=cfg.out_chans, mlahead_channels=cfg.decoder_channels)
    return encoder, prompts, decoder


def ref_model_predict(img, prompt, img_encoder, prompt_encoder, mask_decoder, patch_size, encoder_side, grid):
    """test.py's model_predict; their literals 512, 64 and 64 are ``encoder_side``, ``2 * grid``."""
    out = F.interpolate(img.float(), scale_factor=encoder_side / patch_size, mode="trilinear")
    input_batch = out[0].transpose(0, 1)
    batch_features, feature_list = img_encoder(input_batch)
    feature_list.append(batch_features)
    points_torch = prompt.transpose(0, 1)
    new_feature = []
    for i, (feature, feature_decoder) in enumerate(zip(feature_list, prompt_encoder)):
        if i == 3:
            new_feature.append(feature_decoder(feature, points_torch.clone(), [patch_size] * 3, [grid] * 3))
        else:
            new_feature.append(feature)
    img_resize = F.interpolate(img[0, 0].permute(1, 2, 0).unsqueeze(0).unsqueeze(0),
                               scale_factor=2 * grid / patch_size, mode="trilinear")
    new_feature.append(img_resize)
    masks = mask_decoder(new_feature, 2, patch_size // (2 * grid))
    return masks.permute(0, 1, 4, 2, 3)


def ref_test_crop(img, prompt, patch_size, n_prompts, rng):
    """test.py's crop around the clicks: returns the padded patch, the points and the box."""
    l = len(torch.where(prompt == 1)[0])
    sample = rng.choice(np.arange(l), n_prompts, replace=True)
    x = torch.where(prompt == 1)[1][sample].unsqueeze(1)
    y = torch.where(prompt == 1)[3][sample].unsqueeze(1)
    z = torch.where(prompt == 1)[2][sample].unsqueeze(1)
    x_m = (torch.max(x) + torch.min(x)) // 2
    y_m = (torch.max(y) + torch.min(y)) // 2
    z_m = (torch.max(z) + torch.min(z)) // 2
    d_min, d_max = x_m - patch_size // 2, x_m + patch_size // 2
    h_min, h_max = z_m - patch_size // 2, z_m + patch_size // 2
    w_min, w_max = y_m - patch_size // 2, y_m + patch_size // 2
    d_l, d_r = max(0, -d_min), max(0, d_max - prompt.shape[1])
    h_l, h_r = max(0, -h_min), max(0, h_max - prompt.shape[2])
    w_l, w_r = max(0, -w_min), max(0, w_max - prompt.shape[3])
    points = torch.cat([x - d_min, y - w_min, z - h_min], dim=1).unsqueeze(1).float()
    d_min, h_min, w_min = max(0, d_min), max(0, h_min), max(0, w_min)
    img_patch = img[:, :, d_min:d_max, h_min:h_max, w_min:w_max].clone()
    img_patch = F.pad(img_patch, (w_l, w_r, h_l, h_r, d_l, d_r))
    clicks_dhw = torch.cat([x, z, y], dim=1)
    return img_patch, points, clicks_dhw


# ====================================== helpers ======================================


def tiny_model(seed=0) -> Sam3DAdapter:
    torch.manual_seed(seed)
    model = Sam3DAdapter(TINY)
    with torch.no_grad():  # random values everywhere (zero-initialised tables would hide errors)
        for name, p in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name or "depth_embed" in name:
                p.normal_(0, 0.5)
            if name.endswith("lr"):
                p.fill_(0.7)
    return model.eval()


def ref_from(model: Sam3DAdapter):
    encoder, prompts, decoder = ref_build(model.cfg)
    layout = authors_checkpoint_layout(model)
    encoder.load_state_dict(layout["encoder_dict"], strict=True)
    decoder.load_state_dict(layout["decoder_dict"], strict=True)
    for p, state in zip(prompts, layout["feature_dict"]):
        p.load_state_dict(state, strict=True)
    return encoder.eval(), [p.eval() for p in prompts], decoder.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reference(model):
    return ref_from(model)


# ====================================== tests ======================================


def test_parity_with_the_authors_pipeline(model, reference):
    """Same weights, same volume, same clicks: test.py's crop + model_predict == ours."""
    encoder, prompts, decoder = reference
    rng = np.random.default_rng(3)
    size = TINY.crop_size
    volume = torch.from_numpy(rng.normal(size=(1, 3, 80, 70, 90)).astype(np.float32))
    volume[:, 1:] = volume[:, :1]  # their 3 channels are copies
    truth = torch.zeros(1, 80, 70, 90)
    truth[0, 60:75, 5:20, 30:50] = 1  # near a border: the crop is padded
    with torch.no_grad():
        patch, points, clicks_dhw = ref_test_crop(volume, truth, size, n_prompts=3, rng=rng)
        expected = ref_model_predict(patch, points, encoder, prompts, decoder, size,
                                     TINY.encoder_input[0], TINY.token_grid)
        plan = plan_crop(clicks_dhw.numpy(), size)
        crop = cut_crop(volume[0, 0], plan)
        assert torch.equal(crop, patch[0, 0])
        ours = model(crop.expand(3, -1, -1, -1), torch.as_tensor(plan.clicks, dtype=torch.float32))
    assert ours.shape == expected.shape == (1, 2, size, size, size)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), (ours - expected).abs().max()
    assert torch.equal(ours.argmax(1), expected.argmax(1))
    assert expected.std() > 0.01  # not a constant output


def test_authors_layout_loads_strictly_both_ways(tmp_path, model):
    path = tmp_path / "last.pth.tar"
    state = authors_checkpoint_layout(model)
    state.update(epoch=3, best_val_loss=0.5, encoder_opt={"state": {}, "param_groups": []})
    torch.save(state, path)
    loaded = load_authors_file(path, TINY)
    assert not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # the authors' modules accept our layout strictly (names and shapes; done in ref_from) and ours theirs
    encoder, prompts, decoder = ref_build(TINY)
    theirs = {"encoder_dict": encoder.state_dict(), "decoder_dict": decoder.state_dict(),
              "feature_dict": [p.state_dict() for p in prompts]}
    load_authors_checkpoint(Sam3DAdapter(TINY), theirs)
    assert any(k.endswith("attn_mask") for k in theirs["encoder_dict"])  # shifted blocks store their mask


def test_wrong_checkpoints_are_refused(tmp_path, model):
    with pytest.raises(CheckpointError, match="Not a 3DSAM-adapter"):
        load_authors_checkpoint(Sam3DAdapter(TINY), {"model": {}})
    state = authors_checkpoint_layout(model)
    state["encoder_dict"] = dict(state["encoder_dict"])
    state["encoder_dict"].pop("depth_embed")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_authors_checkpoint(Sam3DAdapter(TINY), state)
    with pytest.raises(CheckpointError, match="not there"):
        load_authors_file(tmp_path / "missing.pth.tar")


def _ref_trainable(encoder, prompts, decoder) -> int:
    """The authors' train.py requires_grad rule applied to the reference modules."""
    for p in encoder.parameters():
        p.requires_grad = False
    encoder.depth_embed.requires_grad = True
    for p in encoder.slice_embed.parameters():
        p.requires_grad = True
    for blk in encoder.blocks:
        for part in (blk.norm1, blk.adapter, blk.norm2):
            for p in part.parameters():
                p.requires_grad = True
        blk.attn.rel_pos_d.requires_grad = True
    for neck in encoder.neck_3d:
        for p in neck.parameters():
            p.requires_grad = True
    modules = [encoder, *prompts, decoder]
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


def test_trainable_parameters_at_full_size():
    """Full-size model (SAM ViT-B, 128^3 crops) built on the meta device (no memory, no weights).

    Counted with the authors' train.py rule (ViT frozen except LayerNorms; slice/depth embedding,
    adapters, depth relative positions, necks, the four prompt encoders and the decoder trained).
    The paper's own figure could not be read in this environment (no access to arXiv 2306.13465's
    tables); see docs/volumetric.md. What is pinned here: our count equals the count of the
    authors' modules under their rule, and the value.
    """
    with torch.device("meta"):
        ours = Sam3DAdapter()
        reference = ref_build(Sam3DAdapterConfig())
    total = trainable_parameters(ours)
    assert total == _ref_trainable(*reference)
    assert total == 34_954_880
    assert trainable_parameters(ours, used_only=True) == 25_198_976  # the parts inference calls
    frozen = sum(p.numel() for p in ours.parameters() if not p.requires_grad)
    assert 80e6 < frozen < 95e6  # SAM ViT-B's encoder (about 86M) minus its LayerNorms


# ------------------------------------ the session ------------------------------------


def _ball_volume(shape=(40, 48, 44), spacing=(2.0, 1.5, 1.5)) -> Volume:
    k, j, i = np.indices(shape)
    ball = ((k - 20) * spacing[0]) ** 2 + ((j - 24) * spacing[1]) ** 2 + ((i - 20) * spacing[2]) ** 2 < 12 ** 2
    array = np.where(ball, 120.0, -20.0) + np.random.default_rng(0).normal(0, 5, shape)
    ijk_to_ras = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    return Volume(array=array.astype(np.float32), ijk_to_ras=ijk_to_ras, name="ball", modality="CT")


def test_session_click_gives_the_pipeline_result(model):
    volume = _ball_volume()
    session = VolumetricSession(volume, model, axis=0, options=VolumetricOptions(dataset="kits"))
    preview = session.add_prompt(1, SlicePrompt(axis=0, index=20, points=(Point(24, 20),)))
    steps = []
    result = session.propagate(1, progress=lambda d, t, i: steps.append((d, t)))
    assert result.engine == "volumetric" and result.mask.shape == volume.shape
    assert np.array_equal(result.mask[20], preview.mask)
    assert result.slices_encoded == 0  # the preview already ran the model; nothing changed since
    assert steps[-1][0] == steps[-1][1]

    # the same steps by hand, as the authors' dataset code and test.py do them
    intensity = DATASET_INTENSITY["kits"]
    image = normalise(resample_to_spacing(volume.array, volume.spacing_kji), intensity)
    expected_image = torch.from_numpy(np.clip(F.interpolate(
        torch.from_numpy(volume.array)[None, None], scale_factor=(2.0, 1.5, 1.5), mode="trilinear")[0, 0].numpy(),
        -54, 247))
    assert torch.allclose(image, (expected_image - intensity.mean) / intensity.std)
    click = session.to_resampled(np.array([[20, 24, 20]]))
    plan = plan_crop(click, TINY.crop_size)
    with torch.no_grad():
        logits = model(cut_crop(image, plan).expand(3, -1, -1, -1), torch.as_tensor(plan.clicks).float())
    full = torch.zeros(image.shape)
    lo = [max(s, 0) for s in plan.start]
    hi = [min(s + TINY.crop_size, n) for s, n in zip(plan.start, image.shape)]
    full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = torch.softmax(logits, 1)[0, 1][
        lo[0] - plan.start[0]:hi[0] - plan.start[0], lo[1] - plan.start[1]:hi[1] - plan.start[1],
        lo[2] - plan.start[2]:hi[2] - plan.start[2]]
    expected = F.interpolate(full[None, None], size=volume.shape, mode="trilinear")[0, 0].numpy() > 0.5
    assert np.array_equal(result.mask, expected)


def test_session_more_clicks_refine_and_cancel_keeps_result(model):
    volume = _ball_volume()
    session = VolumetricSession(volume, model, axis=0)
    session.add_prompt(1, SlicePrompt(axis=0, index=20, points=(Point(24, 20),)))
    first = session.propagate(1).mask.copy()
    session.add_prompt(1, SlicePrompt(axis=0, index=14, points=(Point(20, 26),)))
    clicks = session.clicks_kji(session.anchors(1))
    assert clicks.shape == (2, 3)
    with pytest.raises(PropagationCancelled):
        session.propagate(1, cancel=lambda: True)
    assert np.array_equal(session.mask(1), first)  # cancelled: previous result kept
    second = session.propagate(1)
    assert second.mask.shape == volume.shape and second.slices_encoded == 0  # the preview ran it
    ranged = session.propagate(1, PropagationOptions(slice_range=(15, 25)))  # cached: no new run
    assert ranged.slices_encoded == 0
    assert not ranged.mask[:15].any() and not ranged.mask[26:].any()
    assert np.array_equal(ranged.mask[15:26], second.mask[15:26])
    # a slice mask replaces that slice of the result
    edited = np.zeros(volume.shape[1:], dtype=bool)
    edited[10:14, 10:14] = True
    session.set_slice_mask(1, 5, edited)
    third = session.propagate(1)
    assert np.array_equal(third.mask[5], edited)
    session.close()


def test_session_refuses_what_the_model_cannot_take(model):
    session = VolumetricSession(_ball_volume(), model)
    with pytest.raises(PromptError, match="exclude"):
        session.add_prompt(1, SlicePrompt(axis=0, index=20, points=(Point(24, 20), Point(5, 5, positive=False))))
    with pytest.raises(PromptError, match="boxes"):
        session.add_prompt(1, SlicePrompt(axis=0, index=20, box=Box(10, 10, 30, 30)))
    with pytest.raises(InputError, match="dataset"):
        VolumetricOptions(dataset="brats")
