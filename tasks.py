"""Spatial-SSRL's data: verifiable (question, images, answer) samples from raw RGB(-D) pixels, and the reward.
No model code: grpo.py consumes these records, ssrl.py trains on them.

The five self-supervised tasks of Spatial-SSRL (arXiv 2510.27606, section 3.1 and appendix A), a numpy ray-caster that
renders RGB-D scenes when no data is given, the dataset builder/loader used for training, and the reward.
Every answer is computed by a program from the pixels, and `Sample.meta` records enough to re-check it.

The first sample of each task from `python tasks.py --out /tmp/d --per-task 50` (rendered scenes, seed 0); for
training, make_prompt() appends FORMAT_PROMPT:
  shuffle   "<image>The image has been divided into 3 shuffled horizontal strips labeled 0, 1, and 2. Based on
             visual clues such as continuity, alignment, and context, answer the correct arrangement of the strips
             to restore the original image, where the format is 'Left-Middle-Right'."                  -> 2-1-0
  flip      "<image>The image has been divided into 4 labeled 0, 1, 2, and 3. One of the four patches is flipped
             either horizontally or vertically. ... where the format is 'Label-Direction'. The direction can only
             be 0(flipped vertically) or 1(flipped horizontally)."                                     -> 3-0
  crop      "Which image is the missing part in the first image <image>? ... select one of the four options
             <image><image><image><image> as the final answer. The final answer should be chosen from 'A', 'B',
             'C', and 'D'."                                                                            -> D
  depth     "<image>The original image has three regions marked as 1, 2, and 3. ... sort the depths of the three
             regions from smallest to largest from the camera, where the format of the answer is
             'Smallest-Middle-Largest'."                                                               -> 3-1-2
  position  "<image>I've taken an image and there are two regions marked as 1, and 2 on the image. Assume that
             there is a camera at position '1' and it's facing to the left of the image. According to the camera,
             where is the region marker '2'? A. Right-Front B. Left-Front C. Left-Back D. Right-Back. Consider
             cues such as depth, orientation, and 3D spatial relationship and ignore the height difference between
             the two regions. ..."                                                                     -> C

Run:
  python tasks.py --out /tmp/d --per-task 50                  # rendered scenes, no download
  python tasks.py --out DIR --rgb COCO_DIR --rgbd DIODE_OR_MEGADEPTH_DIR --per-task 20000 --workers 8
  python -m bench.tasks                                        # samples/s per task at 640x480
"""
import argparse
import ast
import base64
import contextlib
import csv
import functools
import io
import json
import math
import multiprocessing
import os
import re
import random
import shutil
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

# ---------------------------------------------------------------------------------------------------------------
# Constants and question templates (the paper's appendix A and the released data_process/*.py of
# InternLM/Spatial-SSRL, quoted verbatim; "<image>" is the EasyR1 placeholder)

FORMAT_PROMPT = ("You FIRST think about the reasoning process as an internal monologue and then provide the final "
                 "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST "
                 "BE put in \\boxed{}.")

# Shuffle variants in the proportions of the paper's Table 6: (rows, cols, white-masked patch, weight). The strip
# rows are split evenly between 3 and 4 strips (the table gives only their sum).
SHUFFLE_VARIANTS = ((2, 2, False, 4000), (2, 2, True, 4028),
                    (1, 3, False, 4991 / 2), (1, 4, False, 4991 / 2),
                    (3, 1, False, 3009 / 2), (4, 1, False, 3009 / 2))
_SHUFFLE_2X2 = ("The image has been divided into 4 shuffled patches labeled 0, 1, 2, and 3.{mask} Based on visual "
                "clues such as continuity, alignment, and context, answer the correct arrangement of the patches to "
                "restore the original image, where the format is 'TopLeft-TopRight-BottomLeft-BottomRight'.")
_SHUFFLE_MASK = " One of the four patches is masked completely by white pixels."
_SHUFFLE_STRIPS = ("The image has been divided into {n} shuffled {kind} strips labeled {labels}. Based on visual "
                   "clues such as continuity, alignment, and context, answer the correct arrangement of the strips "
                   "to restore the original image, where the format is '{fmt}'.")
_STRIP_FORMATS = {("horizontal", 3): "Left-Middle-Right", ("horizontal", 4): "Left-Middle1-Middle2-Right",
                  ("vertical", 3): "Top-Middle-Bottom", ("vertical", 4): "Top-Middle1-Middle2-Bottom"}
# Flip: verbatim, including the paper's missing word ("divided into 4 labeled") and "the direction the flip".
_FLIP = ("The image has been divided into 4 labeled 0, 1, 2, and 3. One of the four patches is flipped either "
         "horizontally or vertically. Based on visual clues such as continuity, alignment, and context, answer the "
         "correct patch that is flipped and the direction the flip, where the format is 'Label-Direction'. The "
         "direction can only be 0(flipped vertically) or 1(flipped horizontally).")
_CROP = ("Which image is the missing part in the first image <image>? Based on visual clues such as alignment, image "
         "content, and positional relationship, select one of the four options <image><image><image><image> as the "
         "final answer. The final answer should be chosen from 'A', 'B', 'C', and 'D'.")
_DEPTH = ("The original image has three regions marked as 1, 2, and 3. Consider the content, positional "
          "relationships, depths of the three regions and other cues, and sort the depths of the three regions from "
          "smallest to largest from the camera, where the format of the answer is 'Smallest-Middle-Largest'.")
_POSITION = ("I've taken an image and there are two regions marked as 1, and 2 on the image. Assume that there is a "
             "camera at position '{camera}' and it's facing {facing}. According to the camera, where is the region "
             "marker '{target}'? {options}. Consider cues such as depth, orientation, and 3D spatial "
             "relationship{ignore}. The final answer should be chosen from 'A', 'B', 'C', and 'D'.")
_FACING_PHRASES = {"left": "to the left of the image", "right": "to the right of the image",
                   "towards": "to me", "away": "to away from me"}   # Position.py's wording, "to away" included
FACINGS = ("left", "right", "towards", "away")
# Spec section 6.1: the paper samples the facing uniformly, Position.py with weights 30/30/30/10. We default to the
# paper (a skewed prior is a shortcut a model can learn); pass facing_weights=FACING_WEIGHTS_CODE for the code's.
FACING_WEIGHTS_CODE = (30, 30, 30, 10)
LETTERS = "ABCD"

# The released code's pixel thresholds (25/11-px depth windows, 15-px position blocks, 150 px, 30 px) were applied
# to DIODE (1024x768) and MegaDepth images. Images with a short side >= REFERENCE_SIDE keep them as they are;
# smaller ones (the 112-160 px of the tiny CPU run) scale them down in proportion, so a 150-px lateral gap is still
# a quarter of the frame width, not all of it. Our choice: the paper does not consider small images.
REFERENCE_SIDE = 480
MIN_PATCH = 16   # px; a grid whose patches would be smaller is skipped ("too small")
PALETTE = {0: (255, 150, 0), 1: (230, 30, 30), 2: (20, 170, 40), 3: (40, 90, 255)}   # per-label marker fill
_BORDER = (0, 0, 255)   # the released images' border is blue (a cv2 BGR tuple read as RGB); we keep their look


class Skip(Exception):
    """The image does not admit a sample for this task; the message is the counted reason."""


class BadRecord(ValueError):
    """A dataset record (or one of its images) cannot be used; the message says why in one line."""


@dataclass
class Sample:
    task: str
    problem: str          # question with one "<image>" per image, in order
    answer: str           # the exact string the reward compares with
    images: list          # PIL RGB images
    meta: dict = field(default_factory=dict)


def make_prompt(problem: str) -> str:
    """Question plus the format instruction, as the EasyR1 jinja template `{{ content | trim }} ...` builds it."""
    return problem.strip() + " " + FORMAT_PROMPT


def _pixel_scale(height, width):
    return min(1.0, min(height, width) / REFERENCE_SIDE)

# ---------------------------------------------------------------------------------------------------------------
# Procedural RGB-D scenes: a pinhole camera over a textured ground plane with boxes, spheres and cylinders,
# ray-cast in numpy (Lambert shading, hard shadows, distance fog). Depth is planar z-depth in metres; sky is 0
# (invalid, like the <=0 convention of the plain input layout).

_GROUND_FAR = 60.0   # metres; ground beyond is haze with invalid depth, so the horizon does not dominate depth range


def _hsv(rng, saturation=(0.35, 0.9), value=(0.45, 0.95)):
    hue, sat, val = rng.random(), rng.uniform(*saturation), rng.uniform(*value)
    i, f = int(hue * 6) % 6, hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    return np.array([(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i], np.float32)


def _intersect(obj, ox, oy, oz, dx, dy, dz):
    """Ray parameter t of the first hit with obj (inf where missed) and the hit normal (3 arrays)."""
    inf = np.inf
    if obj["kind"] == "sphere":
        cx, cy, cz = obj["centre"]
        px, py, pz = ox - cx, oy - cy, oz - cz
        a = dx * dx + dy * dy + dz * dz
        b = 2 * (px * dx + py * dy + pz * dz)
        c = px * px + py * py + pz * pz - obj["radius"] ** 2
        disc = b * b - 4 * a * c
        t = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), inf)
        t = np.where(t > 1e-4, t, inf)
        r = obj["radius"]
        return t, ((ox + t * dx - cx) / r, (oy + t * dy - cy) / r, (oz + t * dz - cz) / r)
    if obj["kind"] == "cylinder":
        cx, cz = obj["centre"][0], obj["centre"][2]
        r, top = obj["radius"], obj["height"]
        px, pz = ox - cx, oz - cz
        a = np.maximum(dx * dx + dz * dz, 1e-12)
        b = 2 * (px * dx + pz * dz)
        c = px * px + pz * pz - r * r
        disc = b * b - 4 * a * c
        side = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), inf)
        y = oy + side * dy
        side = np.where((side > 1e-4) & (y >= 0) & (y <= top), side, inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            cap = (top - oy) / dy
        cap_x, cap_z = px + cap * dx, pz + cap * dz
        cap = np.where((cap > 1e-4) & (cap_x * cap_x + cap_z * cap_z <= r * r), cap, inf)
        t = np.minimum(side, cap)
        on_cap = cap <= side
        nx = np.where(on_cap, 0.0, (px + t * dx) / r)
        nz = np.where(on_cap, 0.0, (pz + t * dz) / r)
        return t, (nx, np.where(on_cap, 1.0, 0.0), nz)
    # box rotated by yaw about the vertical axis: slab test in its own frame
    cos, sin = math.cos(obj["yaw"]), math.sin(obj["yaw"])
    cx, cy, cz = obj["centre"]
    lox, loy, loz = cos * (ox - cx) + sin * (oz - cz), oy - cy, -sin * (ox - cx) + cos * (oz - cz)
    ldx, ldy, ldz = cos * dx + sin * dz, dy + 0 * dx, -sin * dx + cos * dz
    near, far, axis = None, None, None
    with np.errstate(divide="ignore", invalid="ignore"):
        for index, (o, d, h) in enumerate(zip((lox, loy, loz), (ldx, ldy, ldz), obj["half"])):
            t1, t2 = (-h - o) / d, (h - o) / d
            lo, hi = np.fmin(t1, t2), np.fmax(t1, t2)
            if near is None:
                near, far, axis = lo, hi, np.zeros(np.shape(lo), np.int8)
            else:
                axis = np.where(lo > near, index, axis)
                near, far = np.fmax(near, lo), np.fmin(far, hi)
    t = np.where((far >= near) & (near > 1e-4), near, inf)
    sign = -np.sign(np.where(axis == 0, ldx, np.where(axis == 1, ldy, ldz)))
    lnx, lny, lnz = (axis == 0) * sign, (axis == 1) * sign, (axis == 2) * sign
    return t, (cos * lnx - sin * lnz, lny, sin * lnx + cos * lnz)


def _place_objects(rng, tan_half):
    """3-8 boxes, spheres and cylinders on the ground, footprints apart, plus a skyline of tall boxes at the back
    (vertical faces give flat far regions, which the depth tasks' far band needs and a bare ground plane lacks)."""
    objects, footprints = [], []
    wanted = rng.randint(3, 8)
    for _ in range(wanted * 8):                      # rejection sampling of non-overlapping footprints
        if len(objects) == wanted:
            break
        kind = rng.choice(("box", "sphere", "cylinder"))
        size = rng.uniform(0.3, 1.4)
        z = rng.uniform(3.0, 22.0)
        x = rng.uniform(-0.9, 0.9) * z * tan_half
        reach = size * 1.8
        if any((x - fx) ** 2 + (z - fz) ** 2 < (reach + fr) ** 2 for fx, fz, fr in footprints):
            continue
        footprints.append((x, z, reach))
        obj = {"kind": kind, "colour": _hsv(rng), "stripes": rng.choice((0.0, 0.0, 3.0, 6.0)),
               "stripe_axis": rng.randrange(3)}
        if kind == "sphere":
            obj.update(radius=size, centre=(x, size, z), reach=size, top=2 * size)
        elif kind == "cylinder":
            height = size * rng.uniform(1.0, 3.5)
            obj.update(radius=size * 0.7, height=height, centre=(x, height / 2, z), reach=size * 0.7, top=height)
        else:
            half = (size * rng.uniform(0.5, 1.2), size * rng.uniform(0.4, 1.8), size * rng.uniform(0.5, 1.2))
            obj.update(half=half, centre=(x, half[1], z), yaw=rng.uniform(0, math.pi), reach=math.hypot(half[0],
                       half[2]), top=2 * half[1])
        objects.append(obj)
    distance = rng.uniform(20.0, 45.0)
    left, right = -1.3 * distance * tan_half, 1.3 * distance * tan_half
    while left < right:
        span = rng.uniform(4.0, 14.0)
        depth, height = rng.uniform(2.0, 6.0), rng.uniform(4.0, 18.0)
        half = (span / 2, height / 2, depth / 2)
        objects.append({"kind": "box", "colour": _hsv(rng, (0.05, 0.5), (0.35, 0.8)), "stripes":
                        rng.choice((0.0, 1.0, 2.0)), "stripe_axis": 1, "half": half, "yaw": 0.0,
                        "centre": (left + span / 2, height / 2, distance + rng.uniform(-3, 3) + depth / 2),
                        "reach": math.hypot(half[0], half[2]), "top": height})
        left += span
    return objects


def _screen_box(points, camera, width, height):
    """Pixel rectangle (rows, cols slices) covering the projections of world points; whole image if any is
    behind the camera. Used to cast rays only where an object (or its shadow) can be."""
    cam_height, sp, cp, focal = camera
    points = np.asarray(points, dtype=np.float64)
    rel_y = points[:, 1] - cam_height
    forward = -sp * rel_y + cp * points[:, 2]
    if (forward < 0.05).any():
        return slice(0, height), slice(0, width)
    cols = points[:, 0] / forward * focal + width / 2
    rows = -(cp * rel_y + sp * points[:, 2]) / forward * focal + height / 2
    row0, row1 = int(np.clip(np.floor(rows.min()) - 1, 0, height)), int(np.clip(np.ceil(rows.max()) + 2, 0, height))
    col0, col1 = int(np.clip(np.floor(cols.min()) - 1, 0, width)), int(np.clip(np.ceil(cols.max()) + 2, 0, width))
    return slice(row0, row1), slice(col0, col1)


def _corners(obj):
    x, _, z = obj["centre"]
    reach = obj["reach"]
    return [(x + sx * reach, y, z + sz * reach) for sx in (-1, 1) for sz in (-1, 1) for y in (0.0, obj["top"])]


def _ground_albedo(rng, nrng, x, z):
    base, other = _hsv(rng, (0.1, 0.6), (0.35, 0.8)), _hsv(rng, (0.1, 0.6), (0.35, 0.8))
    cell = rng.uniform(0.5, 2.5)
    ix, iz = np.floor(x / cell).astype(np.int64), np.floor(z / cell).astype(np.int64)
    style = rng.randrange(3)
    if style == 0:      # checkerboard
        mix = ((ix + iz) & 1).astype(np.float32)
    elif style == 1:    # tiles of random brightness
        table = nrng.random((32, 32), np.float32)
        mix = table[ix % 32, iz % 32]
    else:               # stripes across the view
        mix = (0.5 + 0.5 * np.sin(z * (2 * math.pi / cell))) ** 2
    grain = nrng.random((64, 64), np.float32)            # fine texture in 12.5-cm cells
    fine = grain[np.floor(x * 8).astype(np.int64) % 64, np.floor(z * 8).astype(np.int64) % 64]
    return (base * (1 - mix[..., None]) + other * mix[..., None]) * (0.85 + 0.3 * fine[..., None])


def render_scene(rng: random.Random, width: int, height: int):
    """A random RGB-D scene: (PIL RGB image of width x height, float32 depth [H, W] in metres, 0 = sky)."""
    nrng = np.random.default_rng(rng.getrandbits(63))
    cam_height, pitch = rng.uniform(1.2, 3.0), math.radians(rng.uniform(2, 18))
    tan_half = math.tan(math.radians(rng.uniform(50, 75)) / 2)
    focal = width / 2 / tan_half
    sp, cp = np.float32(math.sin(pitch)), np.float32(math.cos(pitch))
    camera = (cam_height, sp, cp, focal)
    # float32 rays: half the memory traffic of float64, and 1e-7 relative error is far below a pixel
    u = ((np.arange(width) + 0.5 - width / 2) / focal).astype(np.float32)        # right
    v = ((np.arange(height) + 0.5 - height / 2) / focal).astype(np.float32)      # down
    # ray through pixel = forward + u*right - v*up; forward has unit length and the others are orthogonal to it,
    # so the ray parameter t of a hit is its planar depth
    dx = np.broadcast_to(u[None, :], (height, width))
    dy = np.broadcast_to((-sp - v * cp)[:, None], (height, width))
    dz = np.broadcast_to((cp - v * sp)[:, None], (height, width))
    objects = _place_objects(rng, tan_half)

    with np.errstate(divide="ignore"):
        depth = np.where(dy < 0, -cam_height / dy, np.inf)
    depth = np.where(depth * np.sqrt(dx * dx + dy * dy + dz * dz) < _GROUND_FAR, depth, np.inf)
    hit = np.where(np.isfinite(depth), 0, -1)
    normals = [np.zeros_like(dx), np.ones_like(dx), np.zeros_like(dx)]
    boxes = [_screen_box(_corners(obj), camera, width, height) for obj in objects]
    for index, (obj, (rows, cols)) in enumerate(zip(objects, boxes)):
        t, normal = _intersect(obj, 0.0, cam_height, 0.0, dx[rows, cols], dy[rows, cols], dz[rows, cols])
        closer = t < depth[rows, cols]
        depth[rows, cols] = np.where(closer, t, depth[rows, cols])
        hit[rows, cols] = np.where(closer, index + 1, hit[rows, cols])
        for axis in range(3):
            normals[axis][rows, cols] = np.where(closer, normal[axis], normals[axis][rows, cols])
    valid = np.isfinite(depth)
    safe = np.where(valid, depth, 0.0)
    px, py, pz = dx * safe, cam_height + dy * safe, dz * safe

    # albedo: textured ground, objects in their colour with optional stripes
    albedo = _ground_albedo(rng, nrng, px, pz)
    for index, (obj, box) in enumerate(zip(objects, boxes)):
        on, region = hit[box] == index + 1, albedo[box]
        if obj["stripes"]:
            coord = (px, py, pz)[obj["stripe_axis"]][box][on]
            region[on] = obj["colour"] * (0.75 + 0.25 * (np.sin(coord * obj["stripes"] * math.pi) > 0))[:, None]
        else:
            region[on] = obj["colour"]

    # sun light with hard shadows: a shadow ray towards the sun from every hit point that the object's shadow
    # volume (its corners and their ground projections along the light) can cover on screen
    elevation, azimuth = math.radians(rng.uniform(25, 70)), rng.uniform(0, 2 * math.pi)
    light = (math.cos(elevation) * math.cos(azimuth), math.sin(elevation), math.cos(elevation) * math.sin(azimuth))
    lambert = np.clip(normals[0] * light[0] + normals[1] * light[1] + normals[2] * light[2], 0, 1)
    lit = valid.copy()
    origin = [px + normals[0] * 1e-3, py + normals[1] * 1e-3, pz + normals[2] * 1e-3]
    for obj in objects:
        corners = _corners(obj)
        ground = [(x - y / light[1] * light[0], 0.0, z - y / light[1] * light[2]) for x, y, z in corners]
        rows, cols = _screen_box(corners + ground, camera, width, height)
        t, _ = _intersect(obj, origin[0][rows, cols], origin[1][rows, cols], origin[2][rows, cols], *light)
        lit[rows, cols] &= ~np.isfinite(t)
    ambient = rng.uniform(0.25, 0.45)
    colour = albedo * (ambient + (1 - ambient) * lambert * lit)[..., None]

    # sky gradient by ray elevation, and fog towards the horizon colour (a real aerial-perspective depth cue)
    horizon, zenith = _hsv(rng, (0.05, 0.3), (0.8, 1.0)), _hsv(rng, (0.3, 0.7), (0.6, 0.95))
    upward = np.clip(dy / np.sqrt(dx * dx + dy * dy + dz * dz), 0, 1)
    sky = horizon + (zenith - horizon) * np.sqrt(upward)[..., None]
    fog = 1 - np.exp(-safe / rng.uniform(30, 110))
    colour = np.where(valid[..., None], colour * (1 - fog[..., None]) + horizon * fog[..., None], sky)
    rgb = (np.clip(colour, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(rgb, "RGB"), safe.astype(np.float32)

# ---------------------------------------------------------------------------------------------------------------
# Drawing: labelled badges and region markers. Per-label fill colours are our legibility choice within the paper's
# task: a small model reading 28x28-px tokens tells "a red 1" from "a green 2" far sooner than two tiny digits.

_FONTS = {}


def _font(size):
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)   # Pillow's embedded font: same glyphs on every machine
    return _FONTS[size]


def _marker_radius(width, height):
    return max(6, round(0.05 * min(width, height)))


def draw_marker(draw, centre, label, radius):
    """A filled circle in the label's colour with a black edge and a white, black-outlined digit on top."""
    x, y = centre
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=PALETTE[label % 4], outline=(0, 0, 0),
                 width=max(1, radius // 6))
    draw.text((x, y), str(label), fill=(255, 255, 255), font=_font(round(radius * 1.5)), anchor="mm",
              stroke_width=max(1, radius // 7), stroke_fill=(0, 0, 0))


def _draw_grid_labels(image, rows, cols, patch_w, patch_h):
    """2-px blue border around each patch and its position label in the top-left corner (App. A.2)."""
    draw = ImageDraw.Draw(image)
    border = 2 if min(patch_w, patch_h) >= 48 else 1
    radius = max(6, round(0.12 * min(patch_w, patch_h)))
    radius = min(radius, _marker_radius(*image.size) + 4)
    for position in range(rows * cols):
        left, top = (position % cols) * patch_w, (position // cols) * patch_h
        draw.rectangle((left, top, left + patch_w - 1, top + patch_h - 1), outline=_BORDER, width=border)
        draw_marker(draw, (left + border + 2 + radius, top + border + 2 + radius), position, radius)
    return {"border": border, "label_box": 2 * radius + border + 4}

# ---------------------------------------------------------------------------------------------------------------
# The three depth-free tasks (paper section 3.1.1, App. A.2-A.4; data_process/{Shuffle,Flip,Crop}.py)


def _grid(image, rows, cols):
    """Patches of a rows x cols grid, row-major; the image is cut to a multiple of the patch size (code: H // M)."""
    width, height = image.size
    patch_w, patch_h = width // cols, height // rows
    if min(patch_w, patch_h) < MIN_PATCH:
        raise Skip("too small")
    pixels = np.asarray(image)
    patches = [pixels[r * patch_h:(r + 1) * patch_h, c * patch_w:(c + 1) * patch_w] for r in range(rows)
               for c in range(cols)]
    return patches, patch_w, patch_h


def _assemble(patches, rows, cols):
    return np.concatenate([np.concatenate(patches[r * cols:(r + 1) * cols], axis=1) for r in range(rows)], axis=0)


def shuffle_task(image, rng, variant=None):
    """Shuffled patch reordering. variant indexes SHUFFLE_VARIANTS (default: drawn with the Tab. 6 weights)."""
    if variant is None:
        variant = rng.choices(range(len(SHUFFLE_VARIANTS)), weights=[v[3] for v in SHUFFLE_VARIANTS])[0]
    rows, cols, masked, _ = SHUFFLE_VARIANTS[variant]
    patches, patch_w, patch_h = _grid(image, rows, cols)
    order = list(range(rows * cols))
    rng.shuffle(order)                       # position p of the task image shows source patch order[p]
    shown = [patches[k] for k in order]
    masked_position = rng.randrange(rows * cols) if masked else None
    if masked:
        shown[masked_position] = np.full_like(shown[masked_position], 255)   # before the labels, as the code does
    out = Image.fromarray(_assemble(shown, rows, cols))
    drawn = _draw_grid_labels(out, rows, cols, patch_w, patch_h)
    # answer: for each source position (row-major), the label of the patch that belongs there = argsort(order)
    answer = "-".join(str(order.index(k)) for k in range(rows * cols))
    if rows == cols == 2:
        problem = _SHUFFLE_2X2.format(mask=_SHUFFLE_MASK if masked else "")
    else:
        n, kind = max(rows, cols), "horizontal" if rows == 1 else "vertical"
        labels = ", ".join(str(k) for k in range(n - 1)) + f", and {n - 1}"
        problem = _SHUFFLE_STRIPS.format(n=n, kind=kind, labels=labels, fmt=_STRIP_FORMATS[kind, n])
    meta = {"grid": [rows, cols], "order": order, "masked": masked_position, "patch": [patch_w, patch_h], **drawn}
    return Sample("shuffle", "<image>" + problem, answer, [out], meta)


def flip_task(image, rng, min_change=6.0):
    """Flipped patch recognition on a 2x2 grid; direction 0 = vertical (upside down), 1 = horizontal (mirror).

    A flip of a near-symmetric patch (sky, a wall) is invisible and its answer unknowable, which the released code
    never checks: we draw (patch, direction) uniformly among the pairs whose flip changes the patch by at least
    `min_change` grey levels on average, and skip images with none.
    """
    patches, patch_w, patch_h = _grid(image, 2, 2)
    grey = np.asarray(image.convert("L"), dtype=np.int16)
    pairs = [(label, direction) for label in range(4) for direction in (0, 1)]
    for label, direction in rng.sample(pairs, len(pairs)):
        r, c = divmod(label, 2)
        patch = grey[r * patch_h:(r + 1) * patch_h, c * patch_w:(c + 1) * patch_w]
        if np.abs((patch[::-1] if direction == 0 else patch[:, ::-1]) - patch).mean() >= min_change:
            break          # the first visible pair of a random order: uniform among the visible ones
    else:
        raise Skip("flip invisible")
    shown = list(patches)
    shown[label] = patches[label][::-1] if direction == 0 else patches[label][:, ::-1]
    out = Image.fromarray(_assemble(shown, 2, 2))
    drawn = _draw_grid_labels(out, 2, 2, patch_w, patch_h)   # drawn after the flip, so labels stay upright
    meta = {"grid": [2, 2], "flipped": label, "direction": direction, "patch": [patch_w, patch_h], **drawn}
    return Sample("flip", "<image>" + _FLIP, f"{label}-{direction}", [out], meta)


def crop_task(image, rng, min_difference=4.0):
    """Cropped patch inpainting: black out an s x s square (s = min(H, W) // 2), four options A-D.

    Distractors are three of five transforms (Tab. 7), each resized to s x s. On flat content a transform can equal
    the truth (a rotated blank patch), so a transform that differs from the truth or from a distractor already
    taken by less than `min_difference` grey levels on average is passed over; fewer than three left means a skip.
    """
    width, height = image.size
    side = min(width, height) // 2
    if side < MIN_PATCH:
        raise Skip("too small")
    x, y = rng.randint(0, width - side), rng.randint(0, height - side)
    quarter, half = side // 4, side // 2

    def context(margin):
        box = (max(0, x - margin), max(0, y - margin), min(width, x + side + margin), min(height, y + side + margin))
        return image.resize((side, side), Image.BILINEAR, box=box, reducing_gap=1.5)

    truth = image.crop((x, y, x + side, y + side))
    makers = {"interior": lambda: truth.resize((side, side), Image.BILINEAR,
                                               box=(quarter, quarter, side - quarter, side - quarter)),
              "exterior_0.25": lambda: context(quarter), "exterior_0.5": lambda: context(half),
              "rotate_cw": lambda: truth.transpose(Image.Transpose.ROTATE_270),
              "rotate_ccw": lambda: truth.transpose(Image.Transpose.ROTATE_90)}
    # distinctness is judged on 2x2-averaged copies (4x cheaper; a full-size difference is at least as large)
    kept, seen = {"truth": truth}, [np.asarray(truth.reduce(2), dtype=np.int16)]
    for name in rng.sample(sorted(makers), len(makers)):        # built lazily, in a random order
        option = makers[name]()
        small = np.asarray(option.reduce(2), dtype=np.int16)
        if all(np.abs(small - other).mean() >= min_difference for other in seen):
            kept[name] = option
            seen.append(small)
        if len(kept) == 4:
            break
    if len(kept) < 4:
        raise Skip("crop distractors not distinct")
    names = [name for name in kept if name != "truth"]
    answer_index = rng.randrange(4)
    names.insert(answer_index, "truth")
    masked = image.copy()
    masked.paste((0, 0, 0), (x, y, x + side, y + side))
    meta = {"box": [x, y, side, side], "options": names}
    return Sample("crop", _CROP, LETTERS[answer_index], [masked] + [kept[name] for name in names], meta)

# ---------------------------------------------------------------------------------------------------------------
# Window statistics for the depth tasks. Per-block min/max/invalid counts come from strided slices of the image;
# windows of k x k blocks are then a sliding min/max over the small block grid, and the invalid counts an integral
# image. The centre candidates lie on the block grid (stride = block size), which replaces the released code's
# per-pixel Python loop and its 15 s search time-out (machine-speed-dependent output).


def _block_reduce(array, block, function):
    """(rows * block, cols * block) -> (rows, cols) by an elementwise ufunc over strided slices (several times
    faster than a multi-axis reduce of the reshaped array)."""
    columns = functools.reduce(function, [array[:, k::block] for k in range(block)])
    return functools.reduce(function, [columns[k::block] for k in range(block)])


def _sliding(array, span, function):
    """Running reduction over `span` consecutive rows: out[i] = function(array[i], ..., array[i + span - 1])."""
    count = array.shape[0] - span + 1
    return functools.reduce(function, [array[k:k + count] for k in range(span)])


def _window_stats(norm, window):
    """Windows of about `window` px on a block grid: centres (y, x), nanmin, nanmax, invalid count, true size."""
    height, width = norm.shape
    block = max(1, round(window / 5))
    span = max(1, round(window / block))                      # window = span x span blocks
    rows, cols = height // block, width // block
    if rows < span or cols < span:
        return None
    cut = norm[:rows * block, :cols * block]
    block_min = _block_reduce(cut, block, np.fmin)            # fmin/fmax skip NaN, like the code's nanmin/nanmax
    block_max = _block_reduce(cut, block, np.fmax)
    counts = np.zeros((rows + 1, cols + 1))
    counts[1:, 1:] = _block_reduce(np.isnan(cut).astype(np.uint16), block, np.add).cumsum(0).cumsum(1)
    win_min = _sliding(_sliding(block_min, span, np.fmin).T, span, np.fmin).T
    win_max = _sliding(_sliding(block_max, span, np.fmax).T, span, np.fmax).T
    win_invalid = counts[span:, span:] - counts[:-span, span:] - counts[span:, :-span] + counts[:-span, :-span]
    size = span * block
    ys, xs = np.meshgrid(np.arange(win_min.shape[0]) * block + size // 2,
                         np.arange(win_min.shape[1]) * block + size // 2, indexing="ij")
    return {"y": ys.ravel(), "x": xs.ravel(), "min": win_min.ravel(), "max": win_max.ravel(),
            "invalid": win_invalid.ravel(), "size": size}


def _squeeze(array):
    """H x W x 1 (DIODE's depth and mask) to H x W; anything else unchanged."""
    array = np.asarray(array)
    return array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array


def _check_depth(image, depth, mask):
    """Depth as float [H, W] with NaN where invalid (<= 0, non-finite, or masked out)."""
    depth = _squeeze(depth)
    if depth.ndim != 2 or depth.shape != (image.size[1], image.size[0]):
        raise Skip("depth shape mismatch")
    depth = depth.astype(np.float32, copy=False)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(depth) & (depth > 0)
    if mask is not None:
        mask = _squeeze(mask)
        if mask.shape != depth.shape:
            raise Skip("mask shape mismatch")
        valid &= mask.astype(bool)
    if valid.sum() < 0.05 * valid.size:
        raise Skip("too little valid depth")
    return np.where(valid, depth, np.float32(np.nan)), valid


def _marker_fits(candidates, radius, width, height):
    """Boolean filter: a marker of this radius at the candidate centre lies wholly inside the image."""
    return ((candidates["x"] > radius) & (candidates["x"] < width - 1 - radius)
            & (candidates["y"] > radius) & (candidates["y"] < height - 1 - radius))


def _spaced(candidates, index, chosen, min_distance):
    """Boolean filter: candidates at least min_distance px from every chosen (y, x)."""
    keep = index.copy()
    for y, x in chosen:
        keep &= (candidates["y"] - y) ** 2 + (candidates["x"] - x) ** 2 >= min_distance ** 2
    return keep

# ---------------------------------------------------------------------------------------------------------------
# The two depth-based tasks (paper section 3.1.2, App. A.5-A.6; data_process/{Depth,Position}.py)


def depth_task(image, depth, mask, rng):
    """Regional depth ordering: three marked regions in near/mid/far bands, answer nearest-to-farthest labels.

    Normalisation and bands follow Depth.py (p0.5 -> 0, p99.5 -> 1, centres in [0, .3], [.35, .65], [.7, 1], a flat
    25x25 window with range < 0.15, else 11x11 with < 0.2). Depth.py only approximates the paper's gap rule with
    a centre band and a window range; we also enforce it exactly on the chosen windows: min of the farther window -
    max of the nearer > d_min = 0.05, so every answer is unambiguous.
    """
    depth, valid = _check_depth(image, depth, mask)
    height, width = depth.shape
    # percentiles on a regular grid of ~20k pixels: the same to ~1e-3 of the range, and 10x faster at 640x480
    stride = max(1, round(math.sqrt(depth.size / 20000)))
    values = depth[::stride, ::stride][valid[::stride, ::stride]]
    if values.size < 16:
        raise Skip("too little valid depth")
    low, high = np.percentile(values, (0.5, 99.5))
    if not high > low:
        raise Skip("flat depth")
    # pixels outside [p0.5, p99.5] are invalid in Depth.py; a window holds none exactly when min >= 0 and max <= 1
    norm = (depth - np.float32(low)) * np.float32(1 / (high - low))
    scale = _pixel_scale(height, width)
    radius = _marker_radius(width, height)
    for window, max_range in ((max(5, 25 * scale), 0.15), (max(3, 11 * scale), 0.2)):
        stats = _window_stats(norm, window)
        if stats is None:
            raise Skip("too small")
        centre = norm[stats["y"], stats["x"]]
        flat = ((stats["invalid"] == 0) & (stats["min"] >= 0) & (stats["max"] <= 1)
                & (stats["max"] - stats["min"] < max_range) & _marker_fits(stats, radius, width, height))
        bands = [flat & (centre >= 0.0) & (centre <= 0.3), flat & (centre >= 0.35) & (centre <= 0.65),
                 flat & (centre >= 0.7) & (centre <= 1.0)]
        min_distance = max(2.2 * radius, 1.5 * stats["size"])
        chosen, previous_max = [], -np.inf
        for band in bands:
            keep = _spaced(stats, band & (stats["min"] - previous_max > 0.05), chosen, min_distance)
            options = np.flatnonzero(keep)
            if options.size == 0:
                break
            pick = options[rng.randrange(options.size)]
            chosen.append((int(stats["y"][pick]), int(stats["x"][pick])))
            previous_max = stats["max"][pick]
        if len(chosen) == 3:
            break
    else:
        raise Skip("no depth regions")
    labels = [1, 2, 3]
    rng.shuffle(labels)                      # labels[i] marks the i-th nearest region
    out = image.copy()
    draw = ImageDraw.Draw(out)
    for (y, x), label in zip(chosen, labels):
        draw_marker(draw, (x, y), label, radius)
    by_label = sorted(zip(labels, chosen))
    meta = {"centres": [[x, y] for _, (y, x) in by_label],   # label 1, 2, 3: [x, y] px
            "depths": [float(depth[y, x]) for _, (y, x) in by_label],
            "normalised": [float(norm[y, x]) for _, (y, x) in by_label],
            "window": int(stats["size"]), "max_range": max_range}
    return Sample("depth", "<image>" + _DEPTH, "-".join(map(str, labels)), [out], meta)


# Answer of the released code's table (Position.py, the paper's Table 8), keyed by facing: lateral and front/back
# words from the signs of dx (target right of the camera point in the image) and dd (target farther). It equals the
# paper's rotation [x~, z~] = Rot(theta) [dx, dd] with theta = 0 away, 90 left, 180 towards, 270 right; tests check that.
def _relation(facing, dx, dd):
    lateral = {"away": ("Right", "Left", dx), "towards": ("Left", "Right", dx),
               "left": ("Right", "Left", dd), "right": ("Left", "Right", dd)}[facing]
    depthwise = {"away": ("Front", "Back", dd), "towards": ("Back", "Front", dd),
                 "left": ("Back", "Front", dx), "right": ("Front", "Back", dx)}[facing]
    return (lateral[0] if lateral[2] >= 0 else lateral[1]), (depthwise[0] if depthwise[2] >= 0 else depthwise[1])


def position_task(image, depth, mask, rng, facing_weights=None, kind=None):
    """Relative 3D position: camera at one marked region facing left/right/towards/away, where is the other?

    Pairs follow Position.py: min-max normalised depth, flat 15x15 windows (nanmax - nanmin <= 0.15; we also ask
    for half the window and its centre valid) centred within 45% of the frame from its middle. "far": depth gap
    >= 0.25 and distance >= min(H, W) // 8; a lateral gap > 150 px gives the diagonal options, else the answer is by
    depth alone. "near": depth ranges within 0.25 of each other, |dy| < 30 px, |dx| >= min(H, W) // 8; answer by dx
    alone. The sign uses raw depth (window nanmax, as the code stores). Lateral offsets are image-plane pixels, as
    in the paper's thresholds. kind picks "near" or "far" (default: a fair coin; the code's mix is not stated).
    """
    depth, valid = _check_depth(image, depth, mask)
    height, width = depth.shape
    low, high = float(np.nanmin(depth)), float(np.nanmax(depth))
    if not high > low:
        raise Skip("flat depth")
    norm = (depth - np.float32(low)) * np.float32(1 / (high - low))
    scale = _pixel_scale(height, width)
    radius = _marker_radius(width, height)
    stats = _window_stats(norm, max(5, 15 * scale))
    if stats is None:
        raise Skip("too small")
    size = stats["size"]
    central = ((np.abs(stats["y"] - height / 2) <= 0.45 * height) & (np.abs(stats["x"] - width / 2) <= 0.45 * width)
               & (stats["invalid"] <= size * size / 2) & (stats["max"] - stats["min"] <= 0.15)
               & valid[stats["y"], stats["x"]] & _marker_fits(stats, radius, width, height))
    candidates = np.flatnonzero(central)
    if candidates.size < 2:
        raise Skip("no position regions")
    ys, xs = stats["y"].astype(np.int64), stats["x"].astype(np.int64)
    window_min, window_max = stats["min"], stats["max"]
    min_dx = max(min(height, width) // 8, 2.2 * radius)
    kinds = [kind] if kind else (["near", "far"] if rng.random() < 0.5 else ["far", "near"])
    pair = None
    for pair_kind in kinds:
        for _ in range(8):        # a few random first regions, then every partner of it at once
            first = candidates[rng.randrange(candidates.size)]
            dx_all, dy_all = xs[candidates] - xs[first], ys[candidates] - ys[first]
            if pair_kind == "far":
                gap = (np.maximum(window_min[candidates], window_min[first])
                       - np.minimum(window_max[candidates], window_max[first]))
                ok = (gap >= 0.25) & (dx_all ** 2 + dy_all ** 2 >= max(min(height, width) // 8, 2.2 * radius) ** 2)
            else:
                ok = ((np.abs(window_max[first] - window_min[candidates]) <= 0.25)
                      & (np.abs(window_max[candidates] - window_min[first]) <= 0.25)
                      & (np.abs(dy_all) < max(30 * scale, 1)) & (np.abs(dx_all) >= min_dx))
            partners = candidates[ok]
            if partners.size:
                pair = (first, partners[rng.randrange(partners.size)], pair_kind)
                break
        if pair:
            break
    if pair is None:
        raise Skip("no position pair")
    first, second, pair_kind = pair
    camera_region, target_region = (first, second) if rng.random() < 0.5 else (second, first)
    raw_max = {}
    half = size // 2
    for region in (camera_region, target_region):
        y, x = ys[region], xs[region]
        raw_max[region] = float(np.nanmax(depth[max(0, y - half):y + half + 1, max(0, x - half):x + half + 1]))
    facing = rng.choices(FACINGS, weights=facing_weights or (1, 1, 1, 1))[0]
    dx = int(xs[target_region] - xs[camera_region])
    dd = raw_max[target_region] - raw_max[camera_region]
    lateral, depthwise = _relation(facing, dx, dd)
    diagonal_gap = 150 * scale
    if pair_kind == "far" and abs(dx) > diagonal_gap:
        variant, truth, options = "diagonal", f"{lateral}-{depthwise}", ["Left-Front", "Right-Front", "Right-Back",
                                                                         "Left-Back"]
    else:
        # one axis decides: by depth alone for far pairs, by image x alone for near ones
        variant = "far" if pair_kind == "far" else "near"
        decides_lateral = (facing in ("left", "right")) == (variant == "far")
        truth, options = (lateral if decides_lateral else depthwise), ["Left", "Right", "Front", "Back"]
    rng.shuffle(options)
    camera_label = rng.choice((1, 2))
    target_label = 3 - camera_label
    out = image.copy()
    draw = ImageDraw.Draw(out)
    for region, label in ((camera_region, camera_label), (target_region, target_label)):
        draw_marker(draw, (int(xs[region]), int(ys[region])), label, radius)
    problem = _POSITION.format(camera=camera_label, facing=_FACING_PHRASES[facing], target=target_label,
                               options=" ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options)),
                               ignore=" and ignore the height difference between the two regions"
                               if variant != "near" else "")
    meta = {"camera": [int(xs[camera_region]), int(ys[camera_region])],
            "target": [int(xs[target_region]), int(ys[target_region])],
            "camera_label": camera_label, "facing": facing, "variant": variant, "options": options,
            "dx": dx, "dd": dd, "camera_depth": raw_max[camera_region], "target_depth": raw_max[target_region],
            "window": int(size), "diagonal_gap": diagonal_gap}
    return Sample("position", "<image>" + problem, LETTERS[options.index(truth)], [out], meta)

# ---------------------------------------------------------------------------------------------------------------
# Cold-start answers, written by program from each sample's meta (the paper used an LVLM, and its CoT quality "is
# not important": InternLM/Spatial-SSRL training/training.md). Each is a short true <think> naming the cues the task
# rests on, then the \boxed{} answer. The depth and position reasonings are written in the words the tiny base was
# pre-trained to answer ("The lowest marker is 2.", "A. Left, no. B. Back, yes."; tiny.PRIMITIVES): a cold start
# teaches a model to reason from what it can already see (docs/tiny-model.md, section 3).

def cold_start_response(record, rng):
    """A <think>...</think> reasoning plus \\boxed{answer} for `record`, in one of several phrasings."""
    think = TASKS[record["task"]].reasoning(record["meta"], record["answer"], rng)
    return reasoned_answer(think, record["answer"], rng)


def reasoned_answer(think, answer, rng):
    """The answer format the reward checks: <think>Think.</think> then an optional lead-in and \\boxed{answer}."""
    closing = rng.choice(("So the answer is ", "Answer: ", ""))
    return f"<think>{think[0].upper() + think[1:]}</think> {closing}\\boxed{{{answer}}}"


def _shuffle_cot(meta, answer, rng):
    rows, cols = meta["grid"]
    labels = answer.split("-")                  # labels[k]: the patch that belongs at source position k
    joins = [f"{labels[k]} left of {labels[k + 1]}" for k in range(rows * cols - 1) if (k + 1) % cols]
    joins += [f"{labels[k]} above {labels[k + cols]}" for k in range(rows * cols - cols)]
    joins = rng.sample(joins, min(3, len(joins)))
    masked = f"patch {meta['masked']} is blank; " if meta.get("masked") is not None else ""
    return rng.choice(("Edges continue across patches: {masked}{joins}.", "Matching lines and colours: {masked}{joins}.",
                       "{masked}{joins}, by continuity.")).format(masked=masked, joins=", ".join(joins))


def _flip_cot(meta, answer, rng):
    label, direction = meta["flipped"], meta["direction"]
    how = ("upside down", "mirrored left to right")[direction]
    return rng.choice(("Patch {label} breaks continuity: it is {how}.", "Only patch {label} does not line up; it "
                       "looks {how}.", "Patch {label} is {how}; the others continue smoothly.")).format(
                           label=label, how=how)


_CROP_DISTRACTORS = {"interior": "too close", "exterior_0.25": "too wide", "exterior_0.5": "far too wide",
                     "rotate_cw": "turned clockwise", "rotate_ccw": "turned anticlockwise"}


def _crop_cot(meta, answer, rng):
    x, y, side, _ = meta["box"]
    width, height = meta.get("size", [2 * side, 2 * side])
    where = ("top" if y + side / 2 < height / 2 else "bottom") + " " + ("left" if x + side / 2 < width / 2 else "right")
    wrong = [f"{'ABCD'[i]} is {_CROP_DISTRACTORS[name]}" for i, name in enumerate(meta["options"]) if name != "truth"]
    rng.shuffle(wrong)
    return rng.choice(("The hole is {where}; {answer} continues its edges. {wrong}.",
                       "{wrong}. {answer} fits the {where} hole.",
                       "Missing part: {where}. {wrong}; {answer} matches.")).format(
                           where=where, answer=answer, wrong=", ".join(wrong))


def extreme(labels, points, kind):
    """The label of the marker that is `kind` (lowest/highest/leftmost/rightmost) in the image."""
    axis, sign = {"lowest": (1, -1), "highest": (1, 1), "leftmost": (0, 1), "rightmost": (0, -1)}[kind]
    return min(zip(labels, points), key=lambda pair: sign * pair[1][axis])[0]


def _depth_cot(meta, answer, rng):
    """The lowest and the highest marker in the image (lower in a photo is usually nearer), then the labels sorted
    by depth, which the answer gives and the image cues only suggest."""
    near, mid, far = answer.split("-")           # labels from nearest to farthest
    labels, points = (1, 2, 3), meta["centres"]
    return rng.choice(("{low_fact} {high_fact} Near to far: {near}, {mid}, {far}.",
                       "{low_fact} {high_fact} So near to far is {near}, {mid}, {far}.",
                       "{low_fact} {high_fact} By ground contact: {near}, {mid}, {far}.")).format(
        low_fact=f"The lowest marker is {extreme(labels, points, 'lowest')}.",
        high_fact=f"The highest marker is {extreme(labels, points, 'highest')}.", near=near, mid=mid, far=far)


POSITION_DIRECTIONS = ("Facing {facing} from {camera}, {target} is {truth}.",
                       "From {camera} facing {facing}, {target} is {truth}.",
                       "Camera {camera} faces {facing}: {target} is {truth}.")


def _position_cot(meta, answer, rng):
    """Which marker is leftmost and which highest in the image (the lateral and, roughly, the depth cue), the
    camera's view, then which option names that direction."""
    camera, target = meta["camera_label"], 3 - meta["camera_label"]
    points = {camera: meta["camera"], target: meta["target"]}
    labels, points = (1, 2), [points[1], points[2]]
    facing = {"left": "left", "right": "right", "towards": "towards me", "away": "away from me"}[meta["facing"]]
    truth = meta["options"][LETTERS.index(answer)]
    return ("{left} {high} " + rng.choice(POSITION_DIRECTIONS) + " {scan}").format(
        left=f"The leftmost marker is {extreme(labels, points, 'leftmost')}.",
        high=f"The highest marker is {extreme(labels, points, 'highest')}.",
        facing=facing, camera=camera, target=target, truth=truth, scan=scan_options(meta["options"], truth))


def scan_options(options, word):
    """Read the options in order up to the one that is `word`: "A. Left, no. B. Back, yes." Each step copies the
    word that follows a letter in the prompt (the lookup a small transformer learns first: find the token, copy what
    comes next), where "Back is option B." would ask the reverse lookup, which the tiny 3-layer model learnt far
    more slowly (docs/tiny-model.md, section 3)."""
    stop = options.index(word)
    return " ".join(f"{LETTERS[i]}. {option}, {'yes' if i == stop else 'no'}."
                    for i, option in enumerate(options[:stop + 1]))

# ---------------------------------------------------------------------------------------------------------------
# The tasks: one entry each, all that the builder, the cold start and evaluation need to know of a task. A sixth task
# is a sample function, a reasoning writer and an entry here (tests/test_tasks.py registers a toy one).


@dataclass(frozen=True)
class Task:
    sample: object      # (image, rng) -> Sample, or (image, depth, mask, rng) -> Sample when `depth`; raises Skip
    reasoning: object   # (meta, answer, rng) -> the cold start's <think> text
    chance: float       # accuracy of a uniform guess over the answers
    depth: bool = False  # needs RGB-D sources (else any RGB image)


TASKS = {
    # chance: 1 / permutations, mixed over the shuffle variants in their weights
    "shuffle": Task(shuffle_task, _shuffle_cot, sum(w / math.factorial(r * c) for r, c, _, w in SHUFFLE_VARIANTS)
                    / sum(w for *_, w in SHUFFLE_VARIANTS)),
    "flip": Task(flip_task, _flip_cot, 1 / 8),                 # 4 patches x 2 directions
    "crop": Task(crop_task, _crop_cot, 1 / 4),                 # 4 options
    "depth": Task(depth_task, _depth_cot, 1 / 6, depth=True),  # 3! orders
    "position": Task(position_task, _position_cot, 1 / 4, depth=True),   # 4 options
}

# ---------------------------------------------------------------------------------------------------------------
# Reward (paper section 3.2; InternLM/Spatial-SSRL training/GRPO/examples/reward_function/math.py `img_score` with
# mathruler's `extract_boxed_content`). Same results as those regexes, rewritten so adversarial responses cost linear
# time: `\s*(<|>|/)\s*` and `<think>.*</think>.*\\boxed\{.*\}.*` backtrack quadratically on long runs of spaces or
# repeated tags.

# A whitespace run touching '<', '>' or '/'. Matches start only at a run's first character (the lookbehind), and
# the possessive \s++ never backtracks, so each run is scanned once.
_AROUND_TAG = re.compile(r"(?<!\s)\s++(?=[<>/])|(?<=[<>/])\s++")


def _normalise(response):
    """Equal to re.sub(r"\s*(<|>|/)\s*", r"\1", response): drop every whitespace run next to '<', '>' or '/'."""
    return _AROUND_TAG.sub("", response)


def _format_ok(text):
    """re.fullmatch(r"<think>.*</think>.*\\\\boxed\\{.*\\}.*", text, re.DOTALL), by taking the earliest of each part."""
    if not text.startswith("<think>"):
        return False
    close = text.find("</think>", 7)
    box = text.find("\\boxed{", close + 8) if close >= 0 else -1
    return box >= 0 and text.find("}", box + 7) >= 0


def extract_boxed(response: str):
    """Content of the last \\boxed{...} with balanced braces, stripped; None when there is none (mathruler returns
    the string "None" there). An unclosed last box gives None, as in mathruler: no falling back to an earlier one."""
    start = response.rfind("\\boxed{")
    if start < 0:
        return None
    content = response[start + 7:]
    # brace depth after each character, in C: the box closes where the running sum first reaches -1
    codes = np.frombuffer(content.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    depth = np.cumsum((codes == ord("{")).astype(np.int32) - (codes == ord("}")))
    closing = np.flatnonzero(depth == -1)
    return content[:closing[0]].strip() if closing.size else None


def reward(response: str, answer: str) -> dict:
    """{"overall", "format", "accuracy"}: overall = 0.9 * accuracy + 0.1 * format, accuracy by exact string match."""
    text = _normalise(response)
    format_score = 1.0 if _format_ok(text) else 0.0
    accuracy = 1.0 if extract_boxed(text) == answer else 0.0
    return {"overall": 0.9 * accuracy + 0.1 * format_score, "format": format_score, "accuracy": accuracy}

# ---------------------------------------------------------------------------------------------------------------
# Input discovery and loading. Layouts found recursively under --rgbd, each image with the first depth that exists:
#   plain:     NAME.jpg|png + NAME.npy (H x W; <= 0 or non-finite = invalid) [+ NAME_mask.npy]
#   16-bit:    NAME.jpg|png + NAME_depth.png (uint16, 0 = invalid; units do not matter, tasks normalise depth)
#   DIODE:     NAME.png + NAME_depth.npy (H x W x 1) + NAME_depth_mask.npy
#   MegaDepth: .../imgs/NAME.jpg + .../depths/NAME.h5 (dataset "depth"; needs the optional h5py)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_LOAD_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _to_rgb(image):
    """Any PIL mode to RGB: EXIF orientation applied, 16-bit scaled down, transparency composited on white."""
    if image.getexif().get(0x0112, 1) != 1:          # orientation tag; exif_transpose copies even when upright
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "F" and pixels.max() > 255 else 255.0
        if image.mode == "F":
            top = max(float(np.nanmax(pixels)), 1e-12)
        image = Image.fromarray((np.clip(np.nan_to_num(pixels) / top, 0, 1) * 255 + 0.5).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, (255, 255, 255))
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path):
    """An RGB PIL image, or Skip("corrupt image") for anything PIL cannot fully decode."""
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except _LOAD_ERRORS:
        raise Skip("corrupt image") from None


def load_depth(path):
    """A float32 depth array from .npy, 16-bit .png or MegaDepth .h5 (Skip with the reason when unreadable)."""
    try:
        if path.endswith(".npy"):
            depth = np.load(path, allow_pickle=False)
        elif path.endswith(".h5"):
            try:
                import h5py            # optional: only MegaDepth needs it
            except ImportError:
                raise Skip("MegaDepth .h5 depth needs h5py (pip install h5py)") from None
            with h5py.File(path, "r") as handle:
                depth = np.asarray(handle["depth"])
        else:
            with Image.open(path) as image:
                depth = np.asarray(image)
    except Skip:
        raise
    except (*_LOAD_ERRORS, KeyError):
        raise Skip("corrupt depth") from None
    if depth.dtype.kind not in "fiub" or depth.ndim not in (2, 3):
        raise Skip("depth shape mismatch")
    return depth.astype(np.float32, copy=False)


def load_rgbd(image_path, depth_path, mask_path=None):
    """(RGB image, depth [H, W], mask [H, W] or None), or Skip when a file is unreadable or the shapes differ."""
    image = load_rgb(image_path)
    depth = _squeeze(load_depth(depth_path))
    if depth.shape != (image.size[1], image.size[0]):
        raise Skip("depth shape mismatch")
    mask = None
    if mask_path:
        try:
            mask = _squeeze(np.load(mask_path, allow_pickle=False))
        except _LOAD_ERRORS:
            raise Skip("corrupt mask") from None
        if mask.shape != depth.shape:
            raise Skip("mask shape mismatch")
    return image, depth, mask


def find_images(root):
    """Every image file under root, recursively, sorted (depth PNGs excluded)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        found += [os.path.join(folder, name) for name in sorted(files)
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.endswith("_depth.png")]
    return found


def find_rgbd(root):
    """[(image, depth, mask or None)] under root, and a Counter of skipped files (depth without image and so on)."""
    pairs, claimed, depth_files, skipped = [], set(), [], Counter()
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in sorted(files):
            if (name.endswith((".npy", "_depth.png")) and not name.endswith("_mask.npy")) or name.endswith(".h5"):
                depth_files.append(os.path.join(folder, name))
    for image in find_images(root):
        folder, stem = os.path.dirname(image), os.path.splitext(os.path.basename(image))[0]
        candidates = [os.path.join(folder, stem + suffix) for suffix in (".npy", "_depth.npy", "_depth.png")]
        if os.path.basename(folder) == "imgs":
            candidates.append(os.path.join(os.path.dirname(folder), "depths", stem + ".h5"))
        depth = next((path for path in candidates if os.path.isfile(path)), None)
        if depth is None:
            skipped["image without depth"] += 1
            continue
        mask = next((os.path.join(folder, stem + suffix) for suffix in ("_mask.npy", "_depth_mask.npy")
                     if os.path.isfile(os.path.join(folder, stem + suffix))), None)
        pairs.append((image, depth, mask))
        claimed.add(depth)
    skipped["depth without image"] += sum(path not in claimed for path in depth_files)
    return pairs, +skipped


def _fit(image, max_side, depth=None, mask=None):
    """Downscale so the longer side is at most max_side (never up); depth and mask by nearest neighbour."""
    width, height = image.size
    if max(width, height) <= max_side:
        return image, depth, mask
    factor = max_side / max(width, height)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    image = image.resize(size, Image.BILINEAR, reducing_gap=2.0)
    if depth is not None:
        depth = np.asarray(Image.fromarray(depth.astype(np.float32), "F").resize(size, Image.NEAREST))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.NEAREST)).astype(bool)
    return image, depth, mask

# ---------------------------------------------------------------------------------------------------------------
# Records: our jsonl, or the released Spatial-SSRL-81k (spatialssrl.parquet + images.zip; pyarrow optional).
#
# The release as InternLM/Spatial-SSRL training/training.md lays it out: `spatialssrl.parquet` (or renamed
# data/parquets/train.parquet), one row per sample with `problem` (<image> placeholders), `answer` (a string,
# compared exactly) and `images` (EasyR1's image_key), and images.zip unpacked to images/{crop,depth,flip,position,
# shuffle}/. No eval split ships (the official "val" is the parquet's first 10,000 rows, data/process_GRPO_val.py:
# one or two tasks of a file ordered by task), so ssrl.py holds rows out itself (`hold_out`).
#
# An image entry may be anything EasyR1's verl/utils/dataset.py process_image opens: a path string, {"bytes": ...}
# (the Hugging Face Image feature; its "path" then only names the file) or raw bytes; {"path": ...} too. Paths:
# the 7B script sets data.image_dir=/ (EasyR1 joins it to string paths), so stored paths may be absolute
# (/data/images/crop/x.jpg) or root-relative (data/images/crop/x.jpg) on a machine that is not this one. A path is
# tried as given under --data when relative, then cut at its first task folder and tried under --data/,
# --data/images/ and --data/data/images/ (the two layouts of training.md): first hit wins. Our choice: nothing
# outside --data is ever read; an absolute path only lends its task folder and file name, and a relative one may
# not leave --data through '..' or a symlink. The folder is kept: depth/ and position/ share file names.

RELEASE_IMAGE_FOLDERS = ("", "images", os.path.join("data", "images"))


class EmbeddedImage(bytes):
    """An encoded image held in the data file itself ({"bytes": ...} or raw bytes); printed short, not as bytes."""

    def __str__(self):
        return f"<embedded image, {len(self)} bytes>"

    __repr__ = __str__


def _inside(root, relative, where):
    """Absolute path of an image, refusing absolute paths and anything that resolves outside root."""
    if not isinstance(relative, str) or not relative:
        raise BadRecord(f"{where}: image path must be a non-empty string, got {relative!r}")
    if os.path.isabs(relative) or ".." in re.split(r"[\\/]", relative):
        raise BadRecord(f"{where}: image path {relative!r} must be relative to the dataset root, without '..'")
    path = os.path.join(root, relative)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise BadRecord(f"{where}: image path {relative!r} leaves the dataset root (symlink?)")
    return path


def release_image(root, entry, where):
    """One entry of a release row's `images` -> (an existing path under root, or EmbeddedImage; the path the row
    names or None). BadRecord when the entry has no usable form or no candidate exists (see the section's rules)."""
    if isinstance(entry, dict):
        if entry.get("bytes"):
            return EmbeddedImage(entry["bytes"]), entry.get("path")
        entry = entry.get("path")
    if isinstance(entry, (bytes, bytearray)) and entry:
        return EmbeddedImage(entry), None
    if not isinstance(entry, str) or not entry:
        raise BadRecord(f"{where}: an image must be a path, {{'path': ...}}, {{'bytes': ...}} or bytes, got "
                        f"{type(entry).__name__}")
    parts = [part for part in re.split(r"[\\/]", entry) if part not in ("", ".")]
    absolute = os.path.isabs(entry) or bool(re.match(r"^[A-Za-z]:", entry))
    if not absolute and ".." in parts:
        raise BadRecord(f"{where}: image path {entry!r} leaves the dataset root ('..')")
    candidates = [] if absolute else [os.path.join(*parts)]
    cut = next((i for i, part in enumerate(parts) if part in TASKS), None)
    if cut is not None and ".." not in parts[cut:]:
        candidates += [os.path.join(folder, *parts[cut:]) for folder in RELEASE_IMAGE_FOLDERS]
    real_root = os.path.realpath(root)
    for relative in dict.fromkeys(candidates):
        path = os.path.join(root, relative)
        if os.path.isfile(path):
            if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
                raise BadRecord(f"{where}: image path {entry!r} leaves the dataset root (symlink)")
            return path, relative
    tried = ", ".join(candidates) or "nothing: no task folder in the path"
    raise BadRecord(f"{where}: image {entry!r} not found under {root} (tried {tried})")


def split_file(root, split):
    """The file holding `split` under root: our {split}.jsonl, else a release parquet; None when there is none."""
    names = [f"{split}.jsonl", f"{split}.parquet", os.path.join("data", "parquets", f"{split}.parquet")]
    names += ["spatialssrl.parquet"] if split == "train" else []
    return next((os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n))), None)


def _parquet(path):
    """pyarrow.parquet, imported only when a parquet file is read (the release, Q-Spatial-Bench): it is optional."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return parquet


def _read_parquet(path):
    parquet = _parquet(path)
    names = parquet.read_schema(path).names
    missing = [key for key in ("problem", "answer", "images") if key not in names]
    if missing:
        raise BadRecord(f"{path}: no column(s) {', '.join(missing)}; a Spatial-SSRL parquet has problem, answer, "
                        f"images (found {', '.join(names)})")
    columns = ["problem", "answer", "images"] + [key for key in ("task", "id") if key in names]
    return parquet.read_table(path, columns=columns).to_pylist()


def _read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise BadRecord(f"{path}:{number}: not JSON ({error.msg})") from None
    return rows


def _need_file(path, expected):
    if not os.path.isfile(path):
        raise BadRecord(f"{path}: no such file; expected {expected}")
    return path


def _rows(path, expected):
    """A JSON list, JSON lines or a parquet file (pyarrow) as a list of dicts; BadRecord naming `expected` when it is
    none of them."""
    _need_file(path, expected)
    if path.endswith(".parquet"):
        return _parquet(path).read_table(path).to_pylist()
    if path.endswith(".jsonl"):
        return _read_jsonl(path)
    try:
        with open(path, encoding="utf-8") as handle:
            rows = json.load(handle)
    except ValueError as error:
        raise BadRecord(f"{path}: not JSON ({error}); expected {expected}") from None
    if not isinstance(rows, list):
        raise BadRecord(f"{path}: expected {expected} (a JSON list)")
    return rows


def _task_of(row, named):
    """A row's task: its `task` column, else the first task folder of an image path it names."""
    if row.get("task"):
        return str(row["task"])
    for path in named:
        for part in re.split(r"[\\/]", path or ""):
            if part in TASKS:
                return part
    return None


def load_records(root, split="train", problems=None):
    """Records of one split: {"id", "task", "problem", "answer", "images": [absolute paths or EmbeddedImage],
    "meta"}, from our jsonl or a release parquet (section comment above).

    Every row's <image> count is checked against its images. With `problems` (a Counter) a bad row is skipped and
    its reason counted there, the same on every rank that reads the same files; without, it raises BadRecord."""
    root = os.path.abspath(root)
    source = split_file(root, split)
    if source is None:
        raise FileNotFoundError(f"no {split}.jsonl or {split} parquet in {root}")
    ours = source.endswith(".jsonl")

    def record(row, where, number):
        if not isinstance(row, dict) or not all(key in row for key in ("problem", "answer", "images")):
            raise BadRecord(f"{where}: needs the fields problem, answer, images")
        if ours:
            named = list(row["images"] or [])
            images = [_inside(root, relative, where) for relative in named]
        else:
            images, named = [], []
            for entry in row["images"] or []:
                image, name = release_image(root, entry, where)
                images.append(image)
                named.append(name)
        _check_placeholders(row["problem"], images, where)
        task = _task_of(row, named)
        if task is None:
            raise BadRecord(f"{where}: no task (no task column and no task folder in its image paths)")
        return {"id": str(row.get("id") or f"{split}-{number - 1:06d}"), "task": task, "problem": row["problem"],
                "answer": str(row["answer"]), "images": images, "meta": row.get("meta") or {}}

    return _records_of(_read_jsonl(source) if ours else _read_parquet(source), source, record, problems)


def _check_placeholders(problem, images, where):
    placeholders = str(problem).count("<image>")
    if placeholders != len(images):
        raise BadRecord(f"{where}: {placeholders} <image> placeholders for {len(images)} images")


def _records_of(rows, source, record, problems=None):
    """record(row, "source:number", number) of every row (numbered from 1). A row it refuses with BadRecord is
    skipped and its reason counted in `problems` (a Counter), or raised when there is none."""
    records = []
    for number, row in enumerate(rows, 1):
        where = f"{source}:{number}"
        try:
            records.append(record(row, where, number))
        except BadRecord as error:
            if problems is None:
                raise
            problems[_reason(str(error), where)] += 1
    return records


def _reason(message, where):
    """A skipped row's message without its row number, so that equal reasons count together."""
    reason = message.replace(where + ": ", "")
    return re.sub(r"'[^']*'", "'...'", reason) if "not found" in reason else reason


def image_file(item):
    """What PIL opens for an image item of a record: its path, or a buffer over embedded bytes."""
    return io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item


def open_images(record):
    """The record's images as RGB PIL images; BadRecord("path: reason") when one is missing or corrupt. An item is
    a path, embedded bytes or a PIL image already."""
    images = []
    for item in record["images"]:
        if isinstance(item, Image.Image):
            images.append(_to_rgb(item))
            continue
        if isinstance(item, str) and not os.path.isfile(item):
            raise BadRecord(f"{item}: missing")
        try:
            images.append(load_rgb(image_file(item)))
        except Skip as error:
            raise BadRecord(f"{item}: {error}") from None
    return images


def source_keys(record):
    """Where a release row's pixels come from, as far as its file names show it: the folder and the first number of
    each image's name. crop's blackened_image_01234_00017.jpg and cropped_img_01234_2.jpg share "crop/01234";
    flip/image_12_3.jpg is "flip/12"; depth/image_10.jpg and position/image_10.jpg stay apart. A row whose images
    name no file is a source of its own."""
    keys = set()
    for item in record["images"]:
        if isinstance(item, str):
            name = os.path.basename(item)
            number = re.search(r"\d+", name)
            keys.add(f"{os.path.basename(os.path.dirname(item))}/{number.group() if number else name}")
    return keys or {f"row:{record['id']}"}


def hold_out(records, per_task=0, seed=0, ids=None):
    """(train, held_out, dropped) for a dataset without an eval split: `per_task` rows of each task drawn by a
    seeded shuffle (or the rows whose id is in `ids`, a split written before), and the training rows that share no
    source (`source_keys`) with a held-out row; `dropped` counts the training rows left out for sharing one."""
    if ids is None:
        rng, by_task = random.Random(f"{seed}:held-out"), {}
        for record in records:
            by_task.setdefault(record["task"], []).append(record)
        ids = set()
        for task in sorted(by_task):
            rows = list(by_task[task])
            rng.shuffle(rows)
            ids.update(record["id"] for record in rows[:per_task])
    ids = set(ids)
    held_out = [record for record in records if record["id"] in ids]
    held_sources = set().union(*(source_keys(record) for record in held_out))
    train = [record for record in records if record["id"] not in ids]
    kept = [record for record in train if not source_keys(record) & held_sources]
    return kept, held_out, len(train) - len(kept)

# ---------------------------------------------------------------------------------------------------------------
# Cold-start files (--sft-data): the release's SFT-coldstart.json, ~3.6k rows with written reasonings

_TASK_PHRASES = (("shuffled", "shuffle"), ("is flipped", "flip"), ("missing part", "crop"),
                 ("three regions marked", "depth"), ("two regions marked", "position"))


def task_of_problem(problem):
    """The pretext task a question asks, from its template's wording (the templates above); None when none fits."""
    return next((task for phrase, task in _TASK_PHRASES if phrase in problem), None)


def wrap_reasoning(output):
    """A cold-start answer in the format the reward checks: unchanged when it has <think>...</think>; else the text
    before its last \\boxed{} becomes the reasoning, "<think>text</think> \\boxed{...}" (None without a box)."""
    if "<think>" in output and "</think>" in output:
        return output
    box = output.rfind("\\boxed{")
    if box < 0:
        return None
    return f"<think>{output[:box].strip()}</think> {output[box:].strip()}"


def _turns(row):
    """(user text, assistant text) of a sharegpt row: `messages` or `conversations`, role/content or from/value."""
    turns = row.get("messages") or row.get("conversations")
    if not isinstance(turns, list):
        return None
    said = [(turn.get("role") or turn.get("from"), turn.get("content") or turn.get("value") or "")
            for turn in turns if isinstance(turn, dict)]
    said = [(role, text) for role, text in said if role != "system"]
    if len(said) != 2 or said[0][0] not in ("user", "human") or said[1][0] not in ("assistant", "gpt"):
        return None
    return said[0][1], said[1][1]


def load_cold_start(path, problems=None):
    """(records, wrapped) of a cold-start SFT file: LLaMA-Factory alpaca rows (instruction, input, output, images; the
    release's dataset_info.json maps prompt/query/response to them) or single-turn sharegpt rows (messages or
    conversations, images). The question is instruction + "\\n" + input when input is set (LLaMA-Factory's
    AlpacaDatasetConverter), used as written (its own "\\boxed{}" sentence; no format prompt appended); images are
    relative to the file's folder (LLaMA-Factory's media_dir). `wrapped` counts outputs that had no
    <think>...</think> (`wrap_reasoning`). Bad rows are counted in `problems` and skipped (raised without it)."""
    folder = os.path.dirname(os.path.abspath(path))
    rows = _rows(path, "a cold-start file: a JSON list of alpaca rows (instruction, input, output, images)")
    wrapped = 0

    def record(row, where, number):
        nonlocal wrapped
        if not isinstance(row, dict):
            raise BadRecord(f"{where}: not an object")
        if "instruction" in row and "output" in row:
            problem = "\n".join(str(row[key]) for key in ("instruction", "input") if row.get(key))
            output = str(row["output"])
        elif _turns(row):
            problem, output = _turns(row)
        else:
            raise BadRecord(f"{where}: neither alpaca (instruction, output) nor a single-turn sharegpt row")
        images = [item if os.path.isabs(item) else os.path.join(folder, item) for item in row.get("images") or []]
        if not all(os.path.isfile(item) for item in images):
            raise BadRecord(f"{where}: image not found")
        _check_placeholders(problem, images, where)
        response = wrap_reasoning(output)
        if response is None:
            raise BadRecord(f"{where}: output without <think>...</think> and without \\boxed{{}}")
        wrapped += response != output
        answer = extract_boxed(response)
        return {"id": f"coldstart-{number - 1:06d}", "task": task_of_problem(problem) or "coldstart",
                "problem": problem, "answer": answer if answer is not None else "", "images": images, "meta": {},
                "response": response, "format_prompt": False}

    return _records_of(rows, path, record, problems), wrapped

# ---------------------------------------------------------------------------------------------------------------
# Benchmarks (paper section 4, Table 1): readers that turn each benchmark's own files into records, with the prompt
# the paper's evaluation code builds (InternLM/Spatial-SSRL evaluation/: VLMEvalKit for Spatial457, 3DSRBench,
# SpatialEval and QSpatial-plus, its own scripts for What'sUp, ViewSpatial and VSI-Bench), and pure scorers
# response -> (score, what was read from it). A record: {"id", "task" (the benchmark's sub-category), "problem" (the
# whole prompt, the format prompt included where the paper appends it, <image> where each image goes), "answer",
# "images" (paths or EmbeddedImage), "meta", "format_prompt": False}. Any other VLMEvalKit multiple-choice TSV
# (--eval-tsv) goes through the same reader and scorer as 3DSRBench and SpatialEval (`read_mcq`, `score_mcq`).
# Our choices where the paper's runs differ (docs/benchmarks.md): decoding is greedy everywhere (the What'sUp script
# samples at T 0.7 for the 3B model); VSI-Bench gets its frames as images (the script passes a video, which
# Qwen2.5-VL merges two frames per temporal patch); every response is cut to its last \boxed{} before VLMEvalKit's
# matching (its Qwen2VLChat post_process, off in the paper's config, where the whole reasoning then reaches the
# matcher).

NA_STRINGS = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
              "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}   # what pandas' read_csv reads as missing


def _check_keys(rows, keys, path, expected):
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict) or any(k not in row for k in keys)), None)
    if not rows or bad is not None:
        raise BadRecord(f"{path}: expected {expected}" + (f"; row {bad} lacks one of {', '.join(keys)}"
                                                           if rows else "; no rows"))


def _local_image(base, path, where, also=()):
    """A benchmark's image path: as given when absolute, else under the benchmark file's folder or its parent (the
    evaluation scripts run from the folder above the JSON), else `also` (more paths relative to the file's folder);
    BadRecord naming it when none exists."""
    candidates = [path] if os.path.isabs(path) else [os.path.join(folder, path)
                                                     for folder in (base, os.path.dirname(base))]
    candidates += [os.path.join(base, other) for other in also]
    found = next((candidate for candidate in candidates if os.path.isfile(candidate)), None)
    if found is None:
        raise BadRecord(f"{where}: image {path} not found (looked in {', '.join(candidates)})")
    return found


# VLMEvalKit's TSV layout (vlmeval/dataset/image_base.py, image_mcq.py): one row per question, its image(s) base64

def read_tsv(path, required, expected):
    """Rows of a VLMEvalKit TSV, each with "images": its images as EmbeddedImage. VLMEvalKit stores a repeated image
    once and puts that row's index in the later ones; a list "['...', ...]" is several images. Each image is
    base64-decoded once and shared by the rows that use it."""
    _need_file(path, expected)
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    missing = sorted(set(required) - set(rows[0] if rows else ()))
    if not rows or missing:
        found = f"no column(s) {', '.join(missing)}" if rows else "no rows"
        raise BadRecord(f"{path}: expected {expected}; {found}")
    by_index, decoded = {row["index"]: row["image"] for row in rows}, {}

    def images(row):
        value = row["image"]
        if len(value) < 64 and value in by_index:
            value = by_index[value]
        if value not in decoded:
            try:
                items = ast.literal_eval(value) if value.startswith("[") else [value]
                decoded[value] = [EmbeddedImage(base64.b64decode(item)) for item in items]
            except (ValueError, SyntaxError, TypeError):
                raise BadRecord(f"{path}: row {row['index']}: image is not base64") from None
        return decoded[value]

    for row in rows:
        row["images"] = images(row)
    return rows


def read_mcq(path, name="multiple-choice"):
    """Records of a VLMEvalKit multiple-choice TSV (3DSRBench.tsv, SpatialEval.tsv, any other): the prompt of
    ImageMCQDataset.build_prompt (hint, question, lettered options, "Please select the correct answer from the
    options above. \\n"), images first, the format prompt appended as the paper's VLMEvalKit copy does (vlm/base.py:
    `item['value'] += reasoning_prompt`, no separator). Empty option columns are no options."""
    records = []
    for row in read_tsv(path, ("index", "question", "answer", "image", "A", "B"),
                        f"VLMEvalKit's {name} TSV (index, question, A, B, ..., answer, image)"):
        choices = {letter: row[letter] for letter in string.ascii_uppercase
                   if (row.get(letter) or "") not in NA_STRINGS}
        hint = row.get("hint") or ""
        prompt = (f"Hint: {hint}\n" if hint not in NA_STRINGS else "") + f"Question: {row['question']}\n"
        if choices:
            prompt += "Options:\n" + "".join(f"{letter}. {text}\n" for letter, text in choices.items())
            prompt += "Please select the correct answer from the options above. \n"
        records.append({"id": row["index"], "task": row.get("category") or name, "answer": row["answer"].strip(),
                        "problem": "<image>" * len(row["images"]) + prompt + FORMAT_PROMPT, "images": row["images"],
                        "meta": {"choices": choices, "qid": row.get("qid")}, "format_prompt": False})
    return records


def vlmeval_box(response):
    """VLMEvalKit Qwen2VLChat post_process: the text inside the last \\boxed{ (braces balanced; to the end when it
    never closes), the whole response when it has none."""
    if "\\boxed{" not in response:
        return response
    content, depth = response.split("\\boxed{")[-1], 1
    for i, character in enumerate(content):
        depth += (character == "{") - (character == "}")
        if depth == 0:
            return content[:i]
    return content


def can_infer(answer, choices):
    """VLMEvalKit utils/matching_util.py can_infer: the one choice letter standing alone among the words (after
    .()[],:;!*#{} become spaces), else the one choice whose text is in the answer (ignoring case); 'Z' for a
    refusal or a lone Z; False when neither is unique."""
    if "Failed to obtain answer via API" in answer:
        return False
    refusals = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                "I'm sorry, but without the image provided", "Cannot determine the answer")
    if any(refusal in answer for refusal in refusals):
        return "Z"
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", answer).split()
    letters = [letter for letter in choices if letter in words]
    if len(letters) == 1:
        return letters[0]
    if not letters and "Z" in words:
        return "Z"
    texts = [letter for letter, text in choices.items() if str(text).lower() in answer.lower()]
    return texts[0] if len(texts) == 1 else False


def score_mcq(response, record):
    choice = can_infer(vlmeval_box(response), record["meta"]["choices"])
    return float(choice == record["answer"]), choice or None


def summary_3dsrbench(entries, records):
    """VLMEvalKit _3DSRBench.evaluate: besides the plain (vanilla) accuracy, a question counts only when all of its
    variants are right: flip_eval pairs qid with qid-flip (left-right flipped image), circ_eval groups the circular
    option orders (qid[:8], or qid[:13] for flipped ones), flip_circ_eval both (qid[:8])."""
    hits = {entry["qid"]: entry["score"] for entry in entries if entry.get("qid")}
    if not hits:
        return {}
    keys = {"flip_eval": lambda q: q.replace("-flip", ""),
            "circ_eval": lambda q: q[:13] if "-flip" in q else q[:8],
            "flip_circ_eval": lambda q: q[:8]}
    figures = {}
    for name, key in keys.items():
        groups = {}
        for qid, hit in hits.items():
            groups.setdefault(key(qid), []).append(hit)
        kept = [all(groups[qid]) for qid in groups if qid in hits]   # a group is scored on its own qid's row
        figures[name] = sum(kept) / max(len(kept), 1)
    return figures


# Spatial457: VLMEvalKit dataset/spatial457.py (its build_subtask_instruction) and utils/spatial457.py.
_SPATIAL457_TASK = {
    "L1_single": "identify attributes of the objects, ",
    "L2_objects": "identify attributes of multiple objects, ",
    "L3_2d_spatial": "identify attributes of multiple objects and their spatial relationship from 2D projected camera "
                     "view, ",
    "L4_occ": "identify attributes of multiple objects and their occlusion relationships, ",
    "L4_pose": "identify attributes of multiple objects and their facing direction in 3D space from the camera view, ",
    "L5_6d_spatial": "identify attributes of multiple objects and their spatial relationship from objects’ "
                     "perspective in 3D space, ",
    "L5_collision": "identify attributes of multiple objects and their potential collision given the assumption of "
                    "moving direction in 3D space, ",
}

SPATIAL457_ATTRIBUTES = {
    "size": ("small", "large"),
    "shape": ("airliner", "dirtbike", "road bike", "tandem bike", "suv", "wagon", "scooter", "mountain bike",
              "minivan", "sedan", "school bus", "fighter", "chopper", "double bus", "truck", "articulated bus",
              "cruiser", "jet", "utility bike", "regular bus", "biplane"),
    "color": ("gray", "blue", "purple", "brown", "green", "cyan", "red", "yellow"),
    "direction": ("left", "right", "front", "back"),
}

# a shape word -> its super-category (SuperCLEVR's): naming a sibling sub-shape counts as right
_SUPER_SHAPE = {word: group for group, words in {
    "car": ("suv", "wagon", "minivan", "sedan", "truck", "addi", "car"),
    "bus": ("articulated", "regular", "double", "school", "bus"),
    "motorbike": ("chopper", "dirtbike", "scooter", "cruiser", "motorbike"),
    "aeroplane": ("jet", "fighter", "biplane", "airliner", "aeroplane"),
    "bicycle": ("road", "utility", "mountain", "tandem", "bicycle")}.items() for word in words}

_NUMBER_WORDS = {word: str(i) for i, word in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}


def _spatial457_prompt(category, question):
    opening = ("You are an intelligent chatbot designed to answer questions based on an image. Your task is to "
               f"analyze the images, {_SPATIAL457_TASK.get(category, '')}and then determine the answer to the "
               "question.\n") if category in _SPATIAL457_TASK else ""
    options = ", ".join(", ".join(word.capitalize() for word in words) for words in SPATIAL457_ATTRIBUTES.values())
    closing = (
        "First, you should identify the related objects refered in the questions, including their shape, color, size; "
        "then add a brief reasoning process about the questions. Each object in the image has a shape (e.g., "
        "'airliner'), a size (only can be 'small' or 'large'), a color (e.g. 'blue'). The size of the object is "
        "either 'small' or 'large'. The color of the object is one of the following: 'gray', 'blue', 'purple', "
        "'brown', 'green', 'cyan', 'red', 'yellow'. The direction of the object is one of the following: 'left', "
        "'right', 'front', 'back'.\n\nSecond, give the answer based on the reasoning process. The answer should only "
        f"be (1) a phrase chosen from the following options: {options}, or (2) an integer [0-10] when asked for 'How "
        "many' or 'What is the number of', or (3) 'Yes' or 'No' when asked for 'Is there'. If you think there are no "
        "possible answers or the question is not clear, choose the best answer that fits the question.\n\n")
    # every text part gets the format prompt (the paper's VLMEvalKit vlm/base.py appends it to each text item)
    return opening + FORMAT_PROMPT + "<image>" + question + FORMAT_PROMPT + closing + FORMAT_PROMPT


def read_spatial457(path):
    records = []
    for row in read_tsv(path, ("index", "question", "answer", "category", "image"),
                        "VLMEvalKit's Spatial457 TSV (index, question, answer, category, image)"):
        records.append({"id": row["index"], "task": row["category"], "answer": row["answer"],
                        "problem": _spatial457_prompt(row["category"], row["question"]).replace(
                            "<image>", "<image>" * len(row["images"])),
                        "images": row["images"], "meta": {}, "format_prompt": False})
    return records


def spatial457_correct(answer, predict):
    """VLMEvalKit Spatial457_utils.is_correct: equal ignoring case; "none" reads as "no", "0" as "No", number words
    as digits, any digit 1-9 as "yes"; or both first words are shapes of one super-category."""
    predict, answer = str(predict), str(answer)
    if predict.lower() == "none":
        predict = "no"
    if predict.lower() == answer.lower() or (predict == "0" and answer == "No"):
        return True
    if _NUMBER_WORDS.get(predict.lower()) == answer or (answer.lower() == "yes" and predict in tuple("123456789")):
        return True
    first, truth = predict.lower().split(" ")[0], answer.lower().split(" ")[0]
    return first in _SUPER_SHAPE and truth in _SUPER_SHAPE and _SUPER_SHAPE[first] == _SUPER_SHAPE[truth]


def score_spatial457(response, record):
    """The `Answer` field of a JSON object in the (boxed) response ('Answer': '...', "Answer": "...", 'Answer': N),
    else the whole of it (the paper's VLMEvalKit copy runs ROBUST = True)."""
    text = vlmeval_box(response)
    found = (re.search(r"Answer': '(.*?)'", text) or re.search(r'Answer": "(.*?)"', text)
             or re.search(r"Answer': (\d)", text))
    predict = found.group(1) if found else text
    return float(spatial457_correct(record["answer"], predict)), predict


QSPATIAL_SYSTEM = (   # Q-Spatial-Bench-code prompt_templates/system_prompt.txt, as VLMEvalKit's QSpatial sends it
    "You will be provided with a question and a 2D image. The question involves measuring the precise distance in "
    "3D space through a 2D image. You will answer the question by providing a numeric answer consisting of a scalar "
    "and a distance unit in the format of \"\"\"\\scalar{scalar} \\distance_unit{distance unit}\"\"\" at the end of "
    "your response.")

# prompt_templates/spatial_prompt_single.txt, verbatim ("thinkg" included): the paper sends no format prompt here
QSPATIAL_QUESTION = ("Question: {question}\nLet's thinkg step by step and start by finding good reference objects or "
                     "object parts in the image.")

_CENTIMETRES = {**dict.fromkeys(("meters", "meter", "m", "metre", "metres"), 100.0),
                **dict.fromkeys(("centimeters", "centimeter", "cm"), 1.0),
                **dict.fromkeys(("feet", "foot", "ft"), 30.48), **dict.fromkeys(("inch", "inches", "in"), 2.54),
                "mm": 0.1}


def centimetres_per(unit):
    """VLMEvalKit QSpatial.get_multiplier: 0 for a unit it does not know (which makes the answer wrong)."""
    return _CENTIMETRES.get(str(unit).lower().strip(), 0.0)


def read_qspatial(path):
    """Q-Spatial-Bench's QSpatial_plus split (Hugging Face andrewliao11/Q-Spatial-Bench: question, answer_value,
    answer_unit, question_type, image as {"bytes", "path"}, image_path) as parquet, JSON or JSON lines; rows of
    QSpatial_scannet in the same file are left out (VLMEvalKit keeps one split)."""
    expected = "Q-Spatial-Bench QSpatial_plus rows (question, answer_value, answer_unit, image)"
    rows = _rows(path, expected)
    _check_keys(rows, ("question", "answer_value", "answer_unit"), path, expected)
    base, records = os.path.dirname(os.path.abspath(path)), []
    for number, row in enumerate(rows):
        if "scannet" in str(row.get("image_path") or "").lower():
            continue
        image = row.get("image")
        if isinstance(image, dict) and image.get("bytes"):
            images = [EmbeddedImage(image["bytes"])]
        else:
            name = (image.get("path") if isinstance(image, dict) else image) or row.get("image_path")
            images = [_local_image(base, str(name), f"{path}: row {number}")]
        question = QSPATIAL_QUESTION.format(question=row["question"])
        records.append({"id": str(number), "task": row.get("question_type") or "qspatial",
                        "answer": f"{row['answer_value']} {row['answer_unit']}",
                        "problem": "<image>" + QSPATIAL_SYSTEM + "\n" + question, "images": images,
                        "meta": {"centimetres": float(row["answer_value"]) * centimetres_per(row["answer_unit"])},
                        "format_prompt": False})
    return records


def qspatial_centimetres(response):
    """The answer of a response in centimetres, as the paper's VLMEvalKit copy parses it (QSpatial.parse_prediction),
    or None where it fails (the official then scores 1e-8 cm). The last \\scalar{...} gives the mean of its numbers
    (a range "2-3" is 2.5); the unit is the last \\distance_unit{...}, else the last unit{...}, else the last {...}
    (when that is a number, the letters after the response's last backslash). A \\boxed{} is read as a scalar: the
    copy rewrites "\\boxed{3 m}" as "\\scalar{3} m" (a '}' before the first space after it, the response's last '}'
    dropped)."""
    text = response
    if "boxed{" in text:
        text = text.replace("boxed{", "scalar{")
        space = text.find(" ", text.find("scalar{"))
        if space != -1:
            text = text[:space] + "}" + text[space:]
        last = text.rfind("}")
        if last != -1:
            text = text[:last] + text[last + 1:]
    scalars = re.findall(r"scalar{([^}]*)}", text)
    numbers = re.findall(r"\d+\.?\d*", scalars[-1]) if scalars else []
    units = (re.findall(r"distance_unit{([^}]*)}", text) or re.findall(r"unit{([^}]*)}", text)
             or re.findall(r"\{([^}]*)\}", text))
    if not numbers or not units:
        return None
    unit = units[-1]
    try:
        float(unit)
        unit = re.match(r"[a-zA-Z]*", text.rsplit("\\", 1)[-1] if "\\" in text else "").group(0)
    except ValueError:
        pass
    return sum(map(float, numbers)) / len(numbers) * centimetres_per(unit)


def qspatial_ratio(response, record):
    """max(pred / truth, truth / pred) with VLMEvalKit's 1e-8 cm added to both (an unparsed answer is 1e-8)."""
    predicted = (qspatial_centimetres(response) or 0.0) + 1e-8
    truth = record["meta"]["centimetres"] + 1e-8
    return max(predicted / truth, truth / predicted)


def score_qspatial(response, record):
    """delta_2 (Q-Spatial-Bench's success rate, Table 1): right when the answer is within a factor 2 of the truth."""
    centimetres = qspatial_centimetres(response)
    return float(qspatial_ratio(response, record) < 2.0), None if centimetres is None else f"{centimetres:.4g} cm"


def summary_qspatial(entries, records):
    by_id = {record["id"]: record for record in records}
    close = [qspatial_ratio(entry["response"], by_id[entry["id"]]) < 1.5 for entry in entries]
    return {"delta_1.5": sum(close) / max(len(close), 1)}


def _last_box_plain(response):
    """The evaluation scripts' extract(): the last \\boxed{...} by the regex \\\\boxed\\{([^}]*)\\} (no nesting);
    '' when there is none."""
    found = re.findall(r"\\boxed\{([^}]*)\}", response)
    return found[-1] if found else ""


WHATSUP_PROMPT = "Based on the image, choose the correct option from the list below."


def read_whatsup(path):
    """What'sUp Controlled_Images_A (whatsup_vlms: controlled_images_dataset.json, a list of {image_path,
    caption_options}, the true caption first) with the prompt of evaluation/whatsup_eval/main.py --CoT: the images'
    options as "A: caption" lines after the format prompt, no separator. The answer is always A (the script's
    correct_pred for Controlled_Images_A)."""
    expected = "What'sUp controlled_images_dataset.json (a list of image_path, caption_options)"
    rows = _rows(path, expected)
    _check_keys(rows, ("image_path", "caption_options"), path, expected)
    base, records = os.path.dirname(os.path.abspath(path)), []
    for number, row in enumerate(rows):
        name = os.path.basename(row["image_path"])
        relation = next((word for word in ("left_of", "right_of", "_on_", "under") if word in name), "other")
        image = _whatsup_image(base, row["image_path"], f"{path}: row {number}")
        options = "\n".join(f"{'ABCD'[i]}: {caption}" for i, caption in enumerate(row["caption_options"][:4]))
        records.append({"id": str(number), "task": relation.strip("_"), "answer": "A",
                        "problem": "<image>" + WHATSUP_PROMPT + FORMAT_PROMPT + options, "images": [image],
                        "meta": {}, "format_prompt": False})
    return records


def _whatsup_image(base, path, where):
    """The script's paths are data/controlled_images/NAME relative to its folder: also found beside the JSON."""
    return _local_image(base, path, where, also=[os.path.join("controlled_images", os.path.basename(path))])


def score_whatsup(response, record):
    """evaluation/whatsup_eval/main.py evaluate_scores: right when the letter A appears anywhere in the last box,
    as the script tests it (`"A" in answer`: "B: A mug ..." counts too, through its article)."""
    box = _last_box_plain(response)
    return float(record["answer"] in box), box


VIEWSPATIAL_PROMPT = "\nThe final answer should be the option letter from the given choices.\n"


def read_viewspatial(path):
    """ViewSpatial-Bench.json (a list of question_type, image_path [list], question, answer "A. right", choices) with
    the prompt of evaluation/ViewSpatial_eval/main.py --CoT: question, choices, the option-letter sentence, the
    format prompt; images first. Image paths are relative to the folder above eval/ (ViewSpatial-Bench/...)."""
    expected = "ViewSpatial-Bench.json (a list of question_type, image_path, question, answer, choices)"
    rows = _rows(path, expected)
    _check_keys(rows, ("image_path", "question", "answer", "choices"), path, expected)
    base, records = os.path.dirname(os.path.abspath(path)), []
    for number, row in enumerate(rows):
        names = row["image_path"] if isinstance(row["image_path"], list) else [row["image_path"]]
        images = [_local_image(base, name, f"{path}: row {number}") for name in names]
        records.append({"id": str(number), "task": row.get("question_type") or "viewspatial", "answer": row["answer"],
                        "problem": "<image>" * len(images) + row["question"] + "\n" + row["choices"]
                        + VIEWSPATIAL_PROMPT + FORMAT_PROMPT, "images": images, "meta": {}, "format_prompt": False})
    return records


def _letter(text):
    found = re.search(r"\b([A-D])\b", text or "", re.IGNORECASE)
    return found.group(1).upper() if found else None


def score_viewspatial(response, record):
    """main.py extract_pred: the first standalone letter A-D (any case) of the last box, against the answer's."""
    predicted = _letter(_last_box_plain(response))
    return float(predicted is not None and predicted == _letter(record["answer"])), predicted


VSI_OPENING = "Watch the given video and anser the following question.\n\n"   # vsi_infer.py fix_prompt, verbatim
VSI_NUMBER = "\nThe final answer should be a number(integer or decimal).\n"
VSI_LETTER = "\nThe final answer should be the option letter from the given choices.\n"


def _natural(name):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def vsi_frames(folder, count):
    """`count` frames of a folder of extracted frames, uniformly spaced as vsi_infer.py samples a video
    (linspace(0, total - 1, count) rounded; all of them when there are fewer)."""
    names = sorted((name for name in os.listdir(folder) if name.lower().endswith(IMAGE_EXTENSIONS)), key=_natural)
    if len(names) > count:
        names = [names[round(i * (len(names) - 1) / (count - 1))] if count > 1 else names[0] for i in range(count)]
    return [os.path.join(folder, name) for name in names]


def read_vsibench(path, frames=128):
    """VSI-Bench questions, either the paper's evaluation/VSI-bench_eval/VSIBench/vsi_bench.json (mp4_path,
    question_type, question, answer, A-D) or Hugging Face nyu-visionx/VSI-Bench rows (dataset, scene_name,
    question_type, question, options, ground_truth) as JSON, JSON lines or parquet. A video is a folder of frames
    the user extracted, beside the question file: DATASET/SCENE/ (e.g. arkitscenes/41069025/*.jpg) or SCENE/;
    `frames` of them are used (the paper: 128). The prompt is vsi_infer.py's fix_prompt with --cot true, verbatim:
    its options follow the question with no separator, each after its letter again ("A. A. left")."""
    expected = "VSI-Bench questions (vsi_bench.json: mp4_path, question_type, question, answer, A-D)"
    rows = _rows(path, expected)
    _check_keys(rows, ("question_type", "question"), path, expected)
    base, records, missing = os.path.dirname(os.path.abspath(path)), [], []
    frames_of = {}          # a scene's folder is listed once: its few hundred scenes carry ~5,000 questions
    for number, row in enumerate(rows):
        if "mp4_path" in row:
            scene, dataset = (os.path.splitext(os.path.basename(row["mp4_path"]))[0],
                              os.path.basename(os.path.dirname(row["mp4_path"])))
            options, answer = [row.get(letter) for letter in "ABCD"], row.get("answer")
        else:
            scene, dataset = str(row.get("scene_name")), str(row.get("dataset"))
            options, answer = list(row.get("options") or []), row.get("ground_truth")
        options = [option for option in options if option is not None]
        if answer is None:
            raise BadRecord(f"{path}: row {number} has no answer (answer or ground_truth); expected {expected}")
        folder = next((os.path.join(base, *parts) for parts in ((dataset, scene), (scene,))
                       if os.path.isdir(os.path.join(base, *parts))), None)
        if folder and folder not in frames_of:
            frames_of[folder] = vsi_frames(folder, frames)
        images = list(frames_of[folder]) if folder else []
        if not images:
            missing.append(os.path.join(base, dataset, scene))
            continue
        prompt = VSI_OPENING + row["question"] + "".join(f"{'ABCD'[i]}. {option}" for i, option in enumerate(options))
        prompt += (VSI_LETTER if options else VSI_NUMBER) + FORMAT_PROMPT
        records.append({"id": str(number), "task": row["question_type"], "answer": str(answer),
                        "problem": "<image>" * len(images) + prompt, "images": images,
                        "meta": {"choice": bool(options)}, "format_prompt": False})
    if missing:
        raise BadRecord(f"{path}: no frames for {len(missing)} of {len(rows)} questions, e.g. {missing[0]}/ (extract "
                        "each video's frames into DATASET/SCENE/ beside the question file)")
    return records


def mean_relative_accuracy(predicted, truth):
    """VSI-Bench's MRA as evaluation/VSI-bench_eval/check_accuracy.py computes it: the share of the thresholds
    0.50, 0.55, ..., 0.95 with |pred - truth| / truth < 1 - threshold; 0 when either is not a number. Computed in
    decimal, so the edges are exact: 5% off counts for 0.50-0.90, not 0.95 (the script's floats count it there
    too, since 1 - 0.95 = 0.050000000000000044)."""
    import decimal
    try:
        predicted, truth = decimal.Decimal(str(predicted).strip()), decimal.Decimal(str(truth).strip())
        error = abs(predicted - truth) / truth
        return sum(error < 1 - (decimal.Decimal("0.50") + decimal.Decimal("0.05") * i) for i in range(10)) / 10
    except (decimal.InvalidOperation, ZeroDivisionError):
        return 0.0


def score_vsibench(response, record):
    """check_accuracy.py: the last box; a single letter is compared with the answer ignoring case, anything else
    scores its mean relative accuracy against the answer (0 for a letter answer)."""
    predicted = _last_box_plain(response)
    if len(predicted) == 1 and predicted.isalpha():
        return float(predicted.lower() == record["answer"].lower()), predicted
    return mean_relative_accuracy(predicted, record["answer"]), predicted


def summary_vsibench(entries, records):
    """VSI-Bench's own overall (thinking-in-space lmms_eval vsibench_aggregate_results): the mean over question
    types, the three relative-direction ones merged into one; Table 1 reports the mean over questions."""
    by_task = {}
    for entry in entries:
        by_task.setdefault(entry["task"], []).append(entry["score"])
    means = {task: sum(scores) / len(scores) for task, scores in by_task.items()}
    directions = [means.pop(task) for task in list(means) if task.startswith("object_rel_direction")]
    if directions:
        means["object_rel_direction"] = sum(directions) / 3   # as lmms_eval: a missing one counts 0
    return {"vsi_bench_overall": sum(means.values()) / max(len(means), 1)}




@dataclass
class Benchmark:
    """One of Table 1's benchmarks: its column, what the user passes, reader and scorer, extra figures, and the
    per-image pixel range its official evaluation used (None: the run's --min-pixels/--max-pixels)."""
    column: str
    expected: str
    read: object        # path -> records
    score: object       # (response, record) -> (score, what was read from the response)
    summary: object = None   # (entries, records) -> {figure: value}, the benchmark's own figures beside the score
    pixels: tuple = None
    resize: tuple = None          # (width, height) every image is resized to first, as the official script does


VLMEVAL_PIXELS = (1280 * 28 * 28, 16384 * 28 * 28)    # the paper's VLMEvalKit config for Qwen2.5-VL-3B/7B, SSRL-7B
BENCHMARKS = {     # Table 1's order
    "spatial457": Benchmark("S457", "VLMEvalKit Spatial457.tsv", read_spatial457, score_spatial457,
                            pixels=VLMEVAL_PIXELS),
    "3dsrbench": Benchmark("3DSR", "VLMEvalKit 3DSRBench.tsv", lambda path: read_mcq(path, "3DSRBench"),
                           score_mcq, summary=summary_3dsrbench, pixels=VLMEVAL_PIXELS),
    "spatialeval": Benchmark("SpEval", "VLMEvalKit SpatialEval.tsv", lambda path: read_mcq(path, "SpatialEval"),
                             score_mcq, pixels=VLMEVAL_PIXELS),
    "qspatial-plus": Benchmark("QSp+", "Q-Spatial-Bench QSpatial_plus (parquet or JSON)", read_qspatial,
                               score_qspatial, summary=summary_qspatial, pixels=VLMEVAL_PIXELS),
    # whatsup_eval/main.py: max_pixels 512*28*28 (qwen-vl-utils' min 4*28*28)
    "whatsup": Benchmark("WhatsUp", "whatsup_vlms controlled_images_dataset.json", read_whatsup, score_whatsup,
                         pixels=(4 * 28 * 28, 512 * 28 * 28)),
    # ViewSpatial_eval/main.py resizes every image to 420 x 280 for Qwen2.5-VL (resized_width/height)
    "viewspatial": Benchmark("ViewSp", "ViewSpatial-Bench.json", read_viewspatial, score_viewspatial,
                             resize=(420, 280)),
    # frames as images: at most 128 x 28 x 28 pixels each (qwen-vl-utils' floor for a video frame)
    "vsi-bench": Benchmark("VSI", "VSI-Bench vsi_bench.json + frame folders", read_vsibench, score_vsibench,
                           summary=summary_vsibench, pixels=(4 * 28 * 28, 128 * 28 * 28)),
}

# Table 1 (Qwen2.5-VL, no-reasoning base) and Table 9 (Qwen3-VL-4B) of the paper, per preset, in BENCHMARKS' order
PAPER_TABLE1 = {
    "qwen2.5-vl-3b": {"Qwen2.5-VL-3B": (33.70, 50.30, 54.65, 33.66, 85.85, 35.38, 27.84),
                      "Spatial-SSRL-3B": (46.07, 51.72, 59.59, 39.60, 86.71, 36.62, 33.49)},
    "qwen2.5-vl-7b": {"Qwen2.5-VL-7B": (44.67, 53.39, 62.37, 46.53, 86.95, 36.83, 38.08),
                      "Spatial-SSRL-7B": (53.34, 56.53, 64.03, 54.46, 90.61, 37.81, 39.29)},
    "qwen3-vl-4b": {"Qwen3-VL-4B": (53.43, 56.46, 63.04, 63.37, 98.78, 39.09, 46.82),
                    "Spatial-SSRL-4B": (57.12, 59.48, 72.38, 59.41, 97.44, 42.07, 42.13)},
}


def summarize_benchmark(name, entries, records):
    """Score (the mean of the entries' scores: Table 1's figure), n, the mean per sub-category, and the benchmark's
    own extra figures."""
    by_task = {}
    for entry in entries:
        by_task.setdefault(entry["task"], []).append(entry["score"])
    result = {"score": sum(e["score"] for e in entries) / max(len(entries), 1), "n": len(entries),
              "tasks": {task: sum(scores) / len(scores) for task, scores in sorted(by_task.items())}}
    if BENCHMARKS[name].summary is not None:
        result.update(BENCHMARKS[name].summary(entries, records))
    return result


def pass_at_k(n, c, k):
    """The unbiased pass@k of n samples with c right (Chen et al. 2021, arXiv 2107.03374): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)

# ---------------------------------------------------------------------------------------------------------------
# Dataset builder. Each sample is a pure function of (seed, split, task, index, attempt), so the output is the same
# bytes whatever the number of workers; a skipped attempt moves on to the next attempt's source.

MAX_ATTEMPTS = 40
_SCENE_CACHE = {}
_CONTEXT = {}   # per process: set by _start_worker (the pool initializer) or build_dataset itself


def _start_worker(context):
    _CONTEXT.clear()
    _CONTEXT.update(context)


def _scene(name, width):
    """Rendered scene `name`, cached for the next call: jobs run index-major, so the five tasks of one index share
    a scene (five times fewer renders, and the cache never changes what a job produces)."""
    if _SCENE_CACHE.get("name") != name:
        image, depth = render_scene(random.Random(f"scene:{name}"), width, max(MIN_PATCH, round(width * 3 / 4)))
        _SCENE_CACHE.update(name=name, image=image, depth=depth)
    return _SCENE_CACHE["image"], _SCENE_CACHE["depth"]


def _attempt(task, rng, split, index, attempt):
    context, entry = _CONTEXT, TASKS[task]
    kind = "rgbd" if entry.depth else "rgb"
    pool = context["sources"][split][kind]
    depth = mask = None
    if pool is None:
        image, depth = _scene(f"{context['seed']}:{split}:{index}:{attempt}", context["max_side"])
        source = f"scene:{context['seed']}:{split}:{index}:{attempt}"
    else:
        chosen = pool[rng.randrange(len(pool))]
        source = os.path.relpath(chosen[0], context["roots"][kind])
        if entry.depth:
            image, depth, mask = load_rgbd(*chosen)
        else:
            image = load_rgb(chosen[0])
    image, depth, mask = _fit(image, context["max_side"], depth, mask)
    inputs = (image, depth, mask, rng) if entry.depth else (image, rng)
    sample = entry.sample(*inputs, **context["options"].get(task, {}))
    sample.meta = {"source": source, "size": list(image.size), **sample.meta}
    return sample


def _make_sample(job):
    """One record (or None after MAX_ATTEMPTS skips) and the Counter of skip reasons on the way."""
    split, task, index = job
    context, skips = _CONTEXT, Counter()
    for attempt in range(MAX_ATTEMPTS):
        name = f"{context['seed']}:{split}:{task}:{index}:{attempt}"
        try:
            sample = _attempt(task, random.Random(name), split, index, attempt)
        except Skip as reason:
            skips[f"{task}: {reason}"] += 1
            continue
        paths = []
        for number, image in enumerate(sample.images):
            relative = f"{task}/{split}_{index:06d}_{number}.jpg"
            path = os.path.join(context["out"], relative)
            with written_atomically(path) as temp:
                image.save(temp, "JPEG", quality=95)
            paths.append(relative)
        record = {"id": f"{split}-{task}-{index:06d}", "task": task, "problem": sample.problem,
                  "answer": sample.answer, "images": paths, "meta": sample.meta}
        return record, skips
    return None, skips


def _split_sources(items, seed, eval_share):
    """Disjoint (train, eval) source lists: a seeded shuffle, eval takes its share (at least one when asked)."""
    items = list(items)
    random.Random(f"{seed}:split").shuffle(items)
    if eval_share <= 0 or len(items) < 2:
        return items, []
    count = min(len(items) - 1, max(1, round(len(items) * eval_share)))
    return items[count:], items[:count]


@contextlib.contextmanager
def written_atomically(path):
    """Yield a temporary path beside `path` to write a file or a folder at; when the block ends without an error it
    replaces `path` in one rename, so no reader and no crash ever finds half of it under the real name."""
    path = os.fspath(path)
    temp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    _remove(temp)
    try:
        yield temp
    except BaseException:
        _remove(temp)
        raise
    if os.path.isdir(path):          # a rename replaces a file in one step, not a folder
        shutil.rmtree(path)
    os.replace(temp, path)


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _write_jsonl(path, lines):
    with written_atomically(path) as temp, open(temp, "w", encoding="utf-8") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())


def build_dataset(out, rgb=None, rgbd=None, per_task=1000, eval_per_task=100, tasks=TASKS, seed=0, workers=1,
                  max_side=640, overwrite=False, progress=True, facing_weights=None):
    """Write out/train.jsonl, out/eval.jsonl and out/<task>/*.jpg; return a summary dict.

    Sources: RGB tasks use --rgb images (else the --rgbd images), depth tasks the --rgbd pairs; without inputs,
    scenes rendered at max_side x 3/4 max_side. Eval samples come from source images disjoint from train.
    """
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {TASKS}")
    for flag, folder in (("rgb", rgb), ("rgbd", rgbd)):
        if folder and not os.path.isdir(folder):
            raise ValueError(f"--{flag} {folder}: not a directory")
    if max_side < 4 * MIN_PATCH or per_task < 0 or eval_per_task < 0:
        raise ValueError(f"need max_side >= {4 * MIN_PATCH} and non-negative sample counts")
    out = os.path.abspath(out)
    existing = [name for name in ("train.jsonl", "eval.jsonl") if os.path.exists(os.path.join(out, name))]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset ({', '.join(existing)}); pass overwrite=True "
                              "(--overwrite) to replace it")
    for name in existing:          # drop the old dataset's images so none are left unreferenced
        try:
            old = load_records(out, name.split(".")[0])
        except BadRecord:
            old = []
        for path in (path for record in old for path in record["images"]):
            if os.path.isfile(path):
                os.remove(path)
        os.remove(os.path.join(out, name))
    start = time.time()
    skips = Counter()
    eval_share = eval_per_task / max(per_task + eval_per_task, 1)
    sources = {"train": {"rgb": None, "rgbd": None}, "eval": {"rgb": None, "rgbd": None}}   # None: rendered
    described = {"rgb": "rendered scenes", "rgbd": "rendered scenes"}
    if rgbd:
        pairs, skipped = find_rgbd(rgbd)
        skips.update({f"input: {reason}": count for reason, count in skipped.items()})
        train, held_out = _split_sources(pairs, seed, eval_share)
        sources["train"]["rgbd"], sources["eval"]["rgbd"] = train, held_out
        described["rgbd"] = f"{len(pairs)} RGB-D pairs in {rgbd}"
        if not rgb:
            sources["train"]["rgb"], sources["eval"]["rgb"] = train, held_out
            described["rgb"] = described["rgbd"]
    if rgb:
        images = [(path,) for path in find_images(rgb)]
        train, held_out = _split_sources(images, seed, eval_share)
        sources["train"]["rgb"], sources["eval"]["rgb"] = train, held_out
        described["rgb"] = f"{len(images)} images in {rgb}"
    for split, count in (("train", per_task), ("eval", eval_per_task)):
        for kind in {"rgbd" if TASKS[task].depth else "rgb" for task in tasks}:
            if count and sources[split][kind] == []:
                skips[f"input: no {kind} sources for {split}"] += 1
    roots = {"rgb": os.path.abspath(rgb or rgbd or "."), "rgbd": os.path.abspath(rgbd or ".")}
    context = {"out": out, "seed": seed, "max_side": max_side, "sources": sources, "roots": roots,
               "options": {"position": {"facing_weights": tuple(facing_weights)}} if facing_weights else {}}
    for task in tasks:
        os.makedirs(os.path.join(out, task), exist_ok=True)
    jobs = [(split, task, index) for split, count in (("train", per_task), ("eval", eval_per_task))
            for index in range(count) for task in tasks
            if sources[split]["rgbd" if TASKS[task].depth else "rgb"] != []]
    records = {"train": [], "eval": []}
    counts = {split: Counter() for split in records}
    from tqdm.auto import tqdm   # the same bar as ssrl.py's stages (tqdm comes with transformers)
    bar = tqdm(total=len(jobs), desc="data", unit="sample", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    if workers > 1 and len(jobs) > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, _start_worker, (context,))
        results = pool.imap(_make_sample, jobs, chunksize=4 * len(tasks))
    else:
        pool = None
        _start_worker(context)
        results = map(_make_sample, jobs)
    try:
        for done, ((split, task, _), (record, job_skips)) in enumerate(zip(jobs, results), 1):
            skips.update(job_skips)
            if record is not None:
                records[split].append(json.dumps(record) + "\n")
                counts[split][task] += 1
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    os.makedirs(out, exist_ok=True)
    for split in ("eval", "train"):       # train.jsonl last: its presence marks a finished build
        _write_jsonl(os.path.join(out, f"{split}.jsonl"), records[split])
    seconds = time.time() - start
    total = sum(len(lines) for lines in records.values())
    return {"out": out, "train": dict(counts["train"]), "eval": dict(counts["eval"]),
            "missing": {f"{split}/{task}": (per_task if split == "train" else eval_per_task) - counts[split][task]
                        for split in records for task in tasks
                        if counts[split][task] < (per_task if split == "train" else eval_per_task)},
            "skips": dict(sorted(skips.items())), "sources": described, "samples": total,
            "seconds": round(seconds, 2), "samples_per_s": round(total / max(seconds, 1e-9), 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build a Spatial-SSRL pretext-task dataset (jsonl + images).")
    parser.add_argument("--out", required=True, help="output directory (train.jsonl, eval.jsonl, <task>/*.jpg)")
    parser.add_argument("--rgb", help="folder of RGB images for shuffle/flip/crop (searched recursively)")
    parser.add_argument("--rgbd", help="folder of RGB-D pairs (plain .npy, 16-bit png, DIODE or MegaDepth layout)")
    parser.add_argument("--per-task", type=int, default=1000, help="training samples per task")
    parser.add_argument("--eval-per-task", type=int, default=100, help="eval samples per task (disjoint sources)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks to build")
    parser.add_argument("--seed", type=int, default=0, help="seed; same seed and inputs give the same bytes")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (output does not depend on it)")
    parser.add_argument("--max-side", type=int, default=640, help="longer image side in px (rendered scenes: "
                        "max-side x 3/4 max-side; inputs are downscaled, never upscaled)")
    parser.add_argument("--facing-weights", choices=("paper", "code"), default="paper",
                        help="relative position facing: uniform (paper) or 30/30/30/10 (released Position.py)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    try:
        summary = build_dataset(args.out, args.rgb, args.rgbd, args.per_task, args.eval_per_task, tuple(args.tasks),
                                args.seed, args.workers, args.max_side, args.overwrite, not args.no_progress,
                                FACING_WEIGHTS_CODE if args.facing_weights == "code" else None)
    except (FileExistsError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
