"""The conditioned NeRF field: a torch MLP from (3D point, identity latent) to (density, colour).

Contract (other modules code against this):

    field = ConditionedField(FieldConfig.cpu(), latent_dim=64)
    sigma, rgb = field(points, latents)
    # points (N, 3), latents (N, L) -> sigma (N,) >= 0, rgb (N, 3) in (0, 1)
    sigma, rgb = field(points, ray_latents)
    # points (R, S, 3), ray_latents (R, L) -> sigma (R, S), rgb (R, S, 3): one code per ray

Each layer's weight is applied block by block ([hidden | latent chunk | encoding], see
``weight_blocks``): the hidden and encoding blocks per sample, the latent block once per ray and
broadcast over its samples, so neither the per-layer concatenation nor a per-sample copy of the code is
ever built (``benchmarks/field_layout.py`` measures it against the concatenated form). The
parameters (``layers.i.weight`` over the concatenated input) and checkpoints are unchanged.

Density is ``softplus`` and colour ``sigmoid``; colour does not depend on the viewing direction (LOLNeRF
learns from one view per identity, so view dependence cannot be supervised).

The latent reaches every layer, as in the official code (docs/PAPER.md, Defaults of the official
code): with ``latent_mode="chunks"`` the code is split into ``depth`` chunks and layer i sees
[hidden, chunk_i, encoded xyz]; with ``latent_mode="whole"`` every layer sees the whole code.
``chunks`` is the default: it is the official form, and in a short training comparison it reached a
higher training PSNR than ``whole`` (README, Training, Model).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class FieldConfig:
    """Shape of the conditioned MLP (each field's ``metadata["help"]`` is its documentation and its
    ``train.py --help`` text).

        >>> FieldConfig.cpu().depth, FieldConfig.paper().width
        (4, 256)
    """

    depth: int = dataclass_field(default=8, metadata={"help": "hidden layers of the field MLP"})
    width: int = dataclass_field(default=256, metadata={"help": "units per hidden layer"})
    n_frequencies: int = dataclass_field(default=4, metadata={
        "help": "positional-encoding octaves: sin/cos at 2^0..2^(n-1)"})
    include_input: bool = dataclass_field(default=True, metadata={
        "help": "also feed the raw xyz to every layer"})
    latent_mode: str = dataclass_field(default="chunks", metadata={
        "help": "chunks (layer i sees the i-th slice of the latent, as the official code) | whole (every "
                "layer sees all of it)"})

    @classmethod
    def paper(cls) -> FieldConfig:
        """The official 8 × 256 network."""
        return cls()

    @classmethod
    def cpu(cls) -> FieldConfig:
        """A 4 × 64 network that trains in minutes on 2 CPU cores."""
        return cls(depth=4, width=64)


def encoded_size(n_inputs: int, n_frequencies: int, include_input: bool) -> int:
    """Width of ``positional_encoding`` output.

    Example: ``encoded_size(3, 4, True) == 27``.
    """
    return n_inputs * (2 * n_frequencies + int(include_input))


def positional_encoding(x: torch.Tensor, n_frequencies: int, include_input: bool = True) -> torch.Tensor:
    """NeRF encoding [x, sin(2^k x), cos(2^k x)] for k = 0..n_frequencies-1.

    Shapes: x (N, D) -> (N, D * (2 * n_frequencies + include_input)).

    Example:
        >>> positional_encoding(torch.zeros(2, 3), 4).shape
        torch.Size([2, 27])
    """
    scales = 2.0 ** torch.arange(n_frequencies, dtype=x.dtype, device=x.device)
    scaled = (x[..., None, :] * scales[:, None]).flatten(-2)  # (N, F*D)
    parts = [x] if include_input else []
    parts += [torch.sin(scaled), torch.cos(scaled)]
    return torch.cat(parts, dim=-1)


def latent_chunk_sizes(latent_dim: int, depth: int, mode: str) -> list[int]:
    """How many latent values each layer sees.

    Example: ``latent_chunk_sizes(64, 4, "chunks") == [16, 16, 16, 16]``; ``"whole"`` gives [64] * depth.
    """
    if mode == "whole":
        return [latent_dim] * depth
    if mode != "chunks":
        raise ValueError(f"latent_mode must be 'chunks' or 'whole', not {mode!r}.")
    base, extra = divmod(latent_dim, depth)
    return [base + (1 if i < extra else 0) for i in range(depth)]


class ConditionedField(nn.Module):
    """Latent-conditioned density + colour MLP (no view dependence).

    Shapes: points (N, 3), latents (N, L) -> sigma (N,), rgb (N, 3).
    """

    def __init__(self, cfg: FieldConfig, latent_dim: int):
        super().__init__()
        self.cfg = cfg
        self.latent_dim = latent_dim
        self.chunk_sizes = latent_chunk_sizes(latent_dim, cfg.depth, cfg.latent_mode)
        enc = encoded_size(3, cfg.n_frequencies, cfg.include_input)
        self.layers = nn.ModuleList()
        for i, chunk in enumerate(self.chunk_sizes):
            hidden_in = 0 if i == 0 else cfg.width
            self.layers.append(nn.Linear(hidden_in + chunk + enc, cfg.width))
        self.density_head = nn.Linear(cfg.width, 1)
        self.color_head = nn.Linear(cfg.width, 3)

    def latent_chunks(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """Split (..., L) latents into the per-layer inputs."""
        if self.cfg.latent_mode == "whole":
            return [latents] * len(self.layers)
        return list(torch.split(latents, self.chunk_sizes, dim=-1))

    def weight_blocks(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Layer i's weight split by input block: (hidden or None for layer 0, latent chunk, encoding).

        The layer's input is [hidden, chunk_i, encoded xyz]; multiplying each block by its own input and
        adding is the same product without building the concatenation for every sample.
        """
        weight = self.layers[i].weight
        n_hidden = 0 if i == 0 else self.cfg.width
        n_chunk = self.chunk_sizes[i]
        hidden = weight[:, :n_hidden] if n_hidden else None
        return hidden, weight[:, n_hidden:n_hidden + n_chunk], weight[:, n_hidden + n_chunk:]

    takes_ray_index = True  # forward(points, latents, ray=...): packed samples with one code per ray

    def forward(self, points: torch.Tensor, latents: torch.Tensor,
                ray: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Evaluate the field, one latent per sample or one per ray.

        Shapes: points (N, 3), latents (N, L) -> sigma (N,) >= 0, rgb (N, 3) in (0, 1); or
        points (R, S, 3), latents (R, L) -> sigma (R, S), rgb (R, S, 3) (every sample of a ray shares
        its ray's code, which is never copied per sample); or packed samples, points (N, 3) with
        ``ray`` (N,) int64 naming each one's row of latents (R, L) -> (N,), (N, 3): each layer's latent
        term is computed once per ray and added to its samples (no (N, L) copy of the codes, and the
        latent product runs on R rows, not N).

        Example:
            >>> field = ConditionedField(FieldConfig(depth=2, width=8), latent_dim=4)
            >>> sigma, rgb = field(torch.zeros(5, 7, 3), torch.zeros(5, 4))
            >>> sigma.shape, rgb.shape
            (torch.Size([5, 7]), torch.Size([5, 7, 3]))
        """
        if latents.shape[-1] != self.latent_dim:
            raise ValueError(f"latents have {latents.shape[-1]} values per row; this field expects "
                             f"{self.latent_dim}.")
        if ray is not None:
            return self._forward_packed(points, latents, ray)
        per_sample = points.dim() == 2
        grouped = points[:, None, :] if per_sample else points  # (R, S, 3)
        if latents.dim() != 2 or grouped.dim() != 3 or grouped.shape[0] != latents.shape[0]:
            raise ValueError(f"points {tuple(points.shape)} and latents {tuple(latents.shape)} do not pair: "
                             "give (N, 3) with (N, L), or (R, S, 3) with (R, L).")
        n_rays, n_samples, _ = grouped.shape
        enc = positional_encoding(grouped.reshape(-1, 3), self.cfg.n_frequencies, self.cfg.include_input)
        width = self.cfg.width
        hidden = None
        for i, (layer, chunk) in enumerate(zip(self.layers, self.latent_chunks(latents), strict=True)):
            hidden_w, chunk_w, enc_w = self.weight_blocks(i)
            per_ray = torch.addmm(layer.bias, chunk, chunk_w.T)  # (R, width): once per ray
            # Accumulate into one fresh product in place: an out-of-place addmm with a full (N, width) input
            # copies that input first (a quarter of a skip-empty render's time went to such copies), and
            # none of mm, addmm_, add_ needs its output for backward; relu_ keeps only its own result.
            pre = enc @ enc_w.T if hidden is None else (hidden @ hidden_w.T).addmm_(enc, enc_w.T)
            pre = pre.view(n_rays, n_samples, width)
            if torch.is_grad_enabled():  # in place on a view costs autograd more than the copy it saves
                hidden = F.relu(pre + per_ray[:, None]).view(-1, width)
            else:
                hidden = pre.add_(per_ray[:, None]).relu_().view(-1, width)
        sigma = F.softplus(self.density_head(hidden)).view(n_rays, n_samples)
        rgb = torch.sigmoid(self.color_head(hidden)).view(n_rays, n_samples, 3)
        if per_sample:
            return sigma[:, 0], rgb[:, 0]
        return sigma, rgb

    def _forward_packed(self, points: torch.Tensor, latents: torch.Tensor,
                        ray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``forward`` with ``ray``: points (N, 3), latents (R, L), ray (N,) -> sigma (N,), rgb (N, 3)."""
        if points.dim() != 2 or latents.dim() != 2 or ray.shape != points.shape[:1]:
            raise ValueError(f"packed samples need points (N, 3), latents (R, L) and ray (N,); got "
                             f"{tuple(points.shape)}, {tuple(latents.shape)} and {tuple(ray.shape)}.")
        enc = positional_encoding(points, self.cfg.n_frequencies, self.cfg.include_input)
        hidden = None
        for i, (layer, chunk) in enumerate(zip(self.layers, self.latent_chunks(latents), strict=True)):
            hidden_w, chunk_w, enc_w = self.weight_blocks(i)
            per_ray = torch.addmm(layer.bias, chunk, chunk_w.T)  # (R, width): once per ray
            pre = enc @ enc_w.T if hidden is None else (hidden @ hidden_w.T).addmm_(enc, enc_w.T)
            if torch.is_grad_enabled():
                hidden = F.relu(pre + per_ray.index_select(0, ray))
            else:
                hidden = pre.add_(per_ray.index_select(0, ray)).relu_()
        sigma = F.softplus(self.density_head(hidden)).view(-1)
        return sigma, torch.sigmoid(self.color_head(hidden))
