"""3DSAM-adapter (Gong et al., "3DSAM-adapter: Holistic Adaptation of SAM from 2D to 3D for
Promptable Medical Image Segmentation", arXiv 2306.13465; code github.com/med-air/3DSAM-adapter).

SAM's ViT made volumetric, written from the authors' ``modeling/`` and ``test.py``:

- **Encoder** (their ``ImageEncoderViT_3d_v2``): SAM's 2D patch embedding on every slice of the
  input, then a depth-wise 3D convolution (``slice_embed``) merging ``num_slice`` slices into one
  token; SAM's position embedding average-pooled by 2 plus a learned depth embedding; every block
  starts with a spatial adapter (linear down, depth-wise 3x3x3 conv, linear up, residual) and
  attends in (shifted) cubic windows of 8^3 tokens with decomposed 3D relative positions; four
  necks (1x1x1 conv, LayerNorm3d, 3x3x3 conv, LayerNorm3d) after blocks 3, 6, 9 and 12.
- **Prompt encoder** (their ``PromptEncoder`` + ``TwoWayTransformer``): the clicks sample the last
  feature map and its Fourier position encoding (``grid_sample``); learned global queries attend
  with them, and the image tokens attend to the queries. Only the fourth of the four prompt
  encoders in a checkpoint is used (as in their test.py); the other three are kept for the layout.
- **Decoder** (their ``VIT_MLAHead_h``): a multi-layer aggregation head over the four feature maps
  and the crop itself at half resolution, 2 classes.

Token layout inside the model is (batch, H, W, D, channels) as in the authors' code; crops are
(D, H, W) arrays (D = the volume's k axis) and clicks are (d, h, w) voxel indices of the crop.

The authors' checkpoints are ``torch.save`` dicts with ``encoder_dict``, ``decoder_dict`` and
``feature_dict`` (a list of four prompt-encoder state dicts); :func:`load_authors_checkpoint`
loads them strictly, :func:`authors_checkpoint_layout` writes a model in that layout.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import PatchEmbed

from ..errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sam3DAdapterConfig:
    """Sizes of the model; the defaults are the released checkpoints' (SAM ViT-B, 128^3 crops)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    num_slice: int = 16
    pretrain_img_size: int = 1024
    patch_depth: int = 32
    token_grid: int = 32
    window: int = 8
    rel_pos_local: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    out_chans: int = 256
    decoder_channels: int = 128
    num_classes: int = 2
    prompt_depth: int = 2
    prompt_mlp_dim: int = 2048
    prompt_heads: int = 8
    global_queries: int = 10
    crop_size: int = 128

    @property
    def feature_taps(self) -> tuple[int, ...]:
        """Blocks (1-based) after which a neck reads the tokens: every third, the last one too."""
        return tuple(i for i in range(3, self.depth + 1, 3))

    @property
    def encoder_input(self) -> tuple[int, int]:
        """(in-plane size, number of slices) the encoder is fed: the crop is resized to it."""
        return self.token_grid * self.patch_size, self.token_grid * self.num_slice

    @property
    def decoder_grid(self) -> int:
        return 2 * self.token_grid


# --- encoder ---------------------------------------------------------------------------------


class SpatialAdapter(nn.Module):
    """Linear down, ReLU, depth-wise 3x3x3 conv, ReLU, linear up, ReLU, plus the input."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.conv = nn.Conv3d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, H, W, D, C)
        hidden = F.relu(self.linear1(tokens))
        hidden = F.relu(self.conv(hidden.permute(0, 4, 1, 2, 3))).permute(0, 2, 3, 4, 1)
        return tokens + F.relu(self.linear2(hidden))


class LayerNorm3d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W, D) map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight.view(1, -1, 1, 1, 1) * x + self.bias.view(1, -1, 1, 1, 1)


def _relative_table(size: int, table: torch.Tensor) -> torch.Tensor:
    """(size, size, C) embeddings of the offsets q - k, the table resized linearly to 2*size-1."""
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(table.T.unsqueeze(0), size=length, mode="linear").squeeze(0).T
    offsets = torch.arange(size)[:, None] - torch.arange(size)[None, :] + (size - 1)
    return table[offsets]


class WindowAttention3d(nn.Module):
    """Multi-head attention in cubic windows with decomposed (h, w, d) relative positions."""

    def __init__(self, dim: int, num_heads: int, rel_pos_size: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        table = 2 * rel_pos_size - 1
        self.rel_pos_h = nn.Parameter(torch.zeros(table, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(table, head_dim))
        self.rel_pos_d = nn.Parameter(torch.zeros(table, head_dim))
        self.lr = nn.Parameter(torch.tensor(1.0))

    def forward(self, windows: torch.Tensor, shift_mask: torch.Tensor | None, chunk: int = 8) -> torch.Tensor:
        """Attention within each window, ``chunk`` windows at a time (bounded memory, same result)."""
        n_win = windows.shape[0]
        parts = []
        for start in range(0, n_win, chunk):
            index = torch.arange(start, min(start + chunk, n_win), device=windows.device)
            mask = None if shift_mask is None else shift_mask[index % shift_mask.shape[0]]
            parts.append(self._attend(windows[start:start + chunk], mask))
        return torch.cat(parts)

    def _attend(self, windows: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        n_win, h, w, d, channels = windows.shape
        n = h * w * d
        qkv = self.qkv(windows).reshape(n_win, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (n_win, heads, n, head_dim)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        grid_q = q.reshape(n_win, self.num_heads, h, w, d, -1)
        rel_h = torch.einsum("bnhwdc,hkc->bnhwdk", grid_q, _relative_table(h, self.rel_pos_h))
        rel_w = torch.einsum("bnhwdc,wkc->bnhwdk", grid_q, _relative_table(w, self.rel_pos_w))
        rel_d = torch.einsum("bnhwdc,dkc->bnhwdk", grid_q, _relative_table(d, self.rel_pos_d))
        bias = (
            rel_h[..., :, None, None] + rel_w[..., None, :, None] + rel_d[..., None, None, :]
        ).reshape(n_win, self.num_heads, n, n)
        logits = logits + self.lr * bias
        if shift_mask is not None:  # (n_win, n, n): the mask of each window
            logits = logits + shift_mask[:, None]
        out = logits.softmax(-1) @ v  # (n_win, heads, n, head_dim)
        out = out.permute(0, 2, 1, 3).reshape(n_win, h, w, d, channels)
        return self.proj(out)


def _to_windows(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    b, h, w, d, c = x.shape
    pads = [(size - s % size) % size for s in (h, w, d)]
    if any(pads):
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    hp, wp, dp = h + pads[0], w + pads[1], d + pads[2]
    x = x.view(b, hp // size, size, wp // size, size, dp // size, size, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, size, size, size, c), (hp, wp, dp)


def _from_windows(windows: torch.Tensor, size: int, padded: tuple[int, int, int],
                  shape: tuple[int, int, int]) -> torch.Tensor:
    hp, wp, dp = padded
    b = windows.shape[0] // ((hp // size) * (wp // size) * (dp // size))
    x = windows.view(b, hp // size, wp // size, dp // size, size, size, size, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, hp, wp, dp, -1)
    h, w, d = shape
    return x[:, :h, :w, :d].contiguous()


def _shift_mask(grid: int, window: int, shift: int) -> torch.Tensor:
    """The Swin mask (-100 between regions that the cyclic shift brought together) for a grid^3."""
    regions = torch.zeros(1, grid, grid, grid, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for bh in bands:
        for bw in bands:
            for bd in bands:
                regions[:, bh, bw, bd, :] = label
                label += 1
    labels = _to_windows(regions, window)[0].reshape(-1, window ** 3)
    differ = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(differ.shape).masked_fill(differ, -100.0)


class AdapterBlock3d(nn.Module):
    """Spatial adapter, then SAM's pre-norm attention (windowed, maybe shifted) and MLP."""

    def __init__(self, cfg: Sam3DAdapterConfig, index: int):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        rel_size = cfg.pretrain_img_size // cfg.patch_size if index in cfg.global_attn_indexes else cfg.rel_pos_local
        self.attn = WindowAttention3d(dim, cfg.num_heads, rel_size)
        self.window = cfg.window
        self.shift = cfg.window // 2 if index % 2 == 0 else 0
        mask = _shift_mask(cfg.token_grid, cfg.window, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * cfg.mlp_ratio), act=nn.GELU)
        self.adapter = SpatialAdapter(dim, dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adapter(x)
        h, w, d = x.shape[1:4]
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift,) * 3, dims=(1, 2, 3))
        windows, padded = _to_windows(y, self.window)
        y = _from_windows(self.attn(windows, self.attn_mask), self.window, padded, (h, w, d))
        if self.shift:
            y = torch.roll(y, shifts=(self.shift,) * 3, dims=(1, 2, 3))
        x = x + y
        return x + self.mlp(self.norm2(x))


class VolumeEncoder(nn.Module):
    """The volumetric ViT; attribute names follow the authors' ``encoder_dict``."""

    def __init__(self, cfg: Sam3DAdapterConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(kernel_size=(cfg.patch_size,) * 2, stride=(cfg.patch_size,) * 2,
                                      in_chans=3, embed_dim=dim)
        self.slice_embed = nn.Conv3d(dim, dim, kernel_size=(1, 1, cfg.num_slice),
                                     stride=(1, 1, cfg.num_slice), groups=dim)
        grid = cfg.pretrain_img_size // cfg.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dim))
        self.depth_embed = nn.Parameter(torch.ones(1, cfg.patch_depth, dim))
        self.blocks = nn.ModuleList(AdapterBlock3d(cfg, i) for i in range(cfg.depth))
        self.neck_3d = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(dim, cfg.out_chans, 1, bias=False),
                LayerNorm3d(cfg.out_chans),
                nn.Conv3d(cfg.out_chans, cfg.out_chans, 3, padding=1, bias=False),
                LayerNorm3d(cfg.out_chans),
            )
            for _ in cfg.feature_taps
        )

    def forward(self, slices: torch.Tensor) -> list[torch.Tensor]:
        """(D, 3, H, W) slices -> the neck outputs, each (1, out_chans, h, w, d), shallow first."""
        group = self.cfg.num_slice  # the slice embedding merges each run of num_slice slices alone
        tokens = torch.cat([
            self.slice_embed(self.patch_embed(slices[i:i + group]).permute(3, 1, 2, 0).unsqueeze(0))
            for i in range(0, slices.shape[0], group)
        ], dim=-1).permute(0, 2, 3, 4, 1)  # (1, h, w, d, C)
        pos = F.avg_pool2d(self.pos_embed.permute(0, 3, 1, 2), kernel_size=2).permute(0, 2, 3, 1)
        tokens = tokens + pos[:, :, :, None, :] + self.depth_embed[:, None, None, :, :]
        features = []
        taps = self.cfg.feature_taps
        for number, block in enumerate(self.blocks, start=1):
            tokens = block(tokens)
            if number in taps:
                features.append(self.neck_3d[taps.index(number)](tokens.permute(0, 4, 1, 2, 3)))
        return features


# --- prompt encoder --------------------------------------------------------------------------


class _Attention(nn.Module):
    """SAM's attention with projections to ``dim // downsample`` channels."""

    def __init__(self, dim: int, num_heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        out = (weights @ v).transpose(1, 2)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


class PointQueryBlock(nn.Module):
    """Global queries + click tokens attend to each other; the image tokens attend to the queries.

    ``cross_attn_token_to_image`` exists in the authors' block (and their checkpoints) but their
    forward never calls it; it is kept for the layout.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, n_queries: int):
        super().__init__()
        self.n_queries = n_queries
        self.self_attn = _Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = _Attention(dim, num_heads, downsample=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = _Attention(dim, num_heads, downsample=2)
        self.global_query = nn.Parameter(0.1 * torch.randn(1, n_queries, dim))

    def forward(self, image: torch.Tensor, clicks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.cat([self.global_query, clicks], dim=1)
        tokens = self.norm2(tokens + self.norm1(self.self_attn(tokens, tokens, tokens)))
        queries, clicks = tokens[:, :self.n_queries], tokens[:, self.n_queries:]
        queries = self.norm3(queries + self.mlp(queries))
        image = self.norm4(image + self.cross_attn_image_to_token(image, queries, queries))
        return image, clicks


class _PointTransformer(nn.Module):
    def __init__(self, cfg: Sam3DAdapterConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            PointQueryBlock(cfg.out_chans, cfg.prompt_heads, cfg.prompt_mlp_dim, cfg.global_queries)
            for _ in range(cfg.prompt_depth)
        )


class ClickEncoder(nn.Module):
    """The authors' prompt encoder: clicks read the feature map where they are."""

    def __init__(self, cfg: Sam3DAdapterConfig):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, cfg.out_chans // 2))
        self.transformer = _PointTransformer(cfg)

    def _fourier(self, unit_coords: torch.Tensor) -> torch.Tensor:
        # 2 * pi * 3/2 as in the authors' _pe_encoding
        angles = (2 * unit_coords - 1) @ self.positional_encoding_gaussian_matrix * (3 * math.pi)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def grid_encoding(self, shape: tuple[int, int, int], device) -> torch.Tensor:
        """(1, C, h, w, d) encoding of the token centres; coordinates stacked as (w, h, d)."""
        h, w, d = shape
        axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n for n in (h, w, d)]
        hh, ww, dd = torch.meshgrid(*axes, indexing="ij")
        return self._fourier(torch.stack([ww, hh, dd], dim=-1)).permute(3, 0, 1, 2).unsqueeze(0)

    def forward(self, features: torch.Tensor, clicks_dhw: torch.Tensor, crop: int) -> torch.Tensor:
        """``features`` (1, C, h, w, d); ``clicks_dhw`` (N, 3) crop voxel indices -> new features."""
        shape = tuple(features.shape[2:])
        # the authors compute grid and click encodings here but no layer reads them: skipped
        # grid_sample's (x, y, z) index the map's last, middle, first axes: (d, w, h)
        d, h, w = clicks_dhw.unbind(-1)
        grid = torch.stack([d, w, h], dim=-1).float()
        grid = ((grid + 0.5) * 2 / crop - 1).reshape(1, 1, 1, -1, 3)
        clicks = F.grid_sample(features, grid, align_corners=False).reshape(1, features.shape[1], -1)
        image = features.flatten(2).transpose(1, 2)
        clicks = clicks.transpose(1, 2)
        for layer in self.transformer.layers:
            image, clicks = layer(image, clicks)
        return image.transpose(1, 2).reshape(1, -1, *shape)


# --- decoder ---------------------------------------------------------------------------------


def _conv_stage(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout), nn.ReLU()]


class _Heads(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        for name in ("head2", "head3", "head4", "head5"):
            setattr(self, name, nn.Sequential(*_conv_stage(cin, cout), *_conv_stage(cout, cout)))


class MultiScaleDecoder(nn.Module):
    """The authors' ``VIT_MLAHead_h``: four conv heads, upsampled and concatenated with the
    half-resolution crop, two convs to class logits, upsampled to the crop."""

    def __init__(self, cfg: Sam3DAdapterConfig):
        super().__init__()
        c = cfg.decoder_channels
        self.mlahead = _Heads(cfg.out_chans, c)
        self.cls = nn.Sequential(*_conv_stage(4 * c + 1, c), nn.Conv3d(c, cfg.num_classes, 3, padding=1, bias=False))

    def forward(self, features: list[torch.Tensor], small_image: torch.Tensor, up1: float, up2: float) -> torch.Tensor:
        heads = (self.mlahead.head2, self.mlahead.head3, self.mlahead.head4, self.mlahead.head5)
        maps = [F.interpolate(head(f), scale_factor=up1, mode="trilinear", align_corners=True)
                for head, f in zip(heads, features)]
        logits = self.cls(torch.cat([*maps, small_image], dim=1))
        return F.interpolate(logits, scale_factor=up2, mode="trilinear", align_corners=True)


# --- the whole model -------------------------------------------------------------------------


class Sam3DAdapter(nn.Module):
    """Encoder, the four prompt encoders of the checkpoint layout, decoder."""

    def __init__(self, cfg: Sam3DAdapterConfig | None = None):
        super().__init__()
        self.cfg = cfg or Sam3DAdapterConfig()
        if len(self.cfg.feature_taps) != 4:
            raise ValueError("3DSAM-adapter reads four feature maps: the encoder depth must be 12 (or 12..14).")
        self.encoder = VolumeEncoder(self.cfg)
        self.prompt_encoders = nn.ModuleList(ClickEncoder(self.cfg) for _ in range(4))
        self.decoder = MultiScaleDecoder(self.cfg)

    def forward(self, crop: torch.Tensor, clicks_dhw: torch.Tensor) -> torch.Tensor:
        """``crop`` (3, S, S, S) normalised (D, H, W), three equal channels, S = crop_size; ``clicks_dhw`` (N, 3)
        -> class logits (1, num_classes, S, S, S) in (D, H, W) order."""
        features = self.encode(crop)
        return self.decode(crop, features, clicks_dhw)

    def encode(self, crop: torch.Tensor) -> list[torch.Tensor]:
        cfg = self.cfg
        size = crop.shape[-1]
        side, depth = cfg.encoder_input
        # the 3 channels are copies of one image: resize one, then expand (a third of the memory)
        big = F.interpolate(crop[None, :1].float(), scale_factor=side / size, mode="trilinear")
        if big.shape[2] != depth:
            raise ValueError(f"Crop of {size} voxels does not give {depth} encoder slices.")
        return self.encoder(big[0].transpose(0, 1).expand(-1, 3, -1, -1))

    def decode(self, crop: torch.Tensor, features: list[torch.Tensor], clicks_dhw: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        size = crop.shape[-1]
        last = self.prompt_encoders[3](features[3], clicks_dhw, size)
        small = F.interpolate(crop[0].permute(1, 2, 0)[None, None].float(),
                              scale_factor=cfg.decoder_grid / size, mode="trilinear")
        logits = self.decoder([*features[:3], last], small, 2, size // cfg.decoder_grid)
        return logits.permute(0, 1, 4, 2, 3)


# --- parameters the adapter setting trains ----------------------------------------------------


def mark_trainable(model: Sam3DAdapter) -> None:
    """requires_grad as in the authors' train.py: SAM's ViT frozen (patch and position embedding,
    attention, MLP, in-plane relative positions) except its LayerNorms; trained: the slice and
    depth embeddings, the adapters, the depth relative positions, the necks, the prompt encoders
    and the decoder."""
    enc = model.encoder
    for p in enc.parameters():
        p.requires_grad = False
    enc.depth_embed.requires_grad = True
    for p in enc.slice_embed.parameters():
        p.requires_grad = True
    for block in enc.blocks:
        for part in (block.norm1, block.adapter, block.norm2):
            for p in part.parameters():
                p.requires_grad = True
        block.attn.rel_pos_d.requires_grad = True  # train.py re-creates rel_pos_d as a trainable Parameter
    for neck in enc.neck_3d:
        for p in neck.parameters():
            p.requires_grad = True
    for p in [*model.prompt_encoders.parameters(), *model.decoder.parameters()]:
        p.requires_grad = True


def trainable_parameters(model: Sam3DAdapter, used_only: bool = False) -> int:
    """Number of trainable parameters after :func:`mark_trainable`; ``used_only`` leaves out the
    three prompt encoders and the block parts that inference never calls."""
    mark_trainable(model)
    skip: set[int] = set()
    if used_only:
        for encoder in list(model.prompt_encoders)[:3]:
            skip.update(id(p) for p in encoder.parameters())
        for layer in model.prompt_encoders[3].transformer.layers:
            skip.update(id(p) for p in layer.cross_attn_token_to_image.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in skip)


# --- the authors' checkpoint layout -----------------------------------------------------------


def authors_checkpoint_layout(model: Sam3DAdapter) -> dict[str, Any]:
    """The model as the authors' train.py saves it (their optimizer states left out)."""
    return {
        "encoder_dict": model.encoder.state_dict(),
        "decoder_dict": model.decoder.state_dict(),
        "feature_dict": [encoder.state_dict() for encoder in model.prompt_encoders],
    }


def is_authors_checkpoint(state: Any) -> bool:
    return isinstance(state, dict) and {"encoder_dict", "decoder_dict", "feature_dict"} <= set(state)


def load_authors_checkpoint(model: Sam3DAdapter, state: dict[str, Any]) -> Sam3DAdapter:
    """Load a checkpoint in the authors' layout strictly (every tensor, no extra one)."""
    if not is_authors_checkpoint(state):
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            "Not a 3DSAM-adapter checkpoint: it needs encoder_dict, decoder_dict and feature_dict "
            f"(the authors' last.pth.tar / best.pth.tar); found {keys}."
        )
    prompts = state["feature_dict"]
    if len(prompts) != 4:
        raise CheckpointError(f"A 3DSAM-adapter checkpoint holds 4 prompt encoders; this one holds {len(prompts)}.")
    try:
        model.encoder.load_state_dict(state["encoder_dict"], strict=True)
        model.decoder.load_state_dict(state["decoder_dict"], strict=True)
        for encoder, part in zip(model.prompt_encoders, prompts):
            encoder.load_state_dict(part, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"The 3DSAM-adapter checkpoint does not fit the model: {exc}") from exc
    return model


def load_authors_file(path: str | Path, cfg: Sam3DAdapterConfig | None = None) -> Sam3DAdapter:
    """Build the model and load the authors' ``.pth.tar`` from a local file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"3DSAM-adapter checkpoint {path} is not there. The authors share last.pth.tar per dataset "
            "on OneDrive (see docs/volumetric.md); download it by hand and give its path."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise CheckpointError(f"Could not read {path} as a torch checkpoint: {exc}") from exc
    model = load_authors_checkpoint(Sam3DAdapter(cfg), state)
    log.info("Loaded 3DSAM-adapter checkpoint %s", path)
    return model.eval()


# --- the authors' intensity handling (dataset/datasets.py, split "test") ----------------------


@dataclass(frozen=True)
class DatasetIntensity:
    """Clip to [low, high] HU, then (x - mean) / std; all resampled to 1 mm first."""

    low: float
    high: float
    mean: float
    std: float
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)


DATASET_INTENSITY: dict[str, DatasetIntensity] = {
    "kits": DatasetIntensity(-54, 247, 59.53867, 55.457336),
    "lits": DatasetIntensity(-48, 163, 60.057533, 40.198017),
    "pancreas": DatasetIntensity(-39, 204, 68.45214, 63.422806),
    "colon": DatasetIntensity(-57, 175, 65.175035, 32.651197),
}


# --- the released checkpoints -----------------------------------------------------------------

AUTHORS_CHECKPOINT_PAGE = (
    "https://mycuhk-my.sharepoint.com/:f:/g/personal/1155187960_link_cuhk_edu_hk/"
    "EgSZwTonMG1Cl_PA7wTP5zgBe-DU4K5rb0woDt3i8U22SA?e=0jmfkq"
)
"""The authors' OneDrive folder (README "Our pretrained checkpoint can be downloaded through
OneDrive"); a page to visit, no direct file URL. Sizes and checksums are not published."""


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """One of the four checkpoints the authors share (one per dataset, each a last.pth.tar)."""

    name: str
    dataset: str
    target: str


RELEASED_CHECKPOINTS: dict[str, ReleasedCheckpoint] = {
    c.name: c for c in (
        ReleasedCheckpoint("3dsam_adapter_kits", "kits", "kidney tumour (KiTS 2021), CT"),
        ReleasedCheckpoint("3dsam_adapter_lits", "lits", "liver tumour (LiTS 2017), CT"),
        ReleasedCheckpoint("3dsam_adapter_pancreas", "pancreas", "pancreas tumour (MSD Task07), CT"),
        ReleasedCheckpoint("3dsam_adapter_colon", "colon", "colon cancer (MSD Task10), CT"),
    )
}
