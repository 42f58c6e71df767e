"""Real trained models and real inputs for tests and benchmarks (never committed).

Models come from PyPI packages fetched with ``pip download --no-deps`` into a cache
(``$ONNXSHRINK_CACHE`` or ``~/.cache/onnxshrink``); photos from scikit-image's bundled data;
text-line images rendered with PIL and a DejaVu font (from matplotlib/PIL/system when present).

    from models.real import real_model, photos, text_lines
    path = real_model("yolov8n")                # Path to 320n.onnx
    imgs = photos(32, (320, 320))               # list of HxWx3 uint8 arrays
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("ONNXSHRINK_CACHE", Path.home() / ".cache" / "onnxshrink"))

# name -> (pip requirement, path inside the wheel)
REAL_MODELS = {
    "ppocr_det": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "ppocr_rec": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
    "ppocr_cls": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "yolov8n": ("nudenet==3.4.2", "nudenet/320n.onnx"),
}

# the input each real model is fed in tests and benchmarks: (layout, H, W)
REAL_INPUTS = {
    "ppocr_det": ("text_photo", 640, 640),
    "ppocr_rec": ("text", 48, 320),
    "ppocr_cls": ("text", 48, 192),
    "yolov8n": ("photo", 320, 320),
}


def real_model(name: str) -> Path:
    """Path of a real model, downloading its wheel into the cache on first use."""
    req, member = REAL_MODELS[name]
    out = CACHE / "models" / Path(member).name
    if out.exists():
        return out
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pkg = req.split("==")[0].replace("-", "_")
    found = sorted(glob.glob(str(wheels / f"{pkg}-*.whl")))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), req],
                       check=True, stdout=subprocess.DEVNULL)
        found = sorted(glob.glob(str(wheels / f"{pkg}-*.whl")))
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as z:
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(z.read(member))
        os.replace(tmp, out)
    return out


def _photo_files() -> list[Path]:
    import skimage

    d = Path(skimage.__file__).parent / "data"
    files = []
    for f in sorted(d.glob("*.png")) + sorted(d.glob("*.jpg")):
        try:
            from PIL import Image
            with Image.open(f) as im:
                if min(im.size) >= 64:
                    files.append(f)
        except Exception:
            pass
    return files


def photos(n: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """``n`` RGB uint8 images of ``size`` (H, W): scikit-image's bundled photos, cropped at seeded
    random windows and resized, so more crops than files are still real image content."""
    from PIL import Image

    files = _photo_files()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        f = files[i % len(files)]
        with Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            if i >= len(files):  # a random crop of 60-100% of the picture
                s = rng.uniform(0.6, 1.0)
                cw, ch = int(w * s), int(h * s)
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                im = im.crop((x0, y0, x0 + cw, y0 + ch))
            im = im.resize((size[1], size[0]), Image.BILINEAR)
            out.append(np.asarray(im, dtype=np.uint8))
    return out


def _font_path() -> str | None:
    cands = glob.glob("/usr/share/fonts/**/DejaVuSans*.ttf", recursive=True)
    try:
        import matplotlib
        cands += glob.glob(str(Path(matplotlib.__file__).parent / "mpl-data/fonts/ttf/DejaVuSans*.ttf"))
    except Exception:
        pass
    try:
        import PIL
        cands += glob.glob(str(Path(PIL.__file__).parent / "**/DejaVu*.ttf"), recursive=True)
    except Exception:
        pass
    return sorted(cands)[0] if cands else None


_WORDS = ("onnx shrink model edge phone runtime quantize prune channel tensor invoice total amount date "
          "receipt number street city 2024 12.50 45% price order item quality check ship").split()


def text_lines(n: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """``n`` RGB uint8 images (H, W) of rendered text lines (dark text, light background), some
    rotated 180 degrees (what the PP-OCR direction classifier tells apart)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fp = _font_path()
    h, w = size
    out = []
    for i in range(n):
        words = " ".join(rng.choice(_WORDS, size=int(rng.integers(2, 6))))
        fs = int(h * rng.uniform(0.55, 0.8))
        font = ImageFont.truetype(fp, fs) if fp else ImageFont.load_default()
        bg = tuple(int(v) for v in rng.integers(200, 256, 3))
        fg = tuple(int(v) for v in rng.integers(0, 60, 3))
        im = Image.new("RGB", (w * 2, h), bg)
        ImageDraw.Draw(im).text((int(rng.integers(2, 12)), (h - fs) // 2), words, fill=fg, font=font)
        bbox = im.getbbox() or (0, 0, w, h)
        im = im.crop((0, 0, min(w * 2, max(w, bbox[2] + 8)), h)).resize((w, h), Image.BILINEAR)
        if i % 3 == 2:
            im = im.rotate(180)
        out.append(np.asarray(im, dtype=np.uint8))
    return out


def text_photos(n: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """``n`` RGB uint8 images (H, W): scikit-image photos (as :func:`photos`) with 2-6 rendered
    text lines pasted on each, at random places, sizes and colours (dark on light boxes, or light
    text straight on the photo): what a text detector such as PP-OCR det is fed in practice. A
    photo with no text makes the detector's map almost all zero, a sample no fidelity figure can
    say anything about."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed + 7919)
    fp = _font_path()
    h, w = size
    out = []
    for base in photos(n, size, seed):
        im = Image.fromarray(base)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 7))):
            words = " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 5))))
            fs = int(rng.integers(max(10, h // 40), max(12, h // 12)))
            font = ImageFont.truetype(fp, fs) if fp else ImageFont.load_default()
            x0, y0 = int(rng.integers(0, max(1, w // 2))), int(rng.integers(0, max(1, h - fs - 4)))
            if rng.random() < 0.6:  # a label: dark text on a light box
                tw = int(draw.textlength(words, font=font)) if hasattr(draw, "textlength") else fs * len(words) // 2
                bg = tuple(int(v) for v in rng.integers(190, 256, 3))
                draw.rectangle((x0 - 3, y0 - 3, x0 + tw + 3, y0 + fs + 5), fill=bg)
                fg = tuple(int(v) for v in rng.integers(0, 70, 3))
            else:
                fg = tuple(int(v) for v in rng.integers(200, 256, 3))
            draw.text((x0, y0), words, fill=fg, font=font)
        out.append(np.asarray(im, dtype=np.uint8))
    return out


def preprocess(images: list[np.ndarray], name: str) -> list[np.ndarray]:
    """Each model's own preprocessing, as its package does it: NCHW float32."""
    out = []
    for im in images:
        x = im.astype(np.float32)
        if name == "yolov8n":
            x = x / 255.0
        elif name == "ppocr_det":
            x = (x / 255.0 - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
        else:  # rec and cls: (x/255 - 0.5) / 0.5
            x = (x / 255.0 - 0.5) / 0.5
        out.append(np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32)))
    return out


def real_samples(name: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` preprocessed input dicts for a real model (photos or text lines at its usual size)."""
    import onnx

    kind, h, w = REAL_INPUTS[name]
    make = {"photo": photos, "text": text_lines, "text_photo": text_photos}[kind]
    imgs = make(n, (h, w), seed)
    m = onnx.load(str(real_model(name)), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    in_name = next(i.name for i in m.graph.input if i.name not in inits)
    return [{in_name: x} for x in preprocess(imgs, name)]


def write_samples(samples: list[dict], folder: str | os.PathLike) -> Path:
    """Write samples as .npy (single input) or .npz files into ``folder`` for --calib."""
    p = Path(folder)
    p.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(samples):
        if len(s) == 1:
            np.save(p / f"{i:04d}.npy", next(iter(s.values())))
        else:
            np.savez(p / f"{i:04d}.npz", **s)
    return p
