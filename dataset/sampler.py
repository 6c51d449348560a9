"""Pixel batches for auto-decoder training: B identities x V views x P random pixels, from the memory maps.

Only the sampled pixels are read (fancy indexing into the memmaps), never whole images or the whole
dataset. With single-view data (one image per identity), ``views_per_identity > 1`` draws from that same
image again: the V "views" are then V independent pixel draws from one photo.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from dataset.cache import PreparedDataset


class PixelBatchSampler:
    """Seeded, resumable sampler of pixel batches; R = B * V * P rows per batch.

    ``sample()`` returns torch tensors: rgb (R, 3) float32 [0, 1], mask (R,) float32 [0, 1], pixels (R, 2)
    float32 integer (u, v) indices (``generate_rays`` adds the 0.5), K (R, 3, 3), world_to_camera (R, 3, 4),
    identity (R,) int64, image_index (R,) int64. Identities are drawn without replacement within a batch
    (with replacement only when B exceeds the identities available), views without replacement when
    an identity has at least V images.

    ``identity_subset`` restricts sampling to the identities one distributed rank owns.

    >>> sampler = PixelBatchSampler(ds, identities_per_batch=4, views_per_identity=2, pixels_per_view=64,
    ...                             seed=0)  # doctest: +SKIP
    >>> sampler.sample()["rgb"].shape  # doctest: +SKIP
    torch.Size([512, 3])
    """

    def __init__(self, ds: PreparedDataset, identities_per_batch: int, views_per_identity: int,
                 pixels_per_view: int, seed: int = 0, identity_subset=None):
        if min(identities_per_batch, views_per_identity, pixels_per_view) < 1:
            raise ValueError("identities_per_batch, views_per_identity and pixels_per_view must all be >= 1.")
        self.ds = ds
        self.identities_per_batch = identities_per_batch
        self.views_per_identity = views_per_identity
        self.pixels_per_view = pixels_per_view
        self.seed = seed
        identities = np.asarray(ds.identities)
        order = np.argsort(identities, kind="stable")
        present, starts = np.unique(identities[order], return_index=True)
        self._images_of = dict(zip(present.tolist(), np.split(order, starts[1:]), strict=True))
        if identity_subset is None:
            self.identities = present
        else:
            self.identities = np.unique(np.asarray(identity_subset, dtype=np.int64))
            missing = np.setdiff1d(self.identities, present)
            if missing.size:
                raise ValueError(f"identity_subset names identities with no images in this split: "
                                 f"{missing[:10].tolist()}; use ids in 0..{ds.n_identities - 1}.")
        if self.identities.size == 0:
            raise ValueError("PixelBatchSampler has no identities to sample from (empty dataset or subset).")
        self.rng = np.random.default_rng(seed)
        self.batches_drawn = 0

    def _choose_images(self) -> tuple[np.ndarray, np.ndarray]:
        """(B*V,) image indices and their identities for one batch."""
        b = self.identities_per_batch
        chosen = self.rng.choice(self.identities, size=b, replace=b > self.identities.size)
        images = []
        for identity in chosen.tolist():
            own = self._images_of[identity]
            images.append(self.rng.choice(own, size=self.views_per_identity,
                                          replace=self.views_per_identity > own.size))
        return np.concatenate(images), np.repeat(chosen, self.views_per_identity)

    def sample(self) -> dict[str, torch.Tensor]:
        """One batch as a dict of torch tensors (see the class docstring for shapes)."""
        image_index, identity = self._choose_images()
        height, width = self.ds.image_size
        p = self.pixels_per_view
        u = self.rng.integers(0, width, size=(image_index.size, p))
        v = self.rng.integers(0, height, size=(image_index.size, p))
        rows = np.repeat(image_index, p)
        u, v = u.ravel(), v.ravel()
        # Sorted reads touch each memmap page once and in order; results go back to the drawn order.
        order = np.lexsort((u, v, rows))
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        rgb = np.asarray(self.ds.images[rows[order], v[order], u[order]])[inverse]
        mask = np.asarray(self.ds.masks[rows[order], v[order], u[order]])[inverse]
        self.batches_drawn += 1
        return {
            "rgb": torch.from_numpy(rgb.astype(np.float32) / 255.0),
            "mask": torch.from_numpy(mask.astype(np.float32) / 255.0),
            "pixels": torch.from_numpy(np.stack([u, v], axis=1).astype(np.float32)),
            "K": torch.from_numpy(np.ascontiguousarray(self.ds.K[rows])),
            "world_to_camera": torch.from_numpy(np.ascontiguousarray(self.ds.world_to_camera[rows])),
            "identity": torch.from_numpy(np.repeat(identity, p).astype(np.int64)),
            "image_index": torch.from_numpy(rows.astype(np.int64)),
        }

    def _identities_hash(self) -> str:
        return hashlib.sha256(self.identities.astype(np.int64).tobytes()).hexdigest()

    def state_dict(self) -> dict:
        """The generator state and batch count; ``load_state_dict`` continues the same stream."""
        return {"seed": self.seed, "batches_drawn": self.batches_drawn,
                "bit_generator": self.rng.bit_generator.state,
                "identities_sha256": self._identities_hash(),
                "shape": [self.identities_per_batch, self.views_per_identity, self.pixels_per_view]}

    def load_state_dict(self, state: dict) -> None:
        """Resume the stream saved by ``state_dict`` (same dataset, subset and batch shape required)."""
        shape = [self.identities_per_batch, self.views_per_identity, self.pixels_per_view]
        if list(state["shape"]) != shape or state["identities_sha256"] != self._identities_hash():
            raise ValueError("This sampler state was saved with another batch shape or identity subset; "
                             "resume with the same identities_per_batch, views_per_identity, pixels_per_view "
                             "and identity_subset.")
        self.rng.bit_generator.state = state["bit_generator"]
        self.batches_drawn = int(state["batches_drawn"])
        self.seed = state["seed"]
