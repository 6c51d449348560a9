"""Face landmarks from MediaPipe: the semantic points the camera fit uses.

Points (pixel coordinates, continuous: the centre of pixel (i, j) is (i + 0.5, j + 0.5); MediaPipe's
normalised coordinates × image size are already in this convention):

- `face_mesh` (primary; 5 points, like the official code): Face Mesh indices
  33 = right outer eye corner, 263 = left outer eye corner, 1 = nose tip, 61 = right mouth corner,
  291 = left mouth corner. "Right" is the subject's right, i.e. image left on a frontal photo.
- `face_detection` (fallback when Face Mesh finds no face; 4 points): Face Detection keypoints
  0 = right eye centre, 1 = left eye centre, 2 = nose tip, 3 = mouth centre. Its two ear-tragion
  keypoints are not used: they lie outside Face Mesh's surface, so the template (which is derived from
  Face Mesh) has no measured depth for them, and on frontal faces they are guesses.

MediaPipe graphs are slow to build, so each process builds them once, lazily, and reuses them. MediaPipe
is not fork-safe: a process forked after its parent built a graph crashes or hangs inside MediaPipe (observed
with 0.10.21; docs/MEDIAPIPE.md), so `_graph` raises a clear error there instead. Start workers with the
`spawn` context.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numpy as np

from .config import PoseConfig
from .errors import NoFaceError

MESH_INDICES: dict[str, int] = {
    "right_eye_outer": 33,
    "left_eye_outer": 263,
    "nose_tip": 1,
    "right_mouth_corner": 61,
    "left_mouth_corner": 291,
}
DETECTION_KEYPOINTS: dict[str, int] = {"right_eye": 0, "left_eye": 1, "nose_tip": 2, "mouth_centre": 3}
# Eye contours of Face Mesh (mediapipe.solutions.face_mesh.FACEMESH_RIGHT_EYE / _LEFT_EYE); their
# centroids are the eye centres used for framing.
RIGHT_EYE_CONTOUR = (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246)
LEFT_EYE_CONTOUR = (249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466)

METHODS = ("face_mesh", "face_detection")


@dataclass
class FaceLandmarks:
    """Landmarks of the chosen face in one image.

    Attributes:
        points: (P, 2) float64 pixel coordinates; P = 5 for `face_mesh`, 4 for `face_detection`
            (order as in `MESH_INDICES` / `DETECTION_KEYPOINTS`).
        method: "face_mesh" or "face_detection" (the fallback); selects the template subset.
        n_faces: how many faces the detector returned.
        chosen: index of the chosen face among them (largest, most central).
        box: (4,) float64 (x0, y0, x1, y1) pixel box of the chosen face.
        eye_centres: (2, 2) right then left eye centre in pixels (used for framing).
        mouth_centre: (2,) pixels: midpoint of the mouth corners (Face Mesh) or the mouth keypoint.
        mesh: (468, 3) float64 Face Mesh output in pixels (x·W, y·H, z·W), or None for the fallback.
        mesh_attention: (478, 3) float64 the same face from Face Mesh's attention model
            (`refine_landmarks=True`: 468 points, then 10 iris points), or None when it was not run
            (only `PoseConfig.solve_points="mesh_posed"` runs it) or found no face there.
    """

    points: np.ndarray
    method: str
    n_faces: int
    chosen: int
    box: np.ndarray
    eye_centres: np.ndarray
    mouth_centre: np.ndarray
    mesh: np.ndarray | None = field(default=None, repr=False)
    mesh_attention: np.ndarray | None = field(default=None, repr=False)

    def transformed(self, scale: float, offset: np.ndarray) -> FaceLandmarks:
        """The same landmarks after the image map p' = (p − offset) · scale (a crop then a resize)."""
        offset = np.asarray(offset, np.float64)

        def move(p: np.ndarray) -> np.ndarray:
            return (p - offset) * scale

        def move_mesh(mesh: np.ndarray | None) -> np.ndarray | None:
            return None if mesh is None else np.concatenate([move(mesh[:, :2]), mesh[:, 2:] * scale], axis=1)

        box = np.concatenate([move(self.box[:2]), move(self.box[2:])])
        return FaceLandmarks(move(self.points), self.method, self.n_faces, self.chosen, box,
                             move(self.eye_centres), move(self.mouth_centre), move_mesh(self.mesh),
                             move_mesh(self.mesh_attention))

    def summary(self) -> dict:
        """JSON-ready record of the detection choice."""
        return {"method": self.method, "n_faces": self.n_faces, "chosen": self.chosen,
                "box": [round(float(v), 2) for v in self.box],
                "attention_mesh": self.mesh_attention is not None}


_graphs: dict[tuple, object] = {}
_graphs_lock = threading.Lock()


def _graph(kind: str, **options) -> object:
    """This process's MediaPipe graph of one kind and options, built on first use."""
    pid = os.getpid()
    key = (pid, kind, tuple(sorted(options.items())))
    with _graphs_lock:
        parents = {owner for owner, *_ in _graphs} - {pid}
        if parents:
            raise RuntimeError(
                f"MediaPipe graphs were built in process {min(parents)} before it forked this one, and "
                "MediaPipe cannot run in a forked copy; start worker processes with "
                "multiprocessing.get_context('spawn').")
        if key not in _graphs:
            import mediapipe as mp

            if kind == "face_mesh":
                _graphs[key] = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, **options)
            elif kind == "face_detection":
                _graphs[key] = mp.solutions.face_detection.FaceDetection(**options)
            elif kind == "selfie_segmentation":
                _graphs[key] = mp.solutions.selfie_segmentation.SelfieSegmentation(**options)
            else:
                raise ValueError(f"Unknown MediaPipe graph {kind!r}.")
        return _graphs[key]


def run_graph(kind: str, image: np.ndarray, **options):
    """Run a cached MediaPipe graph on a uint8 RGB image (serialised: one graph is not re-entrant)."""
    graph = _graph(kind, **options)
    with _graphs_lock:
        return graph.process(np.ascontiguousarray(image))


def choose_face(boxes: np.ndarray, image_size: tuple[int, int]) -> int:
    """Index of the largest, most central box: maximise area × (1 − centre distance / half-diagonal).

    >>> choose_face(np.array([[0, 0, 10, 10], [40, 40, 60, 60]], float), (100, 100))
    1
    """
    height, width = image_size
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    distance = np.hypot(centres[:, 0] - width / 2, centres[:, 1] - height / 2) / (np.hypot(width, height) / 2)
    return int(np.argmax(areas * np.clip(1.0 - distance, 0.0, 1.0) + 1e-9 * areas))


def _meshes(faces, image_size: tuple[int, int]) -> list[np.ndarray]:
    height, width = image_size
    return [np.array([[p.x * width, p.y * height, p.z * width] for p in face.landmark]) for face in faces]


def matching_mesh(meshes: list[np.ndarray], mesh: np.ndarray) -> np.ndarray | None:
    """The mesh among `meshes` (another Face Mesh model's faces) of the same face as `mesh`: the one
    whose first 468 points lie nearest on average, if that is within a tenth of the face's size.

    >>> face = np.random.default_rng(0).uniform(0, 50, (468, 3))
    >>> bool(matching_mesh([face + 100, face + 1], face)[0, 0] == face[0, 0] + 1)
    True
    """
    if not meshes:
        return None
    distances = [np.linalg.norm(m[:468, :2] - mesh[:468, :2], axis=1).mean() for m in meshes]
    best = int(np.argmin(distances))
    size = np.ptp(mesh[:468, :2], axis=0).max()
    return meshes[best] if distances[best] <= 0.1 * size else None


def _from_mesh(faces, image_size: tuple[int, int]) -> FaceLandmarks:
    meshes = _meshes(faces, image_size)
    boxes = np.array([[m[:, 0].min(), m[:, 1].min(), m[:, 0].max(), m[:, 1].max()] for m in meshes])
    chosen = choose_face(boxes, image_size)
    mesh = meshes[chosen]
    xy = mesh[:, :2]
    return FaceLandmarks(
        points=xy[list(MESH_INDICES.values())].copy(),
        method="face_mesh",
        n_faces=len(meshes),
        chosen=chosen,
        box=boxes[chosen],
        eye_centres=np.stack([xy[list(RIGHT_EYE_CONTOUR)].mean(0), xy[list(LEFT_EYE_CONTOUR)].mean(0)]),
        mouth_centre=xy[[MESH_INDICES["right_mouth_corner"], MESH_INDICES["left_mouth_corner"]]].mean(0),
        mesh=mesh,
    )


def _from_detection(detections, image_size: tuple[int, int]) -> FaceLandmarks:
    height, width = image_size
    scale = np.array([width, height], np.float64)
    boxes, keypoints = [], []
    for detection in detections:
        rel = detection.location_data.relative_bounding_box
        boxes.append([rel.xmin * width, rel.ymin * height, (rel.xmin + rel.width) * width,
                      (rel.ymin + rel.height) * height])
        keypoints.append(np.array([[k.x, k.y] for k in detection.location_data.relative_keypoints]) * scale)
    boxes = np.array(boxes)
    chosen = choose_face(boxes, image_size)
    kp = keypoints[chosen]
    return FaceLandmarks(
        points=kp[list(DETECTION_KEYPOINTS.values())].copy(),
        method="face_detection",
        n_faces=len(boxes),
        chosen=chosen,
        box=boxes[chosen],
        eye_centres=kp[:2].copy(),
        mouth_centre=kp[3].copy(),
    )


def detect_landmarks(image: np.ndarray, config: PoseConfig | None = None) -> FaceLandmarks:
    """Find the chosen face's landmarks with Face Mesh, falling back to Face Detection.

    Args:
        image: (H, W, 3) uint8 RGB.
        config: detection settings (`max_num_faces`, `min_detection_confidence`, fallback switch).

    Returns:
        `FaceLandmarks` with points (5, 2) from Face Mesh, or (4, 2) from the fallback; for
        `solve_points="mesh_posed"`, Face Mesh's attention model runs too (`mesh_attention`).

    Raises:
        NoFaceError: neither detector found a face.

    >>> detect_landmarks(skimage.data.astronaut()).points.shape  # doctest: +SKIP
    (5, 2)
    """
    config = config or PoseConfig()
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"detect_landmarks needs a uint8 (H, W, 3) RGB image, "
                         f"got {image.dtype} {image.shape}.")
    image_size = image.shape[:2]
    result = run_graph("face_mesh", image, max_num_faces=config.max_num_faces,
                       min_detection_confidence=config.min_detection_confidence)
    if result.multi_face_landmarks:
        landmarks = _from_mesh(result.multi_face_landmarks, image_size)
        if config.solve_points == "mesh_posed":
            attention = run_graph("face_mesh", image, max_num_faces=config.max_num_faces,
                                  min_detection_confidence=config.min_detection_confidence,
                                  refine_landmarks=True)
            landmarks.mesh_attention = matching_mesh(_meshes(attention.multi_face_landmarks or [],
                                                             image_size), landmarks.mesh)
        return landmarks
    if config.use_face_detection_fallback:
        # model_selection=1 is the full-range model: faces anywhere up to ~5 m, not only close-ups.
        result = run_graph("face_detection", image, model_selection=1,
                           min_detection_confidence=config.min_detection_confidence)
        if result.detections:
            return _from_detection(result.detections, image_size)
    raise NoFaceError("No face was found in the image (Face Mesh and Face Detection both failed); "
                      "use a photo with a visible, roughly frontal face.")
