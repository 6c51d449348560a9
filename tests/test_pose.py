"""Tests of `pose`: real photos shipped by installed packages, synthetic cameras, image-file edge cases."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import cv2
import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from scipy.spatial.transform import Rotation

import pose
from common.conventions import CAMERA_DISTANCE
from pose import (
    EYE_DISTANCE,
    CropBox,
    ImageError,
    NoFaceError,
    PoseConfig,
    PoseRejectedError,
    crop_and_resize,
    crop_intrinsics,
    default_intrinsics,
    detect_landmarks,
    load_image,
    load_template,
    prepare_photo,
    project,
    refine_template,
    rotation_from_yaw_pitch_roll,
    segment_foreground,
    solve_camera,
    solve_inputs,
)
from pose import landmarks as landmarks_module
from pose.template import HEAD_RADIUS, TEMPLATE_PATH

GRACE_HOPPER = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {"astronaut": skimage.data.astronaut(), "grace_hopper": load_image(GRACE_HOPPER)}


@pytest.fixture(scope="module")
def fits(photos) -> dict[str, tuple]:
    """(landmarks, camera fit) of each photo and of its horizontal mirror."""
    out = {}
    for name, image in photos.items():
        for suffix, picture in (("", image), ("_mirrored", np.ascontiguousarray(image[:, ::-1]))):
            lm = detect_landmarks(picture)
            out[name + suffix] = (lm, solve_camera(lm.points, load_template(lm.method), picture.shape[:2]))
    return out


# ---------------------------------------------------------------- real photos


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_landmarks_found(photos, fits, name):
    lm, _ = fits[name]
    height, width = photos[name].shape[:2]
    assert lm.method == "face_mesh" and lm.points.shape == (5, 2) and lm.n_faces == 1 and lm.chosen == 0
    assert np.all((lm.points >= lm.box[:2] - 1) & (lm.points <= lm.box[2:] + 1))
    assert np.all((lm.box[:2] >= 0) & (lm.box[2:] <= [width, height]))
    right_eye, left_eye, nose, right_mouth, left_mouth = lm.points
    assert right_eye[0] < nose[0] < left_eye[0]          # subject's right eye is on the image's left
    assert right_mouth[0] < left_mouth[0]
    assert max(right_eye[1], left_eye[1]) < nose[1] < min(right_mouth[1], left_mouth[1])  # y down


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper", "astronaut_mirrored", "grace_hopper_mirrored"])
def test_reprojection_error_below_2_percent(photos, fits, name):
    _, fit = fits[name]
    width = photos[name.removesuffix("_mirrored")].shape[1]
    assert np.median(fit.per_point_error_px) < 0.02 * width
    assert fit.accepted


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_mirrored_photo_negates_yaw(fits, name):
    yaw = fits[name][1].yaw_pitch_roll_deg[0]
    mirrored_yaw = fits[name + "_mirrored"][1].yaw_pitch_roll_deg[0]
    assert abs(yaw + mirrored_yaw) < 3.0


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_mask_covers_landmarks(photos, fits, name):
    mask = segment_foreground(photos[name])
    assert mask.dtype == np.float32 and mask.shape == photos[name].shape[:2]
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    columns, rows = np.floor(fits[name][0].points).astype(int).T
    assert np.all(mask[rows, columns] > 0.5)
    assert mask[:8, :8].mean() < 0.5 or mask[:8, -8:].mean() < 0.5  # a corner is background


def test_face_detection_fallback(photos, monkeypatch):
    """With Face Mesh silenced, Face Detection's 4 keypoints and their template still fit well."""
    real = landmarks_module.run_graph

    def without_mesh(kind, image, **options):
        if kind == "face_mesh":
            return SimpleNamespace(multi_face_landmarks=None)
        return real(kind, image, **options)

    monkeypatch.setattr(landmarks_module, "run_graph", without_mesh)
    image = photos["astronaut"]
    lm = detect_landmarks(image)
    assert lm.method == "face_detection" and lm.points.shape == (4, 2) and lm.n_faces == 1
    fit = solve_camera(lm.points, load_template(lm.method), image.shape[:2])
    assert np.median(fit.per_point_error_px) < 0.02 * image.shape[1]
    with pytest.raises(NoFaceError):
        detect_landmarks(image, PoseConfig(use_face_detection_fallback=False))


def test_no_face_raises():
    with pytest.raises(NoFaceError, match="No face"):
        detect_landmarks(np.full((128, 128, 3), 127, np.uint8))


def test_several_faces_choose_largest_central(photos):
    face = photos["astronaut"][30:250, 120:340]             # 220 × 220 around the face
    small = cv2.resize(face, (154, 154), interpolation=cv2.INTER_AREA)  # Face Mesh misses much smaller
    canvas = np.full((300, 560, 3), 200, np.uint8)
    canvas[40:260, 300:520] = face
    canvas[73:227, 40:194] = small
    lm = detect_landmarks(canvas)
    assert lm.n_faces == 2
    assert lm.box[0] > 280 and lm.summary()["n_faces"] == 2
    assert landmarks_module.choose_face(np.array([[0, 0, 50, 50], [100, 100, 150, 150]], float),
                                        (250, 250)) == 1   # same size: the central one wins


# ---------------------------------------------------------------- conventions


def test_every_public_name_resolves_from_its_module():
    """``pose`` imports its names on first use: each one in ``__all__`` is found in the module it names."""
    import importlib

    for name in pose.__all__:
        source = importlib.import_module(pose._SOURCES[name], "pose")
        assert getattr(pose, name) is getattr(source, name), name
    assert set(pose._SOURCES) == set(pose.__all__) and len(pose.__all__) == len(pose._SOURCES)
    with pytest.raises(AttributeError):
        pose.no_such_name  # noqa: B018


def test_template_convention():
    template = load_template()
    assert template.shape == (5, 3) and template.dtype == np.float64
    assert np.isclose(np.linalg.norm(template[1] - template[0]), EYE_DISTANCE)
    assert np.argmin(template[:, 2]) == 2                    # the nose tip is closest to the frontal camera
    assert np.all(template[:, 2] < 0)                        # the origin is behind the face
    assert template[3:, 1].min() > template[:2, 1].max()     # y down: mouth below eyes
    assert np.all(np.linalg.norm(template, axis=1) < HEAD_RADIUS)
    fallback = load_template("face_detection")
    assert fallback.shape == (4, 3) and np.argmin(fallback[:, 2]) == 2
    provenance = json.loads(TEMPLATE_PATH.read_text())["provenance"]
    assert "make_template" in provenance["method"] and len(provenance["photos"]) == 4


def test_frontal_camera_is_identity():
    template = load_template()
    K = default_intrinsics(256, 256)
    truth = np.c_[np.eye(3), [0.0, 0.0, CAMERA_DISTANCE]]
    fit = solve_camera(project(template, K, truth), template, (256, 256))
    assert np.allclose(fit.world_to_camera, truth, atol=1e-6)
    assert np.allclose(fit.camera_position, [0.0, 0.0, -CAMERA_DISTANCE], atol=1e-6)
    assert np.allclose(fit.yaw_pitch_roll_deg, 0.0, atol=1e-5)
    assert np.allclose(K, [[512, 0, 128], [0, 512, 128], [0, 0, 1]])


def test_yaw_pitch_roll_signs():
    """Positive yaw turns the face towards image right, pitch > 0 looks up, roll > 0 is clockwise."""
    template = load_template()
    K = default_intrinsics(256, 256)

    def view(yaw=0.0, pitch=0.0, roll=0.0):
        return project(template, K, np.c_[rotation_from_yaw_pitch_roll(yaw, pitch, roll), [0, 0, 7.0]])

    frontal = view()
    eyes_mid = frontal[:2].mean(0)
    assert view(yaw=20)[2, 0] - view(yaw=20)[:2, 0].mean() > 5 > abs(frontal[2, 0] - eyes_mid[0])
    assert view(pitch=15)[2, 1] - view(pitch=15)[:2, 1].mean() < frontal[2, 1] - eyes_mid[1] - 5
    rolled = view(roll=10)
    assert rolled[1, 1] > rolled[0, 1] + 5                    # clockwise (y down): left eye goes down
    for angles in ([20, -10, 5], [-35, 15, -8]):
        fit = solve_camera(view(*angles), template, (256, 256))
        assert np.allclose(fit.yaw_pitch_roll_deg, angles, atol=1e-4)


# ---------------------------------------------------------------- synthetic cameras


def _random_cameras(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    cameras = []
    for _ in range(count):
        angles = rng.uniform(-40, 40), rng.uniform(-20, 20), rng.uniform(-10, 10)
        rotation = rotation_from_yaw_pitch_roll(*angles)
        translation = [rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(6.0, 8.0)]
        cameras.append(np.c_[rotation, translation])
    return cameras


def _camera_errors(fit, truth) -> tuple[float, float]:
    rotation_deg = np.degrees(Rotation.from_matrix(fit.world_to_camera[:, :3] @ truth[:, :3].T).magnitude())
    translation = np.linalg.norm(fit.world_to_camera[:, 3] - truth[:, 3]) / np.linalg.norm(truth[:, 3])
    return float(rotation_deg), float(translation)


def test_solver_recovers_synthetic_cameras():
    """Exact without noise. Under σ = 0.5 px landmark noise at 512² (the size of the test portraits;
    FFHQ is 1024²) every rotation is within 1° and every translation within 2%. At 256² the same noise
    is twice as large relative to the face: there the median rotation error stays below 1° (five points at
    focal 512 px cannot pin every rotation to 1°; the spread is the estimator's own and halves with
    the noise)."""
    template = load_template()
    for size in (512, 256):
        rng = np.random.default_rng(0)
        K = default_intrinsics(size, size)
        clean, noisy = [], []
        for truth in _random_cameras(rng, 24):
            pixels = project(template, K, truth)
            clean.append(_camera_errors(solve_camera(pixels, template, (size, size)), truth))
            noisy.append(_camera_errors(solve_camera(pixels + rng.normal(0, 0.5, pixels.shape), template,
                                                     (size, size)), truth))
        clean, noisy = np.array(clean), np.array(noisy)
        assert clean[:, 0].max() < 1e-5 and clean[:, 1].max() < 1e-7
        assert noisy[:, 1].max() < 0.02
        if size == 512:
            assert noisy[:, 0].max() < 1.0
        else:
            assert np.median(noisy[:, 0]) < 1.0


def test_solver_optimises_focal():
    template = load_template()
    truth = np.c_[rotation_from_yaw_pitch_roll(25, 10, 0), [0.2, -0.1, 9.0]]
    pixels = project(template, default_intrinsics(256, 256, focal=700.0), truth)
    fit = solve_camera(pixels, template, (256, 256), optimise_focal=True)
    assert abs(fit.K[0, 0] - 700.0) < 1.0 and fit.reprojection_error_px < 1e-6


def test_solver_rejects_bad_fit_and_bad_input():
    template = load_template()
    scrambled = np.array([[40, 40], [200, 60], [60, 200], [130, 120], [220, 220]], float)
    fit = solve_camera(scrambled, template, (256, 256))
    assert not fit.accepted and fit.reprojection_error_px > fit.threshold_px
    with pytest.raises(ValueError, match="same order"):
        solve_camera(scrambled[:4], template, (256, 256))


def test_refine_template_lowers_error():
    rng = np.random.default_rng(1)
    truth = load_template()
    K = default_intrinsics(256, 256)
    views = np.stack([project(truth, K, camera) + rng.normal(0, 0.3, (5, 2))
                      for camera in _random_cameras(rng, 16)])
    start = truth + rng.normal(0, 0.08, truth.shape)
    dense = refine_template(views, start, (256, 256))
    sparse = refine_template(views, start, (256, 256), max_lm_images=0)
    assert dense.solver == "lm" and sparse.solver == "trf"
    for result in (dense, sparse):
        assert result.error_after_px < 0.5 * result.error_before_px
        assert result.error_after_px < 0.5                        # down to the pixel noise
        assert np.allclose(result.template[:2], start[:2])        # gauge: the eyes are held
        assert result.template[2, 1] == start[2, 1]
        assert len(result.fits) == 16 and all(fit.accepted for fit in result.fits)
    assert abs(dense.error_after_px - sparse.error_after_px) < 1e-3


# ---------------------------------------------------------------- framing and prepare_photo


def test_crop_intrinsics_match_pixel_map():
    K = default_intrinsics(300, 400)
    camera = np.c_[rotation_from_yaw_pitch_roll(10, 5, 0), [0.1, 0.2, 7.0]]
    box = CropBox(-20, 35, 240)
    expected = (project(load_template(), K, camera) - [box.x0, box.y0]) * (64 / box.side)
    assert np.allclose(project(load_template(), crop_intrinsics(K, box, 64), camera), expected)
    blocks = np.arange(16, dtype=np.float32).reshape(4, 4)  # INTER_AREA averages whole source pixels
    assert crop_and_resize(blocks, CropBox(0, 0, 4), 2)[0, 0] == pytest.approx(2.5)
    padded = crop_and_resize(np.ones((8, 4), np.float32), CropBox(-4, 0, 8), 8, cv2.BORDER_CONSTANT)
    assert padded[:, :4].max() == 0.0 and padded[:, 4:].min() == 1.0


@pytest.mark.parametrize("framing, solve_points", [("aligned", "mesh"), ("landmarks", "mesh"),
                                                   ("landmarks", "paper5")])
def test_prepare_photo(photos, framing, solve_points):
    config = PoseConfig(solve_points=solve_points)
    photo = prepare_photo(photos["grace_hopper"], 64, framing=framing, config=config)
    assert photo.image.shape == (64, 64, 3) and photo.image.dtype == np.uint8
    assert photo.mask.shape == (64, 64) and photo.mask.dtype == np.uint8
    assert np.allclose(photo.K, [[128, 0, 32], [0, 128, 32], [0, 0, 1]])
    assert photo.world_to_camera.shape == (3, 4)
    points, template, method = solve_inputs(photo.landmarks, config)
    assert method == {"mesh": "face_mesh_all", "paper5": "face_mesh"}[solve_points]
    assert len(points) == {"mesh": 468, "paper5": 5}[solve_points] == photo.info["n_points"]
    reprojected = project(template, photo.K, photo.world_to_camera)
    assert np.sqrt(np.mean(np.sum((reprojected - points) ** 2, 1))) == pytest.approx(
        photo.reprojection_error_px)
    assert photo.reprojection_error_px < 0.02 * 64
    assert np.all((photo.landmarks.points > 0) & (photo.landmarks.points < 64))
    columns, rows = np.floor(photo.landmarks.points).astype(int).T
    assert np.all(photo.mask[rows, columns] > 127)
    assert photo.info["framing"] == framing and photo.info["source_size"] == [600, 512]
    json.dumps(photo.info)
    if framing == "landmarks":  # the face fills more of the crop than of the aligned frame
        eye_distance = np.linalg.norm(photo.landmarks.points[1] - photo.landmarks.points[0])
        assert 14 < eye_distance < 30
        # The stated scale: an FFHQ-like crop at focal 2 × width puts the camera about 7 units away.
        camera_distance = np.linalg.norm(-photo.world_to_camera[:, :3].T @ photo.world_to_camera[:, 3])
        assert 6.0 < camera_distance < 9.0
        # A (nearly) frontal real photo: R ≈ I and the camera on the −z axis.
        position = -photo.world_to_camera[:, :3].T @ photo.world_to_camera[:, 3]
        assert np.degrees(np.arccos(-position[2] / camera_distance)) < 10.0
        assert np.degrees(Rotation.from_matrix(photo.world_to_camera[:, :3]).magnitude()) < 10.0


def test_prepare_photo_rejects_and_reads_paths(tmp_path):
    with pytest.raises(PoseRejectedError) as caught:
        prepare_photo(GRACE_HOPPER, 64, config=PoseConfig(max_error_fraction=1e-6))
    assert caught.value.threshold_px == pytest.approx(64e-6) and caught.value.error_px > 0
    with pytest.raises(ImageError):
        prepare_photo(tmp_path / "missing.png", 64)


def test_config_presets():
    assert PoseConfig.paper() == PoseConfig() and PoseConfig.cpu().focal_factor == 2.0


# ---------------------------------------------------------------- load_image


def _write(path, image) -> str:
    assert cv2.imwrite(str(path), image)
    return str(path)


def test_load_image_conversions(tmp_path):
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    loaded = load_image(_write(tmp_path / "gray.png", gray))
    assert loaded.shape == (40, 50, 3) and np.array_equal(loaded[..., 0], gray)
    assert np.array_equal(loaded[..., 0], loaded[..., 2])

    bgra = np.zeros((40, 40, 4), np.uint8)
    bgra[..., 2] = 255                 # red in BGR order
    bgra[:, 20:, 3] = 255              # right half opaque, left half transparent
    loaded = load_image(_write(tmp_path / "rgba.png", bgra))
    assert loaded.shape == (40, 40, 3)
    assert np.all(loaded[:, :20] == 255) and np.all(loaded[:, 20:] == [255, 0, 0])

    deep = (rng.integers(0, 256, (40, 40, 3)) * 257).astype(np.uint16)
    loaded = load_image(_write(tmp_path / "deep.png", deep))
    assert loaded.dtype == np.uint8 and np.array_equal(loaded, (deep // 257)[..., ::-1])

    gray16 = (rng.integers(0, 256, (40, 40)) * 257).astype(np.uint16)
    loaded = load_image(_write(tmp_path / "gray16.png", gray16))
    assert np.array_equal(loaded, np.repeat((gray16 // 257)[..., None].astype(np.uint8), 3, axis=2))

    from PIL import Image  # gray + alpha PNG (colour type 4), which OpenCV cannot write

    gray_alpha = np.stack([np.full((40, 40), 10, np.uint8), np.zeros((40, 40), np.uint8)], axis=2)
    gray_alpha[20:, :, 1] = 255
    Image.fromarray(gray_alpha, mode="LA").save(tmp_path / "gray_alpha.png")
    loaded = load_image(tmp_path / "gray_alpha.png")
    assert np.all(loaded[:20] == 255) and np.all(loaded[20:] == 10)

    color = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    assert np.array_equal(load_image(_write(tmp_path / "color.png", color)), color[..., ::-1])


def test_load_image_honours_exif_orientation(tmp_path):
    from PIL import Image  # pillow comes with matplotlib; only the test writes EXIF with it

    stored = np.zeros((64, 96, 3), np.uint8)
    stored[:32, :32] = [255, 0, 0]     # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6                   # "rotate 90° clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.shape == (96, 64, 3)
    assert loaded[8:24, -24:-8, 0].mean() > 200 and loaded[8:24, 8:24, 0].mean() < 50  # now top-right


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_load_image_truncated(tmp_path, kind):
    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = cv2.imencode("." + kind, image)[1].tobytes()
    path = tmp_path / ("cut." + kind)
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageError, match="truncated"):
        load_image(path)
    path.write_bytes(data)
    assert load_image(path).shape == (64, 64, 3)


def test_load_image_bad_files(tmp_path):
    (tmp_path / "notes.txt").write_text("this is not an image\n")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(tmp_path / "notes.txt")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="cannot be read"):
        load_image(tmp_path / "missing.jpg")
    tiny = _write(tmp_path / "tiny.png", np.zeros((20, 40, 3), np.uint8))
    with pytest.raises(ImageError, match="too small"):
        load_image(tiny)
    assert load_image(tiny, min_side=16).shape == (20, 40, 3)


def test_public_api_exports():
    for name in ("detect_landmarks", "load_template", "solve_camera", "refine_template", "segment_foreground",
                 "load_image", "prepare_photo", "NoFaceError", "PoseRejectedError", "ImageError"):
        assert hasattr(pose, name), name


def test_forked_child_gets_clear_error(photos):
    """MediaPipe crashes in a child forked after the parent built a graph; pose says so instead."""
    detect_landmarks(photos["astronaut"])
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 3
        try:
            landmarks_module._graph("face_mesh", max_num_faces=4, min_detection_confidence=0.5)
            code = 1
        except RuntimeError as err:
            code = 0 if "spawn" in str(err) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_shipped_template_is_reproducible():
    """`python -m pose.make_template` derives the shipped points from Face Mesh (not typed in)."""
    from pose.make_template import derive_template

    points, provenance = derive_template()
    for method, derived in points.items():
        assert np.allclose(derived, load_template(method), atol=0.02), method
    assert provenance["names"]["face_mesh"][2] == "nose_tip"


def test_fit_template_cli(tmp_path, photos):
    from pose.fit_template import main

    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for name, image in photos.items():
        _write(folder / f"{name}.png", image[..., ::-1])
        _write(folder / f"{name}_mirrored.jpg", np.ascontiguousarray(image[:, ::-1, ::-1]))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _write(folder / "blank.png", np.full((96, 96, 3), 90, np.uint8))
    out = tmp_path / "refined.json"
    result = main([str(tmp_path / "photos"), "--out", str(out)])
    assert result.error_after_px < result.error_before_px
    saved = json.loads(out.read_text())["provenance"]["refined"]
    assert saved["counts"] == {"used": 4, "unreadable": 1, "no_face": 1, "fallback_detector": 0,
                               "pose_rejected": 0}
    refined = load_template(path=out)
    assert np.allclose(refined[:2], load_template()[:2])        # the gauge: eyes unchanged
    assert not np.allclose(refined, load_template())
    config = PoseConfig(template_path=str(out), solve_points="paper5")
    photo = prepare_photo(photos["astronaut"], 64, config=config)
    assert np.allclose(project(refined, photo.K, photo.world_to_camera), photo.landmarks.points,
                       atol=3 * photo.reprojection_error_px)


def test_docstring_examples():
    import doctest
    import importlib

    modules = ("camera", "config", "framing", "image_io", "landmarks", "make_template", "mesh_template",
               "refine", "template")
    for name in modules:
        module = importlib.import_module(f"pose.{name}")
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0, name
