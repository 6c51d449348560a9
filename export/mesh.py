"""Meshes from a density field: sample a grid, marching cubes (scikit-image), vertex colours, PLY, volume.

The grid spans the cube [-bound, bound]^3 in world (head) units, indexed [x, y, z], so a marching-cubes
vertex at index coordinates v lies at -bound + v * spacing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from skimage.measure import marching_cubes

from common.atomic import atomic_path


@dataclass
class Mesh:
    """A triangle mesh: vertices (V, 3) float32 world units, faces (F, 3) int64 (counter-clockwise seen
    from outside), normals (V, 3) float32 outward, colors (V, 3) uint8 RGB or None."""

    vertices: np.ndarray
    faces: np.ndarray
    normals: np.ndarray
    colors: np.ndarray | None = None


def grid_points(resolution: int, bound: float) -> np.ndarray:
    """Centres of a regular grid over [-bound, bound]^3 including the faces of the cube.

    Returns (resolution, resolution, resolution, 3) float32, indexed [x, y, z].

    >>> grid_points(3, 1.0)[0, 1, 2].tolist()
    [-1.0, 0.0, 1.0]
    """
    axis = np.linspace(-bound, bound, resolution, dtype=np.float32)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)


@torch.no_grad()
def evaluate_points(
    fn: Callable[[torch.Tensor], torch.Tensor], points: np.ndarray, chunk: int = 65536
) -> np.ndarray:
    """Evaluate ``fn`` on points in chunks, so memory stays bounded for any grid size.

    fn: (P, 3) float32 tensor -> (P,) or (P, C) tensor. points (..., 3) -> (...,) or (..., C) float32.
    """
    flat = np.ascontiguousarray(points.reshape(-1, 3), dtype=np.float32)
    parts = [
        fn(torch.from_numpy(flat[i : i + chunk])).detach().cpu().float().numpy()
        for i in range(0, len(flat), chunk)
    ]
    values = np.concatenate(parts, axis=0) if parts else np.zeros((0,), np.float32)
    return values.reshape(*points.shape[:-1], *values.shape[1:])


def density_grid(
    density_fn: Callable[[torch.Tensor], torch.Tensor],
    resolution: int = 128,
    bound: float = 1.5,
    chunk: int = 65536,
) -> np.ndarray:
    """Sample a density function on a grid over [-bound, bound]^3.

    density_fn: (P, 3) world points -> (P,) density. Returns (resolution,)*3 float32 indexed [x, y, z].
    """
    return evaluate_points(density_fn, grid_points(resolution, bound), chunk).astype(np.float32)


def extract_mesh(density: np.ndarray, bound: float, level: float) -> Mesh:
    """Marching cubes on a density grid at the iso-level ``level`` (skimage.measure.marching_cubes).

    density (N, N, N) over [-bound, bound]^3 indexed [x, y, z]. The grid is padded with zeros first so
    a surface cut by the grid boundary is capped and the mesh is closed (its volume is defined).
    Faces are oriented so the signed volume is positive (normals point out of the dense region).
    Raises ValueError when no point of the grid reaches ``level``.
    """
    d = np.asarray(density, dtype=np.float32)
    if d.ndim != 3 or len(set(d.shape)) != 1:
        raise ValueError(f"density must be a cubic (N, N, N) grid, got {d.shape}.")
    if not np.isfinite(d).all():
        raise ValueError("density grid contains NaN or infinity; check the model before meshing.")
    if d.max() <= level:
        raise ValueError(
            f"No density reaches the iso-level {level:g} (max {d.max():.3g}); lower --mesh-level."
        )
    spacing = 2.0 * bound / (d.shape[0] - 1)
    # A pad far below the level puts the cap's crossing on the grid boundary itself, not part-way into
    # the pad voxel, so a body cut by the box is capped where the box is.
    low = level - 1e4 * (float(d.max()) - level)
    padded = np.pad(d, 1, mode="constant", constant_values=low)
    verts, faces, normals, _ = marching_cubes(padded, level=level, spacing=(spacing,) * 3)
    verts = verts - spacing * 1.0 - bound  # undo the one-voxel pad, then shift to world coordinates
    faces = faces.astype(np.int64)
    mesh = Mesh(verts.astype(np.float32), faces, normals.astype(np.float32))
    # skimage winds faces clockwise seen from the high-density side; the signed volume tells which way
    # they came out, and flipping makes them counter-clockwise from outside (what viewers expect).
    # Its normals (gradient "descent") already point out of the dense region.
    if mesh_volume(mesh) < 0:
        mesh.faces = mesh.faces[:, ::-1].copy()
    return mesh


def mesh_volume(mesh: Mesh) -> float:
    """Signed volume enclosed by a closed triangle mesh (divergence theorem: sum of origin tetrahedra).

    Positive when faces are counter-clockwise seen from outside. Only meaningful for a closed mesh.

    >>> cube = Mesh(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32),
    ...             np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]), np.zeros((4, 3), np.float32))
    >>> round(mesh_volume(cube), 4)
    0.1667
    """
    v = mesh.vertices.astype(np.float64)
    a, b, c = v[mesh.faces[:, 0]], v[mesh.faces[:, 1]], v[mesh.faces[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def is_watertight(mesh: Mesh) -> bool:
    """True when every undirected edge is shared by exactly two faces (a closed 2-manifold surface)."""
    f = mesh.faces
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]], axis=0)
    edges = np.sort(edges, axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return bool(len(counts) > 0 and np.all(counts == 2))


def vertex_colors(
    color_fn: Callable[[torch.Tensor], torch.Tensor], mesh: Mesh, inset: float = 0.0, chunk: int = 65536
) -> np.ndarray:
    """Colour each vertex by querying a colour field, optionally ``inset`` units inside along the normal
    (a level set of density sits where the surface starts; its colour is better defined just inside).

    color_fn: (P, 3) -> (P, 3) RGB in [0, 1]. Returns (V, 3) uint8.
    """
    points = mesh.vertices - inset * mesh.normals
    rgb = evaluate_points(color_fn, points, chunk)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_ply(path: str | Path, mesh: Mesh) -> Path:
    """Write a binary little-endian PLY with float xyz, optional uchar RGB, and triangle faces (atomic).

    Every mesh viewer (MeshLab, Blender, Open3D) reads this layout.
    """
    path = Path(path)
    n_v, n_f = len(mesh.vertices), len(mesh.faces)
    has_color = mesh.colors is not None
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n_v}"]
    header += ["property float x", "property float y", "property float z"]
    if has_color:
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header += [f"element face {n_f}", "property list uchar int vertex_indices", "end_header"]
    vfields = [("xyz", "<f4", (3,))] + ([("rgb", "u1", (3,))] if has_color else [])
    vertices = np.empty(n_v, dtype=vfields)
    vertices["xyz"] = mesh.vertices
    if has_color:
        vertices["rgb"] = mesh.colors
    faces = np.empty(n_f, dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    faces["n"] = 3
    faces["idx"] = mesh.faces
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        fh.write(vertices.tobytes())
        fh.write(faces.tobytes())
    return path


def read_ply(path: str | Path) -> Mesh:
    """Read a PLY written by :func:`write_ply` (binary little-endian, triangles). Returns a Mesh."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    if header[0] != "ply" or "binary_little_endian" not in header[1]:
        raise ValueError(f"{path} is not a binary little-endian PLY written by this project.")
    n_v = int(next(h for h in header if h.startswith("element vertex")).split()[-1])
    n_f = int(next(h for h in header if h.startswith("element face")).split()[-1])
    has_color = any(h == "property uchar red" for h in header)
    vfields = [("xyz", "<f4", (3,))] + ([("rgb", "u1", (3,))] if has_color else [])
    vertices = np.frombuffer(data, dtype=vfields, count=n_v, offset=end)
    faces = np.frombuffer(
        data, dtype=[("n", "u1"), ("idx", "<i4", (3,))], count=n_f, offset=end + vertices.nbytes
    )
    return Mesh(
        vertices["xyz"].copy(),
        faces["idx"].astype(np.int64),
        np.zeros((n_v, 3), np.float32),
        vertices["rgb"].copy() if has_color else None,
    )


def preview_mesh(
    mesh: Mesh, K: np.ndarray, world_to_camera: np.ndarray, height: int, width: int
) -> np.ndarray:
    """A quick picture of a mesh from a camera: triangles filled far to near (painter's algorithm, with
    OpenCV), flat-shaded by a head-on light and tinted by the vertex colours. Returns (H, W, 3) uint8.

    For looking at a mesh in a README or a report, not for measuring: there is no z-buffer, so
    intersecting triangles may overlap wrongly.
    """
    import cv2

    R, t = np.asarray(world_to_camera, np.float64)[:, :3], np.asarray(world_to_camera, np.float64)[:, 3]
    cam = mesh.vertices.astype(np.float64) @ R.T + t
    in_front = cam[:, 2] > 1e-6
    uv = (cam @ np.asarray(K, np.float64).T)[:, :2] / np.maximum(cam[:, 2:3], 1e-6)
    tri = mesh.faces[in_front[mesh.faces].all(axis=1)]
    a, b, c = cam[tri[:, 0]], cam[tri[:, 1]], cam[tri[:, 2]]
    normals = np.cross(b - a, c - a)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    view = (a + b + c) / 3.0
    # Outward normals facing the camera point against the viewing ray; keep those (back-face culling).
    facing = np.einsum("ij,ij->i", normals, view) < 0
    tri, normals, view = tri[facing], normals[facing], view[facing]
    shade = 0.25 + 0.75 * np.clip(
        -np.einsum("ij,ij->i", normals, view / np.linalg.norm(view, axis=1, keepdims=True)), 0, 1
    )
    colors = mesh.colors[tri].mean(axis=1) if mesh.colors is not None else np.full((len(tri), 3), 200.0)
    image = np.full((height, width, 3), 255, np.uint8)
    order = np.argsort(-view[:, 2])
    points = np.round(uv[tri] * 16).astype(np.int32)  # 4 fractional bits for sub-pixel edges
    for k in order:
        color = tuple(int(v) for v in np.clip(colors[k] * shade[k], 0, 255))
        cv2.fillConvexPoly(image, points[k], color, lineType=cv2.LINE_AA, shift=4)
    return image
