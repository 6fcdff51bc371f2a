/*
 * splat-viewer.js: interactive 3D Gaussian-splat views for r2d3ray's evaluation report.
 * Part of r2d3ray; Apache License 2.0 (the LICENSE file beside this script).
 *
 * Why a renderer of our own rather than a packaged viewer: the report has to work opened from
 * disk with no network. Chromium refuses ES modules, fetch() and workers to file:// pages, and
 * the WebGL splat viewers on npm ship as ES modules that sort in web workers (gsplat also loads
 * WebAssembly) or need three.js. This is one classic script with no dependencies: WebGL2,
 * screen-space Gaussians projected as 3DGS/gsplat do (EWA: J·W·Σ·Wᵀ·Jᵀ plus a 0.3 px² blur),
 * sorted by depth on the CPU and alpha-blended back to front.
 *
 * Page contract (r2d3ray/eval/viewer.py writes both sides):
 *   <script src="viewer/splats_000.js">   sets window.R2D3_SPLATS["000/0"] = {count, center, radius, data, ...}
 *   <canvas class="splat-viewer" data-splats="000/0" data-group="000">
 *   <script src="viewer/splat-viewer.js"> draws every canvas.splat-viewer once the page is parsed
 * ``data`` is base64 of, little-endian and 22 bytes a Gaussian: uint16 means (count x 3, world units
 * with y up, each axis quantised over [bounds[k], bounds[3 + k]]), float16 3D covariances divided by
 * ``covariance_scale`` (count x 6: xx xy xz yy yz zz) and uint8 RGBA (count x 4, A = opacity).
 * Canvases of one data-group share their camera: orbiting or zooming one moves the others.
 * Once every viewer has drawn its first frame <html data-splat-viewers> is "ready"; a viewer
 * that cannot draw says why in its box and in console.error, and the attribute is "error".
 */
(function () {
  "use strict";

  var FXFY = 1422.222 / 1024; // DiffSplat's normalised focal (39.6° field of view), as the report's renders
  var ELEVATION = 10 * Math.PI / 180; // DiffSplat's rig elevation: the first view matches the grids' first column
  var HALF_FOV = Math.atan(0.5 / FXFY);
  var FRAME_MARGIN = 1.2; // the initial distance, relative to the one whose view the bounding sphere just fills
  var BACKGROUND = [0.93, 0.93, 0.93]; // light grey: white objects stay visible, canvases stand out on the page
  var BLUR_PX2 = 0.3; // gsplat's screen-space dilation: sub-pixel Gaussians cover a pixel instead of aliasing
  var TEXELS_PER_GAUSSIAN = 4;
  var TEXTURE_WIDTH = 2048; // WebGL2 guarantees MAX_TEXTURE_SIZE >= 2048
  var GAUSSIANS_PER_ROW = TEXTURE_WIDTH / TEXELS_PER_GAUSSIAN; // 512, hence "& 511" and ">> 9" below
  var BYTES_PER_GAUSSIAN = 6 + 12 + 4;
  var MAX_CANVAS_PX = 1024;

  var VERTEX_SHADER = [
    "#version 300 es",
    "precision highp float;",
    "precision highp int;",
    "uniform highp sampler2D u_data;  // per Gaussian 4 texels: mean, cov xx xy xz yy, cov yz zz, rgba",
    "uniform mat4 u_view;             // world -> OpenCV camera (x right, y down, z forward)",
    "uniform float u_focal;           // px",
    "uniform vec2 u_viewport;         // px",
    "uniform float u_blur;            // px², added to the 2D covariance's diagonal",
    "in vec2 a_corner;                // quad corner in [-1, 1]²",
    "in uint a_index;                 // per instance: Gaussian id, back to front",
    "out vec4 v_color;",
    "out vec2 v_offset;               // from the Gaussian's centre, in standard deviations",
    "void main() {",
    "  int i = int(a_index);",
    "  ivec2 texel = ivec2((i & 511) * 4, i >> 9);",
    "  vec4 mean = texelFetch(u_data, texel, 0);",
    "  vec4 c0 = texelFetch(u_data, texel + ivec2(1, 0), 0);",
    "  vec4 c1 = texelFetch(u_data, texel + ivec2(2, 0), 0);",
    "  vec4 color = texelFetch(u_data, texel + ivec2(3, 0), 0);",
    "  vec4 cam = u_view * vec4(mean.xyz, 1.0);",
    "  if (cam.z < 0.01 || color.a < 1.0 / 255.0) { gl_Position = vec4(0.0, 0.0, 2.0, 1.0); return; }",
    "  mat3 sigma = mat3(c0.x, c0.y, c0.z, c0.y, c0.w, c1.x, c0.z, c1.x, c1.y);",
    "  // Jacobian of the projection at the centre, its x/z and y/z clamped to 1.3x the view as gsplat does",
    "  vec2 limit = 1.3 * 0.5 * u_viewport / u_focal;",
    "  vec2 t = clamp(cam.xy / cam.z, -limit, limit) * cam.z;",
    "  float z = cam.z;",
    "  mat3 J = mat3(u_focal / z, 0.0, 0.0,  0.0, u_focal / z, 0.0,  -u_focal * t.x / (z * z), -u_focal * t.y / (z * z), 0.0);",
    "  mat3 T = J * mat3(u_view);",
    "  mat3 cov = T * sigma * transpose(T);",
    "  float a = cov[0][0] + u_blur, b = cov[0][1], c = cov[1][1] + u_blur;",
    "  float mid = 0.5 * (a + c), radius = length(vec2(0.5 * (a - c), b));",
    "  float major = mid + radius, minor = max(mid - radius, 0.01);",
    "  vec2 axis = abs(b) > 1e-9 ? normalize(vec2(b, major - a)) : (a >= c ? vec2(1.0, 0.0) : vec2(0.0, 1.0));",
    "  // 3 standard deviations along each axis: beyond it alpha < exp(-4.5)·opacity",
    "  vec2 offset = 3.0 * (a_corner.x * sqrt(major) * axis + a_corner.y * sqrt(minor) * vec2(-axis.y, axis.x));",
    "  vec2 pixel = u_focal * cam.xy / z + offset;  // from the image centre, y down",
    "  gl_Position = vec4(pixel.x / (0.5 * u_viewport.x), -pixel.y / (0.5 * u_viewport.y), 0.0, 1.0);",
    "  v_color = color;",
    "  v_offset = 3.0 * a_corner;",
    "}",
  ].join("\n");

  var FRAGMENT_SHADER = [
    "#version 300 es",
    "precision highp float;",
    "in vec4 v_color;",
    "in vec2 v_offset;",
    "out vec4 fragColor;",
    "void main() {",
    "  float alpha = min(0.999, v_color.a * exp(-0.5 * dot(v_offset, v_offset)));",
    "  if (alpha < 1.0 / 255.0) discard;",
    "  fragColor = vec4(v_color.rgb * alpha, alpha);  // premultiplied, blended back to front",
    "}",
  ].join("\n");

  // ------------------------------------------------------------------ the one WebGL2 context
  // Every viewer draws with one hidden WebGL2 canvas and copies the frame into its own 2D canvas:
  // browsers cap live WebGL contexts per page (16 in Chromium), and a report has more viewers.

  var shared = null;

  function compile(gl, type, source) {
    var shader = gl.createShader(type);
    gl.shaderSource(shader, source);
    gl.compileShader(shader);
    if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) {
      throw new Error("shader does not compile: " + gl.getShaderInfoLog(shader));
    }
    return shader;
  }

  function renderer() {
    if (shared) return shared;
    var canvas = document.createElement("canvas");
    var gl = canvas.getContext("webgl2", {
      alpha: false, antialias: false, depth: false, premultipliedAlpha: true, preserveDrawingBuffer: true,
    });
    if (!gl) {
      throw new Error("this browser offers no WebGL2, which the 3D viewer needs " +
                      "(open the report in a recent Chrome, Firefox or Safari, with hardware acceleration on)");
    }
    var program = gl.createProgram();
    gl.attachShader(program, compile(gl, gl.VERTEX_SHADER, VERTEX_SHADER));
    gl.attachShader(program, compile(gl, gl.FRAGMENT_SHADER, FRAGMENT_SHADER));
    gl.linkProgram(program);
    if (!gl.getProgramParameter(program, gl.LINK_STATUS)) {
      throw new Error("shader program does not link: " + gl.getProgramInfoLog(program));
    }
    var corners = gl.createBuffer();
    gl.bindBuffer(gl.ARRAY_BUFFER, corners);
    gl.bufferData(gl.ARRAY_BUFFER, new Float32Array([-1, -1, 1, -1, -1, 1, 1, 1]), gl.STATIC_DRAW);
    shared = {
      canvas: canvas, gl: gl, program: program, corners: corners,
      corner: gl.getAttribLocation(program, "a_corner"),
      index: gl.getAttribLocation(program, "a_index"),
      uniforms: {
        data: gl.getUniformLocation(program, "u_data"),
        view: gl.getUniformLocation(program, "u_view"),
        focal: gl.getUniformLocation(program, "u_focal"),
        viewport: gl.getUniformLocation(program, "u_viewport"),
        blur: gl.getUniformLocation(program, "u_blur"),
      },
    };
    return shared;
  }

  // ------------------------------------------------------------------ splat data

  function decodeBase64(text) {
    var binary = atob(text);
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  var halfTable = null;

  // float16 bit pattern -> value, for all 65,536 patterns (browsers have no Float16Array everywhere yet)
  function halfFloats() {
    if (halfTable) return halfTable;
    halfTable = new Float32Array(65536);
    for (var h = 0; h < 65536; h++) {
      var sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 31, fraction = h & 1023;
      halfTable[h] = exponent === 0 ? sign * fraction * Math.pow(2, -24)
        : exponent === 31 ? (fraction ? NaN : sign * Infinity)
        : sign * (1 + fraction / 1024) * Math.pow(2, exponent - 15);
    }
    return halfTable;
  }

  function uploadSplats(key, payload) {
    var n = payload.count;
    var bytes = decodeBase64(payload.data);
    if (bytes.length !== n * BYTES_PER_GAUSSIAN) {
      throw new Error("splat data '" + key + "' holds " + bytes.length + " bytes, expected " + n + " Gaussians x " +
                      BYTES_PER_GAUSSIAN + " (rewrite the report with this version of r2d3ray)");
    }
    var quantised = new Uint16Array(bytes.buffer, 0, 3 * n);
    var halves = new Uint16Array(bytes.buffer, 6 * n, 6 * n);
    var rgba = new Uint8Array(bytes.buffer, 18 * n, 4 * n);
    var half = halfFloats(), bounds = payload.bounds, scale = payload.covariance_scale;
    var steps = [0, 1, 2].map(function (k) { return (bounds[3 + k] - bounds[k]) / 65535; });
    var means = new Float32Array(3 * n); // kept for depth sorting
    var rows = Math.max(1, Math.ceil(n / GAUSSIANS_PER_ROW));
    var texels = new Float32Array(TEXTURE_WIDTH * rows * 4);
    for (var i = 0; i < n; i++) {
      var o = 16 * i, k;
      for (k = 0; k < 3; k++) texels[o + k] = means[3 * i + k] = bounds[k] + quantised[3 * i + k] * steps[k];
      texels[o + 3] = 1;
      for (k = 0; k < 6; k++) texels[o + 4 + k] = half[halves[6 * i + k]] * scale;
      for (k = 0; k < 4; k++) texels[o + 12 + k] = rgba[4 * i + k] / 255;
    }
    var r = renderer(), gl = r.gl;
    var texture = gl.createTexture();
    gl.bindTexture(gl.TEXTURE_2D, texture);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.NEAREST);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.NEAREST);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
    gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA32F, TEXTURE_WIDTH, rows, 0, gl.RGBA, gl.FLOAT, texels);

    var order = gl.createBuffer();
    var vao = gl.createVertexArray();
    gl.bindVertexArray(vao);
    gl.bindBuffer(gl.ARRAY_BUFFER, r.corners);
    gl.enableVertexAttribArray(r.corner);
    gl.vertexAttribPointer(r.corner, 2, gl.FLOAT, false, 0, 0);
    gl.bindBuffer(gl.ARRAY_BUFFER, order);
    gl.bufferData(gl.ARRAY_BUFFER, 4 * Math.max(n, 1), gl.DYNAMIC_DRAW);
    gl.enableVertexAttribArray(r.index);
    gl.vertexAttribIPointer(r.index, 1, gl.UNSIGNED_INT, 0, 0);
    gl.vertexAttribDivisor(r.index, 1);
    gl.bindVertexArray(null);
    return {
      count: n, means: means, texture: texture, vao: vao, order: order,
      center: payload.center, radius: Math.max(payload.radius, 1e-6),
      indices: new Uint32Array(n), depths: new Float32Array(n), buckets: new Uint32Array(65536),
    };
  }

  // Back-to-front order by camera depth: a counting sort over 16-bit depth keys (O(n); ties
  // within 1/65536 of the depth range do not change what a viewer can see).
  function sortBackToFront(splats, view) {
    var n = splats.count, means = splats.means, depths = splats.depths, buckets = splats.buckets;
    var near = Infinity, far = -Infinity;
    for (var i = 0; i < n; i++) {
      var z = view[2] * means[3 * i] + view[6] * means[3 * i + 1] + view[10] * means[3 * i + 2] + view[14];
      depths[i] = z;
      if (z < near) near = z;
      if (z > far) far = z;
    }
    var scale = far > near ? 65535 / (far - near) : 0;
    buckets.fill(0);
    for (i = 0; i < n; i++) {
      var key = ((far - depths[i]) * scale) | 0; // farthest first
      depths[i] = key;
      buckets[key]++;
    }
    for (var b = 0, start = 0; b < 65536; b++) {
      var size = buckets[b];
      buckets[b] = start;
      start += size;
    }
    for (i = 0; i < n; i++) splats.indices[buckets[depths[i]]++] = i;
  }

  // ------------------------------------------------------------------ cameras

  function orbitView(center, distance, azimuth, elevation) {
    // Azimuth 0 looks from +z, 90° from +x; y is up (the project's world frame).
    var eye = [
      center[0] + distance * Math.cos(elevation) * Math.sin(azimuth),
      center[1] + distance * Math.sin(elevation),
      center[2] + distance * Math.cos(elevation) * Math.cos(azimuth),
    ];
    var forward = normalize([center[0] - eye[0], center[1] - eye[1], center[2] - eye[2]]);
    var right = normalize(cross(forward, [0, 1, 0]));
    var down = cross(forward, right);
    var m = new Float32Array(16); // column-major world -> OpenCV camera
    [right, down, forward].forEach(function (axis, row) {
      m[row] = axis[0];
      m[4 + row] = axis[1];
      m[8 + row] = axis[2];
      m[12 + row] = -(axis[0] * eye[0] + axis[1] * eye[1] + axis[2] * eye[2]);
    });
    m[15] = 1;
    return m;
  }

  function cross(a, b) {
    return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
  }

  function normalize(v) {
    var length = Math.hypot(v[0], v[1], v[2]) || 1;
    return [v[0] / length, v[1] / length, v[2] / length];
  }

  // ------------------------------------------------------------------ viewers

  var groups = {};
  var viewers = [];
  var dirty = new Set();
  var frameRequested = false;

  function newCamera() {
    return { azimuth: 0, elevation: ELEVATION, zoom: 1 };
  }

  function invalidate(group) {
    group.viewers.forEach(function (viewer) { dirty.add(viewer); });
    if (!frameRequested) {
      frameRequested = true;
      requestAnimationFrame(drawDirty);
    }
  }

  function drawDirty() {
    frameRequested = false;
    var pending = Array.from(dirty);
    dirty.clear();
    pending.forEach(function (viewer) {
      try {
        viewer.draw();
      } catch (error) {
        viewer.fail(error);
      }
    });
    var root = document.documentElement;
    if (root.dataset.splatViewers === "loading" && viewers.every(function (v) { return v.frames > 0 || v.failed; })) {
      root.dataset.splatViewers = viewers.some(function (v) { return v.failed; }) ? "error" : "ready";
    }
  }

  function Viewer(canvas) {
    this.canvas = canvas;
    this.frames = 0;
    this.failed = false;
    var key = canvas.dataset.splats;
    var payload = (window.R2D3_SPLATS || {})[key];
    if (!payload) {
      throw new Error("no splat data '" + key + "': the viewer/ folder beside index.html is missing or incomplete");
    }
    this.splats = uploadSplats(key, payload);
    this.context = canvas.getContext("2d");
    var groupName = canvas.dataset.group || key;
    this.group = groups[groupName] || (groups[groupName] = { camera: newCamera(), viewers: [] });
    this.group.viewers.push(this);
    this.resize();
    this.listen();
  }

  Viewer.prototype.resize = function () {
    var ratio = window.devicePixelRatio || 1;
    var side = Math.min(MAX_CANVAS_PX, Math.max(16, Math.round(this.canvas.clientWidth * ratio)));
    if (this.canvas.width === side && this.canvas.height === side) return false;
    this.canvas.width = side;
    this.canvas.height = side;
    return true;
  };

  Viewer.prototype.listen = function () {
    var viewer = this, canvas = this.canvas, camera = this.group.camera, last = null;
    canvas.style.touchAction = "none";
    canvas.style.cursor = "grab";
    canvas.addEventListener("pointerdown", function (event) {
      last = [event.clientX, event.clientY];
      canvas.setPointerCapture(event.pointerId);
      canvas.style.cursor = "grabbing";
    });
    canvas.addEventListener("pointermove", function (event) {
      if (!last) return;
      // Dragging right turns the object right (the camera goes left); dragging down shows its top.
      camera.azimuth -= 0.01 * (event.clientX - last[0]);
      camera.elevation = Math.max(-1.55, Math.min(1.55, camera.elevation + 0.01 * (event.clientY - last[1])));
      last = [event.clientX, event.clientY];
      invalidate(viewer.group);
    });
    function release() {
      last = null;
      canvas.style.cursor = "grab";
    }
    canvas.addEventListener("pointerup", release);
    canvas.addEventListener("pointercancel", release);
    canvas.addEventListener("wheel", function (event) {
      event.preventDefault();
      camera.zoom = Math.max(0.1, Math.min(10, camera.zoom * Math.exp(0.001 * event.deltaY)));
      invalidate(viewer.group);
    }, { passive: false });
    canvas.addEventListener("dblclick", function () {
      Object.assign(camera, newCamera());
      invalidate(viewer.group);
    });
  };

  Viewer.prototype.draw = function () {
    if (this.failed) return;
    var r = renderer(), gl = r.gl, splats = this.splats, camera = this.group.camera;
    var width = this.canvas.width, height = this.canvas.height;
    if (r.canvas.width !== width || r.canvas.height !== height) {
      r.canvas.width = width;
      r.canvas.height = height;
    }
    // The object's bounding sphere fills the view but for a margin (zoom 1).
    var distance = camera.zoom * FRAME_MARGIN * splats.radius / Math.sin(HALF_FOV);
    var view = orbitView(splats.center, distance, camera.azimuth, camera.elevation);
    sortBackToFront(splats, view);

    gl.viewport(0, 0, width, height);
    gl.clearColor(BACKGROUND[0], BACKGROUND[1], BACKGROUND[2], 1);
    gl.clear(gl.COLOR_BUFFER_BIT);
    gl.enable(gl.BLEND);
    gl.blendFunc(gl.ONE, gl.ONE_MINUS_SRC_ALPHA);
    gl.useProgram(r.program);
    gl.uniformMatrix4fv(r.uniforms.view, false, view);
    gl.uniform1f(r.uniforms.focal, FXFY * Math.min(width, height));
    gl.uniform2f(r.uniforms.viewport, width, height);
    gl.uniform1f(r.uniforms.blur, BLUR_PX2);
    gl.activeTexture(gl.TEXTURE0);
    gl.bindTexture(gl.TEXTURE_2D, splats.texture);
    gl.uniform1i(r.uniforms.data, 0);
    gl.bindBuffer(gl.ARRAY_BUFFER, splats.order);
    gl.bufferSubData(gl.ARRAY_BUFFER, 0, splats.indices);
    gl.bindVertexArray(splats.vao);
    gl.drawArraysInstanced(gl.TRIANGLE_STRIP, 0, 4, splats.count);
    gl.bindVertexArray(null);
    var error = gl.getError();
    if (error !== gl.NO_ERROR) throw new Error("WebGL error " + error + " while drawing");

    this.context.drawImage(r.canvas, 0, 0);
    this.frames++;
    this.canvas.dataset.frames = String(this.frames);
  };

  Viewer.prototype.fail = function (error) {
    this.failed = true;
    showError(this.canvas, error);
  };

  function showError(canvas, error) {
    console.error("splat viewer (" + (canvas.dataset.splats || "?") + "): " + error.message);
    var note = document.createElement("p");
    note.className = "splat-viewer-error";
    note.textContent = "3D view unavailable: " + error.message;
    canvas.replaceWith(note);
  }

  function start() {
    var root = document.documentElement;
    root.dataset.splatViewers = "loading";
    var canvases = Array.prototype.slice.call(document.querySelectorAll("canvas.splat-viewer"));
    canvases.forEach(function (canvas) {
      try {
        viewers.push(new Viewer(canvas));
      } catch (error) {
        showError(canvas, error);
        root.dataset.splatViewers = "error";
      }
    });
    Object.keys(groups).forEach(function (name) { invalidate(groups[name]); });
    if (!viewers.length && root.dataset.splatViewers === "loading") root.dataset.splatViewers = "ready";
    window.addEventListener("resize", function () {
      viewers.forEach(function (viewer) {
        if (viewer.resize()) invalidate(viewer.group); // a resized canvas is blank
      });
    });
  }

  window.SplatViewer = { viewers: viewers, groups: groups };
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
