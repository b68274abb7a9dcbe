"""The viewing ray of a head and the rotation a crop of it shows, against known answers."""
import math

import numpy as np
import pytest
import torch

from dad3dlib.geometry import (FLIP_YZ, apparent_rotation, orthographic_projection, perspective_projection,
                               viewing_ray)

HEAD = np.random.default_rng(0).normal(0.0, 0.05, (50, 3))
FRONTAL = torch.diag(torch.tensor(FLIP_YZ, dtype=torch.float64))  # facing the camera


def model_view(position, R=np.eye(3)):
    mv = np.eye(4)
    mv[:3, :3], mv[:3, 3] = R, np.asarray(position) - R @ HEAD.mean(0)  # the centroid at ``position``
    return mv


def test_a_head_on_the_optical_axis_is_seen_as_it_is():
    P = perspective_projection(500.0, 100.0, 100.0, 0.1, 10.0)
    ray = viewing_ray(HEAD, model_view([0.0, 0.0, -1.5]), P)
    np.testing.assert_allclose(ray, [0.0, 0.0, 1.0], atol=1e-12)
    R = torch.from_numpy(np.diag(FLIP_YZ) @ np.array([[0.8, 0, 0.6], [0, 1, 0], [-0.6, 0, 0.8]]))[None]
    torch.testing.assert_close(apparent_rotation(R, torch.from_numpy(ray)[None]), R)


def test_a_head_off_the_axis_turned_to_face_the_camera_looks_frontal():
    """Centroid at (0.3, 0.2, -1) in OpenGL camera axes: the ray is (0.3, -0.2, 1) normalised in the
    rotation's axes (y and z flipped), at atan(|(0.3, 0.2)|) from the axis; a head turned by that
    ray's shortest-arc rotation (it faces the camera) shows as frontal, and a frontal one shows
    turned away by the same angle."""
    P = perspective_projection(500.0, 100.0, 100.0, 0.1, 10.0)
    ray = viewing_ray(HEAD, model_view([0.3, 0.2, -1.0]), P)
    expected = np.array([0.3, -0.2, 1.0])
    np.testing.assert_allclose(ray, expected / np.linalg.norm(expected), atol=1e-12)
    ray = torch.from_numpy(ray)[None]
    angle = math.atan(math.hypot(0.3, 0.2))
    axis = np.cross([0.0, 0.0, 1.0], expected)
    axis /= np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    turn = torch.from_numpy(np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K)  # Rodrigues
    torch.testing.assert_close(apparent_rotation(turn @ FRONTAL, ray)[0], FRONTAL)
    shown = apparent_rotation(FRONTAL[None], ray)[0]
    seen_angle = math.acos((float(torch.trace(shown @ FRONTAL.T)) - 1) / 2)
    assert seen_angle == pytest.approx(angle, abs=1e-9)


def test_an_orthographic_camera_sees_every_head_along_its_axis():
    P = orthographic_projection(100.0, 100.0, 0.1, 10.0)
    for position in ([0.0, 0.0, -1.0], [0.4, -0.3, -2.0]):
        np.testing.assert_allclose(viewing_ray(HEAD, model_view(position), P), [0.0, 0.0, 1.0], atol=1e-12)
