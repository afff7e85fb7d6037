#!/usr/bin/env python3
"""Build the embedded ``KanjiGlyphs`` archive (maintainer script; not used at run time).

The dataset is the Omniglot idea with real typefaces: one class per JIS X 0208 level-1 kanji
(2,965 characters), one sample per distinct font *design*. Classes are split disjointly into
train/val/test by :class:`deepmetric.data.KanjiGlyphs`, so it is a many-class zero-shot retrieval task
that trains on a CPU in minutes and needs no download.

Pipeline
--------
1. ``apt-get install`` the Debian font packages listed in ``shared/spec/kanji_fonts.md``
   (skip with ``--no-install``).
2. Find every face under ``/usr/share/fonts`` (.ttf/.otf/.ttc/.otc, every face of a collection) and map it
   to its Debian package through ``/var/lib/dpkg/info/*.list``.
3. Keep faces whose cmap covers the 2,965 level-1 kanji, allowing ``MAX_MISSING`` (5) gaps (Klee One lacks 牙);
   a class that any kept design lacks is left out of the dataset, so every class has every design.
   Slanted faces (italic/oblique) are dropped: a synthetic shear of an upright design is not a design.
4. Render a probe set of 100 kanji per face and drop faces that draw nothing, draw the ``.notdef``/tofu
   box (rendering equal to that of U+10FFFD, which no font maps) or draw the same image for different
   characters. Faces FreeType cannot rasterise ("invalid opcode" hinting programs) are dropped too.
5. De-duplicate designs by single-linkage grouping on the mean per-character pixel cosine of the probe set,
   visiting faces regular-weight first so the regular weight represents its group:

   * across packages, cosine >= 0.95 means one design re-packaged (Takao and Monapo = IPA, UmePlus = Ume,
     VL Gothic and Ricty = M+/Migu as in MigMix, WenQuanYi Micro Hei = Droid Sans Fallback);
   * inside one package, cosine >= 0.85 means weights or regional forms of one family. At 32 px the pixel
     cosine cannot tell a weight variant from another design of the same genre (Noto Sans CJK JP Regular vs
     Bold: 0.894; Noto Sans Bold vs BIZ UDGothic Bold: 0.893), so the package is the extra evidence. Measured
     inside packages: weights/regions 0.86-0.94 (Noto, BIZ UD, MigMix, YOz, kiloji), different designs
     <= 0.83 (Noto Sans vs Noto Serif), 0.75 (Ume Gothic vs Ume Mincho), 0.43 (Kouzan Sousho vs Gyousho).
6. Render every kanji for every kept design and write ``kanji_glyphs.npz`` (``np.savez_compressed``) and
   ``kanji_glyphs_manifest.json`` (designs with package and license, classes, sha256 of the archive,
   dropped faces with the reason). When archive + manifest would exceed ``--max-mb`` (15 MB), an evenly
   spaced subset of the classes (in JIS order) is kept and their JIS indices are recorded.

Rendering
---------
Glyphs are drawn white-on-black (ink = 255, background = 0, like inverted Omniglot/MNIST, which keeps the
archive sparse and pixel cosine meaningful) at a large size, cropped to the *ink* bounding box, scaled with
preserved aspect ratio to fill ``size - 2 * margin`` pixels on the long side and centred in a square.
Normalising position and scale removes font metrics (baseline, em box, side bearings), so two designs of one
character differ only in their shapes.

Why 32x32: the densest level-1 kanji (響, 襲, 鑑, 鷹: up to ~24 strokes) still show every stroke at 32 px,
about the resolution of Omniglot-style few-shot work (28 px); finer detail (48 px, ``--size 48``) mostly
adds serif shape, not strokes. At 32 px ~2,000 classes x ~30 designs fit the 15 MB budget, and a small CNN
trains on it on a CPU in minutes.

Gray levels are quantised to 16 (4 bit): the difference is invisible at 32 px and the compressed archive is
~40 % smaller, which buys ~700 more classes within the budget.

Deliberate exclusions
---------------------
* ``fonts-kanjistrokeorders`` draws small stroke-order numbers next to every stroke. Those digits are not
  part of the design, clutter a 32 px image, and their count equals the stroke count: a non-visual shortcut
  that leaks class information. Dropped.
* ``fonts-misaki`` is an 8x8 pixel font: its glyphs are hand-made abbreviations with merged or omitted strokes
  (all 2,965 bitmaps are distinct, so it is not label noise, but dense kanji are illegible when blown up to
  32 px). Dropped, so that every sample is a faithful drawing of its character.
* ``fonts-unifont`` (16x16 pixel designs, "Unifont" and the separate Japanese bitmaps of "Unifont-JP") stays:
  16 px resolves every level-1 kanji and the blocky style is a genuinely different domain.
* ``fonts-noto-cjk-extra`` (134 MB) only adds weights (Thin..Black) of the Noto designs already present, and
  ``fonts-hanazono``'s HanaMinB only covers CJK extension B; they add no design.

Requires ``fonttools``, ``pillow`` and ``numpy`` (a throwaway venv is fine); run as root for apt. The build takes
a few minutes (~400 faces are inspected, ~30 designs x 2,965 kanji rendered).

Usage::

    python scripts/build_kanji_glyphs.py [--no-install] [--no-large] [--size 32] [--max-mb 15]
"""

from __future__ import annotations

import argparse
import codecs
import glob
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "deepmetric" / "data" / "assets"
ARCHIVE_NAME = "kanji_glyphs.npz"
MANIFEST_NAME = "kanji_glyphs_manifest.json"

# Verified package names (shared/spec/kanji_fonts.md).
FONT_PACKAGES = [
    "fonts-noto-cjk", "fonts-ipafont-gothic", "fonts-ipafont-mincho", "fonts-ipaexfont-gothic",
    "fonts-ipaexfont-mincho", "fonts-takao-gothic", "fonts-takao-mincho", "fonts-vlgothic",
    "fonts-horai-umefont", "fonts-migmix", "fonts-wqy-zenhei", "fonts-wqy-microhei",
    "fonts-morisawa-bizud-gothic", "fonts-morisawa-bizud-mincho", "fonts-kouzan-mouhitsu",
    "fonts-aoyagi-soseki", "fonts-aoyagi-kouzan-t", "fonts-misaki", "fonts-unifont",
    "fonts-yozvox-yozfont", "fonts-yozvox-yozfont-standard-kana", "fonts-mona", "fonts-monapo",
    "fonts-kiloji", "fonts-seto", "fonts-konatu", "fonts-komatuna", "fonts-dejima-mincho",
    "fonts-yusei-magic", "fonts-train", "fonts-motoya-l-cedar", "fonts-motoya-l-maruberi",
    "fonts-sawarabi-gothic", "fonts-oradano-mincho-gsrr", "fonts-droid-fallback",
    "fonts-babelstone-han", "fonts-umeplus", "fonts-umeplus-cl", "fonts-ricty-diminished",
    "fonts-mmcedar", "fonts-kanjistrokeorders", "fonts-ukij-uyghur",
]
# 20-130 MB each; they add distinct designs (Klee handwriting, LXGW WenKai, Hanazono, IPAmj).
LARGE_FONT_PACKAGES = ["fonts-klee", "fonts-ipamj-mincho", "fonts-lxgw-wenkai", "fonts-hanazono"]
# See "Deliberate exclusions" in the module docstring.
EXCLUDED_PACKAGES = {
    "fonts-kanjistrokeorders": "draws stroke-order numbers on every glyph (non-design clutter that leaks stroke count)",
    "fonts-misaki": "8x8 pixel font: glyphs are abbreviations with merged/omitted strokes, illegible at 32 px",
}

FONT_EXTENSIONS = (".ttf", ".otf", ".ttc", ".otc")
MISSING_CODEPOINT = 0x10FFFD  # never mapped: its rendering is the face's .notdef glyph
DEDUP_COSINE = 0.95  # across packages: re-packaged derivatives (Takao/IPA, UmePlus/Ume, VL Gothic/M+)
DEDUP_COSINE_SAME_PACKAGE = 0.85  # inside one package: weights and regional (JP/SC/TC) variants of a family
MAX_MISSING = 5  # a face may lack this many level-1 kanji; those classes are then left out of the dataset
QUANT_LEVELS = 16  # 4-bit gray: invisible at 32 px, and ~40 % smaller compressed than 256 levels
N_PROBE = 100
RENDER_PX = 96  # font size of the intermediate rendering that is cropped and downscaled


def jis_level1_kanji() -> list[str]:
    """The 2,965 JIS X 0208 level-1 kanji in JIS order (rows 16-47; row 47 has 51 characters).

    Decoding EUC-JP byte pairs (row + 0xA0, cell + 0xA0) with Python's codecs avoids a hand-written table.
    """
    chars: list[str] = []
    for row in range(16, 48):
        for cell in range(1, 95):
            try:
                char = bytes([row + 0xA0, cell + 0xA0]).decode("euc_jp")
            except UnicodeDecodeError:
                continue  # unassigned cells at the end of row 47
            # Cross-check with a second codec (ISO-2022-JP, JIS X 0208 in 7-bit form): a codec quirk must
            # not silently alter the class list.
            jis = b"\x1b$B" + bytes([row + 0x20, cell + 0x20]) + b"\x1b(B"
            if codecs.decode(jis, "iso2022_jp") != char:
                raise RuntimeError(f"EUC-JP and ISO-2022-JP disagree at row {row} cell {cell}")
            chars.append(char)
    if len(chars) != 2965:
        raise RuntimeError(f"expected 2965 JIS X 0208 level-1 kanji, decoded {len(chars)}")
    return chars


# --------------------------------------------------------------------------------------------- discovery


@dataclass
class Face:
    path: str
    index: int
    package: str
    family: str = ""
    style: str = ""
    weight: int = 400
    license: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{os.path.basename(self.path)}#{self.index}"


def apt_install(packages: list[str]) -> None:
    """Install the packages; on a batch failure retry one by one so one bad name does not block the rest."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends"]
    if subprocess.run(cmd + packages, env=env, check=False).returncode == 0:
        return
    for pkg in packages:
        if subprocess.run(cmd + [pkg], env=env, check=False).returncode != 0:
            print(f"warning: apt-get install {pkg} failed; its fonts are skipped", file=sys.stderr)


def font_packages_by_path() -> dict[str, str]:
    """Map installed font file paths (as listed and resolved) to their Debian package."""
    owners: dict[str, str] = {}
    for lst in glob.glob("/var/lib/dpkg/info/*.list"):
        pkg = os.path.basename(lst)[: -len(".list")].split(":")[0]
        with open(lst, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                p = line.strip()
                if p.lower().endswith(FONT_EXTENSIONS):
                    owners.setdefault(p, pkg)
                    owners.setdefault(os.path.realpath(p), pkg)
    return owners


def read_license(package: str) -> str:
    """First ``License:`` field of the package's machine-readable copyright file ('' if none)."""
    path = Path("/usr/share/doc") / package / "copyright"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    m = re.search(r"^License:\s*(.+)$", text, flags=re.MULTILINE)
    return m.group(1).strip() if m else ""


def discover_faces(font_dirs: list[str]) -> list[Face]:
    """Every face (all members of collections) of Debian-packaged font files, deduplicated by real path."""
    from fontTools.ttLib import TTCollection  # maintainer-only dependency

    owners = font_packages_by_path()
    seen: set[str] = set()
    faces: list[Face] = []
    for root in font_dirs:
        for dirpath, _, files in sorted(os.walk(root, followlinks=True)):
            for name in sorted(files):
                if not name.lower().endswith(FONT_EXTENSIONS):
                    continue
                path = os.path.join(dirpath, name)
                real = os.path.realpath(path)
                pkg = owners.get(path) or owners.get(real)
                # Any Debian-packaged face is a candidate (meta packages such as fonts-yozvox-yozfont pull
                # the faces in as dependencies); the cmap check below decides.
                if pkg is None or real in seen:
                    continue
                seen.add(real)
                n = len(TTCollection(real).fonts) if name.lower().endswith((".ttc", ".otc")) else 1
                faces.extend(Face(path=real, index=i, package=pkg) for i in range(n))
    return faces


def inspect_face(face: Face, codepoints: list[int]) -> list[int]:
    """Fill in names/weight; return the codepoints that the face's cmap does not map."""
    from fontTools.ttLib import TTFont

    font = TTFont(face.path, fontNumber=face.index, lazy=True)
    names = font["name"]

    def name(*ids: int) -> str:
        for i in ids:
            rec = names.getDebugName(i)
            if rec:
                return rec
        return ""

    face.family = name(16, 1)  # typographic family first: groups weights under one name
    face.style = name(17, 2)
    if "OS/2" in font:
        face.weight = int(font["OS/2"].usWeightClass)
    cmap = font.getBestCmap() or {}
    return [cp for cp in codepoints if cp not in cmap]


# --------------------------------------------------------------------------------------------- rendering


def render_glyph(font: ImageFont.FreeTypeFont, char: str, size: int, margin: int) -> np.ndarray:
    """White-on-black ``size``x``size`` uint8 image of ``char``: ink bbox scaled to fit, centred."""
    canvas = Image.new("L", (3 * RENDER_PX, 3 * RENDER_PX), 0)
    ImageDraw.Draw(canvas).text((RENDER_PX, RENDER_PX), char, fill=255, font=font)
    bbox = canvas.point(lambda v: 255 if v > 24 else 0).getbbox()  # ignore faint anti-alias fringes
    out = np.zeros((size, size), dtype=np.uint8)
    if bbox is None:
        return out
    glyph = canvas.crop(bbox)
    w, h = glyph.size
    inner = size - 2 * margin
    scale = inner / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    # Box filtering is area averaging: the right anti-aliasing for large downscale factors.
    small = glyph.resize((nw, nh), Image.Resampling.BOX)
    tile = Image.new("L", (size, size), 0)
    tile.paste(small, ((size - nw) // 2, (size - nh) // 2))
    step = 255 / (QUANT_LEVELS - 1)
    out[:] = np.round(np.round(np.asarray(tile) / step) * step).astype(np.uint8)
    return out


def load_font(face: Face) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(face.path, size=RENDER_PX, index=face.index)


def render_chars(face: Face, chars: list[str], size: int, margin: int) -> np.ndarray:
    font = load_font(face)
    return np.stack([render_glyph(font, c, size, margin) for c in chars])


def probe_checks(face: Face, probe: np.ndarray, notdef: np.ndarray) -> str | None:
    """Reason to drop the face based on its probe renderings, or None if it looks like real glyphs."""
    flat = probe.reshape(len(probe), -1)
    n_empty = int((flat.max(axis=1) == 0).sum())
    if n_empty > MAX_MISSING:
        return f"empty glyph for {n_empty} of {len(flat)} probe characters"
    if notdef.any() and (flat == notdef.reshape(1, -1)).all(axis=1).sum() > MAX_MISSING:
        return "draws the .notdef (tofu) glyph for probe characters"
    flat = flat[flat.max(axis=1) > 0]
    distinct = len({row.tobytes() for row in flat})
    if distinct < len(flat):
        return f"identical renderings for different characters ({len(flat) - distinct} collisions in probe set)"
    return None


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over characters of the pixel cosine between two faces' renderings ([n, H, W] each)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).mean())


def is_slanted(face: Face) -> bool:
    style = face.style.lower()
    return any(s in style for s in ("italic", "oblique"))


def preference(face: Face) -> tuple:
    """Sort key: regular weight first (weight closest to 400), packages named in the spec before packages
    pulled in as dependencies, then a stable file order."""
    regular = face.style.lower() in ("regular", "book", "normal", "r", "")
    listed = face.package in FONT_PACKAGES or face.package in LARGE_FONT_PACKAGES
    return (not regular, abs(face.weight - 400), not listed, face.package, face.path, face.index)


# --------------------------------------------------------------------------------------------- main


def contact_sheet(images: np.ndarray, designs: list[str], path: str, n_designs: int = 64, n_chars: int = 12) -> None:
    """Designs as rows, characters as columns, black ink on white for viewing."""
    n_classes, n_total, s, _ = images.shape
    cols = np.linspace(0, n_classes - 1, n_chars).round().astype(int)
    rows = list(range(min(n_designs, n_total)))
    pad = 2
    sheet = np.full((len(rows) * (s + pad), len(cols) * (s + pad)), 255, dtype=np.uint8)
    for r, d in enumerate(rows):
        for c, k in enumerate(cols):
            tile = 255 - images[k, d]
            sheet[r * (s + pad) : r * (s + pad) + s, c * (s + pad) : c * (s + pad) + s] = tile
    Image.fromarray(sheet).resize((sheet.shape[1] * 3, sheet.shape[0] * 3), Image.Resampling.NEAREST).save(path)
    print(f"contact sheet -> {path} (rows: {', '.join(designs[d] for d in rows)})")


def npz_bytes(images: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-install", action="store_true", help="skip apt-get install (fonts already present)")
    ap.add_argument("--no-large", action="store_true", help="ignore the 20-130 MB font packages")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    ap.add_argument("--margin", type=int, default=1, help="blank pixels kept around the glyph (default 1)")
    ap.add_argument("--max-mb", type=float, default=15.0, help="archive + manifest budget in MB (default 15)")
    ap.add_argument("--font-dir", action="append", default=None, help="font root(s), default /usr/share/fonts")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--contact-sheet", default="/tmp/kanji_contact_sheet.png")
    args = ap.parse_args(argv)

    chars = jis_level1_kanji()
    codepoints = [ord(c) for c in chars]
    packages = FONT_PACKAGES + ([] if args.no_large else LARGE_FONT_PACKAGES)
    if not args.no_install:
        apt_install(packages)

    faces = discover_faces(args.font_dir or ["/usr/share/fonts"])
    print(f"{len(faces)} faces in {len({f.package for f in faces})} packages")
    dropped: list[dict] = []

    def drop(face: Face, reason: str) -> None:
        dropped.append({"package": face.package, "file": face.key, "family": face.family, "style": face.style,
                        "reason": reason})

    covering: list[Face] = []
    for face in faces:
        try:
            missing = inspect_face(face, codepoints)
        except Exception as exc:  # noqa: BLE001  (a broken font file must not stop the build)
            drop(face, f"unreadable by fontTools: {exc}")
            continue
        if face.package in EXCLUDED_PACKAGES:
            drop(face, EXCLUDED_PACKAGES[face.package])
        elif len(missing) > MAX_MISSING:
            drop(face, f"cmap lacks {len(missing)} of the 2965 level-1 kanji")
        elif is_slanted(face):
            drop(face, "slanted style: a synthetic shear of an upright design, not a design")
        else:
            covering.append(face)
    print(f"{len(covering)} faces cover the level-1 kanji (at most {MAX_MISSING} missing)")

    # Probe set: evenly spaced in JIS order, so it spans simple and dense characters.
    probe_idx = np.linspace(0, len(chars) - 1, N_PROBE).round().astype(int)
    probe_chars = [chars[i] for i in probe_idx]
    clean: list[tuple[Face, np.ndarray]] = []
    for face in sorted(covering, key=preference):
        try:
            font = load_font(face)
            probe = np.stack([render_glyph(font, c, args.size, args.margin) for c in probe_chars])
            notdef = render_glyph(font, chr(MISSING_CODEPOINT), args.size, args.margin)
        except OSError as exc:  # FreeType rejects some faces' hinting bytecode ("invalid opcode")
            drop(face, f"FreeType cannot render it: {exc}")
            continue
        reason = probe_checks(face, probe, notdef)
        if reason:
            drop(face, reason)
        else:
            clean.append((face, probe))

    # Single-linkage grouping in preference order: a face joins the group of any earlier face it is close to
    # (kept or already grouped), so chains such as Serif SC Bold -> Serif JP Bold -> Serif JP Regular end in
    # one group whose first member (the regular weight) represents it.
    kept: list[tuple[Face, np.ndarray]] = []
    seen_faces: list[tuple[Face, np.ndarray, Face]] = []  # (face, probe, representative)
    for face, probe in clean:
        match = None
        for other, p, rep_face in seen_faces:
            cos = mean_cosine(probe, p)
            threshold = DEDUP_COSINE_SAME_PACKAGE if other.package == face.package else DEDUP_COSINE
            if cos >= threshold:
                match = (cos, other, rep_face)
                break
        if match:
            cos, other, rep_face = match
            drop(face, f"same design as {rep_face.family} {rep_face.style} [{rep_face.package}] "
                       f"(cosine {cos:.3f} with {other.family} {other.style})")
            seen_faces.append((face, probe, rep_face))
        else:
            kept.append((face, probe))
            seen_faces.append((face, probe, face))
    # Stable design order in the archive: by package, then file.
    kept.sort(key=lambda t: (t[0].package, t[0].path, t[0].index))
    designs = [f for f, _ in kept]
    print(f"{len(designs)} distinct designs kept")

    images = np.zeros((len(chars), len(designs), args.size, args.size), dtype=np.uint8)
    final_designs: list[Face] = []
    incomplete: dict[int, list[str]] = {}  # class index -> designs lacking it
    for face in designs:
        imgs = render_chars(face, chars, args.size, args.margin)
        flat = imgs.reshape(len(chars), -1)
        notdef = render_glyph(load_font(face), chr(MISSING_CODEPOINT), args.size, args.margin).reshape(1, -1)
        bad = (flat.max(1) == 0) | ((flat == notdef).all(1) if notdef.any() else False)
        if bad.sum() > MAX_MISSING:
            drop(face, f"full render: {int(bad.sum())} empty or tofu glyphs")
            continue
        for k in np.flatnonzero(bad):
            incomplete.setdefault(int(k), []).append(f"{face.family} {face.style}")
        images[:, len(final_designs)] = imgs
        final_designs.append(face)
        print(f"  rendered {face.family} {face.style} [{face.package}] ({int(bad.sum())} missing)", flush=True)
    images = images[:, : len(final_designs)]
    # Every class must have all designs, so classes some design lacks are left out (recorded in the manifest).
    complete = np.array([k for k in range(len(chars)) if k not in incomplete])

    licenses = {f.package: read_license(f.package) for f in final_designs}

    def manifest_for(class_idx: np.ndarray, blob: bytes) -> dict:
        return {
            "name": "KanjiGlyphs",
            "description": "JIS X 0208 level-1 kanji rendered in distinct Debian-packaged typefaces; "
                           "images[class, design] uint8, ink=255 on background 0, glyph ink bbox scaled to fit "
                           f"and centred, {QUANT_LEVELS} gray levels.",
            "archive": ARCHIVE_NAME,
            "array_key": "images",
            "shape": [len(class_idx), len(final_designs), args.size, args.size],
            "image_size": args.size,
            "margin": args.margin,
            "quant_levels": QUANT_LEVELS,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "num_classes": len(class_idx),
            "num_designs": len(final_designs),
            "class_subset": "all" if len(class_idx) == len(chars) else
                            "evenly spaced in JIS order over the classes that every design covers",
            "classes_left_out_incomplete": {f"U+{ord(chars[k]):04X} {chars[k]}": v for k, v in incomplete.items()},
            "build": {"script": "scripts/build_kanji_glyphs.py", "render_px": RENDER_PX,
                      "dedup_cosine": DEDUP_COSINE, "dedup_cosine_same_package": DEDUP_COSINE_SAME_PACKAGE,
                      "n_probe": N_PROBE, "max_missing": MAX_MISSING},
            "designs": [
                {"index": i, "family": f.family, "style": f.style, "weight": f.weight, "package": f.package,
                 "license": licenses[f.package], "file": os.path.basename(f.path), "face_index": f.index}
                for i, f in enumerate(final_designs)
            ],
            "classes": [
                {"index": i, "jis_index": int(j), "codepoint": f"U+{ord(chars[j]):04X}", "char": chars[j]}
                for i, j in enumerate(class_idx)
            ],
            "dropped_faces": dropped,
        }

    # Fit the size budget (archive + manifest) with an evenly spaced class subset: deterministic, and it spans
    # the JIS order (readings) rather than keeping only the first rows.
    budget = int(args.max_mb * 1e6)
    class_idx = complete
    n = len(complete)
    while True:
        blob = npz_bytes(images[class_idx])
        text = dump_manifest(manifest_for(class_idx, blob))
        total = len(blob) + len(text.encode("utf-8"))
        if total <= budget:
            break
        n = min(n - 1, int(n * budget / total * 0.995))
        class_idx = complete[np.unique(np.linspace(0, len(complete) - 1, n).round().astype(int))]
    if len(class_idx) < len(complete):
        print(f"size budget: kept {len(class_idx)} of {len(complete)} complete classes (evenly spaced)")
    images = images[class_idx]

    args.out_dir.mkdir(parents=True, exist_ok=True)
    archive = args.out_dir / ARCHIVE_NAME
    for path, data in ((archive, blob), (args.out_dir / MANIFEST_NAME, text.encode("utf-8"))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: a half-written file never replaces a good one
    print(f"wrote {archive} ({len(blob) / 1e6:.2f} MB, with manifest {total / 1e6:.2f} MB): "
          f"{images.shape[0]} classes x {images.shape[1]} designs")
    if args.contact_sheet:
        contact_sheet(images, [f"{f.family} {f.style}" for f in final_designs], args.contact_sheet)
    return 0


def dump_manifest(manifest: dict) -> str:
    """JSON with one list element per line: readable and diffable, yet ~3x smaller than ``indent=1``."""
    parts = []
    for key, value in manifest.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            body = ",\n  ".join(json.dumps(v, ensure_ascii=False) for v in value)
            parts.append(f" {json.dumps(key)}: [\n  {body}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"

if __name__ == "__main__":
    sys.exit(main())
