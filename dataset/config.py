"""`PrepareConfig`: every setting of dataset preparation, with the `paper` and `cpu` presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from pose.config import PoseConfig


@dataclass(frozen=True)
class PrepareConfig:
    """Settings for ``prepare_dataset`` (defaults are the ``cpu`` preset).

    Attributes:
        resolution: side of the square training images (cameras' K is scaled to match).
        framing: "aligned" or "landmarks"; None picks the source's default ("aligned" for ffhq, celeba,
            celebahq; "landmarks" for folder, whose raw photos need a crop centred on the face).
        min_image_side: photos whose shorter side is below this (pixels) are skipped as "tiny".
        chunk_size: images per resumable shard under ``partial/`` (what an interruption can lose).
        limit: prepare only the first ``limit`` source items in sorted order (None: all).
        views_per_identity: training views per identity (srn, synthetic); photos always have one.
        heldout_views: held-out views per identity (srn, synthetic); -1 means all remaining (srn).
        synthetic_identities: number of identities the synthetic or faces generator draws.
        faces_render_size: side of the faces source's renders, which MediaPipe sees before they are
            resized to ``resolution`` like photos (``dataset.faces``).
        faces_cameraman_texture: faces: also texture identities with scikit-image's cameraman, whose Face
            Mesh is misregistered by about 10° of head rotation, so the truth of his renders is wrong
            (``dataset.faces.FacesConfig.cameraman_texture``, docs/MEDIAPIPE.md); off by default.
        srn_world_scale: SRN scenes are multiplied by this so the objects sit at radius ~1.5, like a head,
            inside the renderer's radius-2 sphere; None estimates it from the silhouettes and cameras
            (``dataset.srn.fit_scene``). Recorded in the manifest as world_scale, with the scene_fit.
        srn_white_threshold: an SRN pixel is background when all its channels are at least this.
        seed: seeds every random choice (synthetic shapes and views, SRN view split).
        pose: landmark, camera-solve and mask settings (``pose.PoseConfig``).
    """

    resolution: int = field(default=64, metadata={"help": "side of the square training images"})
    framing: str | None = field(default=None, metadata={
        "help": "aligned (centred square) or landmarks (crop on the face); None: aligned for ffhq/celeba/"
                "celebahq, landmarks for folder"})
    min_image_side: int = field(default=64, metadata={"help": "skip photos whose shorter side is smaller"})
    chunk_size: int = field(default=32, metadata={"help": "images per resumable shard under partial/"})
    limit: int | None = field(default=None, metadata={"help": "prepare only the first N items (None: all)"})
    views_per_identity: int = field(default=1, metadata={
        "help": "training views per identity (srn, synthetic)"})
    heldout_views: int = field(default=3, metadata={
        "help": "held-out views per identity (srn, synthetic); -1: all remaining (srn)"})
    synthetic_identities: int = field(default=64, metadata={
        "help": "identities the synthetic or faces generator draws"})
    faces_render_size: int = field(default=256, metadata={
        "help": "faces: side of the rendered image MediaPipe sees, before it is resized to --resolution"})
    faces_cameraman_texture: bool = field(default=False, metadata={
        "help": "faces: also texture identities with the cameraman portrait, whose Face Mesh is "
                "misregistered by about 10 degrees, so his renders disagree with their truth (as the "
                "generator before version 3 did)"})
    srn_world_scale: float | None = field(default=None, metadata={
        "help": "multiply SRN scenes by this; none: from the data, so the objects fit at radius 1.5 "
                "(SRN cars: about 3)"})
    srn_white_threshold: int = field(default=250, metadata={
        "help": "an SRN pixel with every channel >= this is background"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    pose: PoseConfig = field(default_factory=PoseConfig)

    def __post_init__(self) -> None:
        problems = [f"{name} must be at least {low} (got {getattr(self, name)})"
                    for name, low in (("resolution", 8), ("min_image_side", 1), ("chunk_size", 1),
                                      ("views_per_identity", 1), ("synthetic_identities", 1),
                                      ("faces_render_size", 64))
                    if getattr(self, name) < low]
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit must be at least 1 or None (got {self.limit})")
        if self.heldout_views < -1:
            problems.append(f"heldout_views must be -1 (all) or at least 0 (got {self.heldout_views})")
        if self.framing not in (None, "aligned", "landmarks"):
            problems.append(f"framing must be 'aligned', 'landmarks' or None (got {self.framing!r})")
        if self.srn_world_scale is not None and not 0 < self.srn_world_scale < float("inf"):
            problems.append(f"srn_world_scale must be positive (got {self.srn_world_scale})")
        if problems:
            raise ValueError("Invalid PrepareConfig: " + "; ".join(problems) + ".")

    @classmethod
    def paper(cls) -> PrepareConfig:
        """256² images, 1,024 synthetic identities.

        >>> PrepareConfig.paper().resolution
        256
        """
        return cls(resolution=256, synthetic_identities=1024)

    @classmethod
    def cpu(cls) -> PrepareConfig:
        """64² images, 64 synthetic identities."""
        return cls()

    def with_(self, **changes) -> PrepareConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready settings (nested dataclasses become dicts)."""
        return asdict(self)
