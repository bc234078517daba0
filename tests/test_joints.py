import numpy as np

from okdpose.joints import BABYPOSE12, COCO17


def test_babypose_reference_facts():
    s = BABYPOSE12
    assert s.num_joints == 12
    assert s.names[0] == "right_hand" and s.names[11] == "left_foot"
    assert s.flip_pairs == ((0, 5), (1, 4), (2, 3), (6, 11), (7, 10), (8, 9))
    np.testing.assert_allclose(s.sigmas_array * 10, [.62, .72, .79, .79, .72, .62, .89, .87, 1.07, 1.07, .87, .89])
    assert s.skeleton[0] == (1, 2) and s.skeleton0[0] == (0, 1)
    assert s.coco_category()["id"] == 3 and s.coco_category()["name"] == "infant"


def test_flip_permutation_is_an_involution():
    for s in (BABYPOSE12, COCO17):
        p = s.flip_permutation()
        assert (p[p] == np.arange(s.num_joints)).all()
        names = [n.replace("left", "L").replace("right", "left").replace("L", "right") for n in s.names]
        assert [s.names[i] for i in p] == names
