/* The report's offline explorer (built by dad3dlib/explorer.py): no dependencies, no network.
 *
 * root: the explorer's div element, holding its data as JSON in its script.x-data element.
 * Meshes are in the display frame of each sample's image: pixels, x right, y down, z away from the
 * viewer. The 3D views are a canvas-2D software renderer: back faces culled, the rest painted far
 * to near with flat Lambert shading. Drag a view (or move the yaw slider) to rotate both views
 * together. The URL hash can set the view: #explorer-yaw=60&explorer-pitch=10&explorer-sample=2
 * &explorer-ablation=NAME.
 */
function dad3dExplorer(root) {
  "use strict";
  const data = JSON.parse(root.querySelector("script.x-data").textContent);
  const el = (name) => root.querySelector("." + name);
  const BACKGROUND = "rgb(236, 241, 247)";
  const LIGHT = (() => { const l = [-0.3, -0.4, -1.0], n = Math.hypot(...l); return l.map((x) => x / n); })();

  function bytes(b64) {
    const s = atob(b64), out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out.buffer;
  }
  const faces = new (data.faces.dtype === "uint32" ? Uint32Array : Uint16Array)(bytes(data.faces.data));

  function vertices(mesh) { // {lo [3], step [3], q: base64 int16 [V*3]} -> Float32Array [V*3]
    if (!mesh.v) {
      const q = new Int16Array(bytes(mesh.q)), v = new Float32Array(q.length);
      for (let i = 0; i < q.length; i++) v[i] = mesh.lo[i % 3] + (q[i] + 32768) * mesh.step[i % 3];
      mesh.v = v;
    }
    return mesh.v;
  }

  const state = { ablation: 0, sample: 0, yaw: 0, pitch: 0 };
  const hash = new URLSearchParams(location.hash.slice(1));
  const number = (k, lo, hi) => Math.min(hi, Math.max(lo, Math.round(Number(hash.get(k))) || 0));
  state.yaw = number("explorer-yaw", -180, 180);
  state.pitch = number("explorer-pitch", -90, 90);
  state.sample = number("explorer-sample", 0, data.samples.length - 1);
  state.ablation = Math.max(0, data.ablations.indexOf(hash.get("explorer-ablation")));

  const ablation = el("x-ablation"), sample = el("x-sample"), yaw = el("x-yaw");
  data.ablations.forEach((name) => ablation.add(new Option(name)));
  data.samples.forEach((s, i) => sample.add(new Option(`${i}: ${s.item_id}`)));
  const images = data.samples.map((s) => { const im = new Image(); im.src = s.image; return im; });

  function dot(ctx, p, colour) {
    ctx.beginPath();
    ctx.arc(p[0], p[1], 2.2, 0, 2 * Math.PI);
    ctx.fillStyle = colour;
    ctx.fill();
  }

  function drawImage() {
    const canvas = el("x-image"), ctx = canvas.getContext("2d"), im = images[state.sample];
    const k = canvas.width / data.size, s = data.samples[state.sample], p = prediction();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = BACKGROUND;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (im.complete) ctx.drawImage(im, 0, 0, canvas.width, canvas.height);
    ctx.setTransform(k, 0, 0, k, 0, 0);
    s.landmarks.forEach((q) => dot(ctx, q, data.colours.gt_landmarks));
    if (p) p.landmarks.forEach((q) => dot(ctx, q, data.colours.prediction_landmarks));
  }

  function drawMesh(canvas, mesh, colour) { // mesh: null (nothing to draw) or an encoded mesh
    const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
    ctx.fillStyle = BACKGROUND;
    ctx.fillRect(0, 0, W, H);
    if (!mesh) return;
    const v = vertices(mesh), n = v.length / 3, c = data.size / 2, k = W / data.size;
    const a = (state.yaw * Math.PI) / 180, b = (state.pitch * Math.PI) / 180;
    const ca = Math.cos(a), sa = Math.sin(a), cb = Math.cos(b), sb = Math.sin(b);
    const p = new Float32Array(3 * n);
    for (let i = 0; i < n; i++) { // yaw about the vertical axis through the image centre, then pitch
      const x = v[3 * i] - c, y = v[3 * i + 1] - c, z = v[3 * i + 2];
      const x1 = ca * x + sa * z, z1 = -sa * x + ca * z;
      p[3 * i] = k * x1 + W / 2;
      p[3 * i + 1] = k * (cb * y - sb * z1) + H / 2;
      p[3 * i + 2] = k * (sb * y + cb * z1);
    }
    const nf = faces.length / 3, order = [], depth = new Float32Array(nf), shade = new Float32Array(nf);
    for (let f = 0; f < nf; f++) {
      const i = 3 * faces[3 * f], j = 3 * faces[3 * f + 1], l = 3 * faces[3 * f + 2];
      const ux = p[j] - p[i], uy = p[j + 1] - p[i + 1], uz = p[j + 2] - p[i + 2];
      const wx = p[l] - p[i], wy = p[l + 1] - p[i + 1], wz = p[l + 2] - p[i + 2];
      const nx = uy * wz - uz * wy, ny = uz * wx - ux * wz, nz = ux * wy - uy * wx;
      if (nz >= 0) continue; // outward normal points away from the viewer: a back face
      shade[f] = Math.max(0, (nx * LIGHT[0] + ny * LIGHT[1] + nz * LIGHT[2]) / Math.hypot(nx, ny, nz));
      depth[f] = p[i + 2] + p[j + 2] + p[l + 2];
      order.push(f);
    }
    order.sort((f, g) => depth[g] - depth[f]);
    ctx.lineWidth = 0.7;
    ctx.lineJoin = "round";
    for (const f of order) {
      const i = 3 * faces[3 * f], j = 3 * faces[3 * f + 1], l = 3 * faces[3 * f + 2], t = 0.25 + 0.75 * shade[f];
      ctx.fillStyle = ctx.strokeStyle = `rgb(${colour.map((x) => Math.round(255 * x * t)).join(",")})`;
      ctx.beginPath();
      ctx.moveTo(p[i], p[i + 1]);
      ctx.lineTo(p[j], p[j + 1]);
      ctx.lineTo(p[l], p[l + 1]);
      ctx.closePath();
      ctx.fill();
      ctx.stroke(); // covers the hairline seams between antialiased triangles
    }
  }

  function prediction() {
    return data.predictions[data.runs[data.ablations[state.ablation]]][state.sample];
  }

  function draw() {
    const p = prediction(), s = data.samples[state.sample];
    ablation.selectedIndex = state.ablation;
    sample.selectedIndex = state.sample;
    yaw.value = state.yaw;
    el("x-yaw-value").textContent = `${Math.round(state.yaw)}\u00b0`;
    el("x-caption").textContent = `${s.item_id}, ${data.runs[data.ablations[state.ablation]]}: ` +
      (p ? p.caption : "no prediction for this sample");
    drawImage();
    drawMesh(el("x-prediction"), p && p.mesh, data.colours.prediction_mesh);
    drawMesh(el("x-gt"), s.mesh, data.colours.gt_mesh);
  }

  let pending = false;
  function redraw() {
    if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; draw(); }); }
  }
  ablation.addEventListener("change", () => { state.ablation = ablation.selectedIndex; redraw(); });
  sample.addEventListener("change", () => { state.sample = sample.selectedIndex; redraw(); });
  yaw.addEventListener("input", () => { state.yaw = Number(yaw.value); redraw(); });
  images.forEach((im, i) => im.addEventListener("load", () => { if (i === state.sample) redraw(); }));
  for (const canvas of [el("x-prediction"), el("x-gt")]) {
    let last = null;
    canvas.addEventListener("pointerdown", (e) => { last = [e.clientX, e.clientY]; canvas.setPointerCapture(e.pointerId); });
    canvas.addEventListener("pointerup", () => { last = null; });
    canvas.addEventListener("pointermove", (e) => {
      if (!last) return;
      state.yaw = ((state.yaw - (e.clientX - last[0]) * 0.6 + 540) % 360) - 180; // the surface follows the pointer
      state.pitch = Math.min(90, Math.max(-90, state.pitch + (e.clientY - last[1]) * 0.6));
      last = [e.clientX, e.clientY];
      redraw();
    });
  }
  draw();
}
