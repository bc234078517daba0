"""Built-in BabyPose-like data: 16-bit depth frames (mm) of a preterm infant seen from above a crib,
written in the real on-disk layout (`okdpose.data.layout`) with COCO keypoint annotations
(BabyPose-12 joints, category 3 "infant") and noisy detection boxes.

Scene, per frame: a pinhole depth camera (f = 575 px, 640x480) at a subject-specific height
above a mattress, slightly tilted and rotated about the vertical; a crib (mattress, wall tops,
floor beyond) and for some subjects a U-shaped positioning nest; a supine infant made of
capsules (torso, head with a nose that shows where the face turns, upper/lower limbs, hands,
feet) with subject-specific sizes, whose joint angles follow a smooth random walk from frame
to frame (arms across the chest, hands at the face, frog / extended / flexed-up legs, crossing
limbs); limbs rest on what lies under them. Occluders: a blanket draped over legs or torso,
cables and tubes (some attached to the body), a caregiver's hand. Depth noise grows with the
square of the distance, with disparity quantisation, shadow holes beside depth edges and dropouts.

Labels: v = 2 when the joint's own body parts are on top at the joint, v = 1 when another part
or an occluder covers it (labelled, coordinates kept), v = 0 with (0, 0) when it projects
outside the frame. The box is the infant's silhouette extent in the frame (occluders ignored),
`area` its pixel count. Everything is drawn from `numpy.random.default_rng` seeded by
(seed, subject[, frame]), so a seed gives the same bytes on every run; subjects are disjoint
between splits (train, then val, then test subject ids).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

from okdpose.data.layout import FRAME_SIZE, SPLITS, annotation_file, detection_file, image_dir, image_name
from okdpose.joints import BABYPOSE12, JointSpec
from okdpose.params import SyntheticParams

W, H = FRAME_SIZE
FOCAL = 575.0
U0, V0 = (W - 1) / 2, (H - 1) / 2
# zlib level 1 with run-length matching only (Z_RLE): lossless as ever, on these noisy 16-bit frames
# 11 vs 16 ms to write, 3.7 vs 4.3 ms to read and 1 % smaller than level 1's default strategy (2-core
# AMD EPYC avx512_bf16, cv2.imencode of 40 frames); level 3+ saves <10% and decodes ~30% faster
PNG_OPTIONS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
YAW_CHOICES = {1: [0.0], 2: [0.0, 180.0], 4: [0.0, 90.0, 180.0, 270.0]}   # crib orientations (deg)
POSE_CORRELATION = 0.6          # AR(1) coefficient of the joint-angle walk between frames

# part labels (body 1..15, occluders >= 20)
TORSO, HEAD, NOSE = 1, 2, 3
R_UARM, R_FARM, R_HAND, L_UARM, L_FARM, L_HAND = 4, 5, 6, 7, 8, 9
R_THIGH, R_SHANK, R_FOOT, L_THIGH, L_SHANK, L_FOOT = 10, 11, 12, 13, 14, 15
BLANKET, CABLE, CAREGIVER, NEST, CRIB = 20, 21, 22, 23, 24
# parts a BabyPose-12 joint belongs to: any other part on top of it means occluded
JOINT_PARTS = (
    (R_FARM, R_HAND), (R_UARM, R_FARM), (TORSO, R_UARM), (TORSO, L_UARM), (L_UARM, L_FARM), (L_FARM, L_HAND),
    (R_SHANK, R_FOOT), (R_THIGH, R_SHANK), (TORSO, R_THIGH), (TORSO, L_THIGH), (L_THIGH, L_SHANK), (L_SHANK, L_FOOT),
)
# latent pose variables: name -> (low, high), mapped from N(0, 1) through the normal CDF
POSE_RANGES = {
    "bend": (-15, 15), "head_yaw": (-35, 35), "head_roll": (-80, 80),
    "r_arm_abd": (-40, 170), "r_arm_elev": (-10, 55), "r_farm_rel": (-60, 160), "r_farm_elev": (-35, 50),
    "l_arm_abd": (-40, 170), "l_arm_elev": (-10, 55), "l_farm_rel": (-60, 160), "l_farm_elev": (-35, 50),
    "r_thigh_abd": (-35, 85), "r_thigh_elev": (-5, 75), "r_shank_rel": (-45, 60), "r_knee": (0.3, 1.4),
    "l_thigh_abd": (-35, 85), "l_thigh_elev": (-5, 75), "l_shank_rel": (-45, 60), "l_knee": (0.3, 1.4),
    "drift_x": (-60, 60), "drift_y": (-60, 60), "spin": (-25, 25),
}
POSE_KEYS = tuple(POSE_RANGES)


# --------------------------------------------------------------------------- camera

@dataclass(frozen=True)
class Camera:
    center: np.ndarray     # (3,) world mm, z up from the mattress
    rot: np.ndarray        # (3, 3) world -> camera

    def project(self, pts: np.ndarray) -> np.ndarray:
        """World (N, 3) -> (N, 3) of (u, v, depth mm)."""
        pc = (np.asarray(pts, np.float64) - self.center) @ self.rot.T
        z = pc[:, 2]
        return np.stack([FOCAL * pc[:, 0] / z + U0, FOCAL * pc[:, 1] / z + V0, z], axis=1)

    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel world XY on the mattress plane (H, W, 2) and the plane's depth (H, W)."""
        a = ((np.arange(W, dtype=np.float32) - U0) / FOCAL)[None, :]
        b = ((np.arange(H, dtype=np.float32) - V0) / FOCAL)[:, None]
        r = self.rot.astype(np.float32)                 # world ray = R^T (a, b, 1)
        dw = [a * r[0, k] + (b * r[1, k] + r[2, k]) for k in range(3)]
        t = np.float32(-self.center[2]) / dw[2]
        xy = np.stack([np.float32(self.center[0]) + t * dw[0], np.float32(self.center[1]) + t * dw[1]], axis=-1)
        return xy, t


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


def make_camera(xy: Sequence[float], height: float, yaw_deg: float, tilt_deg: Sequence[float]) -> Camera:
    """Camera above (x, y) looking down; image up = world +y rotated by `yaw_deg`."""
    down = np.diag([1.0, -1.0, -1.0])               # x_c = x_w, y_c = -y_w, z_c = -z_w (proper rotation)
    rot = _rot_x(math.radians(tilt_deg[0])) @ _rot_y(math.radians(tilt_deg[1])) @ down @ _rot_z(-math.radians(yaw_deg))
    return Camera(center=np.array([xy[0], xy[1], height], dtype=np.float64), rot=rot)


# --------------------------------------------------------------------------- rendering

class Canvas:
    """A z-buffer (depth mm) with a part label per pixel."""

    def __init__(self, depth: np.ndarray):
        self.depth = depth.astype(np.float32)
        self.label = np.zeros(depth.shape, dtype=np.uint8)

    def capsule(self, a: np.ndarray, b: np.ndarray, ra: float, rb: float, label: int, cam: Camera,
                flatten: float = 1.0) -> None:
        """Draw a (tapered) capsule between world points a and b; `flatten` squashes its height."""
        (ua, va, za), (ub, vb, zb) = cam.project(np.stack([a, b]))
        rmax = FOCAL * max(ra, rb) / max(min(za, zb), 1.0)
        x0, x1 = int(max(math.floor(min(ua, ub) - rmax), 0)), int(min(math.ceil(max(ua, ub) + rmax) + 1, W))
        y0, y1 = int(max(math.floor(min(va, vb) - rmax), 0)), int(min(math.ceil(max(va, vb) + rmax) + 1, H))
        if x0 >= x1 or y0 >= y1:
            return
        px = np.arange(x0, x1, dtype=np.float32)[None, :]
        py = np.arange(y0, y1, dtype=np.float32)[:, None]
        dx, dy = ub - ua, vb - va
        L2 = dx * dx + dy * dy
        t = np.clip(((px - ua) * dx + (py - va) * dy) / L2, 0, 1) if L2 > 1e-6 else np.zeros((1, 1), np.float32)
        zc = za + t * (zb - za)
        r = ra + t * (rb - ra)
        d2 = (px - ua - t * dx) ** 2 + (py - va - t * dy) ** 2       # px^2
        rr = r * r - d2 * (zc / FOCAL) ** 2                            # mm^2 under the surface
        inside = rr > 0
        surf = zc - flatten * np.sqrt(np.maximum(rr, 0))
        self._merge(surf, inside, label, y0, y1, x0, x1)

    def _merge(self, surf, inside, label, y0, y1, x0, x1) -> None:
        zb = self.depth[y0:y1, x0:x1]
        lb = self.label[y0:y1, x0:x1]
        closer = inside & (surf < zb)
        zb[closer] = surf[closer]
        lb[closer] = label

    def overlay(self, depth: np.ndarray, mask: np.ndarray, label: int) -> None:
        closer = mask & (depth < self.depth)
        self.depth[closer] = depth[closer]
        self.label[closer] = label


def _smooth_noise(rng: np.random.Generator, cells: tuple[int, int], amplitude: float) -> np.ndarray:
    """Low-frequency noise field (H, W) of roughly unit std times `amplitude`."""
    coarse = rng.normal(0, 1, (cells[1], cells[0])).astype(np.float32)
    return cv2.resize(coarse * np.float32(amplitude), (W, H), interpolation=cv2.INTER_LINEAR)


def _cdf(u: np.ndarray) -> np.ndarray:
    """Standard normal CDF (tanh approximation, error < 3e-4)."""
    return 0.5 * (1.0 + np.tanh(0.7978845608 * (u + 0.044715 * u ** 3)))


# --------------------------------------------------------------------------- subjects and poses

@dataclass(frozen=True)
class Subject:
    sid: int
    size: dict            # segment lengths / radii (mm)
    camera_height: float
    yaw: float            # degrees: image orientation of the crib
    tilt: tuple[float, float]
    crib: tuple[float, float, float]   # half width, half length (mm), wall height
    body_angle: float     # degrees, infant axis relative to the crib (head direction)
    nest: bool
    pose_bias: np.ndarray  # latent mean per pose variable
    noise_gain: float


def make_subject(sid: int, seed: int, camera_height: tuple[float, float], orientations: int = 1) -> Subject:
    """A subject's body, crib and camera set-up. `orientations` 1: the crib is the same way up in every
    subject's image (a camera fixed to the crib, as BabyPose); 2 or 4: turned 180 deg or any 90 deg."""
    rng = np.random.default_rng([seed, sid])
    k = rng.uniform(0.85, 1.15)                         # overall body size (gestational age)

    def seg(mm: float) -> float:
        return float(mm * k * rng.uniform(0.92, 1.08))

    size = {
        "torso": seg(145), "hip_half": seg(32), "sh_half": seg(45), "torso_r0": seg(46), "torso_r1": seg(52),
        "neck": seg(18), "head_r": seg(46), "uarm": seg(72), "farm": seg(64), "arm_r": seg(15), "hand": seg(32),
        "thigh": seg(85), "shank": seg(78), "leg_r": seg(19), "foot": seg(45),
    }
    return Subject(
        sid=sid, size=size,
        camera_height=float(rng.uniform(*camera_height)),
        yaw=float(rng.choice(YAW_CHOICES[orientations]) + rng.normal(0, 15)),
        tilt=(float(rng.normal(0, 3)), float(rng.normal(0, 3))),
        crib=(float(rng.uniform(230, 320)), float(rng.uniform(340, 430)), float(rng.uniform(120, 260))),
        body_angle=float(rng.normal(0, 12)),
        nest=bool(rng.random() < 0.5),
        pose_bias=rng.normal(0, 0.5, len(POSE_KEYS)),
        noise_gain=float(rng.uniform(0.6, 1.4)),
    )


def pose_walk(subject: Subject, seed: int, frames: int) -> list[dict]:
    """`frames` poses (degrees, mm) from an AR(1) walk in the latent space of POSE_RANGES."""
    rng = np.random.default_rng([seed, subject.sid, 1])
    rho = POSE_CORRELATION
    z = rng.normal(0, 1, len(POSE_KEYS))
    poses = []
    for _ in range(frames):
        if rng.random() < 0.1:                        # occasional big movement: a fresh pose
            z = rng.normal(0, 1, len(POSE_KEYS))
        z = rho * z + math.sqrt(1 - rho * rho) * rng.normal(0, 1, len(POSE_KEYS))
        u = _cdf(z + subject.pose_bias)
        poses.append({k: lo + (hi - lo) * float(ui) for (k, (lo, hi)), ui in zip(POSE_RANGES.items(), u)})
    return poses


def _dir(in_plane_deg: float, elev_deg: float, down: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Unit 3D direction: angle from `down` toward `out` in the mattress plane, then raised by elev."""
    a, e = math.radians(in_plane_deg), math.radians(elev_deg)
    flat = math.cos(a) * down + math.sin(a) * out
    return math.cos(e) * flat + math.sin(e) * np.array([0.0, 0.0, 1.0])


def build_body(s: dict, pose: dict, pelvis_xy: np.ndarray, axis_deg: float):
    """3D joints (12, 3) in BabyPose order and the capsule list of a supine infant.

    Body frame: `ax` points to the head, `lat` to the infant's left (supine, facing the camera:
    lat = ax x up), z up. Limb joints are returned before resting them on the surface.
    """
    ang = math.radians(axis_deg)
    ax0 = np.array([math.cos(ang), math.sin(ang), 0.0])
    up = np.array([0.0, 0.0, 1.0])
    bend = math.radians(pose["bend"])
    ax = math.cos(bend) * ax0 + math.sin(bend) * np.cross(ax0, up)       # lateral trunk bend
    lat = np.cross(ax, up)
    zt0, zt1 = s["torso_r0"] * 0.62, s["torso_r1"] * 0.62
    pelvis = np.array([pelvis_xy[0], pelvis_xy[1], zt0])
    chest = pelvis + s["torso"] * ax + np.array([0, 0, zt1 - zt0])
    hips = {side: pelvis + side * s["hip_half"] * lat - 0.15 * s["torso"] * ax + np.array([0, 0, s["leg_r"] - zt0 + 4])
            for side in (-1, 1)}
    shoulders = {side: chest + side * s["sh_half"] * lat - 0.1 * s["torso"] * ax + np.array([0, 0, s["arm_r"] - zt1 + 8])
                 for side in (-1, 1)}
    joints = {}
    for side, p in ((-1, "r"), (1, "l")):
        out = side * lat
        sh = shoulders[side]
        el = sh + s["uarm"] * _dir(pose[f"{p}_arm_abd"], pose[f"{p}_arm_elev"], -ax, out)
        wr = el + s["farm"] * _dir(pose[f"{p}_arm_abd"] + pose[f"{p}_farm_rel"], pose[f"{p}_farm_elev"], -ax, out)
        hp = hips[side]
        kn = hp + s["thigh"] * _dir(pose[f"{p}_thigh_abd"], pose[f"{p}_thigh_elev"], -ax, out)
        shank_elev = -pose[f"{p}_thigh_elev"] * pose[f"{p}_knee"]
        an = kn + s["shank"] * _dir(pose[f"{p}_thigh_abd"] + pose[f"{p}_shank_rel"], shank_elev, -ax, out)
        joints[p] = (sh, el, wr, hp, kn, an)
    head_dir = math.cos(math.radians(pose["head_yaw"])) * ax + math.sin(math.radians(pose["head_yaw"])) * lat
    return {"pelvis": pelvis, "chest": chest, "ax": ax, "lat": lat, "joints": joints, "head_dir": head_dir}


def _joint_array(joints: dict) -> np.ndarray:
    r_sh, r_el, r_wr, r_hp, r_kn, r_an = joints["r"]
    l_sh, l_el, l_wr, l_hp, l_kn, l_an = joints["l"]
    return np.stack([r_wr, r_el, r_sh, l_sh, l_el, l_wr, r_an, r_kn, r_hp, l_hp, l_kn, l_an])


# --------------------------------------------------------------------------- one frame

def render_frame(subject: Subject, pose: dict, rng: np.random.Generator, cfg: SyntheticParams):
    """Depth (H, W) uint16 mm, joints (12, 3) COCO (x, y, v), silhouette box, area, frame facts."""
    s = subject.size
    axis_deg = 90.0 + subject.body_angle + pose["spin"]        # head toward +y, along the crib
    pelvis_xy = np.array([pose["drift_x"], pose["drift_y"] - 0.35 * s["torso"]])
    body = build_body(s, pose, pelvis_xy, axis_deg)
    body_center = body["pelvis"][:2] + 0.5 * s["torso"] * body["ax"][:2]

    cam_h = subject.camera_height + rng.normal(0, 12)
    yaw = subject.yaw + rng.normal(0, 4)
    tilt = (subject.tilt[0] + rng.normal(0, 0.7), subject.tilt[1] + rng.normal(0, 0.7))
    offset = rng.normal(0, 35, 2)
    if rng.random() < cfg.out_of_frame_prob:        # camera shifted: part of the infant leaves the frame
        a = rng.uniform(0, 2 * math.pi)
        offset += rng.uniform(150, 280) * np.array([math.cos(a), math.sin(a)])
    for _ in range(5):                              # keep at least 6 joints in the frame
        cam = make_camera(body_center + offset, cam_h, yaw, tilt)
        uv = cam.project(_joint_array(body["joints"]))
        if ((uv[:, 0] >= 0) & (uv[:, 0] <= W - 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= H - 1)).sum() >= 6:
            break
        offset = offset * 0.5

    xy, plane_depth = cam.rays()
    # crib (fixed in the world, long side along y): mattress inside, wall tops around it, floor beyond
    hw, hl, wall_h = subject.crib
    inside = (np.abs(xy[..., 0]) < hw) & (np.abs(xy[..., 1]) < hl)
    wall = (np.abs(xy[..., 0]) < hw + 25) & (np.abs(xy[..., 1]) < hl + 25) & ~inside
    height = _smooth_noise(rng, (8, 6), 2.5)        # mattress sag and sheet folds
    height = np.where(inside, height, np.where(wall, wall_h, -600.0)).astype(np.float32)
    canvas = Canvas(plane_depth * (cam_h - height) / cam_h)
    canvas.label[wall] = CRIB

    if subject.nest:                                # U-shaped positioning roll around the infant
        _draw_nest(canvas, cam, body, s)

    # resting surface for the limbs: mattress + nest + torso + head
    _draw_trunk(canvas, cam, body, s, pose)
    support = np.maximum(plane_depth - canvas.depth, 0)
    joints3d = _joint_array(body["joints"])
    limb_r = np.array([s["arm_r"]] * 6 + [s["leg_r"]] * 6) * np.array([0.8, 1, 1, 1, 1, 0.8, 0.8, 1, 1, 1, 1, 0.8])
    rest = np.array([True, True, False, False, True, True, True, True, False, False, True, True])
    uv = cam.project(joints3d)
    ui = np.clip(np.round(uv[:, 0]).astype(int), 0, W - 1)
    vi = np.clip(np.round(uv[:, 1]).astype(int), 0, H - 1)
    floor = support[vi, ui] + limb_r
    joints3d[:, 2] = np.where(rest, np.maximum(joints3d[:, 2], floor), joints3d[:, 2])
    body["joints"] = {"r": tuple(joints3d[[2, 1, 0, 8, 7, 6]]), "l": tuple(joints3d[[3, 4, 5, 9, 10, 11]])}
    _draw_limbs(canvas, cam, body, s)

    body_label = canvas.label.copy()
    body_mask = (body_label >= TORSO) & (body_label <= L_FOOT)

    # occluders
    occ = cfg.occluder_prob
    occluders = []
    if rng.random() < occ * 0.7:
        _draw_blanket(canvas, rng, xy, plane_depth, body, inside)
        occluders.append("blanket")
    if rng.random() < occ * 0.6:
        for _ in range(int(rng.integers(1, 4))):
            _draw_cable(canvas, rng, cam, body, joints3d)
        occluders.append("cables")
    if rng.random() < occ * 0.25:
        _draw_caregiver(canvas, rng, cam, joints3d, cam_h)
        occluders.append("hand")

    # annotations from the clean buffers
    uv = cam.project(joints3d)
    in_frame = (uv[:, 0] >= 0) & (uv[:, 0] <= W - 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= H - 1)
    vis = np.zeros(12, dtype=np.int64)
    for j in np.flatnonzero(in_frame):              # 12 tiny disk lookups per frame, not a hot path
        rad = max(2, int(round(0.5 * FOCAL * limb_r[j] / uv[j, 2])))
        x, y = int(round(uv[j, 0])), int(round(uv[j, 1]))
        patch = canvas.label[max(y - rad, 0):y + rad + 1, max(x - rad, 0):x + rad + 1]
        own = np.isin(patch, JOINT_PARTS[j]).mean()
        vis[j] = 2 if own >= 0.5 else 1
    kps = np.zeros((12, 3), dtype=np.float64)
    kps[in_frame, :2] = uv[in_frame, :2]
    kps[:, 2] = vis

    cols, rows = np.flatnonzero(body_mask.any(axis=0)), np.flatnonzero(body_mask.any(axis=1))
    box = [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]
    depth = _sensor(canvas.depth, rng, cfg.noise_mm * subject.noise_gain)
    return depth, kps, box, float(np.count_nonzero(body_mask)), occluders


def _draw_trunk(canvas: Canvas, cam: Camera, body: dict, s: dict, pose: dict) -> None:
    pelvis, chest, ax = body["pelvis"], body["chest"], body["ax"]
    canvas.capsule(pelvis, chest, s["torso_r0"], s["torso_r1"], TORSO, cam, flatten=0.62)
    hd = body["head_dir"]
    neck = chest + s["torso_r1"] * 0.75 * ax
    hr = s["head_r"]
    head_c = neck + (s["neck"] + hr) * hd
    head_c[2] = hr * 0.85
    canvas.capsule(neck, head_c - 0.3 * hr * hd, s["torso_r1"] * 0.45, hr * 0.75, TORSO, cam, flatten=0.8)
    canvas.capsule(head_c - 0.15 * hr * hd, head_c + 0.2 * hr * hd, hr, hr * 0.95, HEAD, cam, flatten=0.85)
    roll = math.radians(pose["head_roll"])          # where the face points: up, or turned to a side
    side = np.cross(hd, np.array([0.0, 0.0, 1.0]))
    face = math.cos(roll) * np.array([0.0, 0.0, 1.0]) + math.sin(roll) * side
    nose = head_c + 0.3 * hr * hd + 0.85 * hr * face
    canvas.capsule(nose, nose + 0.1 * hr * face, 0.2 * hr, 0.14 * hr, NOSE, cam)


def _draw_limbs(canvas: Canvas, cam: Camera, body: dict, s: dict) -> None:
    up = np.array([0.0, 0.0, 1.0])
    for p, (uarm, farm, hand, thigh, shank, foot) in (("r", (R_UARM, R_FARM, R_HAND, R_THIGH, R_SHANK, R_FOOT)),
                                                      ("l", (L_UARM, L_FARM, L_HAND, L_THIGH, L_SHANK, L_FOOT))):
        sh, el, wr, hp, kn, an = body["joints"][p]
        ar, lr = s["arm_r"], s["leg_r"]
        canvas.capsule(sh, el, ar * 1.05, ar * 0.9, uarm, cam, flatten=0.9)
        canvas.capsule(el, wr, ar * 0.9, ar * 0.72, farm, cam, flatten=0.9)
        fdir = _unit(wr - el)
        canvas.capsule(wr + 0.25 * s["hand"] * fdir, wr + 0.75 * s["hand"] * fdir, ar * 0.8, ar * 0.6, hand, cam, flatten=0.7)
        canvas.capsule(hp, kn, lr * 1.1, lr * 0.85, thigh, cam, flatten=0.9)
        canvas.capsule(kn, an, lr * 0.85, lr * 0.68, shank, cam, flatten=0.9)
        toe = _unit(0.75 * up + 0.45 * _unit(an - kn) + 0.2 * _unit(an[:3] - hp[:3]))
        canvas.capsule(an + 0.15 * s["foot"] * toe, an + s["foot"] * toe, lr * 0.62, lr * 0.5, foot, cam, flatten=0.8)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-9 else np.array([0.0, 0.0, 1.0])


def _draw_nest(canvas: Canvas, cam: Camera, body: dict, s: dict) -> None:
    ax, lat = body["ax"], body["lat"]
    base = body["pelvis"].copy()
    base[2] = 0
    half = s["sh_half"] + s["uarm"] + 25
    feet = s["thigh"] + s["shank"] + 40
    t = np.linspace(0, math.pi, 14)
    pts = [base + (-math.cos(a) * half) * lat + (-math.sin(a) * feet) * ax for a in t]
    pts = [base - half * lat + s["torso"] * 1.1 * ax] + pts + [base + half * lat + s["torso"] * 1.1 * ax]
    r = 32.0
    for a, b in zip(pts[:-1], pts[1:]):
        a, b = a.copy(), b.copy()
        a[2] = b[2] = r * 0.8
        canvas.capsule(a, b, r, r, NEST, cam, flatten=0.8)


def _draw_blanket(canvas: Canvas, rng: np.random.Generator, xy: np.ndarray, plane_depth: np.ndarray, body: dict,
                  crib: np.ndarray) -> None:
    """A sheet over the legs (sometimes up to the chest, sometimes from a side), draped on what is below."""
    ax = body["ax"][:2]
    if rng.random() < 0.8:
        normal = -ax
        edge = body["pelvis"][:2] + ax * rng.uniform(-60, 170)
    else:
        normal = body["lat"][:2] * rng.choice([-1, 1])
        edge = body["pelvis"][:2] + normal * rng.uniform(-40, 40)
    a = rng.normal(0, 0.35)
    normal = np.array([normal[0] * math.cos(a) - normal[1] * math.sin(a), normal[0] * math.sin(a) + normal[1] * math.cos(a)])
    # the drape is smooth: work at half resolution, then upsample
    xy2 = xy[::2, ::2]
    dist = (xy2[..., 0] - edge[0]) * normal[0] + (xy2[..., 1] - edge[1]) * normal[1]   # mm beyond the edge
    if not (dist > 0).any():
        return
    under = np.maximum(plane_depth - canvas.depth, 0)
    under = cv2.resize(cv2.dilate(under, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))), (W // 2, H // 2),
                       interpolation=cv2.INTER_AREA)
    drape = cv2.GaussianBlur(under, (0, 0), 2.5)
    wrinkles = np.abs(cv2.resize(rng.normal(0, rng.uniform(3, 9), (12, 16)).astype(np.float32), (W // 2, H // 2)))
    fold = np.float32(rng.uniform(5, 18)) * np.exp(-((dist - 18) ** 2) / 200.0)
    h = drape + np.float32(rng.uniform(4, 10)) + wrinkles + fold
    h = cv2.resize(h.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
    region = (cv2.resize(dist.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR) > 0) & crib
    canvas.overlay(plane_depth - h, region, BLANKET)


def _draw_cable(canvas: Canvas, rng: np.random.Generator, cam: Camera, body: dict, joints3d: np.ndarray) -> None:
    """A lead or tube: a Bezier curve from the frame edge to a body point or across the frame."""
    r = rng.uniform(1.8, 4.5)
    zc = float(np.median(canvas.depth))
    start_px = np.array([rng.choice([-20, W + 20]), rng.uniform(0, H)]) if rng.random() < 0.5 else \
        np.array([rng.uniform(0, W), rng.choice([-20, H + 20])])
    if rng.random() < 0.6:                          # attached: chest lead, foot sensor, hand line, nasal tube
        target = [body["chest"], joints3d[6], joints3d[11], joints3d[0], joints3d[5]][int(rng.integers(0, 5))]
        end_px = cam.project(target[None])[0, :2] + rng.normal(0, 6, 2)
    else:
        end_px = np.array([W, H]) - start_px + rng.normal(0, 80, 2)
    ctrl = (start_px + end_px) / 2 + rng.normal(0, 120, 2)
    t = np.linspace(0, 1, 48)[:, None]
    pts = (1 - t) ** 2 * start_px + 2 * (1 - t) * t * ctrl + t ** 2 * end_px
    surface = cv2.erode(canvas.depth, np.ones((5, 5), np.uint8))
    ui = np.clip(np.round(pts[:, 0]).astype(int), 0, W - 1)
    vi = np.clip(np.round(pts[:, 1]).astype(int), 0, H - 1)
    seg_depth = surface[vi, ui] - r - rng.uniform(0, 6)
    thickness = max(1, int(round(2 * r * FOCAL / zc)))
    layer = np.full((H, W), np.inf, dtype=np.float32)
    for i in range(len(pts) - 1):                   # 47 cv2.line calls; depth varies along the cable
        p0 = (int(round(pts[i, 0])), int(round(pts[i, 1])))
        p1 = (int(round(pts[i + 1, 0])), int(round(pts[i + 1, 1])))
        cv2.line(layer, p0, p1, float(seg_depth[i]), thickness, lineType=cv2.LINE_8)
    canvas.overlay(layer, np.isfinite(layer), CABLE)


def _draw_caregiver(canvas: Canvas, rng: np.random.Generator, cam: Camera, joints3d: np.ndarray, cam_h: float) -> None:
    """A caregiver's forearm and hand reaching from the frame edge toward a random joint."""
    target = joints3d[int(rng.integers(0, 12))] + np.append(rng.normal(0, 30, 2), 0)
    a = rng.uniform(0, 2 * math.pi)
    direction = np.array([math.cos(a), math.sin(a), 0.0])     # from the hand back toward the edge
    z = target[2] + rng.uniform(35, 140)
    palm = np.array([target[0], target[1], z])
    wrist = palm + 60 * direction
    elbow = wrist + 400 * direction + np.array([0, 0, 120.0])
    canvas.capsule(elbow, wrist, 40, 30, CAREGIVER, cam, flatten=0.8)
    canvas.capsule(wrist, palm, 34, 40, CAREGIVER, cam, flatten=0.45)
    side = np.cross(direction, np.array([0.0, 0.0, 1.0]))
    for k, off in enumerate((-1.5, -0.5, 0.5, 1.5)):
        base = palm - 10 * direction + off * 18 * side
        tip = base + rng.uniform(50, 68) * _unit(-direction + 0.15 * off * side) - np.array([0, 0, rng.uniform(0, 30)])
        canvas.capsule(base, tip, 9, 7.5, CAREGIVER, cam, flatten=0.9)
    thumb = palm + 30 * direction + 40 * side * rng.choice([-1, 1])
    canvas.capsule(palm + 20 * direction, thumb - 20 * direction, 10, 8, CAREGIVER, cam)


def _sensor(depth: np.ndarray, rng: np.random.Generator, noise_mm: float) -> np.ndarray:
    """Structured-light depth sensor: noise ~ z^2, disparity quantisation, shadows and dropouts."""
    z = depth.astype(np.float32)
    z2 = z * z
    noise = rng.standard_normal(z.shape, dtype=np.float32)
    noise *= z2 * np.float32(noise_mm / 800.0 ** 2)
    z += noise
    z += _smooth_noise(rng, (8, 6), 1.5)
    q = z2 * np.float32(1.0 / (FOCAL * 75.0 * 8.0))               # disparity step in mm, ~ z^2
    z = np.round(z / q) * q
    # shadow: the projector sits beside the camera, so surfaces just right of a near->far edge go dark
    jump = (depth[:, 1:] - depth[:, :-1]) > 25
    k = int(rng.integers(2, 6))
    shadow = cv2.dilate(jump.astype(np.uint8), np.ones((1, k), np.uint8), anchor=(k - 1, 0)) > 0
    holes = np.zeros(z.shape, dtype=bool)
    holes[:, 1:] |= shadow
    speckle = rng.integers(0, H * W, int(0.002 * H * W))
    holes.reshape(-1)[speckle] = True
    blobs = np.zeros(z.shape, dtype=np.uint8)
    for _ in range(int(rng.integers(0, 4))):        # dropouts: dark or shiny spots
        centre = (int(rng.integers(0, W)), int(rng.integers(0, H)))
        axes = (int(rng.integers(3, 16)), int(rng.integers(3, 16)))
        cv2.ellipse(blobs, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    holes |= blobs > 0
    holes |= depth > 1800                                           # beyond the sensor's range
    z[holes] = 0
    return np.clip(z, 0, 65535).astype(np.uint16)


# --------------------------------------------------------------------------- data set

def split_subjects(subjects: Sequence[int]) -> dict[str, list[int]]:
    """Subject ids 1..N assigned to splits in order: train first, then val, then test (disjoint)."""
    out, start = {}, 1
    for split, n in zip(SPLITS, subjects):
        out[split] = list(range(start, start + n))
        start += n
    return out


def image_id_for(sid: int, frame: int) -> int:
    return sid * 10_000 + frame + 1


def _detections(rng: np.random.Generator, image_id: int, box: list[float], cfg: SyntheticParams,
                category_id: int) -> list[dict]:
    x, y, w, h = box
    dets = []
    if rng.random() >= 0.02:                        # 2% missed detections
        j = cfg.box_jitter
        cx, cy = x + w / 2 + rng.normal(0, j * w), y + h / 2 + rng.normal(0, j * h)
        w2, h2 = w * math.exp(rng.normal(0, j)), h * math.exp(rng.normal(0, j))
        dets.append(_clip_box([cx - w2 / 2, cy - h2 / 2, w2, h2]) + [float(np.clip(rng.normal(0.93, 0.04), 0.5, 0.999))])
    if rng.random() < cfg.false_positive_prob:      # a low-score box elsewhere (nest, hand, blanket)
        w2, h2 = rng.uniform(60, 220), rng.uniform(60, 260)
        dets.append(_clip_box([rng.uniform(0, W - w2), rng.uniform(0, H - h2), w2, h2]) + [float(rng.uniform(0.05, 0.35))])
    return [{"image_id": image_id, "category_id": category_id, "bbox": [round(v, 2) for v in d[:4]],
             "score": round(d[4], 4)} for d in dets if d[2] >= 2 and d[3] >= 2]


def _clip_box(b: list[float]) -> list[float]:
    x0, y0 = max(b[0], 0.0), max(b[1], 0.0)
    x1, y1 = min(b[0] + b[2], float(W)), min(b[1] + b[3], float(H))
    return [x0, y0, x1 - x0, y1 - y0]


def generate_dataset(root: str | Path, cfg: SyntheticParams, spec: JointSpec = BABYPOSE12,
                     workers: int = 1, progress: bool = True) -> dict:
    """Write a BabyPose-layout data set under `root` (a fresh folder); return counts per split.

    Subjects render in `workers` processes; the output does not depend on `workers`.
    """
    if spec.name != BABYPOSE12.name:
        raise ValueError(f"the synthetic generator writes BabyPose-12 joints, not {spec.name!r}: "
                         "set data.joints: babypose12 or use data.source local/archive/url")
    root = Path(root)
    cat = spec.coco_category()
    jobs = [(root, split, sid, cfg, cat["id"]) for split, sids in split_subjects(cfg.subjects).items() for sid in sids]
    for split in SPLITS:
        image_dir(root, split).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(jobs) * cfg.frames_per_subject, desc="synthetic frames", unit="frame", disable=not progress)
    results = []
    if workers > 1:
        import multiprocessing as mp

        # spawn, not fork: the parent may hold torch/OpenCV thread pools that do not survive a fork
        with mp.get_context("spawn").Pool(min(workers, len(jobs)), initializer=cv2.setNumThreads, initargs=(1,)) as pool:
            for res in pool.imap(_render_subject, jobs):
                results.append(res)
                bar.update(cfg.frames_per_subject)
    else:
        for job in jobs:
            results.append(_render_subject(job))
            bar.update(cfg.frames_per_subject)
    bar.close()
    summary = {}
    for split, sids in split_subjects(cfg.subjects).items():
        images, anns, dets = [], [], []
        for res_split, im, an, de in results:
            if res_split == split:
                images += im
                anns += an
                dets += de
        info = {"description": "okdpose synthetic BabyPose-like depth frames (mm, uint16)",
                "generator": "okdpose.data.synthetic", "seed": cfg.seed, "split": split, "subjects": sids}
        _write_json(annotation_file(root, split),
                    {"info": info, "licenses": [], "images": images, "annotations": anns, "categories": [cat]})
        _write_json(detection_file(root, split), dets)
        summary[split] = {"subjects": sids, "images": len(images), "detections": len(dets)}
    return summary


def _render_subject(job) -> tuple[str, list, list, list]:
    root, split, sid, cfg, category_id = job
    subject = make_subject(sid, cfg.seed, cfg.camera_height, cfg.orientations)
    images, anns, dets = [], [], []
    for frame, pose in enumerate(pose_walk(subject, cfg.seed, cfg.frames_per_subject)):
        rng = np.random.default_rng([cfg.seed, sid, 2, frame])
        depth, kps, box, area, _ = render_frame(subject, pose, rng, cfg)
        iid = image_id_for(sid, frame)
        path = image_dir(root, split) / image_name(iid)
        if not cv2.imwrite(str(path), depth, PNG_OPTIONS):
            raise OSError(f"could not write {path}")
        images.append({"id": iid, "file_name": image_name(iid), "width": W, "height": H,
                       "subject_id": sid, "frame": frame})
        flat = kps.reshape(-1)
        anns.append({"id": iid, "image_id": iid, "category_id": category_id, "iscrowd": 0,
                     "keypoints": [round(float(v), 2) if i % 3 < 2 else int(v) for i, v in enumerate(flat)],
                     "num_keypoints": int((kps[:, 2] > 0).sum()),
                     "bbox": [round(v, 2) for v in box], "area": area})
        dets.extend(_detections(rng, iid, box, cfg, category_id))
    return split, images, anns, dets


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n")
