"""Mesh rasterizer on a headless OpenGL context (moderngl, EGL): per-vertex colour, Lambert +
Blinn-Phong shading, z-buffer, with the DAD-3DHeads camera convention.

Convention (docs/ARCHITECTURE.md): ``P`` maps camera space straight to pixels, bottom-up;
``MV`` maps model space to camera space (the camera looks down -z). OpenGL's clip space is
``N @ P @ MV`` with ``N`` the pixel -> NDC map below; rows are flipped to top-down on read-back.
:func:`dad3dlib.geometry.project` is the one projection formula (docs/ARCHITECTURE.md, conventions) every module uses for annotations.

Shapes: V vertices, F faces, H x W image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from .geometry import vertex_normals

_SYSTEM_PACKAGES = "libegl1 libgl1-mesa-dri"


@dataclass(frozen=True)
class Light:
    """Directional light in camera space (pointing from the surface towards the light)."""

    direction: tuple[float, float, float] = (0.0, 0.0, 1.0)
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ambient: float = 0.35
    diffuse: float = 0.65
    specular: float = 0.12
    shininess: float = 24.0


def pixel_to_ndc(width: int, height: int) -> np.ndarray:
    """N [4,4]: pixels (bottom-up) -> OpenGL normalized device coordinates."""
    return np.array([[2.0 / width, 0, 0, -1], [0, 2.0 / height, 0, -1], [0, 0, 1, 0], [0, 0, 0, 1]])


# --------------------------------------------------------------------------------------------
# The OpenGL context: one per process, created on first use
# --------------------------------------------------------------------------------------------
_CTX: dict = {}


def gl_context():
    """The process's standalone EGL context (re-created after a fork)."""
    pid = os.getpid()
    if _CTX.get("pid") != pid:
        import moderngl

        try:
            ctx = moderngl.create_standalone_context(backend="egl")
        except Exception as e:  # moderngl/glcontext raise plain Exceptions
            raise RuntimeError(
                f"cannot create a headless OpenGL (EGL) context: {e}. Install the system libraries "
                f"(Debian/Ubuntu: `apt-get install -y {_SYSTEM_PACKAGES}`; `make setup` does it "
                f"when run as root).") from e
        _CTX.update(pid=pid, ctx=ctx)
    return _CTX["ctx"]


_VERTEX_SHADER = """
#version 330
uniform mat4 mv;
uniform mat4 clip_from_camera;   // N·P
uniform mat3 normal_matrix;      // inverse transpose of MV[:3,:3]
in vec3 in_pos;
in vec3 in_normal;
in vec3 in_color;
out vec3 v_pos;
out vec3 v_normal;
out vec3 v_color;
void main() {
    vec4 cam = mv * vec4(in_pos, 1.0);
    v_pos = cam.xyz;
    v_normal = normal_matrix * in_normal;
    v_color = in_color;
    gl_Position = clip_from_camera * cam;
}
"""

_FRAGMENT_SHADER = """
#version 330
uniform vec3 light_dir;
uniform vec3 light_color;
uniform vec4 light_terms;        // ambient, diffuse, specular, shininess
uniform float label;             // written to alpha: 1 for the mesh, 0.5 for scenery
uniform vec4 eye;                // the viewer in homogeneous camera space (w = 0: orthographic)
in vec3 v_pos;
in vec3 v_normal;
in vec3 v_color;
out vec4 f_color;
void main() {
    vec3 n = normalize(v_normal);
    vec3 view = normalize(eye.xyz - eye.w * v_pos);
    if (dot(n, view) < 0.0) n = -n;          // back faces seen through open parts
    vec3 l = normalize(light_dir);
    float lambert = max(dot(n, l), 0.0);
    float spec = lambert > 0.0 ? pow(max(dot(n, normalize(l + view)), 0.0), light_terms.w) : 0.0;
    vec3 rgb = v_color * (light_terms.x + light_terms.y * lambert) * light_color
             + light_terms.z * spec * light_color;
    f_color = vec4(clamp(rgb, 0.0, 1.0), label);
}
"""

_PROJECT_SHADER = """
#version 330
uniform mat4 mv;
uniform mat4 clip_from_camera;
in vec3 in_pos;
out vec4 out_clip;
void main() { out_clip = clip_from_camera * (mv * vec4(in_pos, 1.0)); }
"""


def _mat(m: np.ndarray) -> bytes:
    """Row-major numpy matrix -> column-major float32 bytes for a GLSL uniform."""
    return np.ascontiguousarray(np.asarray(m, np.float32).T).tobytes()


class Renderer:
    """Offscreen rasterizer of one image size. ``samples``: MSAA samples (0 = none; llvmpipe's MSAA
    costs ~2.5x the time); with MSAA the edges are anti-aliased and the mask is coverage >= 1/2."""

    def __init__(self, width: int, height: int, samples: int = 0):
        self.width, self.height, self.samples = int(width), int(height), int(samples)
        ctx = self.ctx = gl_context()
        self.program = ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        self.fbo = ctx.framebuffer(
            ctx.renderbuffer((self.width, self.height), 4, samples=self.samples),
            ctx.depth_renderbuffer((self.width, self.height), samples=self.samples))
        self.resolved = (ctx.framebuffer(ctx.renderbuffer((self.width, self.height), 4))
                         if self.samples else self.fbo)
        self._buffers: dict = {}
        self._project_program = None

    def _vao(self, vertices, normals, colors, faces):
        data = np.ascontiguousarray(np.concatenate([vertices, normals, colors], axis=1), dtype=np.float32)  # any layout in
        idx = np.ascontiguousarray(faces, dtype=np.int32)
        key = (data.nbytes, idx.nbytes)  # one buffer set per mesh size, reused across calls
        if key not in self._buffers:
            vbo, ibo = self.ctx.buffer(reserve=data.nbytes), self.ctx.buffer(reserve=idx.nbytes)
            vao = self.ctx.vertex_array(self.program, [(vbo, "3f 3f 3f", "in_pos", "in_normal", "in_color")],
                                        index_buffer=ibo, index_element_size=4)
            self._buffers[key] = (vbo, ibo, vao)
        vbo, ibo, vao = self._buffers[key]
        vbo.write(data)
        ibo.write(idx)
        return vao

    def _draw(self, vertices, faces, colors, model_view, label: float) -> None:
        vertices, faces = np.asarray(vertices, np.float32), np.asarray(faces, np.int64)
        mv = np.asarray(model_view, np.float64)
        vao = self._vao(vertices, vertex_normals(vertices, faces), np.asarray(colors, np.float32), faces)
        self.program["mv"].write(_mat(mv))
        self.program["normal_matrix"].write(_mat(np.linalg.inv(mv[:3, :3]).T))
        self.program["label"].value = label
        vao.render(self.ctx.TRIANGLES)

    def render(self, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray, model_view: np.ndarray,
               projection: np.ndarray, background: np.ndarray | None = None, light: Light = Light(),
               feather: float = 0.0, scenery: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
        """Rasterize one mesh.

        vertices [V,3] model space, faces [F,3], colors [V,3] in [0,1], model_view [4,4],
        projection [4,4] (P of the convention above, perspective or orthographic),
        background [H,W,3] uint8 or None (black)
        -> rgb [H,W,3] uint8 top-down, mask [H,W] bool (pixels where this mesh is visible).
        feather: with a background, blend the silhouette's inner edge over it with a Gaussian of
        this many pixels (cheap anti-aliasing without MSAA; the mask is unchanged).
        scenery: more meshes (vertices, faces, colors, model_view) drawn in the same z-buffer but
        left out of the mask (e.g. shoulders); needs ``samples == 0``.
        """
        if scenery and self.samples:
            raise ValueError("scenery meshes need a renderer without MSAA (samples=0)")
        prog, ctx = self.program, self.ctx
        prog["clip_from_camera"].write(_mat(pixel_to_ndc(self.width, self.height) @ projection))
        prog["eye"].value = (0.0, 0.0, 1.0, 0.0) if projection[3, 2] == 0 else (0.0, 0.0, 0.0, 1.0)
        prog["light_dir"].value = tuple(float(x) for x in light.direction)
        prog["light_color"].value = tuple(float(x) for x in light.color)
        prog["light_terms"].value = (light.ambient, light.diffuse, light.specular, light.shininess)
        self.fbo.use()
        ctx.viewport = (0, 0, self.width, self.height)
        ctx.enable(ctx.DEPTH_TEST)
        ctx.disable(ctx.CULL_FACE)
        self.fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
        for mesh in scenery:
            self._draw(*mesh, label=0.5)
        self._draw(vertices, faces, colors, model_view, label=1.0)
        if self.samples:
            ctx.copy_framebuffer(self.resolved, self.fbo)
        raw = np.frombuffer(self.resolved.read(components=4, alignment=1), np.uint8)
        rgba = raw.reshape(self.height, self.width, 4)[::-1]
        mask = rgba[..., 3] >= 192 if scenery else rgba[..., 3] >= 128
        if background is None:
            return np.ascontiguousarray(rgba[..., :3]), mask
        if background.shape != (self.height, self.width, 3):
            raise ValueError(f"background has shape {background.shape}, expected {(self.height, self.width, 3)}")
        # coverage: MSAA's resolved alpha (colour premultiplied by it), else any label
        alpha = (rgba[..., 3] > 0).astype(np.float32) if scenery else rgba[..., 3].astype(np.float32) / 255.0
        rgb = rgba[..., :3].astype(np.float32)
        if feather > 0:
            soft = cv2.GaussianBlur(alpha, (0, 0), feather) * alpha
            rgb *= (soft / np.maximum(alpha, 1e-6))[..., None]
            alpha = soft
        rgb += background.astype(np.float32) * (1.0 - alpha[..., None])
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mask

    def project_gl(self, points: np.ndarray, model_view: np.ndarray, projection: np.ndarray) -> np.ndarray:
        """The GPU pipeline's own projection (transform feedback + viewport transform) of model-space
        points [N,3] -> image pixels [N,2] top-down; for checking :func:`dad3dlib.geometry.project`."""
        ctx = self.ctx
        if self._project_program is None:
            self._project_program = ctx.program(vertex_shader=_PROJECT_SHADER, varyings=["out_clip"])
        prog = self._project_program
        prog["mv"].write(_mat(model_view))
        prog["clip_from_camera"].write(_mat(pixel_to_ndc(self.width, self.height) @ projection))
        pts = np.ascontiguousarray(points, np.float32)
        vbo, out = ctx.buffer(pts.tobytes()), ctx.buffer(reserve=len(pts) * 16)
        vao = ctx.vertex_array(prog, [(vbo, "3f", "in_pos")])
        self.fbo.use()  # EGL without a bound framebuffer drops transform feedback silently
        vao.transform(out, mode=ctx.POINTS, vertices=len(pts))
        clip = np.frombuffer(out.read(), np.float32).reshape(-1, 4).astype(np.float64)
        for obj in (vao, vbo, out):
            obj.release()
        ndc = clip[:, :2] / clip[:, 3:]
        x = (ndc[:, 0] + 1.0) / 2.0 * self.width
        y = (ndc[:, 1] + 1.0) / 2.0 * self.height
        return np.stack([x, self.height - y], axis=1)


def silhouette(pixels: np.ndarray, faces: np.ndarray, height: int, width: int, supersample: int = 8) -> np.ndarray:
    """CPU reference coverage of projected triangles, sampled at pixel centres (OpenCV, independent
    of OpenGL; for checks). pixels [V,2] top-down image pixels, faces [F,3] -> [H,W] bool."""
    k = supersample
    hi = np.zeros((height * k, width * k), np.uint8)
    tri = np.round((np.asarray(pixels, np.float64)[faces] * k - 0.5) * 16).astype(np.int32)  # 4 fraction bits
    for t in tri:
        cv2.fillConvexPoly(hi, t, 1, lineType=cv2.LINE_8, shift=4)
    return hi[k // 2::k, k // 2::k].astype(bool)
