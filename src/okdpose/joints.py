"""Joint specifications: names, flip pairs, OKS sigmas and skeletons.

Indices are 0-based everywhere in code; `skeleton` is kept 1-based as in COCO's category
record (what `person_keypoints_*.json` stores), `skeleton0` gives the 0-based edges.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class JointSpec:
    """A keypoint layout: everything that depends on which joints are annotated."""

    name: str
    names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    sigmas: tuple[float, ...]          # COCO OKS sigmas (already divided by 10)
    skeleton: tuple[tuple[int, int], ...]  # 1-based, COCO category style
    upper_body: tuple[int, ...]        # for half-body augmentation
    category_id: int
    category_name: str

    def __post_init__(self) -> None:
        j = len(self.names)
        if len(self.sigmas) != j:
            raise ValueError(f"joint spec {self.name}: {len(self.sigmas)} sigmas for {j} joints")
        for a, b in self.flip_pairs:
            if not (0 <= a < j and 0 <= b < j):
                raise ValueError(f"joint spec {self.name}: flip pair ({a}, {b}) out of range")

    @property
    def num_joints(self) -> int:
        return len(self.names)

    @property
    def skeleton0(self) -> tuple[tuple[int, int], ...]:
        return tuple((a - 1, b - 1) for a, b in self.skeleton)

    @property
    def lower_body(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_joints) if i not in self.upper_body)

    @property
    def sigmas_array(self) -> np.ndarray:
        return np.asarray(self.sigmas, dtype=np.float64)

    def flip_permutation(self) -> np.ndarray:
        """Index array p such that flipped[:, j] = original[:, p[j]]."""
        perm = np.arange(self.num_joints)
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm

    def coco_category(self) -> dict:
        """The `categories` entry of a COCO keypoint annotation file."""
        return {
            "id": self.category_id,
            "name": self.category_name,
            "supercategory": self.category_name,
            "keypoints": list(self.names),
            "skeleton": [list(e) for e in self.skeleton],
        }


BABYPOSE12 = JointSpec(
    name="babypose12",
    names=(
        "right_hand", "right_elbow", "right_shoulder",
        "left_shoulder", "left_elbow", "left_hand",
        "right_foot", "right_knee", "right_hip",
        "left_hip", "left_knee", "left_foot",
    ),
    flip_pairs=((0, 5), (1, 4), (2, 3), (6, 11), (7, 10), (8, 9)),
    sigmas=tuple(s / 10 for s in (0.62, 0.72, 0.79, 0.79, 0.72, 0.62,
                                  0.89, 0.87, 1.07, 1.07, 0.87, 0.89)),
    skeleton=((1, 2), (2, 3), (4, 5), (5, 6), (7, 8), (8, 9), (10, 11), (11, 12)),
    upper_body=(0, 1, 2, 3, 4, 5),
    category_id=3,
    category_name="infant",
)

COCO17 = JointSpec(
    name="coco17",
    names=(
        "nose", "left_eye", "right_eye", "left_ear", "right_ear",
        "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
        "left_wrist", "right_wrist", "left_hip", "right_hip",
        "left_knee", "right_knee", "left_ankle", "right_ankle",
    ),
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    sigmas=tuple(s / 10 for s in (0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72,
                                  0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89)),
    skeleton=((16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7),
              (6, 8), (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5),
              (4, 6), (5, 7)),
    upper_body=tuple(range(11)),
    category_id=1,
    category_name="person",
)

JOINT_SPECS: dict[str, JointSpec] = {s.name: s for s in (BABYPOSE12, COCO17)}


def get_joint_spec(name: str) -> JointSpec:
    try:
        return JOINT_SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown joint spec {name!r} (params.yaml data.joints); choose one of {sorted(JOINT_SPECS)}"
        ) from None
