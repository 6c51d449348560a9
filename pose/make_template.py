"""Derive `pose/data/template.json` from Face Mesh's own 3D output: `python -m pose.make_template`.

The mediapipe 0.10.21 wheel ships no canonical face model file, so the template is measured:

1. Face Mesh runs on the real portraits shipped by installed packages (scikit-image's astronaut,
   matplotlib's grace_hopper) and on their horizontal mirrors. Its 468 landmarks are 3D: (x·W, y·H, z·W)
   in pixels, already in OpenCV-like axes (y down, z away from the camera).
2. The meshes are aligned by 3D similarity (Umeyama, `skimage.transform.SimilarityTransform`) to their
   running mean and averaged. Mirrors make the mean left–right symmetric; the selected points are then
   symmetrised exactly (pairs mirrored in x, midline points at x = 0).
3. Orientation: x runs from the right to the left outer eye corner; z is the normal of the best-fit plane
   of the face oval (Face Mesh's FACEMESH_FACE_OVAL), pointing away from the nose; y = z × x (down).
4. Scale: outer eye corners `EYE_DISTANCE` apart. Origin: `NOSE_DEPTH` behind the nose tip; vertically
   at the eye midpoint + 0.1 × eye-to-mouth (FFHQ's crop centre).
5. The Face Detection fallback points (eye centres, nose tip, mouth centre) come from Face Detection's own
   keypoints on the same photos, lifted to 3D by interpolating the photo's Face Mesh depth at them,
   and mapped by that photo's alignment.
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np
from scipy.interpolate import LinearNDInterpolator, NearestNDInterpolator
from skimage.transform import SimilarityTransform

from .landmarks import (
    DETECTION_KEYPOINTS,
    LEFT_EYE_CONTOUR,
    MESH_INDICES,
    RIGHT_EYE_CONTOUR,
    run_graph,
)
from .template import EYE_DISTANCE, NOSE_DEPTH, TEMPLATE_PATH, save_template


def calibration_photos() -> dict[str, np.ndarray]:
    """The real portraits shipped by installed packages, as uint8 RGB."""
    import matplotlib.cbook
    import skimage.data

    grace = cv2.imread(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    return {"skimage.data.astronaut": skimage.data.astronaut(),
            "matplotlib grace_hopper.jpg": cv2.cvtColor(grace, cv2.COLOR_BGR2RGB)}


def measure(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Face Mesh (468, 3) and Face Detection keypoints lifted to 3D (4, 3), both in pixels."""
    height, width = image.shape[:2]
    faces = run_graph("face_mesh", image, max_num_faces=1, min_detection_confidence=0.5)
    detections = run_graph("face_detection", image, model_selection=1, min_detection_confidence=0.5)
    if not faces.multi_face_landmarks or not detections.detections:
        raise RuntimeError("A calibration photo has no face; the template cannot be derived.")
    landmarks = faces.multi_face_landmarks[0].landmark
    mesh = np.array([[p.x * width, p.y * height, p.z * width] for p in landmarks])
    keypoints = detections.detections[0].location_data.relative_keypoints
    xy = np.array([[keypoints[i].x * width, keypoints[i].y * height] for i in DETECTION_KEYPOINTS.values()])
    depth = LinearNDInterpolator(mesh[:, :2], mesh[:, 2])(xy)
    depth = np.where(np.isnan(depth), NearestNDInterpolator(mesh[:, :2], mesh[:, 2])(xy), depth)
    return mesh, np.column_stack([xy, depth])


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(4, 4) 3D similarity that best maps src (N, 3) onto dst (N, 3) (Umeyama)."""
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        transform = SimilarityTransform.from_estimate(src, dst)
        ok = bool(transform)
    else:
        transform = SimilarityTransform(dimensionality=3)
        ok = transform.estimate(src, dst)
    if not ok:
        raise RuntimeError("Similarity alignment of two meshes failed.")
    return transform.params


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (4, 4) homogeneous transform to (N, 3) points."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def canonical_frame(mesh: np.ndarray) -> np.ndarray:
    """(4, 4) similarity taking the mean mesh to head units (module docstring, steps 3–4)."""
    import mediapipe as mp

    oval = sorted({i for edge in mp.solutions.face_mesh.FACEMESH_FACE_OVAL for i in edge})
    x_axis = mesh[MESH_INDICES["left_eye_outer"]] - mesh[MESH_INDICES["right_eye_outer"]]
    x_axis /= np.linalg.norm(x_axis)
    centred = mesh[oval] - mesh[oval].mean(0)
    z_axis = np.linalg.svd(centred)[2][2]
    if np.dot(mesh[MESH_INDICES["nose_tip"]] - mesh[oval].mean(0), z_axis) > 0:
        z_axis = -z_axis
    z_axis -= np.dot(z_axis, x_axis) * x_axis
    z_axis /= np.linalg.norm(z_axis)
    rotation = np.stack([x_axis, np.cross(z_axis, x_axis), z_axis])
    scale = EYE_DISTANCE / np.linalg.norm(
        mesh[MESH_INDICES["left_eye_outer"]] - mesh[MESH_INDICES["right_eye_outer"]])
    rotated = mesh @ rotation.T * scale
    eye_mid = (rotated[list(RIGHT_EYE_CONTOUR)].mean(0) + rotated[list(LEFT_EYE_CONTOUR)].mean(0)) / 2
    mouth_mid = (rotated[MESH_INDICES["right_mouth_corner"]] + rotated[MESH_INDICES["left_mouth_corner"]]) / 2
    origin = np.array([
        (rotated[MESH_INDICES["right_eye_outer"]][0] + rotated[MESH_INDICES["left_eye_outer"]][0]) / 2,
        eye_mid[1] + 0.1 * (mouth_mid[1] - eye_mid[1]),
        rotated[MESH_INDICES["nose_tip"]][2] + NOSE_DEPTH,
    ])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * scale
    matrix[:3, 3] = -origin
    return matrix


def symmetrise(points: np.ndarray, pairs: list[tuple[int, int]], midline: list[int]) -> np.ndarray:
    """Make mirror pairs exact mirrors in x (averaging) and put midline points at x = 0.

    >>> symmetrise(np.array([[-1.0, 0, 0], [1.2, 0.2, 0]]), [(0, 1)], []).tolist()
    [[-1.1, 0.1, 0.0], [1.1, 0.1, 0.0]]
    """
    out = points.copy()
    for a, b in pairs:
        mean = (points[a] * [-1, 1, 1] + points[b]) / 2
        out[a], out[b] = mean * [-1, 1, 1], mean
    out[midline, 0] = 0.0
    return out


def derive_template() -> tuple[dict[str, np.ndarray], dict]:
    """Measure the template; returns (points per method, provenance)."""
    meshes, lifted, names = [], [], []
    for name, photo in calibration_photos().items():
        for mirrored in (False, True):
            mesh, keypoints = measure(np.ascontiguousarray(photo[:, ::-1]) if mirrored else photo)
            meshes.append(mesh)
            lifted.append(keypoints)
            names.append(name + (" (mirrored)" if mirrored else ""))
    mean = meshes[0]
    for _ in range(3):  # generalised Procrustes: align to the running mean, re-average
        alignments = [similarity(mesh, mean) for mesh in meshes]
        mean = np.mean([apply(a, mesh) for a, mesh in zip(alignments, meshes, strict=True)], axis=0)
    frame = canonical_frame(mean)
    mesh_points = apply(frame, mean)[list(MESH_INDICES.values())]
    detection_points = np.mean([apply(frame @ a, k) for a, k in zip(alignments, lifted, strict=True)], axis=0)
    points = {
        "face_mesh": symmetrise(mesh_points, [(0, 1), (3, 4)], [2]),
        "face_detection": symmetrise(detection_points, [(0, 1)], [2, 3]),
    }
    residual = np.mean([np.linalg.norm(apply(frame @ a, m) - apply(frame, mean), axis=1).mean()
                        for a, m in zip(alignments, meshes, strict=True)])
    provenance = {
        "method": "python -m pose.make_template: Face Mesh (mediapipe 0.10.21) 3D landmarks of the "
                  "photos below and their mirrors, similarity-aligned and averaged, then oriented, "
                  "scaled and symmetrised (see pose/make_template.py).",
        "photos": names,
        "mean_alignment_residual_head_units": round(float(residual), 4),
        "names": {"face_mesh": list(MESH_INDICES), "face_detection": list(DETECTION_KEYPOINTS)},
        "mesh_indices": MESH_INDICES,
        "detection_keypoints": DETECTION_KEYPOINTS,
    }
    return points, provenance


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(TEMPLATE_PATH), help="where to write the template JSON")
    args = parser.parse_args(argv)
    points, provenance = derive_template()
    save_template(points, args.out, provenance)
    for method, p in points.items():
        print(method, np.round(p, 3).tolist())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
